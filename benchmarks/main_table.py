"""The paper's main table on one harness: Full, IntraModal, FastV, PyramidDrop, OmniZip, Random, EchoingPixels.

Every cell is one ``ep-kit test`` run (:func:`ep_kit.cli.run`, in process) of an evaluation base
config plus one row overlay (``recipes/[toy/]baselines/<method>_<pct>.yaml``), so every method sees
the same model, data, prompt and budget unit (keep ratio ``r`` over the A/V tokens of each sample).
The training-free methods are discovered from those files (:func:`baseline_files`): a new
baseline's three recipes add its rows, with no edit here.

Columns, per method and budget (20/10/5%):

* ``AV avg``: mean accuracy over the audio-visual groups; ``Video avg``: over the video-only groups.
  Toy scale: the synthetic benchmark's question types -- AV = ``av_saliency``, ``sound_only``,
  ``sync`` and the probes ``query``, ``binding``, ``quota``; video-only = ``temporal_order``,
  ``picture_only`` and the probes ``order_long``, ``distractor`` (answers on screen). Real scale: benchmarks -- AV =
  WorldSense, Daily-Omni, Video-MME with audio; video-only = Video-MME, MLVU (``--av-groups`` /
  ``--video-groups`` name the metric keys under ``test/acc/``).
* ``AV rel`` / ``Video rel`` / ``Rel``: 100 x the method's average over the Full model's (``Rel``
  uses the mean of the two averages), the paper's "relative to full".
* ``realised``: kept A/V tokens / A/V tokens over the test split after the last reduction (for
  FastV and PyramidDrop: the tokens the last decoder layers see).
* ``layer-avg``: A/V tokens each decoder layer ran on, averaged over the layers, over the A/V
  tokens (logged by the module as ``test/layer_avg_keep_ratio``): PyramidDrop's effective budget,
  and what FastV spends before its drop layer. Equal to ``realised`` for methods that reduce
  before the LLM.

Toy scale also tabulates each cell's accuracy per probe (question type), with a 95% bootstrap interval
over the questions, from the same per-question outcomes as the ablation table
(:data:`ep_kit.probes.PROBES`; ``main_table_toy_probes.csv``).

Usage (from the repository root)::

    python benchmarks/main_table.py --scale toy
    python benchmarks/main_table.py --scale toy --init-from none --limit 8   # smoke run, random weights
    python benchmarks/main_table.py --scale real --paths-train P.yaml --paths-eval E.yaml [--trainer T.yaml]
    python benchmarks/main_table.py --scale real --standin /tmp/standin --quick        # the same, on CPU

Outputs ``main_table_<scale>[_quick].md``, ``.csv`` and ``.png`` (the md names the command line and
the commit; the figure: toy scale accuracy against budget per method, real scale relative-to-full beside
the paper's) into ``--out`` (default ``runs/tables``; ``benchmarks/results`` holds the recorded ones).
``--plot-from TABLE.csv`` redraws the toy figure of a recorded table without evaluating anything::

    python benchmarks/main_table.py --plot-from benchmarks/results/main_table_toy.csv --out benchmarks/results

Toy scale: the training-free rows use ``recipes/toy/baselines/base.yaml`` (the toy base shipped with
the kit, ``ep_kit/assets/toy_base``); without ``--echoingpixels-ckpt`` the script trains each
budget's CS2 recipe itself first (``ep-kit fit``, seed ``--seed``, from the same toy base) and tests
the result, so the one command gives the whole table; a missing config leaves that row ``n/a`` with
the reason in the notes.

Real scale: every cell is a row of :class:`ep_kit.runs.RowRunner` (its own ``ep-kit`` process, so
Lightning launches the GPUs as from a shell; a finished cell is never run again, an interrupted fit
continues from its ``last.ckpt``). Training-free cells test ``recipes/eval_3b.yaml`` (``--base``)
plus the row overlay with the evaluation path overlay; EchoingPixels cells fit
``recipes/cs2_ste_{pct}.yaml`` (10 and 5 on their base ``cs2_ste_20.yaml``, :mod:`ep_kit.recipes`) with the
training path overlay, then test its ``last.ckpt`` on every
benchmark (``recipes/eval_benchmarks.yaml``), or only test ``--echoingpixels-ckpt`` weights. The
benchmark groups come from :data:`ep_kit.data.benchmarks.BENCHMARK_GROUPS`; the paper's numbers
(:data:`PAPER`) stand beside each cell, with its commands, commit, checkpoint and realised budget.
"""

