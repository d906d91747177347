"""PyramidDrop (training-free): staged in-LLM dropping of audio/video tokens.

Rule (the paper's PyramidDrop baseline): before each listed decoder layer ``l_s`` (paper: 8, 16, 24
of 36) the remaining A/V candidates are ranked by the head-averaged attention of the last instruction token
(last real non-answer token), computed with the q/k of layer ``l_s`` itself -- the layer *after*
the stage boundary -- on its input hidden states (:meth:`ReducerHost.attention_row`,
one row, no ``L x L`` matrix), and ``keep_count(n_remaining, lambda)`` of them are kept. Text is
never dropped, kept tokens keep their original positions, only the prefill is reduced.

Effective budget. With stage layers ``l_1 < ... < l_S`` in an ``N``-layer decoder, the fraction of
A/V tokens present in each layer is 1 for layers ``[0, l_1)``, ``lambda^s`` for ``[l_s, l_{s+1})``
(``l_{S+1} = N``). The budget in the common unit is its average over layers::

    r_eff(lambda) = ( l_1 + sum_{s=1..S} lambda^s * (l_{s+1} - l_s) ) / N

(paper setting, lambda = 0.5 on 36 layers: (8 + 4 + 2 + 1.5) / 36 = 0.43). ``r_eff`` grows
monotonically from ``l_1 / N`` (lambda -> 0) to 1, so :func:`pyramiddrop_for_budget` inverts it by
bisection; a budget at or below ``l_1 / N`` is unreachable with those layers (move the first stage
earlier). The realised value (ceil per stage) is logged by the wrapper as ``layer_avg_keep_ratio``
and by this reducer as ``pyramiddrop_effective``.
"""

from __future__ import annotations

from collections.abc import Sequence

from ep_kit.budget import check_ratio, keep_count, keep_counts
from ep_kit.reducers.attention_rank import query_index
from ep_kit.reducers.base import ReducerHost, ReductionContext, TokenReducer, TokenSchedule
from ep_kit.selectors import top_k_mask
from ep_kit.sequence import TokenSequence


def _check_layers(layers: Sequence[int], num_layers: int | None = None) -> tuple[int, ...]:
    out = tuple(int(x) for x in layers)
    if not out:
        raise ValueError("PyramidDrop layers must not be empty")
    if list(out) != sorted(set(out)) or out[0] < 1:
        raise ValueError(f"PyramidDrop layers must be strictly increasing and >= 1, got {list(layers)}")
    if num_layers is not None and out[-1] >= num_layers:
        raise ValueError(
            f"PyramidDrop layers {list(out)} must be smaller than the decoder depth ({num_layers})"
        )
    return out


def effective_budget(stage_ratio: float, num_layers: int, layers: Sequence[int]) -> float:
    """``r_eff`` (module docstring): the average over layers of the fraction of A/V tokens present."""
    ls = _check_layers(layers, num_layers)
    lam = float(stage_ratio)
    if not 0.0 <= lam <= 1.0:
        raise ValueError(f"stage_ratio must be in [0, 1], got {stage_ratio}")
    bounds = [*ls, num_layers]
    total = float(ls[0])
    for s in range(len(ls)):
        total += lam ** (s + 1) * (bounds[s + 1] - bounds[s])
    return total / num_layers


def pyramiddrop_for_budget(r: float, num_layers: int, layers: Sequence[int]) -> float:
    """The stage ratio ``lambda`` whose effective budget ``r_eff(lambda)`` equals ``r`` (bisection, 1e-12).

    Raises ``ValueError`` when ``r <= layers[0] / num_layers`` (unreachable: all layers before the
    first stage see every token).
    """
    r = check_ratio(r, "keep_ratio")
    ls = _check_layers(layers, num_layers)
    floor = ls[0] / num_layers
    if r <= floor:
        raise ValueError(
            f"PyramidDrop cannot reach budget {r}: with the first stage at layer {ls[0]} of {num_layers} the "
            f"effective budget is always above {floor:.4f}; move the first stage earlier"
        )
    if r >= 1.0:
        return 1.0
    lo, hi = 0.0, 1.0
    while hi - lo > 1e-12:
        mid = (lo + hi) / 2
        if effective_budget(mid, num_layers, ls) < r:
            lo = mid
        else:
            hi = mid
    return (lo + hi) / 2


