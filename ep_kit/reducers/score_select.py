"""Score-and-select: the common base of the pre-LLM reducers that rank tokens and keep a Top-K.

A scorer rates every token, a selector keeps ``k = keep_count(n, r)`` candidates per sample (one
joint pool, or per modality), text and non-candidates are always kept, in order, with their
original positions. Subclasses change *what the scorer reads* (:meth:`ScoreSelect.states`): CS2
runs its sieve first; Random and IntraModal read the merged input embeddings.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from ep_kit.reducers.base import ReducerHost, ReductionContext, TokenReducer
from ep_kit.scorers import Scorer
from ep_kit.selectors import HardTopK, Selector, nan_at_candidates
from ep_kit.sequence import TokenSequence


class ScoreSelect(TokenReducer):
    """Score every token, keep the selector's Top-K of the candidates.

    Args:
        scorer: factory ``hidden_size -> Scorer`` (a scorer class, or a class_path in YAML), built
            once at :meth:`attach` in the model's dtype and device.
        selector: the Top-K rule (default :class:`~ep_kit.selectors.HardTopK`). A straight-through
            selector's weights (exactly 1 forward) multiply the candidates' states so the LM loss
            reaches the scorer.
    """

    #: Key of the per-sample kept count in the reduction stats.
    stat_key = "score_select_k"

    def __init__(self, scorer: Callable[[int], Scorer], selector: Selector | None = None) -> None:
        super().__init__()
        self.scorer_factory = scorer
        self.selector = selector if selector is not None else HardTopK()
        self.scorer: Scorer | None = None

    def attach(self, model: ReducerHost) -> None:
        if self.scorer is None:
            self.scorer = self.scorer_factory(model.hidden_size).to(device=model.device, dtype=model.dtype)

    def states(self, seq: TokenSequence, ctx: ReductionContext) -> TokenSequence:
        """The sequence the scorer reads and whose states the kept tokens carry into the LLM."""
        return seq

    def before_llm(self, seq: TokenSequence, ctx: ReductionContext) -> TokenSequence:
        if self.scorer is None:
            raise RuntimeError(f"{type(self).__name__}.before_llm called before attach(model): build it through the model")
        candidates = ctx.candidates & seq.attention_mask
        # No host-side shortcut for text-only batches: with no candidates every token is kept and a
        # media-free sample's states are left as they are, so the result is the same, and asking
        # the host first would cost a sync on every batch.
        scored = self.states(seq, ctx)
        scores = self.scorer(scored)
        selection = self.selector(scores, candidates, ctx.keep_ratio, seq.modality, check_nan=False)
        hidden = scored.hidden
        if selection.weight is not None:  # straight-through weights: only when a gradient can flow
            weight = torch.where(candidates, selection.weight, torch.ones_like(selection.weight))
            hidden = hidden * weight[..., None].to(hidden.dtype)
        ctx.stats[self.stat_key] = selection.k
        keep = (selection.keep & candidates) | ~candidates
        # The one host sync of the reduction: the kept length (for the gather) and the NaN check, read together.
        length, nan = torch.stack([seq.kept_length(keep), nan_at_candidates(scores, candidates).long()]).tolist()
        if nan:
            raise ValueError(f"{type(self).__name__}: the scorer returned NaN at candidate tokens")
        return seq.replace(hidden=hidden).keep(keep, length=length)

    def kept_candidates(self, n_video: int, n_audio: int, keep_ratio: float) -> int:
        return self.selector.kept_count(n_video, n_audio, keep_ratio)
