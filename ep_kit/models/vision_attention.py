"""The vision tower's window attention as one SDPA call per window length, through transformers.

Why: under ``sdpa`` (and ``eager``) transformers' Qwen2.5-Omni vision attention splits the packed
patch sequence at ``cu_seqlens`` and calls the attention function once per window, from Python:
``depth - len(fullatt_block_indexes)`` window layers x windows per frame x temporal grids, plus
one call per temporal grid in each full-attention layer. A 30 s clip at 2 fps and the processor's
224 x 420 frames (30 temporal grids of 8 windows, 3B/7B vision config: 28 window + 4 full layers)
gives 28 * 240 + 4 * 30 = 6840 calls per forward (:func:`attention_calls`).
Almost all windows have the same length (the interior ``window_size`` squares), the rest a few
edge lengths, and the full-attention blocks attend per temporal grid (all equal within a video).

How, without re-implementing the encoder: for an attention implementation whose *name* contains
"flash", transformers' ``Qwen2_5OmniVisionAttention`` makes ONE call to the registered attention
function with the packed ``(1, heads, N, head_dim)`` q/k/v and ``cu_seq_lens_q/k`` (the varlen
convention of ``flash_attention_2``); nothing else in the vision encoder changes, except that the
encoder computes ``max_seqlen`` of its two ``cu_seqlens`` once per forward (two host syncs).
:func:`grouped_varlen_attention`, registered under :data:`GROUPED_VISION_ATTENTION` with
``transformers.AttentionInterface.register``, receives that call, groups the windows by length
and runs one ``torch.nn.functional.scaled_dot_product_attention`` per distinct length on the
batched ``(windows, heads, length, head_dim)`` view (a view when the windows of that length are
one contiguous run, an ``index_select`` otherwise), writing each group back in place. The result is
the stock per-window SDPA result (same kernel, same per-window arithmetic, tested in float64).

Scope: only the vision encoders of a thinker whose vision attention is ``sdpa`` are switched
(:func:`set_grouped_vision_attention`); ``eager`` stays eager (the reference), and
``flash_attention_2`` keeps transformers' own varlen flash kernel (the GPU path). The name contains
"flash" only because that is transformers' routing key for the packed call; no flash-attn package
is used. The grouping of a ``cu_seqlens`` tensor is cached by identity (the encoder hands the same
tensor to all its window layers), so it is computed once per forward, not once per layer.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from transformers import AttentionInterface
from transformers.models.qwen2_5_omni.modeling_qwen2_5_omni import (
    Qwen2_5OmniVisionAttention,
    Qwen2_5OmniVisionEncoder,
)
from transformers.vision_utils import get_vision_cu_seqlens, get_vision_window_index

#: The attention-implementation name the vision encoders are switched to. It must contain "flash":
#: that is what makes transformers hand the whole packed sequence to the function in one call.
GROUPED_VISION_ATTENTION = "ep_kit_flash_varlen_grouped_sdpa"


@dataclass(frozen=True)
class WindowGroup:
    """Windows of one length: ``count`` windows of ``length`` tokens each.

    ``start`` is the first token when the windows form one contiguous run (a view suffices);
    otherwise ``index`` holds their ``count * length`` token positions (window-major).
    """

    length: int
    count: int
    start: int = 0
    index: Tensor | None = None

    def take(self, x: Tensor) -> Tensor:
        """``(N, heads, dim)`` token-major -> ``(count, heads, length, dim)``."""
        rows = x.narrow(0, self.start, self.count * self.length) if self.index is None else x.index_select(0, self.index)
        return rows.unflatten(0, (self.count, self.length)).transpose(1, 2)

    def put(self, out: Tensor, y: Tensor) -> None:
        """Write ``(count, heads, length, dim)`` back to the ``(N, heads, dim)`` rows of this group."""
        rows = y.transpose(1, 2).reshape(self.count * self.length, y.shape[1], y.shape[3])
        if self.index is None:
            out.narrow(0, self.start, self.count * self.length).copy_(rows)
        else:
            out.index_copy_(0, self.index, rows)


def window_groups(cu_seqlens: Tensor | Sequence[int]) -> list[WindowGroup]:
    """Group the packed windows of ``cu_seqlens`` (``(W + 1,)`` cumulative bounds) by length.

    One host read of ``cu_seqlens``; empty windows are skipped. Groups come in order of first
    appearance; index tensors live on ``cu_seqlens``' device.
    """
    bounds = cu_seqlens.tolist() if isinstance(cu_seqlens, Tensor) else list(cu_seqlens)
    device = cu_seqlens.device if isinstance(cu_seqlens, Tensor) else None
    starts: dict[int, list[int]] = {}
    for lo, hi in zip(bounds[:-1], bounds[1:], strict=True):
        if hi < lo:
            raise ValueError(f"cu_seqlens must be non-decreasing, got {bounds}")
        if hi > lo:
            starts.setdefault(int(hi - lo), []).append(int(lo))
    groups = []
    for length, firsts in starts.items():
        if all(b - a == length for a, b in zip(firsts[:-1], firsts[1:], strict=True)):
            groups.append(WindowGroup(length, len(firsts), start=firsts[0]))
        else:
            first = torch.tensor(firsts, device=device, dtype=torch.long)
            index = (first[:, None] + torch.arange(length, device=device)).flatten()
            groups.append(WindowGroup(length, len(firsts), index=index))
    return groups


class _GroupCache:
    """The last few ``cu_seqlens`` tensors seen (by identity; the reference is kept, so an id is never
    reused while cached) and their groups. The vision encoder passes one tensor object to all its
    window layers and one to all its full-attention layers, so a forward computes each grouping once."""

    def __init__(self, size: int = 4) -> None:
        self.size = size
        self.entries: list[tuple[Tensor, list[WindowGroup]]] = []

    def __call__(self, cu_seqlens: Tensor) -> list[WindowGroup]:
        for tensor, groups in self.entries:
            if tensor is cu_seqlens:
                return groups
        groups = window_groups(cu_seqlens)
        self.entries = [(cu_seqlens, groups), *self.entries[: self.size - 1]]
        return groups


_groups_of = _GroupCache()


def grouped_varlen_attention(
    module: nn.Module,
    query: Tensor,
    key: Tensor,
    value: Tensor,
    attention_mask: Tensor | None = None,
    dropout: float = 0.0,
    scaling: float | None = None,
    is_causal: bool | None = None,
    cu_seq_lens_q: Tensor | None = None,
    cu_seq_lens_k: Tensor | None = None,
    **kwargs,
) -> tuple[Tensor, None]:
    """Bidirectional attention over packed windows, one SDPA call per distinct window length.

    Takes transformers' attention-interface arguments in the flash varlen convention: ``query``,
    ``key``, ``value`` ``(1, heads, N, head_dim)`` packed, ``cu_seq_lens_q == cu_seq_lens_k`` the
    window bounds (None: one window of all N tokens). Returns ``((1, N, heads, head_dim), None)``
    like transformers' flash and sdpa functions. No mask, no causality, no GQA (the encoders'
    attention has none); anything else raises.
    """
    if attention_mask is not None or is_causal:
        raise ValueError("grouped_varlen_attention is for the encoders' bidirectional windows: no mask, not causal")
    if query.shape[0] != 1 or key.shape[1] != query.shape[1]:
        raise ValueError(f"expected packed (1, heads, N, dim) q/k/v with equal heads, got {tuple(query.shape)}, {tuple(key.shape)}")
    if cu_seq_lens_k is not None and cu_seq_lens_k is not cu_seq_lens_q and not torch.equal(cu_seq_lens_k, cu_seq_lens_q):
        raise ValueError("grouped_varlen_attention needs the same windows for queries and keys")
    n = query.shape[2]
    groups = _groups_of(cu_seq_lens_q) if cu_seq_lens_q is not None else [WindowGroup(n, 1)]
    if sum(g.count * g.length for g in groups) != n:
        raise ValueError(f"cu_seqlens cover {sum(g.count * g.length for g in groups)} tokens, the sequence has {n}")
    q, k, v = (t[0].transpose(0, 1) for t in (query, key, value))  # (N, heads, dim) token-major views
    out = value.new_empty(n, value.shape[1], value.shape[-1])
    for group in groups:
        y = F.scaled_dot_product_attention(
            group.take(q), group.take(k), group.take(v), dropout_p=dropout, scale=scaling, is_causal=False
        )
        group.put(out, y)
    return out.unsqueeze(0), None


AttentionInterface.register(GROUPED_VISION_ATTENTION, grouped_varlen_attention)


def vision_encoders(model: nn.Module) -> list[nn.Module]:
    """The Qwen2.5-Omni vision encoders in ``model`` (a thinker holds one; a bare encoder is its own)."""
    return [m for m in model.modules() if isinstance(m, Qwen2_5OmniVisionEncoder)]


def vision_attention(model: nn.Module) -> str:
    """The attention implementation of ``model``'s vision encoder (``"sdpa"`` when unset)."""
    encoders = vision_encoders(model)
    if not encoders:
        raise ValueError(f"{type(model).__name__} holds no Qwen2.5-Omni vision encoder")
    return encoders[0].config._attn_implementation or "sdpa"


