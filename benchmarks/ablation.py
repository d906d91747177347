"""The paper's CS2 ablation table (Daily-Omni, 20% budget), in one command, at toy or real scale.

    python benchmarks/ablation.py --scale toy [--quick] [--seeds 3]
    python benchmarks/ablation.py --scale real --paths-train P.yaml --paths-eval E.yaml \
        [--model DIR] [--trainer T.yaml] [--eval-trainer V.yaml] [--launch "srun ep-kit"]
    python benchmarks/ablation.py --scale real --standin /tmp/standin --quick   # the same, on CPU

Every row is a recipe (one component swapped per row): the full method is ``cs2_ste_20.yaml`` and each
ablation row an overlay on it, run as ``--config cs2_ste_20.yaml --config <row>.yaml``
(:func:`ep_kit.recipes.config_args`).

Toy scale: ``recipes/toy/``, trained from the toy base shipped with the kit (``ep_kit/assets/toy_base``)
and tested on the synthetic benchmark's test split, for each seed, in this process
(:func:`ep_kit.cli.fit_then_test_run`, which also gives each question's outcome). The probes' hypotheses
(:data:`ep_kit.probes.PROBES`) are written to ``<out>/ablation_toy[_quick].md`` before any row trains;
at the end the file is rewritten with the results (:mod:`ep_kit.stats`): each row's accuracy with a 95%
hierarchical-bootstrap interval (seeds, then questions), its paired difference with the full row on the
same questions, accuracy and difference per probe, a verdict for each of the paper's pairwise
orderings (reproduced / refuted / unresolved) with the probe that carries it, and a verdict for each
probe's hypothesis. Beside it: ``.csv`` (one line per row, every number), ``_questions.csv`` (row, seed,
question, category, clip seconds, correct: everything recomputes from it), ``.png`` (bars with the
intervals) and ``_aliasing.png`` (``order_long`` accuracy against clip length for Sync-RoPE and TMRoPE,
beside the phase of each toy layout's slowest temporal pair). ``--quick`` adds :data:`QUICK_TOY_ARGS`
(less data, a short training) and ``--override ARG`` (repeatable) one more ``ep-kit`` argument for
every row, after those.

Real scale: ``recipes/<row>.yaml`` on its base is fitted (``ep-kit fit`` with the
training path overlay and trainer file), then its last checkpoint is tested on every benchmark
(``recipes/eval_benchmarks.yaml`` with the evaluation path overlay) through
:class:`ep_kit.runs.RowRunner`: a finished row is never run again, an interrupted fit continues from
its ``last.ckpt``. Writes ``ablation_real[_quick].md`` (table with the paper's numbers beside it, the
command, the commit, which of the paper's orderings hold by the means, each row's commands, commit and
checkpoint), ``.csv`` and ``.png``. Both scales write into ``--out`` (default ``runs/tables``: the
committed results in ``benchmarks/results/`` are only rewritten when you ask for it with ``--out``).

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
import json
import math
import statistics
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from ep_kit.cli import FitTestResult
    from ep_kit.stats import Interval, Ordering, RowAccuracy
    from ep_kit.train.metrics import QuestionOutcome

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


#: what ``--quick`` changes at toy scale, after the recipe and before ``--override``: less data (a
#: smaller synthetic benchmark, generated once) and a short training. The numbers are a smoke run's.
QUICK_TOY_ARGS: list[str] = [
    "--data.init_args.source.init_args.num_train=48",
    "--data.init_args.source.init_args.num_val=10",
    "--data.init_args.source.init_args.num_test=100",
    "--trainer.max_epochs=1",
    "--trainer.limit_train_batches=6",
    "--trainer.limit_val_batches=1",
]

#: every toy row of the full table: 60 optimizer steps (480 of the 800 training questions, from the toy
#: base) and no validation, so that 8 rows x 3 seeds, each tested on 1000 questions, fit in an hour on 2 cores.
FULL_TOY_ARGS: list[str] = [
    "--trainer.max_epochs=1",
    "--trainer.limit_train_batches=60",
    "--trainer.limit_val_batches=0",
]


#: the reference every probe is read against: the shipped toy base itself (not fine-tuned, its own TMRoPE),
#: tested with all tokens. A probe it answers at chance cannot separate the rows: a reduction row can keep
#: or drop the right tokens, but a model that cannot answer from all of them will not answer from a few.
CEILING = "base_all_tokens"
CEILING_NAME = "Toy base, all tokens (reference)"
CEILING_CONFIGS = ("baselines/base.yaml", "baselines/full.yaml")


def run_ceiling(
    scale: str, quick: bool, feature_cache: Path | None = None, overrides: Sequence[str] = ()
) -> tuple[SeedRun, dict[str, dict[str, Any]]]:
    """``ep-kit test`` of the toy base with all tokens (:data:`CEILING_CONFIGS`) on the rows' test split:
    its run and the test questions' info (:func:`question_info`)."""
    from ep_kit.cli import run

    args = [
        "test",
        *(a for c in CEILING_CONFIGS for a in ("--config", str(REPO / "recipes" / scale / c))),
        f"--trainer.logger.init_args.name=ablation/{CEILING}",
        "--trainer.enable_progress_bar=false",
        "--model.print_metrics=false",
        *feature_cache_args(feature_cache),
        *(QUICK_TOY_ARGS if quick else []),
        *overrides,
    ]
    cli = run(args)
    metrics = {k: float(v) for k, v in cli.trainer.callback_metrics.items() if k.startswith("test/")}
    outcomes = list(cli.model.test_outcomes)
    return SeedRun(0, metrics, outcomes), question_info(outcomes, cli.datamodule)


