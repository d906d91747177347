"""The paper's CS2 ablation table (Daily-Omni, 20% budget), in one command, at toy or real scale.

    python benchmarks/ablation.py --scale toy [--quick] [--seeds 3]
    python benchmarks/ablation.py --scale real --paths-train P.yaml --paths-eval E.yaml \
        [--model DIR] [--trainer T.yaml] [--eval-trainer V.yaml] [--launch "srun ep-kit"]
    python benchmarks/ablation.py --scale real --standin /tmp/standin --quick   # the same, on CPU

Every row is a recipe (one component swapped per row): the full method is ``cs2_ste_20.yaml`` and each
ablation row an overlay on it, run as ``--config cs2_ste_20.yaml --config <row>.yaml``
(:func:`ep_kit.recipes.config_args`). Toy scale: ``recipes/toy/``, trained from the
toy base shipped with the kit (``ep_kit/assets/toy_base``) and tested on the synthetic benchmark's
test split, for each seed, in this process (``ep_kit.cli.fit_then_test``). Real scale: ``recipes/<row>.yaml`` on its base is fitted (``ep-kit fit`` with the
training path overlay and trainer file), then its last checkpoint is tested on every benchmark
(``recipes/eval_benchmarks.yaml`` with the evaluation path overlay) through
:class:`ep_kit.runs.RowRunner`: a finished row is never run again, an interrupted fit continues from
its ``last.ckpt``. Writes ``ablation_<scale>[_quick].md`` (table with the paper's numbers beside it,
the command, the commit, which of the paper's orderings hold; at real scale each row's commands,
commit and checkpoint), ``.csv`` and ``.png`` into ``--out`` (default ``runs/tables``: the committed
results in ``benchmarks/results/`` are only rewritten when you ask for it with ``--out``).

The encoders are frozen in every row, so all rows (and seeds) of one table run share one on-disk
cache of their outputs (:class:`ep_kit.models.feature_cache.EncoderFeatureCache`, per clip, keyed by
the processed media and the encoder weights): only the first row pays for the audio and vision
towers. It lives in ``<out>/feature_cache`` (``<out>/ablation_real[_quick]/feature_cache`` at real
scale); ``--no-feature-cache`` runs the encoders on every batch instead.
"""

from __future__ import annotations

import argparse
import csv
import itertools
import statistics
import sys
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
#: paper order (Table: Daily-Omni, 20% budget) and the paper's accuracies.
ROWS: list[tuple[str, str, float]] = [
    ("ablation_causal", "Causal attention", 56.06),
    ("ablation_intramodal", "Intra-modal attention", 57.73),
    ("ablation_no_prefusion", "w/o pre-fusion", 57.39),
    ("ablation_per_modality", "Per-modality Top-K", 58.23),
    ("ablation_similarity", "Similarity heuristic", 41.85),
    ("ablation_gumbel", "Gumbel-Softmax", 59.06),
    ("ablation_no_syncrope", "w/o Sync-RoPE", 57.98),
    ("cs2_ste_20", "EchoingPixels (full)", 60.65),
]


def commit() -> str:
    from ep_kit.runs import git_commit

    return git_commit(REPO)


def feature_cache_args(root: Path | None) -> list[str]:
    """``ep-kit`` arguments that give the model an encoder-feature cache at ``root`` (none for None)."""
    if root is None:
        return []
    return [
        "--model.feature_cache=ep_kit.models.feature_cache.EncoderFeatureCache",
        f"--model.feature_cache.root={root}",
    ]


def run_row(recipe: Path, seed: int, quick: bool, feature_cache: Path | None = None) -> dict[str, float]:
    """Fit one row (an ablation overlay on its base) for one seed and test it; returns the test metrics.

    ``feature_cache``: directory of the encoder-feature cache every row shares (None: no cache).
    """
    from ep_kit.cli import fit_then_test
    from ep_kit.recipes import config_args

    args = [
        *config_args(recipe),
        f"--seed_everything={seed}",
        f"--trainer.logger.init_args.name=ablation/{recipe.stem}/seed{seed}",
        "--trainer.enable_progress_bar=false",
        "--model.print_metrics=false",
        *feature_cache_args(feature_cache),
    ]
    if quick:
        args += ["--trainer.max_epochs=1", "--trainer.limit_train_batches=6", "--trainer.limit_val_batches=1"]
    return fit_then_test(args)