def set_grouped_vision_attention(model: nn.Module, enabled: bool = True) -> bool:
    """Switch ``model``'s vision encoder(s) between stock ``sdpa`` and the grouped implementation.

    Only ``sdpa`` is switched on (``eager`` and ``flash_attention_2`` stay), and only the grouped
    implementation is switched back to ``sdpa``. The switch is on the encoder's config (the
    thinker's ``vision_config``, shared with the encoder module): transformers' own
    ``set_attn_implementation`` would do the same on a thinker (``{"vision_config": name}``), but on a
    bare encoder it tries to load a flash kernel of that name. Returns whether the grouped
    implementation is now in use.
    """
    for encoder in vision_encoders(model):
        current = encoder.config._attn_implementation or "sdpa"
        if enabled and current == "sdpa":
            encoder.config._attn_implementation = GROUPED_VISION_ATTENTION
        elif not enabled and current == GROUPED_VISION_ATTENTION:
            encoder.config._attn_implementation = "sdpa"
    return vision_attention(model) == GROUPED_VISION_ATTENTION


# ----------------------------------------------------------------------------- measurement helpers
def random_vision_encoder(vision_config, dtype: torch.dtype | None = None) -> nn.Module:
    """A bare random-weight Qwen2.5-Omni vision encoder (``sdpa``) of ``vision_config`` (benchmarks)."""
    previous = torch.get_default_dtype()
    if dtype is not None:
        torch.set_default_dtype(dtype)
    try:
        return Qwen2_5OmniVisionEncoder._from_config(vision_config, attn_implementation="sdpa").eval()
    finally:
        torch.set_default_dtype(previous)