class StageRatioRule:
    """How PyramidDrop derives its stage ratio ``lambda`` from the run's budget ``r`` (a component chosen by class_path)."""

    def __call__(self, keep_ratio: float, num_layers: int, layers: Sequence[int]) -> float:  # pragma: no cover
        raise NotImplementedError

    def __repr__(self) -> str:
        return f"{type(self).__name__}()"


class MatchLayerAverage(StageRatioRule):
    """``lambda`` whose layer-averaged A/V fraction ``r_eff(lambda)`` equals ``r`` (:func:`pyramiddrop_for_budget`).

    Raises when ``r <= layers[0] / num_layers`` (unreachable: every layer before the first stage
    sees all tokens).
    """

    def __call__(self, keep_ratio: float, num_layers: int, layers: Sequence[int]) -> float:
        return pyramiddrop_for_budget(keep_ratio, num_layers, layers)


class MatchFinalStage(StageRatioRule):
    """``lambda = r ** (1 / S)``: the last of the ``S`` stages keeps ``r`` of the A/V tokens.

    For shallow decoders (the 4-layer toy thinker) where no layer average below
    ``layers[0] / num_layers`` exists; the realised layer average is still logged.
    """

    def __call__(self, keep_ratio: float, num_layers: int, layers: Sequence[int]) -> float:
        return check_ratio(keep_ratio) ** (1.0 / len(layers))


class PyramidDrop(TokenReducer):
    """PyramidDrop with stages before ``layers``.

    Args:
        layers: decoder layers before which a stage drops tokens (paper: ``[8, 16, 24]``); all must
            lie in ``[1, num_layers)``.
        stage_ratio: ``lambda``, the fraction of the remaining A/V tokens each stage keeps (paper:
            0.5), or a :class:`StageRatioRule` that derives it from the run's keep ratio
            (:class:`MatchLayerAverage`: the matched-budget recipes; :class:`MatchFinalStage`: toy).
    """

    def __init__(self, layers: list[int] | None = None, stage_ratio: float | StageRatioRule = 0.5) -> None:
        super().__init__()
        self.layers = _check_layers(layers if layers is not None else [8, 16, 24])
        if isinstance(stage_ratio, StageRatioRule):
            self.stage_ratio: float | StageRatioRule = stage_ratio
        else:
            self.stage_ratio = check_ratio(stage_ratio, "stage_ratio")
        self.drop_before_layers = self.layers
        self.num_layers: int | None = None

    def extra_repr(self) -> str:
        return f"layers={list(self.layers)}, stage_ratio={self.stage_ratio!r}"

    def attach(self, model: ReducerHost) -> None:
        _check_layers(self.layers, model.num_layers)
        self.num_layers = model.num_layers

    def lam(self, keep_ratio: float, num_layers: int | None = None) -> float:
        """The stage ratio used at budget ``keep_ratio`` in a ``num_layers``-layer decoder (default: attached model's)."""
        if not isinstance(self.stage_ratio, StageRatioRule):
            return self.stage_ratio
        depth = num_layers if num_layers is not None else self.num_layers
        if depth is None:
            raise RuntimeError("PyramidDrop needs attach(model) or num_layers to derive its stage ratio from the budget")
        return self.stage_ratio(keep_ratio, depth, self.layers)

    def in_llm(self, seq: TokenSequence, layer_idx: int, ctx: ReductionContext) -> TokenSequence:
        if layer_idx not in self.layers:
            return seq
        lam = self.lam(ctx.keep_ratio)
        if lam >= 1.0:
            return seq
        scores = ctx.model.attention_row(layer_idx, seq, query_index(seq))
        candidates = ctx.candidates & seq.attention_mask
        k = keep_counts(candidates.sum(-1), lam)
        keep = top_k_mask(scores, candidates, k)
        ctx.stats.setdefault("pyramiddrop_k", []).append(k)
        ctx.stats["pyramiddrop_stage_ratio"] = lam
        if self.num_layers is not None:
            ctx.stats["pyramiddrop_effective"] = effective_budget(lam, self.num_layers, self.layers)
        return seq.keep(keep | ~candidates)

    def token_schedule(self, n_video: int, n_audio: int, num_layers: int, keep_ratio: float) -> TokenSchedule:
        """Candidates per layer: all before the first stage, ``keep_count(remaining, lambda)`` at each stage."""
        _check_layers(self.layers, num_layers)
        lam = self.lam(keep_ratio, num_layers)
        out, current = [], n_video + n_audio
        for i in range(num_layers):
            if i in self.layers and lam < 1.0:
                current = keep_count(current, lam)
            out.append(current)
        return TokenSchedule(tuple(out))
