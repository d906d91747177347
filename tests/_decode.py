"""Shared helpers of the generation tests: one sample of a sequence, and appending a generated token.

The uncached greedy references in ``test_generation`` and ``test_baselines`` grow a single sample's
sequence token by token with these, independently of ``OmniThinker.generate``.
"""

from __future__ import annotations

import torch

from ep_kit.models import OmniThinker
from ep_kit.sequence import Modality, TokenSequence


def row_of(seq: TokenSequence, b: int) -> TokenSequence:
    n = int(seq.attention_mask[b].sum())
    return TokenSequence(
        hidden=seq.hidden[b : b + 1, :n],
        modality=seq.modality[b : b + 1, :n],
        positions=seq.positions[:, b : b + 1, :n],
        attention_mask=seq.attention_mask[b : b + 1, :n],
        answer_mask=seq.answer_mask[b : b + 1, :n],
        input_ids=seq.input_ids[b : b + 1, :n],
        source_index=seq.source_index[b : b + 1, :n],
    )


def append_token(model: OmniThinker, seq: TokenSequence, token: torch.Tensor, position: int) -> TokenSequence:
    one = torch.ones(1, 1, dtype=torch.bool)
    return TokenSequence(
        hidden=torch.cat([seq.hidden, model.embed_tokens(token).view(1, 1, -1)], 1),
        modality=torch.cat([seq.modality, torch.full((1, 1), int(Modality.TEXT))], 1),
        positions=torch.cat([seq.positions, torch.full((seq.positions.shape[0], 1, 1), position)], 2),
        attention_mask=torch.cat([seq.attention_mask, one], 1),
        answer_mask=torch.cat([seq.answer_mask, ~one], 1),
        input_ids=torch.cat([seq.input_ids, token.view(1, 1)], 1),
        source_index=torch.cat([seq.source_index, torch.full((1, 1), 10_000)], 1),
    )
