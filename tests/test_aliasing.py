"""Aliasing report and rotary similarity for Qwen2.5-Omni-3B (base 1e6, head_dim 128)."""

import math

import pytest
import torch

from ep_kit.aliasing import aliasing_report, main, plot_similarity, rotary_similarity
from ep_kit.rope import SyncRoPE, TMRoPE

BASE, HEAD_DIM = 1e6, 128
TEN_SECONDS = 250  # positions at 25 per second
ONE_HOUR = 3600 * 25


def test_tmrope_every_temporal_pair_aliases_at_ten_seconds():
    report = aliasing_report(TMRoPE(), BASE, HEAD_DIM, stride=TEN_SECONDS)
    assert [p.pair for p in report.pairs] == list(range(16))
    assert report.all_violate and len(report.violating) == 16
    low = report.lowest_temporal
    # by hand: theta_15 = 1e6 ** (-30 / 128) = 10 ** (-1.40625) = 0.0392419 rad/position
    assert low.pair == 15 and low.theta == pytest.approx(0.0392419, rel=1e-5)
    assert low.phase_step == pytest.approx(250 * 0.0392419, rel=1e-5) and low.phase_step > math.pi
    # it still resolves strides up to pi / theta = pi / 0.0392419 = 80.06 positions (3.2 s)
    assert [p.pair for p in aliasing_report(TMRoPE(), BASE, HEAD_DIM, stride=80).violating] == list(range(15))


def test_syncrope_t_low_never_aliases_within_an_hour():
    report = aliasing_report(SyncRoPE(), BASE, HEAD_DIM, stride=ONE_HOUR)
    t_low = report.on_axis(3)
    assert [p.pair for p in t_low] == list(range(54, 64))
    assert not any(p.violates for p in t_low)
    # by hand: theta_54 = 1e6 ** (-108 / 128) = 10 ** (-5.0625) = 8.65964e-6; 90000 * theta_54 = 0.779 < pi
    assert t_low[0].theta == pytest.approx(8.65964e-6, rel=1e-5)
    assert t_low[0].phase_step == pytest.approx(0.779368, rel=1e-5)
    assert report.lowest_temporal.pair == 63
    # the fast t pairs of course still alias: the report is not blanket "ok"
    assert all(p.violates for p in report.on_axis(0))


def test_report_accepts_layouts_and_bound_modules():
    a = aliasing_report([16, 24, 24], BASE, HEAD_DIM, TEN_SECONDS)
    b = aliasing_report(TMRoPE(head_dim=HEAD_DIM, base=BASE), stride=TEN_SECONDS)
    c = aliasing_report("tmrope", BASE, HEAD_DIM, TEN_SECONDS)
    assert a.pairs == b.pairs == c.pairs
    text = str(a)
    assert "16/16 temporal pairs violate" in text and text.count("VIOLATED") == 16
    with pytest.raises(ValueError, match="stride must be > 0 positions, got 0"):
        aliasing_report("tmrope", BASE, HEAD_DIM, 0)
    with pytest.raises(ValueError, match="unknown RoPE layout 'xrope'"):
        aliasing_report("xrope", BASE, HEAD_DIM, 1)
    with pytest.raises(ValueError, match="pass base and head_dim"):
        aliasing_report(TMRoPE(), stride=1)
    with pytest.raises(ValueError, match=r"sections \[16, 24, 24\] sum to 64 pairs, but head_dim 64"):
        aliasing_report(TMRoPE(), BASE, 64, 1)


def test_rotary_similarity_hand_values():
    # one temporal pair with theta = 1: similarity is cos(d)
    d = torch.tensor([0.0, 1.0, 2.5, 100.0])
    sim = rotary_similarity(TMRoPE([1, 2, 1]), d, base=100.0, head_dim=8)
    torch.testing.assert_close(sim, torch.cos(d.double()))
    # Sync-RoPE [1,1,1,1]: t pairs 0 (theta 1) and 3 (theta 100^(-6/8)); mean of both cosines
    sim = rotary_similarity(SyncRoPE([1, 1, 1, 1]), d, base=100.0, head_dim=8)
    torch.testing.assert_close(sim, (torch.cos(d.double()) + torch.cos(d.double() * 100 ** (-0.75))) / 2)


def test_rotary_similarity_equals_rotated_dot_product():
    """mean cos(d theta_j) over the temporal pairs == <R(0) q, R(d) q> / |q|^2 on those pairs, q with equal norms."""
    rope = SyncRoPE().bind(HEAD_DIM, BASE)
    d = torch.tensor([0, 7, 250, 4000, 90000])
    pos = torch.zeros(3, 1, len(d) + 1, dtype=torch.long)
    pos[0, 0, 1:] = d  # only t moves
    cos, sin = rope(pos, torch.float64)
    q = torch.ones(1, 1, len(d) + 1, HEAD_DIM, dtype=torch.float64)
    q_rot, _ = rope.apply_rotary(q, q, cos, sin)
    pairs = rope.temporal_pairs
    cols = torch.cat([pairs, pairs + HEAD_DIM // 2])
    dots = (q_rot[0, 0, 1:, cols] * q_rot[0, 0, :1, cols]).sum(-1) / len(cols)
    # the module computes phases in float32 like transformers (about 5e-3 rad off at 90000 positions)
    torch.testing.assert_close(rotary_similarity(rope, d), dots, rtol=0, atol=1e-3)
    assert rotary_similarity(rope, d)[3] < 0.5  # not a trivially flat curve


def test_oscillating_versus_monotonic():
    d = torch.linspace(0, ONE_HOUR, 2001)
    tm = rotary_similarity(TMRoPE(), d, base=BASE, head_dim=HEAD_DIM)
    low = rotary_similarity(SyncRoPE(), d, "t_low", base=BASE, head_dim=HEAD_DIM)
    assert (tm.diff() > 0).any() and (tm.diff() < 0).any() and tm.min() < 0  # oscillates
    assert (low.diff() < 0).all() and low[-1] > 0.9  # monotonic, still close over an hour


def test_plot_and_cli(tmp_path, capsys):
    out = plot_similarity(str(tmp_path / "sim.png"), max_distance=2000, num_points=200)
    assert (tmp_path / "sim.png").stat().st_size > 1000 and out.endswith("sim.png")
    main(["--stride", "250"])
    text = capsys.readouterr().out
    assert "TMRoPE sections=[16, 24, 24] base=1e+06 head_dim=128 stride=250" in text
    assert "16/16 temporal pairs violate Nyquist" in text
    assert "SyncRoPE sections=[18, 18, 18, 10]" in text and "18/28 temporal pairs violate" in text