from __future__ import annotations

import argparse
import csv
import datetime as dt
import math
import os
import shlex
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from ep_kit.data.benchmarks import BENCHMARK_GROUPS  # noqa: E402
from ep_kit.recipes import baseline_keys, recipe_configs  # noqa: E402
from ep_kit.runs import RowResult, RowSpec, add_real_scale_arguments, git_commit, real_scale_from_args  # noqa: E402

if TYPE_CHECKING:
    from matplotlib.figure import Figure

SCALES = {
    "toy": {
        "base": "recipes/toy/baselines/base.yaml",
        "rows": "recipes/toy/baselines",
        "echoingpixels": "recipes/toy/cs2_ste_{pct}.yaml",
        # Answers that need the audio (or both streams) / answers on screen (ep_kit/data/synthetic.py).
        "av_groups": [f"synthetic_av/{t}" for t in ("av_saliency", "sound_only", "sync", "query", "binding", "quota")],
        "video_groups": [f"synthetic_av/{t}" for t in ("temporal_order", "picture_only", "order_long", "distractor")],
    },
    "real": {
        "base": "recipes/eval_3b.yaml",
        "rows": "recipes/baselines",
        "echoingpixels": "recipes/cs2_ste_{pct}.yaml",
        # The one definition the readers, the metrics and this table share.
        "av_groups": list(BENCHMARK_GROUPS["audio_visual"]),
        "video_groups": list(BENCHMARK_GROUPS["video_only"]),
    },
}
#: The paper's main table (3B): WorldSense, Daily-Omni, Video-MME with audio, AV avg, Video-MME,
#: MLVU, video avg, relative to full (%); None where the paper reports N/A.
PAPER: dict[tuple[str, int], tuple[float | None, ...]] = {
    ("Full", 100): (45.4, 59.6, 63.1, 56.1, 60.9, 67.2, 64.1, 100.0),
    ("IntraModal", 25): (37.4, 46.2, 52.1, 45.2, 51.4, 63.4, 57.4, 84.2),
    ("FastV", 20): (40.1, 49.9, 51.9, 47.3, 51.8, 56.3, 54.1, 84.6),
    ("PyramidDrop", 20): (39.1, 53.0, 56.2, 49.4, 53.9, 59.7, 56.8, 88.3),
    ("OmniZip", 20): (39.5, 50.6, 57.9, 49.3, None, None, None, 87.9),
    ("EchoingPixels", 20): (45.0, 60.7, 60.7, 55.5, 58.6, 68.3, 63.5, 99.0),
    ("EchoingPixels", 10): (43.5, 57.6, 58.4, 53.2, 55.4, 67.4, 61.4, 95.2),
    ("EchoingPixels", 5): (40.9, 52.9, 55.7, 49.8, 54.7, 66.1, 60.4, 91.0),
}
PAPER_COLUMNS = ("WSen", "D-Om", "VMME_a", "AV avg", "VMME", "MLVU", "Video avg", "Rel")


def baseline_files(rows_dir: Path) -> dict[str, str]:
    """Method name -> file-name key of every training-free method with row recipes ``<key>_<pct>.yaml``.

    The rows are discovered from the recipe files, so a new baseline's recipes add its rows with no
    edit here. The name is the reducer's class (``model.reducer.class_path``, ``RandomReducer`` ->
    ``Random``), or the key when the file names none; the paper's methods come first, in its order.
    """
    import yaml

    found: dict[str, str] = {}
    for key in baseline_keys(rows_dir):
        path = next(p for p in sorted(rows_dir.glob(f"{key}_*.yaml")) if p.stem.rpartition("_")[0] == key)
        model = (yaml.safe_load(path.read_text()) or {}).get("model") or {}
        reducer = model.get("reducer") if isinstance(model, dict) else None
        class_path = reducer.get("class_path", "") if isinstance(reducer, dict) else ""
        name = class_path.rsplit(".", 1)[-1].removesuffix("Reducer") or key
        found[name] = key
    paper_order = list(dict.fromkeys(m for m, _ in PAPER))
    order = [m for m in paper_order if m in found] + sorted(m for m in found if m not in paper_order)
    return {m: found[m] for m in order}


