"""Attention modes of the sieve (bidirectional, causal, intra-modal) in every form a backend takes.

One mode = one rule "query i may attend to key j". Every form adds the same two constraints:
padding keys are never attended, and (when asked) answer tokens are not keys, so nothing leaks from
the answer into the tokens that decide what is kept. A query row left with no key at all (e.g. a
padding row, or an intra-modal row whose only same-modality tokens are excluded) is allowed its
own diagonal, so softmax never sees an all-masked row and never produces NaN.

Forms:
* :meth:`AttentionMode.dense` -- ``(B, 1, L, L)`` bool, True = may attend (the reference form).
* :meth:`AttentionMode.layer_kwargs` -- ``attention_mask``/``is_causal`` for a transformers
  decoder layer, the cheapest exact form per backend:
  - ``sdpa``: transformers passes a bool mask to ``scaled_dot_product_attention`` as is and only
    uses ``is_causal`` when the mask is None. So: no mask + ``is_causal=False`` for unpadded
    bidirectional, a ``(B, 1, 1, L)`` key mask for padded bidirectional, no mask +
    ``is_causal=True`` for right-padded causal (pad keys sit after every real query, so real rows
    are exact), a full ``(B, 1, L, L)`` mask otherwise.
  - ``eager``: transformers *adds* the mask to the scores and ignores ``is_causal`` (a None mask
    means bidirectional), so the mask is always additive float: 0 allowed, ``finfo(dtype).min``
    not. A bool mask there would be added as 0/1: a silent bug.
  - ``flash_attention_2``: only a 2D padding mask and the causal flag exist; intra-modal blocks and
    excluded answer keys cannot be expressed and raise.
* :meth:`AttentionMode.mask_mod` -- a ``mask_mod(b, h, q_idx, kv_idx)`` for torch flex attention.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

from ep_kit.sequence import Modality, TokenSequence

MaskMod = Callable[[Tensor, Tensor, Tensor, Tensor], Tensor]

SUPPORTED_IMPLEMENTATIONS = ("sdpa", "eager", "flash_attention_2", "flash_attention_3")


def key_mask(seq: TokenSequence, exclude_answer_keys: bool) -> Tensor:
    """``(B, L)`` bool: tokens that may serve as keys (real, and not answer tokens when excluded)."""
    keys = seq.attention_mask.clone()
    if exclude_answer_keys:
        keys &= ~seq.answer_mask
    return keys


def is_right_padded(attention_mask: Tensor) -> bool:
    """True when every row is ``lengths[b]`` real tokens followed only by padding."""
    L = attention_mask.shape[-1]
    lengths = attention_mask.sum(-1, keepdim=True)
    expected = torch.arange(L, device=attention_mask.device)[None, :] < lengths
    return bool(torch.equal(expected, attention_mask))


def to_additive(mask: Tensor, dtype: torch.dtype) -> Tensor:
    """Bool mask (True = attend) -> additive float mask (0 / ``finfo(dtype).min``) for eager attention."""
    zero = torch.zeros((), dtype=dtype, device=mask.device)
    neg = torch.full((), torch.finfo(dtype).min, dtype=dtype, device=mask.device)
    return torch.where(mask, zero, neg)


class AttentionMode:
    """Base attention rule. Subclasses define :meth:`pattern` (and :meth:`_pattern_mod` for flex)."""

    #: True when the rule is exactly "key index <= query index" (usable as a kernel's causal flag).
    causal: bool = False
    #: True when the rule allows every key (only padding/answer keys are removed).
    full: bool = False

    def __repr__(self) -> str:
        return f"{type(self).__name__}()"

    def __eq__(self, other: object) -> bool:
        return type(self) is type(other)

    def __hash__(self) -> int:
        return hash(type(self))

    # ----------------------------------------------------------------- rule
    def pattern(self, seq: TokenSequence) -> Tensor:
        """``(B, L, L)`` bool (or broadcastable): the mode's own rule, before padding/answer keys."""
        raise NotImplementedError

    def _pattern_mod(self, seq: TokenSequence) -> MaskMod:
        raise NotImplementedError

    def _empty_rows(self, seq: TokenSequence, keys: Tensor) -> Tensor:
        """``(B, L)`` bool: query rows with no allowed key, computed without an ``L x L`` mask."""
        raise NotImplementedError

    # ---------------------------------------------------------------- dense
    def dense(self, seq: TokenSequence, exclude_answer_keys: bool = False) -> Tensor:
        """``(B, 1, L, L)`` bool, True = query row may attend key column.

        Padding keys are never allowed; answer keys are removed when ``exclude_answer_keys``; rows
        with no allowed key get their own diagonal.
        """
        B, L = seq.attention_mask.shape
        keys = key_mask(seq, exclude_answer_keys)
        allowed = self.pattern(seq).expand(B, L, L) & keys[:, None, :]
        empty = ~allowed.any(-1)  # (B, L) rows with no key at all
        eye = torch.eye(L, dtype=torch.bool, device=allowed.device)  # unconditionally: no host read
        return (allowed | (eye[None] & empty[:, :, None]))[:, None]

    # -------------------------------------------------------- layer kwargs
    def layer_kwargs(
        self,
        seq: TokenSequence,
        attn_implementation: str = "sdpa",
        dtype: torch.dtype = torch.float32,
        exclude_answer_keys: bool = False,
        *,
        every_key: bool = False,
    ) -> dict:
        """``dict(attention_mask=..., is_causal=...)`` for a transformers decoder layer's forward.

        See the module docstring for the form chosen per backend. Only the rows of real query
        tokens are guaranteed exact; padding rows are finite but meaningless. ``every_key=True`` is
        the caller's guarantee that every token is real and a key (no padding, no excluded answer,
        e.g. a batch it trimmed itself), which spares the host read that would check it.
        """
        impl = attn_implementation
        if impl.startswith("flash_attention") or "flash" in impl:
            return self._flash_kwargs(seq, exclude_answer_keys, impl, every_key)
        if impl not in ("sdpa", "eager"):
            raise ValueError(
                f"attn_implementation {impl!r} is not supported by {self!r}; use one of {SUPPORTED_IMPLEMENTATIONS}"
            )
        mask, is_causal = self._cheapest_bool(seq, exclude_answer_keys, every_key)
        if impl == "sdpa":
            return {"attention_mask": mask, "is_causal": is_causal}
        # eager: additive float, and it never looks at is_causal.
        if mask is None:
            if is_causal:
                mask = self.dense(seq, exclude_answer_keys)
            else:
                B, L = seq.attention_mask.shape
                mask = torch.ones(B, 1, 1, L, dtype=torch.bool, device=seq.attention_mask.device)
        return {"attention_mask": to_additive(mask, dtype), "is_causal": False}

    def _cheapest_bool(
        self, seq: TokenSequence, exclude_answer_keys: bool, every_key: bool = False
    ) -> tuple[Tensor | None, bool]:
        """Smallest bool mask (or None + causal flag) exactly equal to :meth:`dense` on real query rows.

        At most one host read decides the form (none for intra-modal, whose mask is always dense, or
        when the caller vouches ``every_key``).
        """
        if not (self.full or self.causal):
            return self.dense(seq, exclude_answer_keys), False
        if every_key:
            return None, self.causal
        keys = key_mask(seq, exclude_answer_keys)
        if self.full:
            every, no_empty_row = torch.stack([keys.all(), keys.any(-1).all()]).tolist()
            if every:
                return None, False
            if no_empty_row:  # every sample keeps at least one key: the key mask alone is exact
                return keys[:, None, None, :], False
            return self.dense(seq, exclude_answer_keys), False
        # Causal: the flag alone is exact when nothing is excluded and padding only trails each row.
        real = seq.attention_mask
        right = torch.arange(real.shape[-1], device=real.device)[None, :] < real.sum(-1, keepdim=True)
        if not bool(((keys != real) | (right != real)).any()):
            return None, True
        return self.dense(seq, exclude_answer_keys), False

    def _flash_kwargs(self, seq: TokenSequence, exclude_answer_keys: bool, impl: str, every_key: bool = False) -> dict:
        if not (self.full or self.causal):
            raise ValueError(
                f"{self!r} cannot run with attn_implementation={impl!r}: flash attention only takes a padding "
                "mask and a causal flag; use 'sdpa' or 'eager'"
            )
        if every_key:
            return {"attention_mask": None, "is_causal": self.causal}
        if exclude_answer_keys and bool((seq.answer_mask & seq.attention_mask).any()):
            raise ValueError(
                f"exclude_answer_keys=True cannot be expressed with attn_implementation={impl!r} (answer tokens "
                "are in the sequence); use 'sdpa' or 'eager', or drop the answer tokens before the sieve"
            )
        if not is_right_padded(seq.attention_mask):
            raise ValueError(
                f"attn_implementation={impl!r} needs a right-padded batch (TokenSequence.attention_mask)"
            )
        mask = None if bool(seq.attention_mask.all()) else seq.attention_mask.to(torch.int32)
        return {"attention_mask": mask, "is_causal": self.causal}

    # ----------------------------------------------------------------- flex
    def mask_mod(self, seq: TokenSequence, exclude_answer_keys: bool = False) -> MaskMod:
        """``mask_mod(b, h, q_idx, kv_idx) -> bool`` for ``torch.nn.attention.flex_attention``.

        Captures only ``(B, L)`` tensors (key mask, rows needing their diagonal), never an
        ``L x L`` mask, and equals :meth:`dense`.
        """
        keys = key_mask(seq, exclude_answer_keys)
        empty = self._empty_rows(seq, keys)
        rule = self._pattern_mod(seq)

        def mod(b: Tensor, h: Tensor, q_idx: Tensor, kv_idx: Tensor) -> Tensor:
            allowed = rule(b, h, q_idx, kv_idx) & keys[b, kv_idx]
            return allowed | (empty[b, q_idx] & (q_idx == kv_idx))

        return mod


