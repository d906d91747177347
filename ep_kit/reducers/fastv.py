"""FastV (training-free): drop audio/video tokens inside the LLM by the attention the last token pays them.

Rule (the paper's FastV baseline): layers ``0..K-1`` run on the full sequence; the A/V candidates
are ranked by the head-averaged attention the query token (last real non-answer token, see
:mod:`ep_kit.reducers.attention_rank`) pays them in layer ``K-1``; the top
``k = keep_count(n, r)`` are kept per sample (lower index wins ties), text and non-candidates are
always kept, kept tokens keep their original positions, and layers ``K..`` run on the reduced
sequence. Only the prefill is reduced; decoding runs on the reduced KV cache.

How it plugs into the wrapper: the attention of layer ``K-1`` needs that layer's INPUT, so the
reducer asks to be called before layer ``K-1`` (it only computes the ranking row there and returns
the sequence unchanged) and before layer ``K`` (where it applies the stored keep mask). The main
decoder never leaves its SDPA/flash kernel: only one ``(B, L)`` row is recomputed.
"""

from __future__ import annotations

import torch
from torch import Tensor

from ep_kit.budget import keep_count, keep_counts
from ep_kit.reducers.attention_rank import query_index
from ep_kit.reducers.base import ReducerHost, ReductionContext, TokenReducer, TokenSchedule
from ep_kit.selectors import top_k_mask
from ep_kit.sequence import TokenSequence


class FastV(TokenReducer):
    """FastV at layer ``K``.

    Args:
        layer: ``K`` >= 1: tokens are dropped before decoder layer ``K`` by the attention of layer
            ``K-1`` (paper: 2). Must be smaller than the decoder depth.
    """

    def __init__(self, layer: int = 2) -> None:
        super().__init__()
        if int(layer) < 1:
            raise ValueError(
                f"FastV layer must be >= 1 (attention of layer K-1 ranks the tokens), got {layer}"
            )
        self.layer = int(layer)
        self.drop_before_layers = (self.layer - 1, self.layer)
        self._pending: tuple[Tensor, Tensor] | None = None

    def extra_repr(self) -> str:
        return f"layer={self.layer}"

    def attach(self, model: ReducerHost) -> None:
        if self.layer >= model.num_layers:
            raise ValueError(
                f"FastV layer={self.layer} must be smaller than the decoder depth ({model.num_layers})"
            )

    def rank(self, seq: TokenSequence, ctx: ReductionContext) -> Tensor:
        """``(B, L)`` keep mask for ``seq`` (the input of layer ``K-1``): top-k candidates plus non-candidates."""
        scores = ctx.model.attention_row(self.layer - 1, seq, query_index(seq))
        candidates = ctx.candidates & seq.attention_mask
        k = keep_counts(candidates.sum(-1), ctx.keep_ratio)
        keep = top_k_mask(scores, candidates, k)
        ctx.stats["fastv_k"] = k
        return (keep | ~candidates) & seq.attention_mask

    def in_llm(self, seq: TokenSequence, layer_idx: int, ctx: ReductionContext) -> TokenSequence:
        if layer_idx == self.layer - 1:
            self._pending = (self.rank(seq, ctx), seq.source_index.clone())
            return seq
        if layer_idx == self.layer:
            if self._pending is None:
                raise RuntimeError(
                    f"FastV: called before layer {self.layer} without a ranking from layer {self.layer - 1}"
                )
            keep, source = self._pending
            self._pending = None
            if keep.shape != seq.attention_mask.shape or not torch.equal(source, seq.source_index):
                raise RuntimeError("FastV: the sequence changed between the ranking layer and the drop layer")
            return seq.keep(keep)
        return seq

    def token_schedule(self, n_video: int, n_audio: int, num_layers: int, keep_ratio: float) -> TokenSchedule:
        """Every candidate in layers ``0..K-1``, ``keep_count(n, r)`` from layer ``K`` on."""
        n = n_video + n_audio
        return TokenSchedule(tuple(n if i < self.layer else keep_count(n, keep_ratio) for i in range(num_layers)))
