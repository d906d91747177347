"""The attention rows that attention-ranked baselines (FastV, PyramidDrop) rank tokens by -- and nothing more.

FastV and PyramidDrop rank audio/video tokens by the attention ONE query token per sample (the last
instruction token) pays them inside a decoder layer. Asking the model for its attention weights
would force the eager kernel on every layer and materialise ``(B, H, L, L)`` matrices; instead the
main decoder keeps running on SDPA/flash and this module recomputes, for the ranking layer only,

    softmax(q_query . k_all / sqrt(head_dim))   averaged over heads  -> (B, L)

from that layer's own ``input_layernorm``, ``q_proj`` and ``k_proj`` applied to the layer's input
hidden states, rotated by the kit's rotary ``(cos, sin)`` (so kept tokens keep their original
positions). Grouped-query attention: query head ``h`` reads key head ``h // (H / H_kv)``. The cost is
one ``k_proj`` over the sequence plus a ``(B, H, 1, L)`` product -- never ``(L, L)``.

The query token of a sample is its last real token that is not an answer token: during generation
that is the last prompt token (the "last token" of FastV, the "last instruction token" of
PyramidDrop); in a teacher-forced forward with answers it keeps the ranking from reading the answer.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from ep_kit.rope import apply_rotary
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


def attention_row(
    layer: nn.Module,
    hidden: Tensor,
    cos_sin: tuple[Tensor, Tensor],
    query: Tensor,
    key_mask: Tensor,
    causal: bool = True,
) -> Tensor:
    """Head-averaged attention probabilities of one query token per sample over all keys.

    Args:
        layer: a transformers ``Qwen2_5OmniDecoderLayer`` (its ``input_layernorm`` and
            ``self_attn.{q_proj,k_proj}`` are used, nothing else).
        hidden: ``(B, L, D)`` INPUT hidden states of that layer.
        cos_sin: the rotary ``(cos, sin)``, each ``(B, L, head_dim)``, for the same tokens.
        query: ``(B,)`` long index of the query token of each sample.
        key_mask: ``(B, L)`` bool, True for keys that may be attended (real tokens).
        causal: keys after the query are masked (the decoder is causal).

    Returns:
        ``(B, L)`` probabilities (float32, or float64 for float64 input), 0 on masked keys. Rows
        sum to 1 over the allowed keys.
    """
    attn = layer.self_attn
    if getattr(attn, "sliding_window", None) is not None:
        raise ValueError("attention_row does not support sliding-window decoder layers")
    B, L, _ = hidden.shape
    if tuple(query.shape) != (B,):
        raise ValueError(f"query must have shape (B,) = ({B},), got {tuple(query.shape)}")
    if tuple(key_mask.shape) != (B, L):
        raise ValueError(f"key_mask must have shape (B, L) = {(B, L)}, got {tuple(key_mask.shape)}")
    head_dim = int(attn.head_dim)
    n_heads = attn.q_proj.out_features // head_dim
    n_kv = attn.k_proj.out_features // head_dim
    if n_heads % n_kv:
        raise ValueError(f"{n_heads} query heads are not a multiple of {n_kv} key/value heads")
    rows = torch.arange(B, device=hidden.device)
    normed = layer.input_layernorm(hidden)  # (B, L, D)
    q_in = normed[rows, query][:, None, :]  # (B, 1, D): only the query token goes through q_proj
    q = attn.q_proj(q_in).view(B, 1, n_heads, head_dim).transpose(1, 2)  # (B, H, 1, hd)
    k = attn.k_proj(normed).view(B, L, n_kv, head_dim).transpose(1, 2)  # (B, H_kv, L, hd)
    cos, sin = cos_sin
    q, _ = apply_rotary(q, q, cos[rows, query][:, None], sin[rows, query][:, None])
    _, k = apply_rotary(k, k, cos, sin)
    work = torch.promote_types(hidden.dtype, torch.float32)
    q = q.to(work).view(B, n_kv, n_heads // n_kv, head_dim)  # query heads grouped by their kv head
    logits = torch.einsum("bgrd,bgld->bgrl", q, k.to(work)) * float(attn.scaling)  # (B, H_kv, H/H_kv, L)
    allowed = key_mask.bool()
    if causal:
        allowed = allowed & (torch.arange(L, device=hidden.device)[None, :] <= query[:, None])
    logits = logits.masked_fill(~allowed[:, None, None, :], float("-inf"))
    probs = torch.softmax(logits, dim=-1).nan_to_num(0.0)
    return probs.mean(dim=(1, 2))