def rows_from_recorded(
    run_dir: Path, quick: bool, recipes: Sequence[str], tokens: dict[str, tuple[int, int]]
) -> tuple[list[ToyRow], dict[str, dict[str, Any]], str]:
    """The rows of a recorded toy run, rebuilt from its ``<stem>_questions.csv`` (every answer) and
    ``<stem>.csv`` (each row's realised keep ratio and audio share): what :func:`toy_statistics` needs
    to recompute the report without training anything. Also the recorded run's commit and wall time.

    ``tokens``: question id -> (video, audio) input tokens, for a csv written before it held them.
    """
    from ep_kit.train.metrics import QuestionOutcome

    stem = toy_stem(quick)
    paths = [run_dir / f"{stem}{suffix}" for suffix in ("_questions.csv", ".csv", ".md")]
    for path in paths:
        if not path.is_file():
            raise FileNotFoundError(f"--rows-from: {path} does not exist (a toy run's results directory)")
    per_row = {r["recipe"]: r for r in csv.DictReader(paths[1].open())}
    runs: dict[tuple[str, int], list[QuestionOutcome]] = {}
    questions: dict[str, dict[str, Any]] = {}
    for q in csv.DictReader(paths[0].open()):
        if q["row"] not in recipes:
            continue
        n_video, n_audio = (int(q["n_video"]), int(q["n_audio"])) if q.get("n_video") else tokens.get(q["question_id"], (0, 0))
        runs.setdefault((q["row"], int(q["seed"])), []).append(QuestionOutcome(
            "synthetic_av", q["question_id"], q["category"], int(q["correct"]), q["predicted"],
            int(q["kept_video"]), int(q["kept_audio"]), n_video, n_audio))
        questions.setdefault(q["question_id"], {"category": q["category"],
                                                "seconds": float(q["seconds"]) if q["seconds"] else None})
    rows = []
    for recipe, name, paper in ROWS:
        seeds = sorted(seed for r, seed in runs if r == recipe)
        if recipe not in recipes or not seeds:
            continue
        row = ToyRow(recipe, name, paper)
        for seed in seeds:
            recs = runs[(recipe, seed)]
            row.runs.append(SeedRun(seed, {
                "test/acc": statistics.fmean(o.correct for o in recs),
                "test/realised_keep_ratio": float(per_row[recipe]["realised_keep_ratio"]),
                "test/audio_share": float(per_row[recipe]["audio_share"]),
            }, recs))
        rows.append(row)
    if not rows:
        raise ValueError(f"--rows-from: {paths[0]} holds none of the rows {list(recipes)}")
    return rows, questions, recorded_run(paths[2])


def recorded_run(md: Path) -> str:
    """One line naming a recorded toy run by its report's commit and wall time (read before it is rewritten)."""
    lines = md.read_text().splitlines()
    commit_ = next((ln.split("`")[1] for ln in lines if ln.startswith("Commit: `")), "unknown")
    wall = next((ln.split(":", 1)[1].split(";")[0].strip() for ln in lines if ln.startswith("Wall time")), "unknown")
    return (f"Rows: recomputed, without training, from the per-question outcomes of a recorded run "
            f"(`{md.stem}_questions.csv`; its commit `{commit_}`, wall time {wall})")


def run_row(
    recipe: Path, seed: int, quick: bool, feature_cache: Path | None = None, overrides: Sequence[str] = ()
) -> FitTestResult:
    """Fit one row (an ablation overlay on its base) for one seed and test it: metrics and per-question outcomes.

    ``feature_cache``: directory of the encoder-feature cache every row shares (None: no cache).
    ``overrides``: further ``ep-kit`` arguments, last (they win over the recipe and ``--quick``).
    """
    from ep_kit.cli import fit_then_test_run
    from ep_kit.recipes import config_args

    args = [
        *config_args(recipe),
        f"--seed_everything={seed}",
        f"--trainer.logger.init_args.name=ablation/{recipe.stem}/seed{seed}",
        "--trainer.enable_progress_bar=false",
        "--model.print_metrics=false",
        *feature_cache_args(feature_cache),
    ]
    args += QUICK_TOY_ARGS if quick else FULL_TOY_ARGS
    return fit_then_test_run([*args, *overrides])


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


# ------------------------------------------------------------------------------ toy scale: statistics
@dataclass
class SeedRun:
    """One row fitted and tested with one seed: its logged test metrics and each question's outcome."""

    seed: int
    metrics: dict[str, float]
    records: list[QuestionOutcome]  # in evaluation order

    @property
    def correct(self) -> dict[str, int]:
        return {r.question_id: r.correct for r in self.records}


@dataclass
class ToyRow:
    """A row of the toy table: its recipe, the paper's number, its seed runs and (filled later) statistics."""

    recipe: str
    name: str
    paper: float
    runs: list[SeedRun] = field(default_factory=list)
    matrix: Any = None  # numpy (seeds, questions) of 0/1, columns as ToyTable.qids
    acc: RowAccuracy | None = None
    diff: Interval | None = None  # this row - full (None for the full row, or without it)
    probe_acc: dict[str, RowAccuracy] = field(default_factory=dict)
    probe_diff: dict[str, Interval] = field(default_factory=dict)  # row - full per probe

    def metric(self, key: str) -> float:
        vals = [r.metrics[key] for r in self.runs if key in r.metrics]
        return statistics.fmean(vals) if vals else float("nan")

    @property
    def seed_accs(self) -> list[float]:
        return [r.metrics["test/acc"] for r in self.runs]