#: The training-free methods of the shipped recipes (real scale), then EchoingPixels.
FILES = baseline_files(ROOT / SCALES["real"]["rows"])
METHODS = (*FILES, "EchoingPixels")


@dataclass
class Cell:
    """One evaluated (method, budget)."""

    method: str
    ratio: float
    metrics: dict[str, float] = field(default_factory=dict)
    note: str = ""
    outcomes: list[Any] = field(default_factory=list)  # per-question (ep_kit.train.metrics.QuestionOutcome)

    def group_avg(self, groups: Sequence[str]) -> float:
        vals = [self.metrics[f"test/acc/{g}"] for g in groups if f"test/acc/{g}" in self.metrics]
        return sum(vals) / len(vals) if vals else float("nan")


def _in_process(call: Callable[[list[str]], Any], args: list[str], overrides: Sequence[str], prefix: str) -> Any:
    """``call(args + overrides)`` with a fresh run directory and ``sys.argv`` holding only the program name.

    A fresh directory per cell keeps one run's saved config.yaml from colliding with another's;
    the argv swap makes the CLI see exactly ``args``, not this script's flags.
    """
    run_dir = ROOT / "runs" / "main_table"
    run_dir.mkdir(parents=True, exist_ok=True)
    args = [*args, f"--trainer.default_root_dir={tempfile.mkdtemp(prefix=prefix, dir=run_dir)}", *overrides]
    from ep_kit.cli import program_argv

    with program_argv():
        return call(args)


def evaluate_run(configs: Sequence[Path], overrides: Sequence[str]) -> tuple[dict[str, float], list[Any]]:
    """Run ``ep-kit test`` in process: the logged test metrics and each question's outcome."""
    from ep_kit.cli import run

    args = ["test"]
    for c in configs:
        args += ["--config", str(c)]
    cli = _in_process(run, args, overrides, "cell-")
    metrics = {k: float(v) for k, v in cli.trainer.callback_metrics.items() if k.startswith("test/")}
    return metrics, list(cli.model.test_outcomes)


def evaluate(configs: Sequence[Path], overrides: Sequence[str]) -> dict[str, float]:
    """Run ``ep-kit test`` in process and return the logged test metrics."""
    return evaluate_run(configs, overrides)[0]


def train_and_test_run(
    configs: Sequence[Path], seed: int, overrides: Sequence[str]
) -> tuple[dict[str, float], list[Any]]:
    """Fit a trainable row's recipe (toy scale; its config files, base first) and test the fitted weights:
    the test metrics and each question's outcome."""
    from ep_kit.cli import fit_then_test_run

    args = [
        *(a for c in configs for a in ("--config", str(c))),
        f"--seed_everything={seed}",
        f"--trainer.logger.init_args.name=main_table/{configs[-1].stem}/seed{seed}",
        "--trainer.enable_progress_bar=false",
        "--model.print_metrics=false",
    ]
    result = _in_process(fit_then_test_run, args, overrides, "fit-")
    return {k: v for k, v in result.metrics.items() if k.startswith("test/")}, result.outcomes


def train_and_test(configs: Sequence[Path], seed: int, overrides: Sequence[str]) -> dict[str, float]:
    """Fit a trainable row's recipe (toy scale; its config files, base first) and test the fitted weights."""
    return train_and_test_run(configs, seed, overrides)[0]


