"""Which token's attention the attention-ranked baselines (FastV, PyramidDrop) rank by.

They rank audio/video tokens by the head-averaged attention ONE query token per sample pays them
inside a decoder layer (:meth:`ReducerHost.attention_row`, one row, never ``L x L``).

The query token of a sample is its last real token that is not an answer token: during generation
that is the last prompt token (the "last token" of FastV, the "last instruction token" of
PyramidDrop); in a teacher-forced forward with answers it keeps the ranking from reading the answer.
"""

from __future__ import annotations

import torch
from torch import Tensor

from ep_kit.sequence import TokenSequence


def query_index(seq: TokenSequence) -> Tensor:
    """``(B,)`` long: index of the last real non-answer token of each sample (-1 for an empty row)."""
    eligible = seq.attention_mask & ~seq.answer_mask
    L = seq.seq_len
    idx = torch.arange(L, device=eligible.device).expand_as(eligible)
    last = torch.where(eligible, idx, torch.full_like(idx, -1)).amax(-1)
    # A row made only of answer tokens cannot happen in practice; fall back to its last real token.
    last_real = seq.lengths - 1
    return torch.where(last >= 0, last, last_real)
