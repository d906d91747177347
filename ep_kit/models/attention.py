"""Attention probes the training-free baselines rank tokens by, computed from transformers layers' own weights.

Why here: these read a decoder layer's ``input_layernorm``/``q_proj``/``k_proj``/``scaling`` and an
audio-encoder layer's ``self_attn_layer_norm``; those are transformers internals, so they live in
the model package and reducers reach them through the wrapper's host methods
(:meth:`ep_kit.models.omni.OmniThinker.attention_row`, ``audio_token_salience``).

* :func:`decoder_attention_row` -- FastV / PyramidDrop: the head-averaged attention ONE query token
  per sample pays every key inside a decoder layer. Asking transformers for attention weights would
  force the eager kernel on every layer and build ``(B, H, L, L)`` matrices; instead the decoder
  keeps its SDPA/flash kernel and this recomputes ``softmax(q_query . k_all * scaling)`` for the
  ranking layer only: one ``k_proj`` over the sequence plus a ``(B, H, 1, L)`` product. Grouped-query
  attention: query head ``h`` reads key head ``h // (H / H_kv)``.
* :func:`audio_frame_salience` / :func:`pool_to_tokens` -- OmniZip: the attention each audio
  encoder frame receives in the tower's last layer, mapped to LLM audio tokens.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor, nn

from ep_kit.rope import apply_rotary


def decoder_attention_row(
    layer: nn.Module,
    hidden: Tensor,
    cos_sin: tuple[Tensor, Tensor],
    query: Tensor,
    key_mask: Tensor,
    causal: bool = True,
) -> Tensor:
    """Head-averaged attention probabilities of one query token per sample over all keys.

    Args:
        layer: a transformers ``Qwen2_5OmniDecoderLayer``.
        hidden: ``(B, L, D)`` INPUT hidden states of that layer.
        cos_sin: the rotary ``(cos, sin)``, each ``(B, L, head_dim)``, for the same tokens.
        query: ``(B,)`` long index of the query token of each sample.
        key_mask: ``(B, L)`` bool, True for keys that may be attended (real tokens).
        causal: keys after the query are masked (the decoder is causal).

    Returns:
        ``(B, L)`` probabilities (float32, or float64 for float64 input), 0 on masked keys; rows sum
        to 1 over the allowed keys.
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


def audio_frame_salience(layer: nn.Module, hidden: Tensor, cu_seqlens: Tensor) -> Tensor:
    """``(T,)`` attention each frame receives in an audio-encoder layer (column sums, head mean).

    ``layer`` is a transformers ``Qwen2_5OmniAudioEncoderLayer`` and ``hidden`` ``(T, d)`` its input;
    attention is block-diagonal over the chunks delimited by ``cu_seqlens``, as in the tower.
    """
    attn = layer.self_attn
    h = layer.self_attn_layer_norm(hidden)
    T = h.shape[0]
    H, hd = attn.num_heads, attn.head_dim
    work = torch.promote_types(hidden.dtype, torch.float32)
    q = attn.q_proj(h).view(T, H, hd).to(work)
    k = attn.k_proj(h).view(T, H, hd).to(work)
    out = torch.zeros(T, dtype=work, device=hidden.device)
    bounds = cu_seqlens.tolist()
    for s, e in zip(bounds[:-1], bounds[1:], strict=True):
        logits = torch.einsum("qhd,khd->hqk", q[s:e], k[s:e]) * float(attn.scaling)
        out[s:e] = torch.softmax(logits, dim=-1).sum(1).mean(0)
    return out


def pool_to_tokens(frame_salience: Tensor, feature_lens: Tensor) -> Tensor:
    """Map per-frame salience to LLM audio tokens: token ``j`` of an audio = mean of frames ``2j, 2j+1``.

    ``feature_lens`` are the mel lengths of the audios; frames after the tower's stride-2 conv are
    ``(len - 1) // 2 + 1`` per audio, concatenated; tokens ``(frames - 2) // 2 + 1`` per audio.
    """
    frames = (feature_lens - 1) // 2 + 1
    tokens = (frames - 2) // 2 + 1
    if int(frames.sum()) != frame_salience.shape[0]:
        raise ValueError(
            f"audio salience has {frame_salience.shape[0]} frames but feature lengths give {int(frames.sum())}"
        )
    out, offset = [], 0
    for f, t in zip(frames.tolist(), tokens.tolist(), strict=True):
        idx = offset + 2 * torch.arange(t, device=frame_salience.device)
        out.append((frame_salience[idx] + frame_salience[idx + 1]) / 2)
        offset += f
    return torch.cat(out) if out else frame_salience[:0]


class AudioSalienceProbe:
    """Captures the input of the audio tower's last layer while the wrapper encodes audio.

    A forward pre-hook keeps the last call's input (detached) so OmniZip's salience needs no second
    encoder pass; when nothing matching was captured the audio is encoded once more.
    """

    def __init__(self, tower: nn.Module) -> None:
        self.tower = tower
        self.captured: dict[str, Tensor] | None = None
        self.handle = tower.layers[-1].register_forward_pre_hook(self._capture, with_kwargs=True)

    def _capture(self, module: nn.Module, args: tuple, kwargs: dict) -> None:
        hidden = args[0] if args else kwargs["hidden_states"]
        cu = kwargs.get("cu_seqlens", args[1] if len(args) > 1 else None)
        self.captured = {"hidden": hidden.detach(), "cu_seqlens": cu.detach()}

    def token_salience(self, encode: Callable[[Tensor, Tensor], object], features: Tensor, feature_mask: Tensor) -> Tensor:
        """``(N_audio_tokens,)`` salience of every LLM audio token of the batch, in placeholder order."""
        lens = feature_mask.sum(-1).long()
        expected = int(((lens - 1) // 2 + 1).sum())
        cap = self.captured
        if cap is None or cap["hidden"].shape[0] != expected:
            with torch.no_grad():
                encode(features, feature_mask)
            cap = self.captured
        assert cap is not None
        self.captured = None
        with torch.no_grad():
            frames = audio_frame_salience(self.tower.layers[-1], cap["hidden"], cap["cu_seqlens"])
        return pool_to_tokens(frames, lens)
