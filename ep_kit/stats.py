"""Intervals and paired comparisons for table rows evaluated on the same questions with several seeds.

Why: a toy row's accuracy moves by a few points between training seeds and between question
samples, so a table of means cannot say whether one row beats another. Every function here takes a
row as a 0/1 matrix ``correct[seed, question]`` whose columns are the same questions, in the same
order, for every row; intervals come from a hierarchical bootstrap:

* seeds are resampled with replacement (each row on its own: two rows' seeds are different models);
* questions are resampled with replacement, the same resample for every seed of a row and, in a
  paired comparison, for both rows (so a question that is hard for everyone cancels out);
* the interval is the percentile interval of the statistic over ``resamples`` draws of a generator
  seeded with ``rng_seed``, so the same data always gives the same interval.

A row's accuracy is the mean over seeds of the per-seed accuracy (each seed answers every question).
Intervals are per comparison, not corrected for the number of comparisons a table makes.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np

#: bootstrap draws and generator seed of every interval unless given.
RESAMPLES = 2000
RNG_SEED = 0
LEVEL = 0.95


@dataclass(frozen=True)
class Interval:
    """A point estimate and its bootstrap interval (``low`` <= ``high``)."""

    estimate: float
    low: float
    high: float

    @property
    def contains_zero(self) -> bool:
        return self.low <= 0.0 <= self.high

    def pct(self, digits: int = 1, signed: bool = False) -> str:
        """``61.2 [58.1, 64.0]`` in percent (``+`` sign on the estimate when ``signed``)."""
        sign = "+" if signed else ""
        return f"{100 * self.estimate:{sign}.{digits}f} [{100 * self.low:.{digits}f}, {100 * self.high:.{digits}f}]"


@dataclass(frozen=True)
class RowAccuracy:
    """A row's accuracy (mean of per-seed accuracies), its interval and the spread across seeds."""

    interval: Interval
    seed_std: float  # population std of the per-seed accuracies
    seeds: int
    questions: int

    @property
    def mean(self) -> float:
        return self.interval.estimate


def as_matrix(correct: np.ndarray | Sequence[Sequence[float]]) -> np.ndarray:
    """``correct`` as a float ``(seeds, questions)`` matrix of 0/1 (a vector is one seed)."""
    m = np.asarray(correct, dtype=np.float64)
    if m.ndim == 1:
        m = m[None, :]
    if m.ndim != 2 or m.shape[0] < 1 or m.shape[1] < 1:
        raise ValueError(f"correct must be (seeds, questions) with at least one of each, got shape {m.shape}")
    if not np.isin(m, (0.0, 1.0)).all():
        raise ValueError("correct must hold only 0 and 1")
    return m


def _seed_weights(seeds: int, resamples: int, rng: np.random.Generator) -> np.ndarray:
    """``(resamples, seeds)`` how often each seed is drawn in each resample (rows sum to ``seeds``)."""
    draws = rng.integers(0, seeds, size=(resamples, seeds))
    return (draws[:, :, None] == np.arange(seeds)[None, None, :]).sum(1).astype(np.float64)


def _resampled_question_means(m: np.ndarray, resamples: int, rng: np.random.Generator) -> np.ndarray:
    """``(resamples, questions)``: each question's correctness averaged over a resample of the seeds."""
    return _seed_weights(m.shape[0], resamples, rng) @ m / m.shape[0]


def _question_draws(questions: int, resamples: int, rng: np.random.Generator) -> np.ndarray:
    """``(resamples, questions)`` indices of a resample of the questions (shared by every row compared)."""
    return rng.integers(0, questions, size=(resamples, questions))


def _interval(estimate: float, draws: np.ndarray, level: float) -> Interval:
    lo, hi = np.quantile(draws, [(1 - level) / 2, (1 + level) / 2])
    return Interval(float(estimate), float(lo), float(hi))


def row_accuracy(
    correct: np.ndarray, resamples: int = RESAMPLES, rng_seed: int = RNG_SEED, level: float = LEVEL
) -> RowAccuracy:
    """Mean over seeds of the per-seed accuracy, with its hierarchical-bootstrap interval."""
    m = as_matrix(correct)
    rng = np.random.default_rng(rng_seed)
    per_q = _resampled_question_means(m, resamples, rng)
    idx = _question_draws(m.shape[1], resamples, rng)
    draws = np.take_along_axis(per_q, idx, axis=1).mean(1)
    per_seed = m.mean(1)
    return RowAccuracy(_interval(float(per_seed.mean()), draws, level), float(per_seed.std()), m.shape[0], m.shape[1])


def paired_difference(
    a: np.ndarray, b: np.ndarray, resamples: int = RESAMPLES, rng_seed: int = RNG_SEED, level: float = LEVEL
) -> Interval:
    """Accuracy of row ``a`` minus row ``b`` on the same questions (columns), with its interval.

    Per question, each row's correctness is averaged over its seeds and the two are subtracted; the
    bootstrap resamples each row's seeds on its own and the questions jointly.
    """
    ma, mb = as_matrix(a), as_matrix(b)
    if ma.shape[1] != mb.shape[1]:
        raise ValueError(f"paired rows need the same questions: {ma.shape[1]} vs {mb.shape[1]} columns")
    rng = np.random.default_rng(rng_seed)
    d = _resampled_question_means(ma, resamples, rng) - _resampled_question_means(mb, resamples, rng)
    idx = _question_draws(ma.shape[1], resamples, rng)
    draws = np.take_along_axis(d, idx, axis=1).mean(1)
    return _interval(float(ma.mean(0).mean() - mb.mean(0).mean()), draws, level)


