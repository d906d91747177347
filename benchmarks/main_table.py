"""The paper's main table on one harness: Full, IntraModal, FastV, PyramidDrop, OmniZip, Random, EchoingPixels.

Every cell is one ``ep-kit test`` run (:func:`ep_kit.cli.run`, in process) of an evaluation base
config plus one row overlay (``recipes/[toy/]baselines/<method>_<pct>.yaml``), so every method sees
the same model, data, prompt and budget unit (keep ratio ``r`` over the A/V tokens of each sample).

Columns, per method and budget (20/10/5%):

* ``AV avg``: mean accuracy over the audio-visual groups; ``Video avg``: over the video-only groups.
  Toy scale: the synthetic benchmark's question types -- AV = ``av_saliency``, ``sound_only``,
  ``sync``; video-only = ``temporal_order``, ``picture_only``. Real scale: benchmarks -- AV =
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

Usage (from the repository root)::

    python benchmarks/main_table.py --scale toy
    python benchmarks/main_table.py --scale toy --init-from none --limit 8   # smoke run, random weights

Outputs ``benchmarks/results/main_table_<scale>.md`` and ``.csv`` (with the command line). The
training-free rows need only the pretrained base: at toy scale ``recipes/toy/baselines/base.yaml``
composes the toy recipes' own ``_base`` files (the toy base is built on first use by
``recipes/toy/pretrain.yaml``); at real scale pass ``--base`` (an evaluation config naming the 3B
thinker and the benchmark data). The EchoingPixels row runs the CS2 recipe of each budget
(``recipes/[toy/]cs2_ste_{pct}.yaml``, as a complete config) with its trained weights
(``--echoingpixels-ckpt``, ``{pct}`` = 20/10/5, loaded through ``model.init_from``: the budget on
the command line is the one that runs). At toy scale without ``--echoingpixels-ckpt`` the script
trains each budget's CS2 recipe itself first (``ep-kit fit``, seed ``--seed``, from the same toy
base) and tests the result, so the one command gives the whole table. At real scale a missing
config or checkpoint leaves that row ``n/a`` with the reason in the notes -- never a silently
different model.
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
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]

SCALES = {
    "toy": {
        "base": "recipes/toy/baselines/base.yaml",
        "rows": "recipes/toy/baselines",
        "echoingpixels": "recipes/toy/cs2_ste_{pct}.yaml",
        "av_groups": ["synthetic_av/av_saliency", "synthetic_av/sound_only", "synthetic_av/sync"],
        "video_groups": ["synthetic_av/temporal_order", "synthetic_av/picture_only"],
    },
    "real": {
        "base": None,
        "rows": "recipes/baselines",
        "echoingpixels": "recipes/cs2_ste_{pct}.yaml",
        "av_groups": ["worldsense", "daily_omni", "videomme_av"],
        "video_groups": ["videomme", "mlvu"],
    },
}
METHODS = ("IntraModal", "FastV", "PyramidDrop", "OmniZip", "Random", "EchoingPixels")
FILES = {
    "IntraModal": "intramodal",
    "FastV": "fastv",
    "PyramidDrop": "pyramiddrop",
    "OmniZip": "omnizip",
    "Random": "random",
}


@dataclass
class Cell:
    """One evaluated (method, budget)."""

    method: str
    ratio: float
    metrics: dict[str, float] = field(default_factory=dict)
    note: str = ""

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
    argv, sys.argv = sys.argv, sys.argv[:1]
    try:
        return call(args)
    finally:
        sys.argv = argv


def evaluate(configs: Sequence[Path], overrides: Sequence[str]) -> dict[str, float]:
    """Run ``ep-kit test`` in process and return the logged test metrics."""
    from ep_kit.cli import run

    args = ["test"]
    for c in configs:
        args += ["--config", str(c)]
    cli = _in_process(run, args, overrides, "cell-")
    return {k: float(v) for k, v in cli.trainer.callback_metrics.items() if k.startswith("test/")}


def train_and_test(recipe: Path, seed: int, overrides: Sequence[str]) -> dict[str, float]:
    """Fit a trainable row's recipe (toy scale) and test the fitted weights; returns the test metrics."""
    from ep_kit.cli import fit_then_test

    args = [
        "--config",
        str(recipe),
        f"--seed_everything={seed}",
        f"--trainer.logger.init_args.name=main_table/{recipe.stem}/seed{seed}",
        "--trainer.enable_progress_bar=false",
        "--model.print_metrics=false",
    ]
    metrics = _in_process(fit_then_test, args, overrides, "fit-")
    return {k: v for k, v in metrics.items() if k.startswith("test/")}


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