def ordering_notes(means: dict[str, float], scale: str = "toy") -> list[str]:
    """Which pairwise orderings of the paper's rows the table reproduces."""
    paper = {r: p for r, _, p in ROWS}
    names = {r: n for r, n, _ in ROWS}
    agree, disagree, tied = [], [], []
    for a, b in itertools.combinations([r for r, _, _ in ROWS], 2):
        if paper[a] == paper[b] or a not in means or b not in means:
            continue
        hi, lo = (a, b) if paper[a] > paper[b] else (b, a)
        pair = f"{names[hi]} > {names[lo]}"
        if abs(means[hi] - means[lo]) < 1e-9:
            tied.append(pair)
        else:
            (agree if means[hi] > means[lo] else disagree).append(pair)
    full = "cs2_ste_20"
    total = len(agree) + len(disagree) + len(tied)
    lines = [
        f"- {len(agree)} of {total} pairwise orderings of the paper hold at {scale} scale, {len(disagree)} are "
        f"reversed, {len(tied)} are tied."
    ]
    if full in means:
        beaten = [names[r] for r, _, _ in ROWS if r != full and r in means and means[r] >= means[full]]
        lines.append(
            "- The full method is strictly the best row, as in the paper."
            if not beaten
            else f"- Unlike the paper, the full method does not strictly beat: {', '.join(beaten)}."
        )
    sim = "ablation_similarity"
    if sim in means:
        worst = [names[r] for r in means if means[r] <= means[sim] and r != sim]
        lines.append(
            "- The similarity heuristic is strictly the worst row, as in the paper."
            if not worst
            else f"- Unlike the paper, the similarity heuristic is not strictly the worst row (as low or lower: "
            f"{', '.join(worst)})."
        )
    lines.append("- Reproduced: " + ("; ".join(agree) if agree else "none"))
    lines.append("- Reversed: " + ("; ".join(disagree) if disagree else "none"))
    lines.append("- Tied: " + ("; ".join(tied) if tied else "none"))
    return lines


def write_outputs(out_dir: Path, scale: str, table: list[dict], command: str, elapsed: float, quick: bool) -> Path:
    out_dir.mkdir(parents=True, exist_ok=True)
    stem = f"ablation_{scale}" + ("_quick" if quick else "")
    csv_path = out_dir / f"{stem}.csv"
    seeds = max(len(r["accs"]) for r in table)
    with csv_path.open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["row", "recipe", "paper_daily_omni", "mean_acc", "std_acc", "realised_keep_ratio",
                         "audio_share", *[f"seed_{i}" for i in range(seeds)]])
        for r in table:
            writer.writerow([r["name"], r["recipe"], r["paper"], f"{r['mean']:.4f}", f"{r['std']:.4f}",
                             f"{r['keep']:.4f}", f"{r['audio']:.4f}", *[f"{a:.4f}" for a in r["accs"]]])
    means = {r["recipe"]: r["mean"] for r in table}
    lines = [
        f"# CS2 ablation at {scale} scale" + (" (quick smoke run)" if quick else ""),
        "",
        f"Command: `{command}`  ",
        f"Commit: `{commit()}`  ",
        f"Wall time: {elapsed / 60:.1f} min; seeds per row: {seeds}; toy accuracy = synthetic benchmark test split "
        "(chance 25%); paper = Daily-Omni accuracy of Qwen2.5-Omni-3B at a 20% budget.",
        *(
            ["", "Smoke run: each row trains 6 batches from the shipped toy base, so the accuracies say little; "
             "it checks that every row trains, evaluates and is tabulated."]
            if quick
            else []
        ),
        "",
        "| Row (paper order) | Paper (%) | Toy accuracy (mean +- std, %) | Realised keep ratio | Audio share of kept |",
        "| --- | ---: | ---: | ---: | ---: |",
    ]
    for r in table:
        lines.append(
            f"| {r['name']} | {r['paper']:.2f} | {100 * r['mean']:.1f} +- {100 * r['std']:.1f} | "
            f"{r['keep']:.3f} | {r['audio']:.3f} |"
        )
    lines += ["", "## Orderings", "", *ordering_notes(means), ""]
    md_path = out_dir / f"{stem}.md"
    md_path.write_text("\n".join(lines))
    plot(out_dir / f"{stem}.png", table)
    return md_path


