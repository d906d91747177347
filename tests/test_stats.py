"""ep_kit.stats against cases whose answer is known exactly and against independent numpy computations."""

from __future__ import annotations

import math

import numpy as np
import pytest

from ep_kit.probes import FULL, PROBES, UNTARGETED, hypotheses_markdown
from ep_kit.stats import (
    Interval,
    align,
    carrying_group,
    orderings,
    paired_difference,
    paired_slope,
    row_accuracy,
    verdict,
)


def test_identical_rows_differ_by_exactly_zero_and_are_unresolved():
    rng = np.random.default_rng(1)
    one = (rng.random((1, 200)) < 0.6).astype(float)
    d = paired_difference(one, one.copy())  # one seed: every resample pairs the same answers
    assert (d.estimate, d.low, d.high) == (0.0, 0.0, 0.0)
    assert verdict(d) == "unresolved"
    three = (rng.random((3, 200)) < 0.6).astype(float)
    d = paired_difference(three, three.copy())  # each row's seeds are resampled on their own
    assert d.estimate == 0.0 and d.low < 0 < d.high and verdict(d) == "unresolved"


def test_right_everywhere_minus_wrong_everywhere_is_one_with_a_degenerate_interval():
    d = paired_difference(np.ones((3, 50)), np.zeros((2, 50)))
    assert (d.estimate, d.low, d.high) == (1.0, 1.0, 1.0)
    assert verdict(d) == "reproduced" and verdict(d, expected_positive=False) == "refuted"
    r = row_accuracy(np.ones((3, 50)))
    assert (r.mean, r.interval.low, r.interval.high, r.seed_std) == (1.0, 1.0, 1.0, 0.0)


def test_bernoulli_mean_interval_matches_the_normal_approximation():
    rng = np.random.default_rng(7)
    x = (rng.random(1000) < 0.6).astype(float)
    r = row_accuracy(x)  # one seed: only questions are resampled
    p = x.mean()
    half = 1.959964 * math.sqrt(p * (1 - p) / x.size)
    assert r.mean == pytest.approx(p)
    assert r.interval.low == pytest.approx(p - half, abs=0.004)
    assert r.interval.high == pytest.approx(p + half, abs=0.004)


def test_row_accuracy_is_the_mean_of_per_seed_accuracies_and_their_population_std():
    m = np.array([[1, 1, 0, 0], [1, 1, 1, 0], [1, 0, 0, 0]], dtype=float)
    r = row_accuracy(m)
    assert r.mean == pytest.approx((0.5 + 0.75 + 0.25) / 3)
    assert r.seed_std == pytest.approx(np.std([0.5, 0.75, 0.25]))
    assert (r.seeds, r.questions) == (3, 4)
    assert r.interval.low <= r.mean <= r.interval.high


