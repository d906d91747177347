"""Positional aliasing check for multi-axis RoPE layouts (why Sync-RoPE exists).

Pair ``j`` of a rotary embedding turns by ``theta_j = base ** (-2j / head_dim)`` radians per
position. Two kept tokens ``stride`` positions apart differ by ``stride * theta_j`` in that pair; once
that exceeds pi the phase wraps and the pair can no longer tell the distance from a shorter one
(Nyquist). TMRoPE puts time only in the 16 fastest pairs, so after sparse token selection every
temporal pair aliases; Sync-RoPE repeats t in the slowest pairs, which stay unambiguous for hours.

Use :func:`aliasing_report` for a table, :func:`rotary_similarity` / :func:`plot_similarity` for the
similarity of two tokens' temporal rotations over distance, or the CLI::

    python -m ep_kit.aliasing --stride 250            # 10 s of media at 25 positions/s
    python -m ep_kit.aliasing --stride 90000 --plot sim.png
"""

from __future__ import annotations

import argparse
import math
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
from torch import Tensor

from ep_kit.rope import AXIS_NAMES, TEMPORAL_AXES, MultiAxisRoPE, SyncRoPE, TMRoPE

#: Temporal positions per second of media in Qwen2.5-Omni (audio: 25 tokens/s; video t = s * 25).
POSITIONS_PER_SECOND = 25
QWEN25_OMNI_3B = {"base": 1e6, "head_dim": 128}


def as_rope(rope_or_layout: MultiAxisRoPE | str | Sequence[int]) -> MultiAxisRoPE:
    """A RoPE module from an instance, a name (``"tmrope"``/``"syncrope"``) or a section list
    (3 entries = TMRoPE ``[t, h, w]``, 4 = Sync-RoPE ``[t_high, h, w, t_low]``)."""
    if isinstance(rope_or_layout, MultiAxisRoPE):
        return rope_or_layout
    if isinstance(rope_or_layout, str):
        name = rope_or_layout.lower().replace("-", "").replace("_", "")
        if name == "tmrope":
            return TMRoPE()
        if name == "syncrope":
            return SyncRoPE()
        raise ValueError(
            f"unknown RoPE layout {rope_or_layout!r}; use 'tmrope', 'syncrope' or a section list"
        )
    sections = list(rope_or_layout)
    if len(sections) == 3:
        return TMRoPE(sections)
    if len(sections) == 4:
        return SyncRoPE(sections)
    raise ValueError(f"a section list needs 3 (TMRoPE) or 4 (SyncRoPE) entries, got {sections!r}")


def _bound(
    rope_or_layout: MultiAxisRoPE | str | Sequence[int], base: float | None, head_dim: int | None
) -> MultiAxisRoPE:
    """A bound RoPE for ``base``/``head_dim`` (defaults: the module's own); never rebinds the caller's module."""
    rope = as_rope(rope_or_layout)
    base = rope.base if base is None else float(base)
    head_dim = rope.head_dim if head_dim is None else int(head_dim)
    if base is None or head_dim is None:
        raise ValueError(f"{type(rope).__name__} has no base/head_dim: pass base and head_dim")
    if rope.is_bound and rope.base == base and rope.head_dim == head_dim:
        return rope
    if type(rope) in (TMRoPE, SyncRoPE):
        fresh: MultiAxisRoPE = type(rope)(list(rope.sections))
    else:
        fresh = MultiAxisRoPE(rope.sections, rope.section_axes, rope.num_axes)
    return fresh.bind(head_dim, base)