def real_rows(rows: list[tuple[str, str, float]], seeds: int, scale: Any) -> list[dict]:
    """Fit then test every row and seed through the resumable runner; one table entry per row."""
    table = []
    for recipe, name, paper in rows:
        path = REPO / "recipes" / f"{recipe}.yaml"
        results = []
        for seed in range(seeds):
            results.append(scale.runner.run(scale.trained_row(f"{recipe}-seed{seed}", path, seed)))
            m = results[-1].metrics
            print(f"[ablation] {recipe} seed {seed}: Daily-Omni {m.get('test/acc/daily_omni', float('nan')):.4f} "
                  f"(realised keep {m['test/realised_keep_ratio']:.3f}){' (finished before)' if results[-1].resumed else ''}",
                  flush=True)
        def mean(key: str, runs: list = results) -> float:
            return statistics.fmean(r.metrics.get(key, float("nan")) for r in runs)

        accs = [r.metrics.get("test/acc/daily_omni", float("nan")) for r in results]
        table.append({
            "recipe": recipe, "name": name, "paper": paper, "accs": accs, "mean": statistics.fmean(accs),
            "std": statistics.pstdev(accs) if len(accs) > 1 else 0.0, "keep": mean("test/realised_keep_ratio"),
            "audio": mean("test/audio_share"), "av": mean("test/acc_group/audio_visual"),
            "video": mean("test/acc_group/video_only"), "overall": mean("test/acc"), "runs": results,
        })
    return table