def probe_table(cells: Sequence[Cell]) -> tuple[list[str], list[dict[str, str]]]:
    """Accuracy per probe (question type) of every cell with per-question outcomes, with 95% intervals.

    The same probes as the ablation table (:data:`ep_kit.probes.PROBES`, in that order), from the same
    per-question outcomes (one run per cell: the bootstrap resamples questions). Returns the md lines
    and one csv row per cell.
    """
    import numpy as np

    from ep_kit.probes import PROBES
    from ep_kit.stats import row_accuracy

    done = [c for c in cells if c.outcomes]
    if not done:
        return [], []
    present = {o.category for c in done for o in c.outcomes}
    probes = [p.name for p in PROBES if p.name in present] + sorted(present - {p.name for p in PROBES})
    lines = ["## Accuracy per probe (%) [95% CI]", "",
             "Each probe's questions (the ablation table's probes; `benchmarks/ablation.py` states their hypotheses).",
             "", "| method | budget | " + " | ".join(f"`{p}`" for p in probes) + " |",
             "|---|---|" + "---|" * len(probes)]
    rows = []
    for c in done:
        budget = "100%" if c.method == "Full" else f"{_pct(c.ratio)}%"
        row = {"method": c.method, "budget": budget}
        cells_md = []
        for p in probes:
            correct = np.array([o.correct for o in c.outcomes if o.category == p], dtype=float)
            if correct.size == 0:
                row.update({p: "", f"{p}_ci_low": "", f"{p}_ci_high": ""})
                cells_md.append("n/a")
                continue
            acc = row_accuracy(correct).interval
            row.update({p: f"{acc.estimate:.4f}", f"{p}_ci_low": f"{acc.low:.4f}", f"{p}_ci_high": f"{acc.high:.4f}"})
            cells_md.append(acc.pct())
        lines.append(f"| {c.method} | {budget} | " + " | ".join(cells_md) + " |")
        rows.append(row)
    return lines, rows


def _pct(r: float) -> int:
    return int(round(r * 100))


def _fmt(x: float, digits: int = 1, scale: float = 100.0) -> str:
    return "n/a" if x is None or math.isnan(x) else f"{x * scale:.{digits}f}"


def build_table(
    cells: list[Cell], full: Cell, av_groups: Sequence[str], video_groups: Sequence[str]
) -> list[dict[str, str]]:
    f_av, f_vid = full.group_avg(av_groups), full.group_avg(video_groups)
    rows = []
    for c in [full, *cells]:
        av, vid = c.group_avg(av_groups), c.group_avg(video_groups)
        rel_av = av / f_av if f_av else float("nan")
        rel_vid = vid / f_vid if f_vid else float("nan")
        both = (av + vid) / 2
        rel = both / ((f_av + f_vid) / 2) if (f_av + f_vid) else float("nan")
        rows.append(
            {
                "method": c.method,
                "budget": "100%" if c is full else f"{_pct(c.ratio)}%",
                "AV avg": _fmt(av),
                "Video avg": _fmt(vid),
                "AV rel": _fmt(rel_av),
                "Video rel": _fmt(rel_vid),
                "Rel": _fmt(rel),
                "overall acc": _fmt(c.metrics.get("test/acc", float("nan"))),
                "realised": _fmt(c.metrics.get("test/realised_keep_ratio", float("nan")), 3, 1.0),
                "layer-avg": _fmt(c.metrics.get("test/layer_avg_keep_ratio", float("nan")), 3, 1.0),
                "n": str(int(c.metrics["test/count"])) if "test/count" in c.metrics else "0",
                "note": c.note,
            }
        )
    return rows


def _num(x: str) -> float:
    return float("nan") if x in ("n/a", "") else float(x)