def attention_modules(model: nn.Module) -> list[nn.Module]:
    """The vision encoder's attention modules (one per block): q/k/v, rotary, attention, output projection."""
    return [m for m in model.modules() if isinstance(m, Qwen2_5OmniVisionAttention)]


def bare_attention(encoder: nn.Module) -> nn.Module:
    """A copy of the encoder's first attention module with identity q/k/v/output projections, sharing the
    encoder's config (so :func:`set_grouped_vision_attention` switches it too): transformers' own vision
    attention forward (rotary, window split or packed call, attention) without the projections' matmuls."""
    attention = attention_modules(encoder)[0]
    core = copy.deepcopy(attention)
    core.q = core.k = core.v = core.proj = nn.Identity()
    core.config = attention.config
    return core


def window_bounds(vision_config, grid_thw: Tensor) -> tuple[Tensor, Tensor]:
    """``(cu_window_seqlens, cu_seqlens)``: the window and full-attention (per temporal grid) bounds the
    encoder passes its blocks for videos ``grid_thw`` (transformers' own functions)."""
    _, cu_windows = get_vision_window_index(
        grid_thw, spatial_merge_size=vision_config.spatial_merge_size, window_size=vision_config.window_size,
        patch_size=vision_config.patch_size,
    )
    return cu_windows, get_vision_cu_seqlens(grid_thw)


def encode_video(encoder: nn.Module, pixel_values: Tensor, grid_thw: Tensor) -> Tensor:
    """The encoder's merged output tokens (what the thinker scatters into video placeholders)."""
    return encoder(pixel_values.to(encoder.dtype), grid_thw=grid_thw).pooler_output


def attention_calls(vision_config, grid_thw: Sequence[Sequence[int]], grouped: bool = False) -> int:
    """Attention-function calls of one vision forward over videos ``grid_thw`` ((t, h, w) patch grids).

    Stock ``sdpa``: per window layer, one per window of every temporal grid; per full-attention layer,
    one per temporal grid. Grouped: one per distinct window length per layer (all videos together).
    """
    v = vision_config
    per = v.window_size // v.spatial_merge_size // v.patch_size
    full_layers = len({i for i in v.fullatt_block_indexes if 0 <= i < v.depth})
    window_layers = v.depth - full_layers
    windows, window_lengths, frame_lengths, frames = 0, set(), set(), 0
    for t, h, w in grid_thw:
        gh, gw = h // v.spatial_merge_size, w // v.spatial_merge_size
        rows = [min(per, gh - i) for i in range(0, gh, per)]
        cols = [min(per, gw - j) for j in range(0, gw, per)]
        windows += t * len(rows) * len(cols)
        window_lengths |= {r * c * v.spatial_merge_size**2 for r in rows for c in cols}
        frame_lengths.add(h * w)
        frames += t
    if grouped:
        return window_layers * len(window_lengths) + full_layers * len(frame_lengths)
    return window_layers * windows + full_layers * frames


def grid_of(frames: int, height: int, width: int, vision_config) -> tuple[int, int, int]:
    """(t, h, w) patch grid of ``frames`` frames of ``height`` x ``width`` pixels."""
    v = vision_config
    return (math.ceil(frames / v.temporal_patch_size), height // v.patch_size, width // v.patch_size)
