"""The one structure every ep-kit component takes and returns.

A batch of merged multimodal token sequences, *after* the media encoders have scattered their
features into the text embeddings and *after* the multi-axis rotary positions were computed on the
full sequence. Token reduction happens on this structure, so every component (sieve, scorer,
selector, baseline, decoder runner) speaks the same language: hidden states, modality ids,
positions, padding, "not a key" (answer) flags, labels and the index each token had in the
unreduced sequence.

Batches are right-padded with variable lengths: row ``b`` holds ``lengths[b]`` real tokens followed
by padding. ``keep`` preserves that invariant, the original order of tokens and their positions.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from enum import IntEnum

import torch
from torch import Tensor


class Modality(IntEnum):
    """Per-token modality id. Images count as ``VIDEO`` (one visual pool)."""

    TEXT = 0
    VIDEO = 1
    AUDIO = 2
    PAD = 3


AV_MODALITIES: tuple[Modality, ...] = (Modality.VIDEO, Modality.AUDIO)



def answer_span(labels: Tensor, ignore_index: int = -100) -> Tensor:
    """True from each row's first labelled token to the end of the row (the last axis).

    Why not just ``labels != ignore_index``: the template's newline after the answer's
    ``<|im_end|>`` (and any later turn) is unlabelled, yet its position still tells a bidirectional
    sieve how long the answer is. At inference nothing after the generation point exists, so
    nothing from the first answer token on may be a key of the sieve.
    """
    return (labels != ignore_index).long().cumsum(-1) > 0

@dataclass
class TokenSequence:
    """A right-padded batch of merged token sequences.

    Attributes:
        hidden: ``(B, L, D)`` hidden states (input embeddings, or refined states).
        modality: ``(B, L)`` long, values of :class:`Modality`; padding is ``Modality.PAD``.
        positions: ``(A, B, L)`` long rotary positions, ``A = 3`` (t, h, w: TMRoPE) or
            ``A = 4`` (t, h, w, t: Sync-RoPE). Padding positions are 0.
        attention_mask: ``(B, L)`` bool, True for real tokens, False for padding.
        answer_mask: ``(B, L)`` bool, True for answer tokens: they are never keys in the sieve and
            are never dropped.
        input_ids: ``(B, L)`` long token ids (placeholder ids for media), pad id on padding.
        labels: ``(B, L)`` long next-token labels already aligned with ``input_ids`` (HF style,
            ``-100`` = ignore), or None.
        source_index: ``(B, L)`` long index of each token in the unreduced sequence, -1 on padding.
    """

    hidden: Tensor
    modality: Tensor
    positions: Tensor
    attention_mask: Tensor
    answer_mask: Tensor
    input_ids: Tensor
    labels: Tensor | None = None
    source_index: Tensor | None = None

    def __post_init__(self) -> None:
        self.validate()  # first, so that a bad field is named instead of failing in the default below
        if self.source_index is None:
            B, L = self.modality.shape
            idx = torch.arange(L, device=self.modality.device).expand(B, L)
            self.source_index = torch.where(self.attention_mask, idx, torch.full_like(idx, -1))

    # ------------------------------------------------------------------ checks
    def validate(self) -> None:
        """Raise ``ValueError`` naming the field whose shape or dtype is inconsistent."""
        if self.hidden.ndim != 3:
            raise ValueError(f"TokenSequence.hidden must be (B, L, D), got shape {tuple(self.hidden.shape)}")
        B, L, _ = self.hidden.shape
        for name in ("modality", "attention_mask", "answer_mask", "input_ids", "labels", "source_index"):
            value = getattr(self, name)
            if value is None:
                continue
            if tuple(value.shape) != (B, L):
                raise ValueError(
                    f"TokenSequence.{name} must have shape (B, L) = {(B, L)} like hidden, got {tuple(value.shape)}"
                )
        if self.positions.ndim != 3 or tuple(self.positions.shape[1:]) != (B, L):
            raise ValueError(
                f"TokenSequence.positions must have shape (axes, B, L) = (3 or 4, {B}, {L}), "
                f"got {tuple(self.positions.shape)}"
            )
        if self.positions.shape[0] not in (3, 4):
            raise ValueError(f"TokenSequence.positions must have 3 or 4 axes, got {self.positions.shape[0]}")
        for name in ("attention_mask", "answer_mask"):
            if getattr(self, name).dtype != torch.bool:
                raise ValueError(f"TokenSequence.{name} must be a bool tensor, got {getattr(self, name).dtype}")

    # ------------------------------------------------------------- properties
    @property
    def batch_size(self) -> int:
        return self.hidden.shape[0]

    @property
    def seq_len(self) -> int:
        return self.hidden.shape[1]

    @property
    def lengths(self) -> Tensor:
        """``(B,)`` number of real tokens per sample."""
        return self.attention_mask.sum(-1)

    @property
    def av_mask(self) -> Tensor:
        """``(B, L)`` bool: audio or video tokens (the reduction candidates by default)."""
        return self.is_modality(*AV_MODALITIES)

    def is_modality(self, *modalities: Modality) -> Tensor:
        out = torch.zeros_like(self.attention_mask)
        for m in modalities:
            out |= self.modality == int(m)
        return out & self.attention_mask

    def count(self, *modalities: Modality) -> Tensor:
        """``(B,)`` number of real tokens of the given modalities."""
        return self.is_modality(*modalities).sum(-1)

    def replace(self, **changes) -> TokenSequence:
        return dataclasses.replace(self, **changes)

    # ------------------------------------------------------------------ gather
    def keep(self, keep: Tensor, length: int | None = None) -> TokenSequence:
        """Keep the tokens where ``keep`` (``(B, L)`` bool) is True, per sample, in original order.

        Padding is never kept. The result is right-padded again to the longest kept row. Hidden
        states are gathered with autograd (so straight-through weights multiplied into ``hidden``
        before the call carry their gradient), everything else is gathered as data.

        ``length``: the longest kept row, when the caller already read it (:meth:`kept_length`)
        together with other values in one host sync; else it is read here (one sync).
        """
        if tuple(keep.shape) != tuple(self.attention_mask.shape):
            raise ValueError(f"keep mask must have shape {tuple(self.attention_mask.shape)}, got {tuple(keep.shape)}")
        keep = keep.bool() & self.attention_mask
        counts = keep.sum(-1)
        new_len = length if length is not None else (int(counts.max().item()) if keep.numel() else 0)
        # Stable sort puts kept tokens first, in their original order.
        order = torch.sort((~keep).to(torch.int8), dim=-1, stable=True).indices[:, :new_len]
        valid = torch.arange(new_len, device=keep.device)[None, :] < counts[:, None]
        return self.gather(order, valid)

    def kept_length(self, keep: Tensor) -> Tensor:
        """0-dim device tensor: the longest row :meth:`keep` would return for ``keep`` (read it on the host
        together with other checks, then pass it as ``keep(mask, length=...)``)."""
        counts = (keep.bool() & self.attention_mask).sum(-1)
        return counts.max() if counts.numel() else counts.new_zeros(())

    def gather(self, index: Tensor, valid: Tensor) -> TokenSequence:
        """Gather ``index`` (``(B, K)``) per sample; slots where ``valid`` is False become padding."""
        B, K = index.shape
        D = self.hidden.shape[-1]
        hidden = torch.gather(self.hidden, 1, index[..., None].expand(B, K, D))
        hidden = hidden * valid[..., None].to(hidden.dtype)

        def take(x: Tensor, fill: int | bool) -> Tensor:
            g = torch.gather(x, -1, index if x.ndim == 2 else index[None].expand(x.shape[0], B, K))
            return torch.where(valid if x.ndim == 2 else valid[None], g, torch.full_like(g, fill))

        return TokenSequence(
            hidden=hidden,
            modality=take(self.modality, int(Modality.PAD)),
            positions=take(self.positions, 0),
            attention_mask=valid.clone(),
            answer_mask=take(self.answer_mask, False),
            input_ids=take(self.input_ids, 0),
            labels=None if self.labels is None else take(self.labels, -100),
            source_index=take(self.source_index, -1),
        )