def write_outputs(
    rows: list[dict[str, str]], out_dir: Path, scale: str, command: str, header: str
) -> tuple[Path, Path]:
    out_dir.mkdir(parents=True, exist_ok=True)
    csv_path, md_path = out_dir / f"main_table_{scale}.csv", out_dir / f"main_table_{scale}.md"
    cols = list(rows[0].keys())
    with csv_path.open("w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=cols)
        w.writeheader()
        w.writerows(rows)
    lines = [
        f"# Main table ({scale} scale)",
        "",
        f"Command: `{command}`  ",
        f"Date: {dt.datetime.now(dt.timezone.utc).strftime('%Y-%m-%d %H:%M UTC')}  ",
        header,
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
    md_path.write_text("\n".join(lines) + "\n")
    return md_path, csv_path


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--scale", choices=sorted(SCALES), default="toy")
    p.add_argument("--base", help="evaluation base config (default: the scale's base)")
    p.add_argument("--ratios", type=float, nargs="+", default=[0.2, 0.1, 0.05])
    p.add_argument("--methods", nargs="+", default=list(METHODS), choices=list(METHODS))
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
    p.add_argument("--out", default="benchmarks/results")
    p.add_argument(
        "--override",
        action="append",
        default=[],
        help="extra ep-kit override, e.g. --override=--trainer.accelerator=gpu",
    )
    args = p.parse_args(argv)
    os.chdir(ROOT)  # the recipes' relative paths (data/, runs/) are relative to the repository root
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

    full = Cell("Full", 1.0, evaluate([base, rows_dir / "full.yaml"], overrides))
    cells: list[Cell] = []
    for method in args.methods:
        for r in args.ratios:
            cell = Cell(method, r)
            extra: list[str] = []
            if method == "EchoingPixels":
                configs = [ROOT / (args.echoingpixels or scale["echoingpixels"]).format(pct=_pct(r))]
                ckpt = args.echoingpixels_ckpt
                if ckpt is None and args.scale == "toy" and configs[0].is_file():
                    cell.metrics = train_and_test(configs[0], args.seed, overrides)
                    cell.note = f"trained here: ep-kit fit --config {configs[0].relative_to(ROOT)} (seed {args.seed})"
                    cells.append(cell)
                    continue
                if ckpt is None:
                    cell.note = f"not run: no trained weights (train with ep-kit fit --config {configs[0].relative_to(ROOT)}, pass --echoingpixels-ckpt)"
                elif not Path(ckpt.format(pct=_pct(r))).exists():
                    cell.note = f"not run: missing checkpoint {ckpt.format(pct=_pct(r))}"
                extra = [f"--model.init_from={ckpt.format(pct=_pct(r))}"] if ckpt else []
            else:
                configs = [base, rows_dir / f"{FILES[method]}_{_pct(r)}.yaml"]
            missing = [str(c) for c in configs if not c.is_file()]
            if missing:
                cell.note = f"not run: missing {', '.join(missing)}"
            if cell.note:
                cells.append(cell)
                continue
            try:
                cell.metrics = evaluate(configs, [*overrides, *extra, f"--model.keep_ratio={r}"])
            except (FileNotFoundError, ValueError) as err:
                cell.note = f"not run: {err}"
            cells.append(cell)
    rows = build_table(cells, full, av_groups, video_groups)
    command = "python " + " ".join(
        shlex.quote(a) for a in ["benchmarks/main_table.py", *(argv if argv is not None else sys.argv[1:])]
    )
    header = (
        f"AV groups: {', '.join(av_groups)}; video-only groups: {', '.join(video_groups)}. "
        "Accuracies in %, relative columns in % of Full. " + " ".join(header_bits)
    )
    md, csv_path = write_outputs(rows, ROOT / args.out, args.scale, command, header)
    print(md.read_text())
    print(f"[main_table] wrote {md} and {csv_path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