@dataclass
class Hypothesis:
    """A probe's hypothesis about one row (full beats it), checked on that probe's questions."""

    probe: str
    row: str
    diff: Interval | None  # full - row on the probe's questions; None when not measured
    verdict: str  # supported / contradicted / unresolved / not measured (why)
    ceiling: Interval | None = None  # the toy base's accuracy on the probe with all tokens (None: not run)
    at_chance: bool = False  # that accuracy's interval reaches chance: the probe cannot decide this hypothesis


@dataclass
class ToyTable:
    """Everything the toy report prints, computed once from the rows' per-question outcomes."""

    rows: list[ToyRow]
    qids: list[str]
    categories: list[str]
    seconds: list[float | None]
    orderings: list[Ordering]
    hypotheses: list[Hypothesis]
    by_length: dict[str, dict[int, RowAccuracy]]  # recipe -> clip seconds -> accuracy on order_long
    length_diff: dict[int, Interval]  # clip seconds -> full - no_syncrope on order_long
    length_slope: Interval | None  # that difference's slope per second (None: one length only)
    ceiling: ToyRow | None = None  # the toy base with all tokens (CEILING), not one of the rows
    chance: dict[str, float] = field(default_factory=dict)  # probe -> mean 1/options (known options only)

    def at_chance(self, probe: str) -> bool:
        """Whether the base with all tokens answers ``probe`` at chance (its interval reaches chance)."""
        if self.ceiling is None or probe not in self.chance or probe not in self.ceiling.probe_acc:
            return False
        return self.ceiling.probe_acc[probe].interval.low <= self.chance[probe]

    @property
    def probes(self) -> list[str]:
        """The question types present, probes first in :data:`ep_kit.probes.PROBES` order."""
        from ep_kit.probes import PROBES

        known = [p.name for p in PROBES if p.name in self.categories]
        return known + sorted(set(self.categories) - set(known))

    def row(self, recipe: str) -> ToyRow | None:
        return next((r for r in self.rows if r.recipe == recipe), None)


#: rows of the aliasing figure: Sync-RoPE (the full method) and TMRoPE.
ALIASING_ROWS = (("cs2_ste_20", "Sync-RoPE (full)"), ("ablation_no_syncrope", "TMRoPE (w/o Sync-RoPE)"))
SUPPORT = {"reproduced": "supported", "refuted": "contradicted", "unresolved": "unresolved"}


def toy_statistics(
    rows: list[ToyRow], questions: dict[str, dict[str, Any]], resamples: int = 2000, ceiling: SeedRun | None = None
) -> ToyTable:
    """Intervals, paired differences with the full row, per-probe numbers, orderings and hypothesis verdicts.

    ``questions``: question id -> ``{"category", "seconds"}`` and, where known, ``"chance"`` (1 / number
    of options; the test split's jsonl rows); columns follow the first row's first seed, and every run
    must have answered every question. ``ceiling``: the toy base tested with all tokens (:func:`run_ceiling`),
    tabulated beside the rows and read against chance per probe.
    """
    import numpy as np

    from ep_kit.probes import FULL, PROBES
    from ep_kit.stats import align, orderings, paired_difference, paired_slope, row_accuracy, verdict

    qids = list(rows[0].runs[0].correct)
    for r in rows:
        _, r.matrix = align([run.correct for run in r.runs], qids)
    cats = [questions[q]["category"] for q in qids]
    secs = [questions[q].get("seconds") for q in qids]
    cat_arr = np.asarray(cats)
    full = next((r for r in rows if r.recipe == FULL), None)
    for r in rows:
        r.acc = row_accuracy(r.matrix, resamples)
        if full is not None and r is not full:
            r.diff = paired_difference(r.matrix, full.matrix, resamples)
        for c in dict.fromkeys(cats):
            cols = cat_arr == c
            r.probe_acc[c] = row_accuracy(r.matrix[:, cols], resamples)
            if full is not None and r is not full:
                r.probe_diff[c] = paired_difference(r.matrix[:, cols], full.matrix[:, cols], resamples)
    ceiling_row = None
    if ceiling is not None:
        ceiling_row = ToyRow(CEILING, CEILING_NAME, float("nan"), [ceiling])
        _, ceiling_row.matrix = align([ceiling.correct], qids)
        ceiling_row.acc = row_accuracy(ceiling_row.matrix, resamples)
        for c in dict.fromkeys(cats):
            ceiling_row.probe_acc[c] = row_accuracy(ceiling_row.matrix[:, cat_arr == c], resamples)
    chance = {}
    for c in dict.fromkeys(cats):
        odds = [questions[q]["chance"] for q in qids if questions[q]["category"] == c and "chance" in questions[q]]
        if len(odds) == int((cat_arr == c).sum()):
            chance[c] = float(np.mean(odds))
    order = orderings({r.recipe: r.matrix for r in rows}, {k: p for k, _, p in ROWS}, cats, resamples)
    present = {r.recipe for r in rows}
    hyps = []
    for p in PROBES:
        for target in p.beats:
            if full is None or target not in present:
                hyps.append(Hypothesis(p.name, target, None, "not measured (row not run)"))
            elif p.name not in cats:
                hyps.append(Hypothesis(p.name, target, None, "not measured (no such questions in the test split)"))
            else:
                d = paired_difference(full.matrix[:, cat_arr == p.name],
                                      next(r for r in rows if r.recipe == target).matrix[:, cat_arr == p.name], resamples)
                hyps.append(Hypothesis(p.name, target, d, SUPPORT[verdict(d)]))
    by_length: dict[str, dict[int, RowAccuracy]] = {}
    length_diff: dict[int, Interval] = {}
    slope = None
    long_cols = np.flatnonzero((cat_arr == "order_long") & np.array([s is not None for s in secs]))
    if long_cols.size:
        lengths = np.array([secs[i] for i in long_cols], dtype=float)
        for recipe, _ in ALIASING_ROWS:
            r = next((x for x in rows if x.recipe == recipe), None)
            if r is not None:
                by_length[recipe] = {int(L): row_accuracy(r.matrix[:, long_cols[lengths == L]], resamples)
                                     for L in sorted(set(lengths))}
        sync, tm = (next((x for x in rows if x.recipe == k), None) for k, _ in ALIASING_ROWS)
        if sync is not None and tm is not None:
            for L in sorted(set(lengths)):
                cols = long_cols[lengths == L]
                length_diff[int(L)] = paired_difference(sync.matrix[:, cols], tm.matrix[:, cols], resamples)
            slope = paired_slope(sync.matrix[:, long_cols], tm.matrix[:, long_cols], lengths, resamples)
    table = ToyTable(rows, qids, cats, secs, order, hyps, by_length, length_diff, slope, ceiling_row, chance)
    for h in hyps:
        if ceiling_row is not None and h.probe in ceiling_row.probe_acc:
            h.ceiling = ceiling_row.probe_acc[h.probe].interval
            h.at_chance = table.at_chance(h.probe)
    return table