def table_figure(rows: Sequence[dict[str, str]], title: str) -> Figure:
    """Accuracy against budget, one line per method, for the AV and the video-only groups (Full dashed).

    Built on :class:`matplotlib.figure.Figure` directly, so drawing it never selects a backend.
    """
    from matplotlib.figure import Figure

    fig = Figure(figsize=(10, 4))
    axes = fig.subplots(1, 2, sharey=True)
    full = next((r for r in rows if r["budget"] == "100%"), None)
    methods = list(dict.fromkeys(r["method"] for r in rows if r["budget"] != "100%"))
    for ax, column in zip(axes, ("AV avg", "Video avg"), strict=True):
        for method in methods:
            pts = sorted((_num(r["budget"].rstrip("%")), _num(r[column])) for r in rows if r["method"] == method)
            pts = [(x, y) for x, y in pts if not math.isnan(y)]
            if pts:
                ax.plot(*zip(*pts, strict=True), marker="o", label=method)
        if full is not None and not math.isnan(_num(full[column])):
            ax.axhline(_num(full[column]), color="k", ls="--", lw=1, label="Full (100%)")
        ax.set_xscale("log")
        budgets = sorted({_num(r["budget"].rstrip("%")) for r in rows if r["budget"] != "100%"})
        ax.set_xticks(budgets, [f"{b:g}%" for b in budgets])
        ax.minorticks_off()
        ax.set(xlabel="budget: kept A/V tokens (log)", title=column, ylabel="accuracy (%)" if column == "AV avg" else None)
        ax.grid(alpha=0.3)
    axes[1].legend(fontsize=7, loc="best")
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    return fig


def write_outputs(
    rows: list[dict[str, str]],
    out_dir: Path,
    scale: str,
    command: str,
    header: str,
    commit: str,
    probes: tuple[list[str], list[dict[str, str]]] = ([], []),
) -> tuple[Path, Path]:
    """md, csv and figure of the table; ``probes``: :func:`probe_table`'s md lines and rows (``<stem>_probes.csv``)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    csv_path, md_path = out_dir / f"main_table_{scale}.csv", out_dir / f"main_table_{scale}.md"
    png_path = out_dir / f"main_table_{scale}.png"
    cols = list(rows[0].keys())
    with csv_path.open("w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=cols)
        w.writeheader()
        w.writerows(rows)
    lines = [
        f"# Main table ({scale} scale)",
        "",
        f"Command: `{command}`  ",
        f"Commit: `{commit}`  ",
        f"Date: {dt.datetime.now(dt.timezone.utc).strftime('%Y-%m-%d %H:%M UTC')}  ",
        header,
        "",
        f"![accuracy against budget]({png_path.name})",
        "",
        "| " + " | ".join(c for c in cols if c != "note") + " |",
        "|" + "---|" * (len(cols) - 1),
    ]
    notes = []
    for r in rows:
        lines.append("| " + " | ".join(r[c] for c in cols if c != "note") + " |")
        if r["note"]:
            notes.append(f"- {r['method']} {r['budget']}: {r['note']}")
    if notes:
        lines += ["", "Notes:", *notes]
    probe_lines, probe_rows = probes
    if probe_rows:
        lines += ["", *probe_lines]
        with (out_dir / f"main_table_{scale}_probes.csv").open("w", newline="") as fh:
            w = csv.DictWriter(fh, fieldnames=list(probe_rows[0]))
            w.writeheader()
            w.writerows(probe_rows)
    md_path.write_text("\n".join(lines) + "\n")
    table_figure(rows, f"Main table ({scale} scale), commit {commit}").savefig(png_path, dpi=120)
    return md_path, csv_path


def plot_from(csv_path: Path, out_dir: Path) -> Path:
    """Redraw the figure of a recorded table (``<stem>.png`` in ``out_dir``) from its csv; evaluates nothing."""
    if not csv_path.is_file():
        raise FileNotFoundError(f"--plot-from: {csv_path} does not exist")
    with csv_path.open(newline="") as fh:
        rows = list(csv.DictReader(fh))
    missing = {"method", "budget", "AV avg", "Video avg"} - set(rows[0] if rows else {})
    if missing:
        raise ValueError(f"--plot-from: {csv_path} has no column(s) {sorted(missing)} (not a main-table csv?)")
    out_dir.mkdir(parents=True, exist_ok=True)
    png = out_dir / f"{csv_path.stem}.png"
    table_figure(rows, f"{csv_path.name} (redrawn from the csv)").savefig(png, dpi=120)
    return png


# ------------------------------------------------------------------------------ real scale
REAL_COLUMNS = ("worldsense", "daily_omni", "videomme", "videomme_noaudio", "mlvu")


def real_specs(args: Any, scale: Any) -> list[tuple[str, float, RowSpec]]:
    """(method, ratio, row) of the whole table: Full, the training-free overlays, EchoingPixels (fit + test)."""
    base = ROOT / (args.base or SCALES["real"]["base"])
    rows_dir = ROOT / SCALES["real"]["rows"]
    files = args.baselines
    specs = [("Full", 1.0, scale.evaluation_row("full", base, rows_dir / "full.yaml"))]
    for method in args.methods:
        for r in args.ratios:
            pct = _pct(r)
            if method != "EchoingPixels":
                key = f"{files[method]}_{pct}"
                specs.append((method, r, scale.evaluation_row(key, base, rows_dir / f"{key}.yaml")))
                continue
            recipe = ROOT / (args.echoingpixels or SCALES["real"]["echoingpixels"]).format(pct=pct)
            spec = scale.trained_row(f"echoingpixels_{pct}", recipe, args.seed, f"--model.keep_ratio={r}")
            if args.echoingpixels_ckpt:  # weights trained elsewhere: evaluate only
                spec = RowSpec(spec.key, test=[*spec.test, f"--model.init_from={args.echoingpixels_ckpt.format(pct=pct)}"])
            specs.append((method, r, spec))
    return specs


def _paper(method: str, ratio: float) -> tuple[float | None, ...] | None:
    return PAPER.get((method, 100 if method == "Full" else _pct(ratio)))


def real_table(done: list[tuple[str, float, RowResult]]) -> list[dict[str, str]]:
    """One row per cell: accuracy per benchmark and group, relative to Full, the paper's, budgets."""
    full = next(res.metrics for m, _, res in done if m == "Full")

    def avg(metrics: dict[str, float]) -> float:
        av, vid = metrics.get("test/acc_group/audio_visual"), metrics.get("test/acc_group/video_only")
        return float("nan") if av is None or vid is None else (av + vid) / 2

    rows = []
    for method, ratio, res in done:
        m = res.metrics
        paper = _paper(method, ratio)
        row = {"method": method, "budget": "100%" if method == "Full" else f"{_pct(ratio)}%"}
        row.update({c: _fmt(m.get(f"test/acc/{c}", float("nan"))) for c in REAL_COLUMNS})
        row["AV avg"] = _fmt(m.get("test/acc_group/audio_visual", float("nan")))
        row["Video avg"] = _fmt(m.get("test/acc_group/video_only", float("nan")))
        row["Rel"] = _fmt(avg(m) / avg(full) if avg(full) else float("nan"))
        row["paper AV avg"] = "n/a" if not paper or paper[3] is None else f"{paper[3]:.1f}"
        row["paper Video avg"] = "n/a" if not paper or paper[6] is None else f"{paper[6]:.1f}"
        row["paper Rel"] = "n/a" if not paper else f"{paper[7]:.1f}"
        row["realised"] = _fmt(m.get("test/realised_keep_ratio", float("nan")), 3, 1.0)
        row["layer-avg"] = _fmt(m.get("test/layer_avg_keep_ratio", float("nan")), 3, 1.0)
        row["n"] = str(int(m.get("test/count", 0)))
        row["checkpoint"] = res.checkpoint or "-"
        row["commit"] = res.commit
        row["commands"] = " && ".join(res.commands)
        rows.append(row)
    return rows