class Bidirectional(AttentionMode):
    """Every token attends to every real key (the sieve's default)."""

    full = True

    def pattern(self, seq: TokenSequence) -> Tensor:
        L = seq.seq_len
        return torch.ones(1, L, L, dtype=torch.bool, device=seq.attention_mask.device)

    def _pattern_mod(self, seq: TokenSequence) -> MaskMod:
        def rule(b: Tensor, h: Tensor, q_idx: Tensor, kv_idx: Tensor) -> Tensor:
            return q_idx >= 0

        return rule

    def _empty_rows(self, seq: TokenSequence, keys: Tensor) -> Tensor:
        return (~keys.any(-1, keepdim=True)).expand_as(keys)


class Causal(AttentionMode):
    """Key index <= query index (the pretrained decoder's rule)."""

    causal = True

    def pattern(self, seq: TokenSequence) -> Tensor:
        L = seq.seq_len
        return torch.ones(L, L, dtype=torch.bool, device=seq.attention_mask.device).tril()[None]

    def _pattern_mod(self, seq: TokenSequence) -> MaskMod:
        def rule(b: Tensor, h: Tensor, q_idx: Tensor, kv_idx: Tensor) -> Tensor:
            return kv_idx <= q_idx

        return rule

    def _empty_rows(self, seq: TokenSequence, keys: Tensor) -> Tensor:
        return keys.long().cumsum(-1) == 0


class IntraModal(AttentionMode):
    """A token attends only to tokens of its own modality (text-text, video-video, audio-audio)."""

    def pattern(self, seq: TokenSequence) -> Tensor:
        m = seq.modality
        return m[:, :, None] == m[:, None, :]

    def _pattern_mod(self, seq: TokenSequence) -> MaskMod:
        m = seq.modality

        def rule(b: Tensor, h: Tensor, q_idx: Tensor, kv_idx: Tensor) -> Tensor:
            return m[b, q_idx] == m[b, kv_idx]

        return rule

    def _empty_rows(self, seq: TokenSequence, keys: Tensor) -> Tensor:
        m = seq.modality.long()
        per_modality = torch.zeros(m.shape[0], len(Modality), dtype=torch.long, device=m.device)
        per_modality.scatter_add_(1, m, keys.long())
        return per_modality.gather(1, m) == 0