def question_info(outcomes: Sequence[QuestionOutcome], datamodule: Any) -> dict[str, dict[str, Any]]:
    """Question id -> category, clip seconds and chance (1 / options), from the test split's jsonl rows
    (synthetic benchmark)."""
    info: dict[str, dict[str, Any]] = {r.question_id: {"category": r.category, "seconds": None} for r in outcomes}
    bench = getattr(getattr(datamodule, "source", None), "bench", None)
    if bench is not None:
        for row in bench.rows("test"):
            if row["question_id"] in info:
                info[row["question_id"]]["seconds"] = row.get("seconds")
                if row.get("options"):
                    info[row["question_id"]]["chance"] = 1.0 / len(row["options"])
    return info


def toy_stem(quick: bool) -> str:
    return "ablation_toy" + ("_quick" if quick else "")


def header_lines(command: str, quick: bool) -> list[str]:
    return [
        "# CS2 ablation at toy scale" + (" (quick smoke run)" if quick else ""),
        "",
        f"Command: `{command}`  ",
        f"Commit: `{commit()}`  ",
        f"Every row and seed: its recipe in `recipes/toy/`, from the shipped toy base, then "
        f"`{' '.join(QUICK_TOY_ARGS if quick else FULL_TOY_ARGS)}`  ",
    ]


def write_hypotheses_first(out_dir: Path, command: str, quick: bool) -> Path:
    """``<out>/<stem>.md`` holding only the hypotheses, written before any row trains (overwritten at the end)."""
    from ep_kit.probes import hypotheses_markdown

    out_dir.mkdir(parents=True, exist_ok=True)
    md = out_dir / f"{toy_stem(quick)}.md"
    started = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    md.write_text("\n".join([*header_lines(command, quick), f"Started: {started}; results not in yet.", "",
                             *hypotheses_markdown(), ""]) + "\n")
    return md


def _ci(r: Interval | None) -> str:
    return "n/a" if r is None else r.pct()


def _diff(d: Interval | None) -> str:
    return "-" if d is None else d.pct(signed=True)