def paired_slope(
    a: np.ndarray,
    b: np.ndarray,
    x: Sequence[float],
    resamples: int = RESAMPLES,
    rng_seed: int = RNG_SEED,
    level: float = LEVEL,
) -> Interval | None:
    """Least-squares slope of the per-question difference ``a - b`` against ``x`` (e.g. clip seconds).

    Why: "the gap grows with clip length" is a claim about this slope being positive. None when
    ``x`` takes fewer than two values.
    """
    ma, mb = as_matrix(a), as_matrix(b)
    xs = np.asarray(x, dtype=np.float64)
    if xs.shape != (ma.shape[1],) or ma.shape[1] != mb.shape[1]:
        raise ValueError("paired_slope: a, b and x must cover the same questions")
    if np.unique(xs).size < 2:
        return None

    def slope(d: np.ndarray, xv: np.ndarray) -> np.ndarray:
        xc = xv - xv.mean(-1, keepdims=True)
        dc = d - d.mean(-1, keepdims=True)
        den = (xc * xc).sum(-1)
        return np.divide((xc * dc).sum(-1), den, out=np.zeros_like(den), where=den > 0)

    rng = np.random.default_rng(rng_seed)
    d = _resampled_question_means(ma, resamples, rng) - _resampled_question_means(mb, resamples, rng)
    idx = _question_draws(ma.shape[1], resamples, rng)
    draws = slope(np.take_along_axis(d, idx, axis=1), xs[idx])
    return _interval(float(slope(ma.mean(0) - mb.mean(0), xs)), draws, level)


def verdict(diff: Interval, expected_positive: bool = True) -> str:
    """``reproduced`` when the interval excludes 0 on the expected side, ``refuted`` on the other, else ``unresolved``."""
    if diff.contains_zero:
        return "unresolved"
    return "reproduced" if (diff.low > 0) == expected_positive else "refuted"


def carrying_group(diffs: Mapping[str, Interval], positive: bool) -> str | None:
    """The group with the largest difference in the decisive direction whose own interval excludes 0 there.

    ``positive``: the decisive direction (the overall difference was > 0). None: no group alone.
    """
    sign = 1.0 if positive else -1.0
    decisive = {g: d for g, d in diffs.items() if (d.low > 0 if positive else d.high < 0)}
    if not decisive:
        return None
    return max(decisive, key=lambda g: sign * decisive[g].estimate)


@dataclass(frozen=True)
class Ordering:
    """One of the paper's pairwise orderings (``higher`` above ``lower``) checked on the same questions."""

    higher: str
    lower: str
    diff: Interval  # higher - lower
    verdict: str  # reproduced / refuted / unresolved
    carrier: str | None  # the group carrying a resolved difference; None: none alone (or unresolved)


def orderings(
    rows: Mapping[str, np.ndarray],
    paper: Mapping[str, float],
    groups: Sequence[str],
    resamples: int = RESAMPLES,
    rng_seed: int = RNG_SEED,
) -> list[Ordering]:
    """Every pair of ``rows`` whose paper accuracies differ, in ``paper``'s order, checked on the questions.

    ``groups``: each question's group (the probe); a resolved pair names the group carrying it.
    """
    names = [r for r in paper if r in rows]
    group_of = np.asarray(groups)
    out = []
    for i, a in enumerate(names):
        for b in names[i + 1 :]:
            if paper[a] == paper[b]:
                continue
            hi, lo = (a, b) if paper[a] > paper[b] else (b, a)
            diff = paired_difference(rows[hi], rows[lo], resamples, rng_seed)
            v = verdict(diff)
            carrier = None
            if v != "unresolved":
                per_group = {
                    g: paired_difference(rows[hi][:, group_of == g], rows[lo][:, group_of == g], resamples, rng_seed)
                    for g in dict.fromkeys(groups)
                }
                carrier = carrying_group(per_group, positive=diff.low > 0)
            out.append(Ordering(hi, lo, diff, v, carrier))
    return out


def align(outcomes: Sequence[Mapping[str, int]], questions: Sequence[str] | None = None) -> tuple[list[str], np.ndarray]:
    """Per-seed ``{question_id: correct}`` maps as a ``(seeds, questions)`` matrix over common questions.

    ``questions`` fixes the column order (default: the first seed's order); every seed must have
    answered every one of them.
    """
    if not outcomes:
        raise ValueError("align: no seeds")
    order = list(questions) if questions is not None else list(outcomes[0])
    missing = [(s, q) for s, o in enumerate(outcomes) for q in order if q not in o]
    if missing:
        raise ValueError(f"align: {len(missing)} (seed, question) outcomes missing, e.g. {missing[:3]}")
    return order, np.array([[o[q] for q in order] for o in outcomes], dtype=np.float64)