def pair_thetas(base: float, head_dim: int) -> Tensor:
    """``(head_dim/2,)`` float64 radians per position of every pair: ``base ** (-2j / head_dim)``."""
    j = torch.arange(head_dim // 2, dtype=torch.float64)
    return float(base) ** (-2.0 * j / head_dim)


@dataclass
class PairAliasing:
    """One temporal pair: its frequency, its phase step at the stride, and whether it aliases."""

    pair: int
    axis: int
    theta: float
    phase_step: float
    violates: bool

    @property
    def max_stride(self) -> float:
        """Largest stride (positions) this pair resolves without wrapping: pi / theta."""
        return math.pi / self.theta


@dataclass
class AliasingReport:
    """Nyquist check of every temporal pair of a layout at a given stride (positions)."""

    layout: str
    sections: list[int]
    base: float
    head_dim: int
    stride: float
    pairs: list[PairAliasing] = field(default_factory=list)

    @property
    def violating(self) -> list[PairAliasing]:
        return [p for p in self.pairs if p.violates]

    @property
    def all_violate(self) -> bool:
        return bool(self.pairs) and all(p.violates for p in self.pairs)

    def on_axis(self, axis: int) -> list[PairAliasing]:
        return [p for p in self.pairs if p.axis == axis]

    @property
    def lowest_temporal(self) -> PairAliasing:
        """The slowest temporal pair (the last line of defence against aliasing)."""
        return min(self.pairs, key=lambda p: p.theta)

    def __str__(self) -> str:
        seconds = self.stride / POSITIONS_PER_SECOND
        lines = [
            f"{self.layout} sections={self.sections} base={self.base:g} head_dim={self.head_dim} "
            f"stride={self.stride:g} positions ({seconds:g} s at {POSITIONS_PER_SECOND}/s)",
            f"{'pair':>4} {'axis':>5} {'theta (rad/pos)':>16} {'stride*theta':>13} {'max stride':>11}  Nyquist",
        ]
        for p in self.pairs:
            lines.append(
                f"{p.pair:>4} {AXIS_NAMES[p.axis]:>5} {p.theta:>16.6g} {p.phase_step:>13.6g} "
                f"{p.max_stride:>11.6g}  {'VIOLATED' if p.violates else 'ok'}"
            )
        low = self.lowest_temporal
        lines.append(
            f"{len(self.violating)}/{len(self.pairs)} temporal pairs violate Nyquist (stride*theta > pi); "
            f"lowest temporal frequency: pair {low.pair}, theta={low.theta:.6g} rad/pos, "
            f"unambiguous up to {low.max_stride:.6g} positions ({low.max_stride / POSITIONS_PER_SECOND:.6g} s)"
        )
        return "\n".join(lines)


def aliasing_report(
    rope_or_layout: MultiAxisRoPE | str | Sequence[int],
    base: float | None = None,
    head_dim: int | None = None,
    stride: float = 250,
) -> AliasingReport:
    """Which temporal pairs of a layout exceed Nyquist (``stride * theta_j > pi``) at ``stride`` positions."""
    if not float(stride) > 0:
        raise ValueError(f"stride must be > 0 positions, got {stride!r}")
    rope = _bound(rope_or_layout, base, head_dim)
    thetas = pair_thetas(rope.base, rope.head_dim)
    pairs = []
    for j in rope.temporal_pairs.tolist():
        theta = float(thetas[j])
        step = float(stride) * theta
        pairs.append(PairAliasing(j, int(rope.axis_of_pair[j]), theta, step, step > math.pi))
    return AliasingReport(
        type(rope).__name__, list(rope.sections), rope.base, rope.head_dim, float(stride), pairs
    )


def _pairs_for(rope: MultiAxisRoPE, axis: str) -> Tensor:
    if axis == "t":
        axes: tuple[int, ...] = TEMPORAL_AXES
    elif axis in ("t_high", "h", "w", "t_low"):
        axes = ({"t_high": 0, "h": 1, "w": 2, "t_low": 3}[axis],)
    else:
        raise ValueError(f"axis must be one of 't', 't_high', 'h', 'w', 't_low', got {axis!r}")
    sel = torch.zeros_like(rope.axis_of_pair, dtype=torch.bool)
    for a in axes:
        sel |= rope.axis_of_pair == a
    return torch.nonzero(sel).flatten()


def rotary_similarity(
    rope: MultiAxisRoPE | str | Sequence[int],
    distances: Tensor | Sequence[float],
    axis: str = "t",
    base: float | None = None,
    head_dim: int | None = None,
) -> Tensor:
    """Mean over the pairs of ``axis`` of ``cos(d * theta_j)`` for every distance ``d`` (float64).

    This is the rotary similarity of two identical vectors ``d`` positions apart (all pairs of
    equal norm): 1 at ``d = 0``; it oscillates when only fast pairs carry the axis and decays
    monotonically when slow pairs do. ``axis="t"`` takes every temporal pair (t and t_low).
    """
    rope = _bound(rope, base, head_dim)
    d = torch.as_tensor(distances, dtype=torch.float64).flatten()
    pairs = _pairs_for(rope, axis)
    if pairs.numel() == 0:
        raise ValueError(f"{type(rope).__name__} sections {rope.sections} have no pair on axis {axis!r}")
    thetas = pair_thetas(rope.base, rope.head_dim)[pairs]
    return torch.cos(d[:, None] * thetas[None, :]).mean(-1)


def plot_similarity(
    path: str,
    ropes: Sequence[MultiAxisRoPE | str | Sequence[int]] = ("tmrope", "syncrope"),
    base: float = 1e6,
    head_dim: int = 128,
    max_distance: float = 3600 * POSITIONS_PER_SECOND,
    num_points: int = 4000,
) -> str:
    """Plot the temporal rotary similarity over distance for each layout and save it to ``path``."""
    from matplotlib.figure import Figure  # drawn without pyplot: plotting never selects a backend

    d = torch.linspace(0, float(max_distance), int(num_points), dtype=torch.float64)
    fig = Figure(figsize=(8, 4.5))
    ax = fig.subplots()
    for spec in ropes:
        rope = _bound(spec, base, head_dim)
        name = f"{type(rope).__name__} {list(rope.sections)}"
        ax.plot(
            d / POSITIONS_PER_SECOND,
            rotary_similarity(rope, d, "t"),
            label=f"{name}: all temporal pairs",
            lw=0.6,
            alpha=0.8,
        )
        if (rope.axis_of_pair == 3).any():
            ax.plot(
                d / POSITIONS_PER_SECOND,
                rotary_similarity(rope, d, "t_low"),
                "--",
                label=f"{name}: t_low pairs",
            )
    ax.set_xlabel(f"temporal distance (s, {POSITIONS_PER_SECOND} positions/s)")
    ax.set_ylabel("mean cos(d * theta_j) over pairs")
    ax.set_title(f"Rotary similarity over distance (base {base:g}, head_dim {head_dim})")
    ax.axhline(0, color="grey", lw=0.5)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    return path


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m ep_kit.aliasing", description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--stride", type=float, default=250, help="temporal stride in positions (25 per second)"
    )
    parser.add_argument(
        "--base", type=float, default=QWEN25_OMNI_3B["base"], help="rope theta (Qwen2.5-Omni: 1e6)"
    )
    parser.add_argument("--head-dim", type=int, default=QWEN25_OMNI_3B["head_dim"], help="head dim (3B: 128)")
    parser.add_argument(
        "--tmrope", type=int, nargs=3, default=[16, 24, 24], metavar="N", help="TMRoPE sections"
    )
    parser.add_argument(
        "--syncrope", type=int, nargs=4, default=[18, 18, 18, 10], metavar="N", help="Sync-RoPE sections"
    )
    parser.add_argument("--plot", default=None, help="also save the similarity plot to this path")
    args = parser.parse_args(argv)
    for layout in (TMRoPE(args.tmrope), SyncRoPE(args.syncrope)):
        print(aliasing_report(layout, args.base, args.head_dim, args.stride))
        print()
    if args.plot:
        plot_similarity(args.plot, (args.tmrope, args.syncrope), args.base, args.head_dim)
        print(f"plot saved to {args.plot}")


if __name__ == "__main__":
    main()