def test_seed_resampling_widens_the_interval_when_seeds_disagree():
    """Two seeds that answer complementary halves: questions alone cannot see the seed spread."""
    q = 400
    one = np.r_[np.ones(q // 2), np.zeros(q // 2)]
    agree = row_accuracy(np.stack([one, one]))
    split = row_accuracy(np.stack([np.ones(q), np.zeros(q)]))  # per-seed 1.0 and 0.0
    assert split.mean == agree.mean == 0.5
    assert split.interval.high - split.interval.low > 3 * (agree.interval.high - agree.interval.low)


def test_paired_difference_equals_an_independent_loop_bootstrap():
    """Same generator stream, written as plain loops: seeds of a, seeds of b, then shared questions."""
    rng = np.random.default_rng(3)
    a = (rng.random((3, 60)) < 0.7).astype(float)
    b = (rng.random((2, 60)) < 0.5).astype(float)
    d = paired_difference(a, b, resamples=300, rng_seed=11)
    g = np.random.default_rng(11)
    sa = g.integers(0, 3, size=(300, 3))
    sb = g.integers(0, 2, size=(300, 2))
    qs = g.integers(0, 60, size=(300, 60))
    draws = []
    for k in range(300):
        pa = np.mean([a[s] for s in sa[k]], axis=0)
        pb = np.mean([b[s] for s in sb[k]], axis=0)
        draws.append(np.mean([pa[j] - pb[j] for j in qs[k]]))
    lo, hi = np.quantile(draws, [0.025, 0.975])
    assert d.estimate == pytest.approx(a.mean() - b.mean())
    assert (d.low, d.high) == (pytest.approx(lo), pytest.approx(hi))


def test_pairing_removes_question_difficulty():
    """b is a with 10 extra wrong answers: the paired interval is tight around the true 0.05."""
    rng = np.random.default_rng(5)
    a = (rng.random((1, 200)) < 0.5).astype(float)
    a[0, :20] = 1.0
    b = a.copy()
    b[0, :10] = 0.0
    d = paired_difference(a, b)
    assert d.estimate == pytest.approx(0.05)
    assert d.low > 0 and d.high < 0.1
    unpaired = row_accuracy(a).interval
    assert d.high - d.low < (unpaired.high - unpaired.low) / 2


def test_paired_slope_of_a_gap_that_grows_with_length():
    x = np.repeat([8.0, 16.0, 24.0, 32.0], 50)
    a = np.ones((2, 200))
    b = np.ones((2, 200))
    for k in range(4):  # at 8, 16, 24, 32 s b loses 0, 10, 20, 30 of each 50
        b[:, k * 50 : k * 50 + 10 * k] = 0.0
    s = paired_slope(a, b, x)
    gaps = np.array([0.0, 0.2, 0.4, 0.6])
    expected = np.polyfit([8, 16, 24, 32], gaps, 1)[0]
    assert s.estimate == pytest.approx(expected)
    assert s.low > 0
    assert paired_slope(a, b, np.full(200, 8.0)) is None


def test_carrying_group_and_orderings():
    diffs = {"p": Interval(0.2, 0.1, 0.3), "q": Interval(0.3, -0.1, 0.7), "r": Interval(0.1, 0.05, 0.15)}
    assert carrying_group(diffs, positive=True) == "p"  # q is larger but its interval contains 0
    assert carrying_group(diffs, positive=False) is None
    assert carrying_group({"s": Interval(-0.2, -0.3, -0.1)}, positive=False) == "s"
    groups = ["p"] * 50 + ["q"] * 50
    full = np.ones((2, 100))
    worse_on_p = full.copy()
    worse_on_p[:, :50] = 0.0
    same = full.copy()
    paper = {"abl": 50.0, "tie": 60.0, FULL: 60.0, "top": 70.0}
    out = orderings({"abl": worse_on_p, "tie": same, FULL: full, "top": worse_on_p}, paper, groups, resamples=200)
    pairs = {(o.higher, o.lower): o for o in out}
    assert set(pairs) == {("tie", "abl"), (FULL, "abl"), ("top", "abl"), ("top", "tie"), ("top", FULL)}
    assert pairs[(FULL, "abl")].verdict == "reproduced" and pairs[(FULL, "abl")].carrier == "p"
    assert pairs[("top", FULL)].verdict == "refuted" and pairs[("top", FULL)].carrier == "p"
    assert pairs[("top", "abl")].verdict == "unresolved" and pairs[("top", "abl")].carrier is None


def test_align_orders_columns_and_refuses_missing_questions():
    order, m = align([{"q1": 1, "q2": 0}, {"q2": 1, "q1": 1}])
    assert order == ["q1", "q2"] and m.tolist() == [[1, 0], [1, 1]]
    with pytest.raises(ValueError, match="missing"):
        align([{"q1": 1}, {"q2": 1}])


def test_probes_hypotheses_name_rows_of_the_table():
    from _scripts import load_script

    rows = {r for r, _, _ in load_script("ablation").ROWS}
    claims = [p for p in PROBES if p.beats]
    assert [p.name for p in claims] == ["query", "binding", "order_long", "distractor", "quota"]
    assert all(set(p.beats) <= rows - {FULL} for p in claims)
    assert set(UNTARGETED) == rows - {FULL} - {r for p in claims for r in p.beats}  # only Gumbel
    text = "\n".join(hypotheses_markdown())
    assert text.startswith("## Hypotheses (fixed before the run)")
    assert all(f"`{p.name}`" in text for p in PROBES) and "ablation_gumbel" in text