def plot_real(rows: list[dict[str, str]], path: Path) -> None:
    """Relative-to-full of each cell beside the paper's, where the paper reports one."""
    from matplotlib.figure import Figure

    labels = [f"{r['method']} {r['budget']}" for r in rows]
    x = range(len(rows))
    fig = Figure(figsize=(max(8, 0.5 * len(rows)), 4.5))
    ax = fig.subplots()
    ax.bar([i - 0.2 for i in x], [_num(r["Rel"]) for r in rows], width=0.4, label="this run")
    ax.bar([i + 0.2 for i in x], [_num(r["paper Rel"]) for r in rows], width=0.4, label="paper (3B)")
    ax.set_ylabel("relative to Full (%)")
    ax.set_xticks(list(x))
    ax.set_xticklabels(labels, rotation=45, ha="right", fontsize=8)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def run_real(args: Any, command: str) -> Path:
    """Every cell through the resumable runner, then md + csv + png into ``--out``."""
    start = time.time()
    out = (ROOT / args.out).resolve()
    stem = "main_table_real" + ("_quick" if args.quick else "")
    scale = real_scale_from_args(args, out / stem, args.quick)
    done = []
    for method, ratio, spec in real_specs(args, scale):
        result = scale.runner.run(spec)
        done.append((method, ratio, result))
        print(f"[main_table] {method} {_pct(ratio)}%: acc {result.metrics.get('test/acc', float('nan')):.4f}"
              + (" (finished before)" if result.resumed else ""), flush=True)
    rows = real_table(done)
    out.mkdir(parents=True, exist_ok=True)
    with (out / f"{stem}.csv").open("w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    shown = [c for c in rows[0] if c not in ("checkpoint", "commit", "commands")]
    lines = [
        "# Main table (real scale)" + (" -- quick run: 2 training steps per EchoingPixels row" if args.quick else ""),
        "",
        f"Command: `{command}`  ",
        f"Commit: `{git_commit(ROOT)}`; data: {scale.source}; wall time {(time.time() - start) / 60:.1f} min  ",
        "Accuracy (%) per benchmark (Video-MME with audio = videomme, without = videomme_noaudio); AV avg = "
        f"mean of {', '.join(BENCHMARK_GROUPS['audio_visual'])}; Video avg = mean of "
        f"{', '.join(BENCHMARK_GROUPS['video_only'])}; Rel = mean of the two over Full's. Paper columns: "
        "Qwen2.5-Omni-3B as published (IntraModal at 25% there).",
        "",
        "| " + " | ".join(shown) + " |",
        "|" + "---|" * len(shown),
        *["| " + " | ".join(r[c] for c in shown) + " |" for r in rows],
        "",
        "## Runs",
        "",
    ]
    for r in rows:
        lines.append(f"- **{r['method']} {r['budget']}** (commit `{r['commit']}`, checkpoint `{r['checkpoint']}`)")
        lines += [f"  - `{c}`" for c in r["commands"].split(" && ")]
    md = out / f"{stem}.md"
    md.write_text("\n".join(lines) + "\n")
    plot_real(rows, out / f"{stem}.png")
    return md


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--scale", choices=sorted(SCALES), default="toy")
    p.add_argument("--base", help="evaluation base config (default: the scale's base)")
    p.add_argument("--ratios", type=float, nargs="+", default=[0.2, 0.1, 0.05])
    p.add_argument("--methods", nargs="+", default=None,
                   help=f"rows to run (default all: {', '.join(METHODS)}); training-free ones are discovered "
                        "from recipes/[toy/]baselines/<method>_<pct>.yaml")
    p.add_argument(
        "--init-from",
        help="toy base directory for model.thinker.init_args.init_from ('none' = random weights)",
    )
    p.add_argument("--echoingpixels", help="EchoingPixels recipe template ('{pct}' = 20/10/5)")
    p.add_argument("--echoingpixels-ckpt", help="trained EchoingPixels weights template ('{pct}' = 20/10/5)")
    p.add_argument("--seed", type=int, default=0, help="toy: seed of the EchoingPixels rows trained here")
    p.add_argument("--limit", type=int, help="toy: number of synthetic test questions (smoke runs)")
    p.add_argument("--av-groups", nargs="+")
    p.add_argument("--video-groups", nargs="+")
    p.add_argument("--out", default="runs/tables",
                   help="where the table goes (default runs/tables; benchmarks/results holds the recorded ones)")
    p.add_argument("--quick", action="store_true", help="real: 2 training steps per EchoingPixels row")
    p.add_argument("--plot-from", type=Path, metavar="TABLE.csv",
                   help="only redraw the toy figure of a recorded table's csv into --out (evaluates nothing)")
    add_real_scale_arguments(p)
    p.add_argument(
        "--override",
        action="append",
        default=[],
        help="extra ep-kit override, e.g. --override=--trainer.accelerator=gpu",
    )
    args = p.parse_args(argv)
    args.baselines = baseline_files(ROOT / SCALES[args.scale]["rows"])  # method -> file key, found once
    available = (*args.baselines, "EchoingPixels")
    args.methods = list(available) if args.methods is None else args.methods
    unknown = [m for m in args.methods if m not in available]
    if unknown:
        p.error(f"--methods: unknown {unknown}; the {args.scale} recipes have {list(available)}")
    if args.plot_from is not None:
        print(f"[main_table] wrote {plot_from(args.plot_from.resolve(), (ROOT / args.out).resolve())}")
        return 0
    os.chdir(ROOT)  # the recipes' relative paths (data/, runs/) are relative to the repository root
    command = "python " + " ".join(
        shlex.quote(a) for a in ["benchmarks/main_table.py", *(argv if argv is not None else sys.argv[1:])]
    )
    if args.scale == "real":
        md = run_real(args, command)
        print(md.read_text())
        return 0
    scale = SCALES[args.scale]
    if not (args.base or scale["base"]):
        raise ValueError(f"--base: the {args.scale} scale has no default evaluation base; pass one")
    base = ROOT / (args.base or scale["base"])
    if not base.is_file():
        raise FileNotFoundError(f"--base: evaluation base config {base} does not exist")
    overrides = list(args.override)
    header_bits = []
    if args.init_from is not None:
        value = "null" if args.init_from.lower() == "none" else args.init_from
        overrides.append(f"--model.thinker.init_args.init_from={value}")
        if value == "null":
            header_bits.append("**Random-weight thinker (smoke run): the accuracies are meaningless.**")
    if args.limit is not None:
        overrides += [f"--data.init_args.source.init_args.num_test={args.limit}"]
    av_groups = args.av_groups or scale["av_groups"]
    video_groups = args.video_groups or scale["video_groups"]
    rows_dir = ROOT / scale["rows"]
    files = args.baselines

    full_metrics, full_outcomes = evaluate_run([base, rows_dir / "full.yaml"], overrides)
    full = Cell("Full", 1.0, full_metrics, outcomes=full_outcomes)
    cells: list[Cell] = []
    for method in args.methods:
        for r in args.ratios:
            cell = Cell(method, r)
            extra: list[str] = []
            if method == "EchoingPixels":
                configs = recipe_configs(ROOT / (args.echoingpixels or scale["echoingpixels"]).format(pct=_pct(r)))
                fit_cmd = "ep-kit fit " + " ".join(f"--config {c.relative_to(ROOT)}" for c in configs)
                ckpt = args.echoingpixels_ckpt
                if ckpt is None and args.scale == "toy" and all(c.is_file() for c in configs):
                    cell.metrics, cell.outcomes = train_and_test_run(configs, args.seed, overrides)
                    cell.note = f"trained here: {fit_cmd} (seed {args.seed})"
                    cells.append(cell)
                    continue
                if ckpt is None:
                    cell.note = f"not run: no trained weights (train with {fit_cmd}, pass --echoingpixels-ckpt)"
                elif not Path(ckpt.format(pct=_pct(r))).exists():
                    cell.note = f"not run: missing checkpoint {ckpt.format(pct=_pct(r))}"
                extra = [f"--model.init_from={ckpt.format(pct=_pct(r))}"] if ckpt else []
            else:
                configs = [base, rows_dir / f"{files[method]}_{_pct(r)}.yaml"]
            missing = [str(c) for c in configs if not c.is_file()]
            if missing:
                cell.note = f"not run: missing {', '.join(missing)}"
            if cell.note:
                cells.append(cell)
                continue
            try:
                cell.metrics, cell.outcomes = evaluate_run(configs, [*overrides, *extra, f"--model.keep_ratio={r}"])
            except (FileNotFoundError, ValueError) as err:
                cell.note = f"not run: {err}"
            cells.append(cell)
    rows = build_table(cells, full, av_groups, video_groups)
    header = (
        f"AV groups: {', '.join(av_groups)}; video-only groups: {', '.join(video_groups)}. "
        "Accuracies in %, relative columns in % of Full. " + " ".join(header_bits)
    )
    md, csv_path = write_outputs(rows, ROOT / args.out, args.scale, command, header, git_commit(ROOT),
                                 probe_table([full, *cells]))
    print(md.read_text())
    print(f"[main_table] wrote {md}, {csv_path} and {md.with_suffix('.png')}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