def write_real_outputs(out_dir: Path, table: list[dict], command: str, elapsed: float, quick: bool, source: str) -> Path:
    """The real-scale table: Daily-Omni beside the paper, the group averages, budgets, and how each row ran."""
    out_dir.mkdir(parents=True, exist_ok=True)
    stem = "ablation_real" + ("_quick" if quick else "")
    seeds = max(len(r["accs"]) for r in table)
    with (out_dir / f"{stem}.csv").open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["row", "recipe", "paper_daily_omni", "daily_omni_mean", "daily_omni_std", "av_avg", "video_avg",
                    "overall", "realised_keep_ratio", "audio_share", "seed", "checkpoint", "commit", "commands"])
        for r in table:
            for seed, run in enumerate(r["runs"]):
                w.writerow([r["name"], r["recipe"], r["paper"], f"{r['mean']:.4f}", f"{r['std']:.4f}",
                            f"{r['av']:.4f}", f"{r['video']:.4f}", f"{r['overall']:.4f}", f"{r['keep']:.4f}",
                            f"{r['audio']:.4f}", seed, run.checkpoint, run.commit, " && ".join(run.commands)])
    lines = [
        "# CS2 ablation at real scale" + (" (quick run: 2 training steps per row)" if quick else ""),
        "",
        f"Command: `{command}`  ",
        f"Commit: `{commit()}`; data: {source}  ",
        f"Wall time: {elapsed / 60:.1f} min; seeds per row: {seeds}. Daily-Omni accuracy beside the paper's "
        "(Qwen2.5-Omni-3B, 20% budget); AV / video averages are the main table's groups.",
        "",
        "| Row (paper order) | Paper Daily-Omni (%) | Daily-Omni (%) | AV avg (%) | Video avg (%) | Realised keep ratio "
        "| Audio share of kept |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for r in table:
        lines.append(f"| {r['name']} | {r['paper']:.2f} | {100 * r['mean']:.1f} +- {100 * r['std']:.1f} | "
                     f"{100 * r['av']:.1f} | {100 * r['video']:.1f} | {r['keep']:.3f} | {r['audio']:.3f} |")
    lines += ["", "## Orderings", "", *ordering_notes({r["recipe"]: r["mean"] for r in table}, "real"), "", "## Runs", ""]
    for r in table:
        for seed, run in enumerate(r["runs"]):
            lines.append(f"- **{r['name']}** (seed {seed}, commit `{run.commit}`, {run.seconds / 60:.1f} min, "
                         f"checkpoint `{run.checkpoint}`)")
            lines += [f"  - `{c}`" for c in run.commands]
    md = out_dir / f"{stem}.md"
    md.write_text("\n".join(lines) + "\n")
    plot(out_dir / f"{stem}.png", table, title=f"Real scale ({source}): Daily-Omni, mean +- std over seeds")
    return md


def plot(path: Path, table: list[dict], title: str = "Toy (synthetic benchmark), mean +- std over seeds") -> None:
    from matplotlib.figure import Figure  # drawn without pyplot: plotting never selects a backend

    names = [r["name"] for r in table]
    x = range(len(table))
    fig = Figure(figsize=(12, 4.5))
    ax1, ax2 = fig.subplots(1, 2, sharey=False)
    ax1.bar(x, [100 * r["mean"] for r in table], yerr=[100 * r["std"] for r in table], capsize=4, color="tab:blue")
    ax1.axhline(25, color="grey", ls="--", lw=0.8, label="chance")
    ax1.set_title(title)
    ax1.set_ylabel("accuracy (%)")
    ax1.legend(fontsize=8)
    ax2.bar(x, [r["paper"] for r in table], color="tab:orange")
    ax2.set_title("Paper (Daily-Omni, 3B, 20%)")
    ax2.set_ylim(35, 65)
    for ax in (ax1, ax2):
        ax.set_xticks(list(x))
        ax.set_xticklabels(names, rotation=35, ha="right", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main(argv: list[str] | None = None) -> Path:
    from ep_kit.runs import add_real_scale_arguments, real_scale_from_args

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--scale", choices=["toy", "real"], default="toy")
    parser.add_argument("--quick", action="store_true", help="smoke run: toy 1 short epoch per row; "
                        "real 2 training steps per row")
    parser.add_argument("--seeds", type=int, default=None, help="seeds per row (default: toy 3, quick and real 1)")
    parser.add_argument("--rows", nargs="*", default=None, help="subset of recipe names (default: all, paper order)")
    parser.add_argument("--out", type=Path, default=REPO / "runs" / "tables",
                        help="where the table goes (default runs/tables; benchmarks/results holds the recorded ones)")
    parser.add_argument("--no-feature-cache", action="store_true",
                        help="run the frozen encoders on every batch (default: rows share <out>/feature_cache)")
    add_real_scale_arguments(parser)
    args = parser.parse_args(argv)
    seeds = args.seeds if args.seeds is not None else (3 if args.scale == "toy" and not args.quick else 1)
    if seeds < 1:
        parser.error("--seeds must be >= 1")
    rows = [r for r in ROWS if args.rows is None or r[0] in args.rows]
    unknown = set(args.rows or []) - {r[0] for r in ROWS}
    if unknown:
        parser.error(f"unknown rows {sorted(unknown)}; choose from {[r[0] for r in ROWS]}")
    command = "python benchmarks/ablation.py " + " ".join(argv if argv is not None else sys.argv[1:])
    start = time.time()
    if args.scale == "real":
        out = args.out.resolve()
        root = out / ("ablation_real" + ("_quick" if args.quick else ""))
        scale = real_scale_from_args(args, root, args.quick)
        if not args.no_feature_cache:
            scale.runner.extra += feature_cache_args(root / "feature_cache")
        table = real_rows(rows, seeds, scale)
        md = write_real_outputs(out, table, command, time.time() - start, args.quick, scale.source)
        print(md.read_text())
        return md
    cache = None if args.no_feature_cache else args.out.resolve() / "feature_cache"
    table = []
    for recipe, name, paper in rows:
        accs, keeps, audio = [], [], []
        for seed in range(seeds):
            m = run_row(REPO / "recipes" / args.scale / f"{recipe}.yaml", seed, args.quick, cache)
            accs.append(m["test/acc"])
            keeps.append(m["test/realised_keep_ratio"])
            audio.append(m["test/audio_share"])
            print(f"[ablation] {recipe} seed {seed}: test acc {m['test/acc']:.4f} "
                  f"(realised keep {m['test/realised_keep_ratio']:.3f})", flush=True)
        table.append({
            "recipe": recipe, "name": name, "paper": paper, "accs": accs,
            "mean": statistics.fmean(accs), "std": statistics.pstdev(accs) if len(accs) > 1 else 0.0,
            "keep": statistics.fmean(keeps), "audio": statistics.fmean(audio),
        })
    if cache is not None:
        print(f"[ablation] encoder feature cache: {sum(1 for _ in cache.rglob('*.safetensors'))} clips' "
              f"features in {cache}", flush=True)
    md = write_outputs(args.out, args.scale, table, command, time.time() - start, args.quick)
    print(md.read_text())
    return md


if __name__ == "__main__":
    sys.path.insert(0, str(REPO))
    main()
