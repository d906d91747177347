"""Random selection at the common budget: the floor every reduction method must beat.

Each sample keeps ``k = keep_count(n, r)`` of its ``n`` candidate tokens, drawn uniformly without
replacement; text and non-candidates are always kept, in order, with their original positions.
"""

from __future__ import annotations

import torch

from ep_kit.budget import keep_counts
from ep_kit.reducers.base import ReductionContext, TokenReducer
from ep_kit.selectors import top_k_mask
from ep_kit.sequence import TokenSequence


class RandomReducer(TokenReducer):
    """Uniform random pre-LLM selection.

    Args:
        seed: None draws from torch's global generator; an int gives a private generator seeded
            once at construction, so a run (a sequence of calls) is reproducible.
    """

    def __init__(self, seed: int | None = None) -> None:
        super().__init__()
        self.seed = seed
        self._generator = torch.Generator().manual_seed(int(seed)) if seed is not None else None

    def extra_repr(self) -> str:
        return f"seed={self.seed}"

    def before_llm(self, seq: TokenSequence, ctx: ReductionContext) -> TokenSequence:
        candidates = ctx.candidates & seq.attention_mask
        # Uniform scores on the CPU generator (device-independent draws), ranked per sample.
        scores = torch.rand(candidates.shape, generator=self._generator).to(candidates.device)
        k = keep_counts(candidates.sum(-1), ctx.keep_ratio)
        keep = top_k_mask(scores, candidates, k)
        ctx.stats["random_k"] = k
        return seq.keep(keep | ~candidates)