def write_outputs(
    out_dir: Path, table: ToyTable, command: str, elapsed: float, quick: bool, rows_source: str | None = None
) -> Path:
    """The toy report: md (hypotheses, tables, orderings, verdicts), csv per row, csv per question, two figures.

    ``rows_source``: where the rows came from when they were not trained by this run (``--rows-from``).
    """
    from ep_kit.probes import FULL, PROBES, hypotheses_markdown

    out_dir.mkdir(parents=True, exist_ok=True)
    stem = toy_stem(quick)
    names = {k: n for k, n, _ in ROWS}
    probes = table.probes
    seeds = max(len(r.runs) for r in table.rows)
    first = (table.ceiling or table.rows[0]).runs[0].records
    n_video, n_audio = sum(o.n_video for o in first), sum(o.n_audio for o in first)
    counts = {c: table.categories.count(c) for c in probes}
    # one line per row, every number
    with (out_dir / f"{stem}.csv").open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["row", "recipe", "paper_daily_omni", "mean_acc", "ci_low", "ci_high", "std_acc", "seeds", "questions",
                    "diff_vs_full", "diff_ci_low", "diff_ci_high", "realised_keep_ratio", "audio_share",
                    *[f"seed_{i}" for i in range(seeds)],
                    *[f"{c}_{k}" for c in probes for k in ("acc", "ci_low", "ci_high", "diff", "diff_ci_low", "diff_ci_high")]])
        for r in table.rows:
            d = r.diff
            per_probe = []
            for c in probes:
                a, pd = r.probe_acc[c].interval, r.probe_diff.get(c)
                per_probe += [a.estimate, a.low, a.high, *((pd.estimate, pd.low, pd.high) if pd else ("", "", ""))]
            w.writerow([r.name, r.recipe, r.paper, r.acc.mean, r.acc.interval.low, r.acc.interval.high, r.acc.seed_std,
                        r.acc.seeds, r.acc.questions, *((d.estimate, d.low, d.high) if d else ("", "", "")),
                        r.metric("test/realised_keep_ratio"), r.metric("test/audio_share"),
                        *r.seed_accs, *[""] * (seeds - len(r.runs)), *per_probe])
        if table.ceiling is not None:  # the reference: no paper number, no difference with the full row
            r = table.ceiling
            per_probe = []
            for c in probes:
                a = r.probe_acc[c].interval
                per_probe += [a.estimate, a.low, a.high, "", "", ""]
            w.writerow([r.name, r.recipe, "", r.acc.mean, r.acc.interval.low, r.acc.interval.high, r.acc.seed_std,
                        r.acc.seeds, r.acc.questions, "", "", "", r.metric("test/realised_keep_ratio"),
                        r.metric("test/audio_share"), *r.seed_accs, *[""] * (seeds - len(r.runs)), *per_probe])
    # one line per (row, seed, question): anyone can recompute every number above
    seconds = dict(zip(table.qids, table.seconds, strict=True))
    with (out_dir / f"{stem}_questions.csv").open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["row", "seed", "question_id", "category", "seconds", "correct", "predicted", "kept_video",
                    "kept_audio", "n_video", "n_audio"])
        for r in [*table.rows, *([table.ceiling] if table.ceiling is not None else [])]:
            for run in r.runs:
                for o in run.records:
                    w.writerow([r.recipe, run.seed, o.question_id, o.category, seconds.get(o.question_id, ""),
                                o.correct, o.predicted, o.kept_video, o.kept_audio, o.n_video, o.n_audio])
    lines = [
        *header_lines(command, quick),
        *([rows_source + ".  "] if rows_source else []),
        ("Wall time of this run (the reference row and the report)" if rows_source else "Wall time")
        + f": {elapsed / 60:.1f} min; seeds per row: {seeds}; toy accuracy = synthetic benchmark test split "
        "(chance 25%); paper = Daily-Omni accuracy of Qwen2.5-Omni-3B at a 20% budget.",
        *(["", "Smoke run (`--quick`): little data and a few training batches per row, so the accuracies say "
           "little; it checks that every row trains, evaluates and is tabulated."] if quick else []),
        "",
        "## Data",
        "",
        f"- {len(table.qids)} test questions, the same for every row and seed; per probe: "
        + ", ".join(f"`{c}` {counts[c]}" for c in probes) + ".",
        f"- Video share of the A/V input tokens: {n_video / max(1, n_video + n_audio):.3f} "
        f"({n_video} video, {n_audio} audio tokens over the test split).",
        "- Intervals: 95% hierarchical bootstrap (2000 resamples, fixed generator seed): seeds resampled with "
        "replacement, then questions (the same question resample for every seed, and for both rows of a paired "
        "difference). Differences are paired on the same questions; intervals are per comparison, not corrected "
        "for the number of comparisons (28 orderings: about one resolved by chance at 95% if no row differed).",
        "",
        *hypotheses_markdown(),
        "",
        "## Table",
        "",
        f"![accuracy per row]({stem}.png)",
        "",
        "| Row (paper order) | Paper (%) | Toy accuracy (%) [95% CI] | seed std | Row - full (points) [95% CI] "
        "| Realised keep ratio | Audio share of kept |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    if table.ceiling is not None:
        c_ = table.ceiling
        lines.append(f"| {c_.name} | - | {c_.acc.interval.pct()} | - | - | "
                     f"{c_.metric('test/realised_keep_ratio'):.3f} | {c_.metric('test/audio_share'):.3f} |")
    for r in table.rows:
        lines.append(f"| {r.name} | {r.paper:.2f} | {r.acc.interval.pct()} | {100 * r.acc.seed_std:.1f} | "
                     f"{_diff(r.diff)} | {r.metric('test/realised_keep_ratio'):.3f} | {r.metric('test/audio_share'):.3f} |")
    lines += ["", "## Accuracy per probe (%) [95% CI]", "", "| Row | " + " | ".join(f"`{c}`" for c in probes) + " |",
              "| --- |" + " ---: |" * len(probes)]
    lines += [f"| {r.name} | " + " | ".join(r.probe_acc[c].interval.pct() for c in probes) + " |"
              for r in ([table.ceiling] if table.ceiling is not None else []) + table.rows]
    if table.ceiling is not None:
        lines += ["", f"{CEILING_NAME}: the shipped toy base, not fine-tuned, its own TMRoPE, every token "
                  f"(`ep-kit test` with `recipes/toy/{CEILING_CONFIGS[0]}` + `{CEILING_CONFIGS[1]}`), on the same "
                  "questions: what the model answers before any reduction."]
    if table.row(FULL) is not None and len(table.rows) > 1:
        lines += ["", "## Difference with the full method per probe (points, row - full) [95% CI]", "",
                  "| Row | " + " | ".join(f"`{c}`" for c in probes) + " |", "| --- |" + " ---: |" * len(probes)]
        lines += [f"| {r.name} | " + " | ".join(_diff(r.probe_diff.get(c)) for c in probes) + " |"
                  for r in table.rows if r.recipe != FULL]
    lines += ["", *ordering_lines(table, "Toy", "probe")]
    lines += ["", "## Hypotheses: verdicts", "",
              "Full - row on the probe's questions (points) [95% CI]; supported: above 0, contradicted: below 0. "
              "Base, all tokens: the toy base's accuracy on the probe before any reduction or fine-tuning.", "",
              "| Probe | Full beats | Full - row (points) [95% CI] | Verdict | Base, all tokens (%) [95% CI] |",
              "| --- | --- | ---: | --- | ---: |"]
    for h in table.hypotheses:
        base = "not run" if h.ceiling is None else h.ceiling.pct() + (" (chance)" if h.at_chance else "")
        lines.append(f"| `{h.probe}` | {names.get(h.row, h.row)} | {_diff(h.diff)} | {h.verdict} | {base} |")
    blind = [p.name for p in PROBES if p.beats and table.at_chance(p.name)]
    if blind:
        lines += ["", "The toy base answers " + ", ".join(f"`{p}`" for p in blind) + " at chance with every token "
                  f"(its interval reaches chance, {100 * max(table.chance[p] for p in blind):.0f}%): at this scale "
                  "these probes cannot decide their hypotheses, whatever the verdict column says; a base that "
                  "answers them with all tokens is needed first."]
    long_probe = next(p for p in PROBES if p.by_length)
    lines += ["", f"## Aliasing: `{long_probe.name}` accuracy against clip length", "",
              f"![aliasing]({stem}_aliasing.png)", "",
              *layout_notes(max((s_ for s_ in table.seconds if s_ is not None), default=32)), ""]
    if table.by_length:
        lengths = sorted({L for d in table.by_length.values() for L in d})
        lines += ["| Row | " + " | ".join(f"{L} s" for L in lengths) + " |", "| --- |" + " ---: |" * len(lengths)]
        for recipe, label in ALIASING_ROWS:
            if recipe in table.by_length:
                accs = table.by_length[recipe]
                lines.append(f"| {label} | " + " | ".join(_ci(accs[L].interval if L in accs else None) for L in lengths)
                             + " |")
        if table.length_diff:
            lines.append("| Sync-RoPE - TMRoPE (points) | " + " | ".join(_diff(table.length_diff.get(L)) for L in lengths)
                         + " |")
        if table.length_slope is not None:
            s_ = table.length_slope
            lines += ["", f"Slope of the Sync-RoPE - TMRoPE gap against clip length: {100 * s_.estimate:+.2f} points "
                      f"per second [{100 * s_.low:.2f}, {100 * s_.high:.2f}] ("
                      + ("grows with length" if s_.low > 0 else "shrinks with length" if s_.high < 0 else
                         "no trend resolved") + ")."]
    else:
        lines.append(f"No `{long_probe.name}` questions in this test split (or neither row run): no curve.")
    lines.append("")
    md = out_dir / f"{stem}.md"
    md.write_text("\n".join(lines) + "\n")
    plot(out_dir / f"{stem}.png", [
        {"name": r.name, "mean": r.acc.mean, "lo": r.acc.interval.low, "hi": r.acc.interval.high, "paper": r.paper}
        for r in table.rows
    ], title="Toy (synthetic benchmark), mean over seeds, 95% CI")
    aliasing_figure(out_dir / f"{stem}_aliasing.png", table)
    return md


def ordering_lines(table: ToyTable, scale: str, group: str) -> list[str]:
    """The paper's orderings section: tally, then one line per pair (verdict and the ``group`` carrying it)."""
    names = {k: n for k, n, _ in ROWS}
    paper = {k: p for k, _, p in ROWS}
    tally = {v: sum(o.verdict == v for o in table.orderings) for v in ("reproduced", "refuted", "unresolved")}
    lines = [
        "## The paper's orderings", "",
        f"{len(table.orderings)} pairwise orderings among the rows run: {tally['reproduced']} reproduced (interval of "
        f"higher - lower above 0), {tally['refuted']} refuted (below 0), {tally['unresolved']} unresolved (contains 0). "
        f"Carrying {group}: the {group} with the largest difference in the decisive direction whose own interval "
        "excludes 0.",
        "",
        f"| Paper ordering | Paper diff (points) | {scale} diff (points) [95% CI] | Verdict | Carrying {group} |",
        "| --- | ---: | ---: | --- | --- |",
    ]
    for o in table.orderings:
        carrier = "-" if o.verdict == "unresolved" else (f"`{o.carrier}`" if o.carrier else "none alone")
        lines.append(f"| {names[o.higher]} > {names[o.lower]} | {paper[o.higher] - paper[o.lower]:+.2f} | "
                     f"{o.diff.pct(signed=True)} | {o.verdict} | {carrier} |")
    return lines


def toy_rope_layouts() -> list[tuple[str, Any]]:
    """(label, rope) of the aliasing figure's rows, as their toy recipes build them (unbound)."""
    from ep_kit.recipes import method_from_recipe, recipe_configs

    return [(label, method_from_recipe(recipe_configs(REPO / "recipes" / "toy" / f"{recipe}.yaml")).rope)
            for recipe, label in ALIASING_ROWS]


def aliasing_figure(path: Path, table: ToyTable, head_dim: int | None = None, base: float | None = None) -> None:
    """Left: ``order_long`` accuracy against clip length, Sync-RoPE vs TMRoPE rows, with 95% intervals.
    Right: over the same seconds, the wrapped phase of each toy layout's slowest temporal pair (the
    aliasing report's ``lowest_temporal``, :mod:`ep_kit.aliasing`): a sawtooth aliases, a ramp does not.

    ``head_dim`` / ``base``: the tiny thinker's (default: its config's, 16 and its ``rope_theta``).
    """
    import torch
    from matplotlib.figure import Figure  # drawn without pyplot: plotting never selects a backend

    from ep_kit.aliasing import POSITIONS_PER_SECOND, aliasing_report

    if head_dim is None or base is None:
        config = tiny_text_config()
        head_dim, base = head_dim or config[0], base or config[1]
    fig = Figure(figsize=(12, 4.5))
    left, right = fig.subplots(1, 2)
    lengths = sorted({L for d in table.by_length.values() for L in d})
    for k, (recipe, label) in enumerate(ALIASING_ROWS):
        if recipe not in table.by_length:
            continue
        xs = [L + (k - 0.5) * 0.4 for L in lengths if L in table.by_length[recipe]]
        accs = [table.by_length[recipe][L] for L in lengths if L in table.by_length[recipe]]
        ys = [100 * a.mean for a in accs]
        err = [[y - 100 * a.interval.low for y, a in zip(ys, accs, strict=True)],
               [100 * a.interval.high - y for y, a in zip(ys, accs, strict=True)]]
        left.errorbar(xs, ys, yerr=err, marker="o", capsize=4, label=label)
    if not lengths:
        left.text(0.5, 0.5, "no order_long questions\n(or neither row run)", ha="center", va="center",
                  transform=left.transAxes)
    left.axhline(25, color="grey", ls="--", lw=0.8, label="chance (4 options)")
    left.set(xlabel="clip length (s)", ylabel="accuracy on order_long (%)",
             title="Which came first, on long clips (95% CI)")
    left.legend(fontsize=8)
    max_s = max(lengths) if lengths else 32
    d = torch.linspace(0, max_s * POSITIONS_PER_SECOND, 4000, dtype=torch.float64)
    for label, rope in toy_rope_layouts():
        low = aliasing_report(rope, base, head_dim, stride=1).lowest_temporal
        period = 2 * math.pi / low.theta / POSITIONS_PER_SECOND
        right.plot(d / POSITIONS_PER_SECOND, torch.remainder(d * low.theta, 2 * math.pi) / math.pi, lw=1,
                   label=f"{label} {list(rope.sections)}: slowest temporal pair {low.pair}, period {period:.3g} s")
    for L in lengths:
        right.axvline(L, color="grey", ls=":", lw=0.6)
    right.set(xlabel=f"temporal distance (s, {POSITIONS_PER_SECOND} positions/s)",
              ylabel="phase of the slowest temporal pair (x pi, wrapped)", ylim=(-0.05, 2.3),
              title=f"Temporal phase, toy layouts (head_dim {head_dim}, base {base:g})")
    right.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def layout_notes(seconds: float = 32.0) -> list[str]:
    """One line per toy layout: the period of its slowest temporal pair (beyond it, that pair aliases) and
    how far its phase moves over ``seconds`` (a pair that barely turns carries little order either)."""
    from ep_kit.aliasing import POSITIONS_PER_SECOND, aliasing_report

    head_dim, base = tiny_text_config()
    lines = []
    for label, rope in toy_rope_layouts():
        low = aliasing_report(rope, base, head_dim, stride=1).lowest_temporal
        lines.append(f"- {label} {list(rope.sections)} (head_dim {head_dim}, base {base:g}): slowest temporal pair "
                     f"{low.pair} turns once every {2 * math.pi / low.theta / POSITIONS_PER_SECOND:.3g} s "
                     f"({POSITIONS_PER_SECOND} positions/s); over {seconds:g} s its phase moves "
                     f"{seconds * POSITIONS_PER_SECOND * low.theta:.3g} rad.")
    return lines


def tiny_text_config() -> tuple[int, float]:
    """(head_dim, rope_theta) of the toy recipes' tiny thinker, from its config."""
    import yaml

    from ep_kit.train.sources import TinyThinker

    init = dict(yaml.safe_load((REPO / "recipes" / "toy" / "_base" / "thinker.yaml").read_text())["init_args"])
    init.pop("init_from", None)
    text = TinyThinker(**init).config().text_config
    params = getattr(text, "rope_parameters", None) or {}
    theta = params.get("rope_theta", getattr(text, "rope_theta", None))
    return int(text.head_dim), float(theta)


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
        outcomes = [read_outcomes(scale.runner.row_dir(f"{recipe}-seed{seed}")) for seed in range(seeds)]
        table.append({
            "outcomes": outcomes,
            "recipe": recipe, "name": name, "paper": paper, "accs": accs, "mean": statistics.fmean(accs),
            "std": statistics.pstdev(accs) if len(accs) > 1 else 0.0, "keep": mean("test/realised_keep_ratio"),
            "audio": mean("test/audio_share"), "av": mean("test/acc_group/audio_visual"),
            "video": mean("test/acc_group/video_only"), "overall": mean("test/acc"), "runs": results,
        })
    return table


def read_outcomes(row_dir: Path) -> list[QuestionOutcome] | None:
    """A real-scale row's per-question outcomes (its ``ep-kit test`` run's ``test_questions.jsonl``), or None."""
    from ep_kit.train.metrics import QuestionOutcome
    from ep_kit.train.module import OUTCOMES_FILE

    path = row_dir / "test" / "version_0" / OUTCOMES_FILE
    if not path.is_file():
        return None
    return [QuestionOutcome(**json.loads(line)) for line in path.read_text().splitlines() if line.strip()]


def real_statistics(table: list[dict], benchmark: str = "daily_omni") -> ToyTable | None:
    """The toy table's statistics on one benchmark's questions of the real rows (categories as groups);
    None when a run has no outcomes file or no question of ``benchmark``."""
    rows, questions = [], {}
    for r in table:
        runs = []
        for seed, (run, outs) in enumerate(zip(r["runs"], r["outcomes"], strict=True)):
            mine = [o for o in outs or [] if o.benchmark == benchmark]
            if not mine:
                return None
            runs.append(SeedRun(seed, run.metrics, mine))
            questions.update({o.question_id: {"category": o.category, "seconds": None} for o in mine})
        rows.append(ToyRow(r["recipe"], r["name"], r["paper"], runs))
    return toy_statistics(rows, questions) if rows else None


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
    lines += ["", "## Orderings", "", *ordering_notes({r["recipe"]: r["mean"] for r in table}, "real"), ""]
    stats = real_statistics(table)
    if stats is not None:
        lines += [
            "## Daily-Omni with intervals", "",
            f"{len(stats.qids)} Daily-Omni questions, the same for every row; 95% hierarchical bootstrap (seeds, then "
            "questions; 2000 resamples), differences paired on the same questions.", "",
            "| Row (paper order) | Daily-Omni (%) [95% CI] | Row - full (points) [95% CI] |", "| --- | ---: | ---: |",
            *[f"| {r.name} | {r.acc.interval.pct()} | {_diff(r.diff)} |" for r in stats.rows],
            "", *ordering_lines(stats, "Daily-Omni", "category"), "",
        ]
    else:
        lines += ["Daily-Omni intervals: not computed (a row's `test_questions.jsonl` is missing: it ran before "
                  "`ep-kit test` wrote one).", ""]
    lines += ["## Runs", ""]
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
    """Bars of each row's accuracy beside the paper's; error bars are the 95% interval (``lo``/``hi``) or +- std."""
    from matplotlib.figure import Figure  # drawn without pyplot: plotting never selects a backend

    names = [r["name"] for r in table]
    x = range(len(table))
    fig = Figure(figsize=(12, 4.5))
    ax1, ax2 = fig.subplots(1, 2, sharey=False)
    means = [100 * r["mean"] for r in table]
    if all("lo" in r for r in table):
        yerr = [[m - 100 * r["lo"] for m, r in zip(means, table, strict=True)],
                [100 * r["hi"] - m for m, r in zip(means, table, strict=True)]]
    else:
        yerr = [100 * r["std"] for r in table]
    ax1.bar(x, means, yerr=yerr, capsize=4, color="tab:blue")
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
    parser.add_argument("--quick", action="store_true", help="smoke run: toy QUICK_TOY_ARGS (less data, 6 training "
                        "batches per row); real 2 training steps per row")
    parser.add_argument("--seeds", type=int, default=None, help="seeds per row (default: toy 3, quick and real 1)")
    parser.add_argument("--rows", nargs="*", default=None, help="subset of recipe names (default: all, paper order)")
    parser.add_argument("--out", type=Path, default=REPO / "runs" / "tables",
                        help="where the table goes (default runs/tables; benchmarks/results holds the recorded ones)")
    parser.add_argument("--no-ceiling", action="store_true",
                        help=f"toy: skip the reference row ({CEILING_NAME}: the toy base tested with every token)")
    parser.add_argument("--rows-from", type=Path, default=None, metavar="DIR",
                        help="toy: recompute the report from a recorded run's per-question outcomes in DIR "
                        "(e.g. benchmarks/results) instead of training the rows; the reference row still runs")
    parser.add_argument("--no-feature-cache", action="store_true",
                        help="run the frozen encoders on every batch (default: rows share <out>/feature_cache)")
    parser.add_argument("--override", action="append", default=[], metavar="ARG",
                        help="toy: one more ep-kit argument for every row, after the recipe and --quick "
                        "(repeatable), e.g. --override=--data.init_args.source.init_args.num_test=2000")
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
    recorded = None
    if args.rows_from is not None:  # its report's header, before the hypotheses file may overwrite it
        md_path = args.rows_from / f"{toy_stem(args.quick)}.md"
        recorded = recorded_run(md_path) if md_path.is_file() else None
    write_hypotheses_first(args.out, command, args.quick)  # on record before any row trains
    table_rows: list[ToyRow] = []
    questions: dict[str, dict[str, Any]] = {}
    ceiling = rows_source = None
    if not args.no_ceiling:
        ceiling, questions = run_ceiling(args.scale, args.quick, cache, args.override)
        print(f"[ablation] {CEILING}: test acc {ceiling.metrics['test/acc']:.4f} "
              f"({len(ceiling.records)} questions)", flush=True)
    if args.rows_from is not None:
        tokens = {o.question_id: (o.n_video, o.n_audio) for o in ceiling.records} if ceiling else {}
        table_rows, kept, rows_source = rows_from_recorded(args.rows_from, args.quick, [r[0] for r in rows], tokens)
        rows_source = recorded or rows_source
        if ceiling is not None and set(kept) != set(questions):
            raise ValueError(f"--rows-from: the recorded rows' questions are not this test split's "
                             f"({len(kept)} vs {len(questions)}): pass the recorded run's data arguments")
        for q, info in kept.items():  # the chance of each question comes from the split, if it ran
            info.update({k: v for k, v in questions.get(q, {}).items() if k == "chance"})
        questions, rows = kept, []
    for recipe, name, paper in rows:
        row = ToyRow(recipe, name, paper)
        for seed in range(seeds):
            res = run_row(REPO / "recipes" / args.scale / f"{recipe}.yaml", seed, args.quick, cache, args.override)
            row.runs.append(SeedRun(seed, res.metrics, res.outcomes))
            if not questions:
                questions = question_info(res.outcomes, res.cli.datamodule)
            m = res.metrics
            print(f"[ablation] {recipe} seed {seed}: test acc {m['test/acc']:.4f} "
                  f"(realised keep {m['test/realised_keep_ratio']:.3f}, {len(res.outcomes)} questions)", flush=True)
        table_rows.append(row)
    if cache is not None:
        print(f"[ablation] encoder feature cache: {sum(1 for _ in cache.rglob('*.safetensors'))} clips' "
              f"features in {cache}", flush=True)
    table = toy_statistics(table_rows, questions, ceiling=ceiling)
    md = write_outputs(args.out, table, command, time.time() - start, args.quick, rows_source)
    print(md.read_text())
    return md


if __name__ == "__main__":
    sys.path.insert(0, str(REPO))
    main()
