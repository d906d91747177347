"""Multi-axis rotary position embeddings: TMRoPE (Qwen2.5-Omni's layout) and Sync-RoPE.

Both are the same mechanism: the ``head_dim / 2`` frequency pairs of a rotary embedding are split
into contiguous sections and every section is rotated by one *axis* of the token positions. Pair
``j`` has the standard inverse frequency ``base ** (-2j / head_dim)`` (pair 0 is the fastest).

* TMRoPE (``mrope_section = [16, 24, 24]`` for head_dim 128): pairs 0-15 rotate by t, 16-39 by h,
  40-63 by w. Time only lives in the highest frequencies, so sparse selection aliases it.
* Sync-RoPE (``sections = [t_high, h, w, t_low]``, default ``[18, 18, 18, 10]``): positions get a
  4th axis equal to t, rotating the lowest-frequency pairs, so long temporal strides stay monotonic.

The output ``(cos, sin)`` uses transformers' layout (``cat(f, f)`` over the head dim, computed in
float32 and cast at the end), so it can be handed to transformers' ``Qwen2_5OmniDecoderLayer`` as
``position_embeddings`` and gives the stock model's numbers exactly for the TMRoPE layout.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn

#: Position axes whose values are the temporal index (t, and Sync-RoPE's duplicated t).
TEMPORAL_AXES: tuple[int, ...] = (0, 3)
AXIS_NAMES: tuple[str, ...] = ("t", "h", "w", "t_low")


def _check_sections(sections: Sequence[int], name: str) -> list[int]:
    out = []
    for s in sections:
        if isinstance(s, bool) or not isinstance(s, int) or s < 0:
            raise ValueError(f"{name} must be a list of non-negative ints, got {list(sections)!r}")
        out.append(int(s))
    if sum(out) == 0:
        raise ValueError(f"{name} must cover at least one frequency pair, got {out!r}")
    return out


def _check_head_dim(head_dim: int, name: str = "head_dim") -> int:
    if isinstance(head_dim, bool) or not isinstance(head_dim, int) or head_dim <= 0 or head_dim % 2:
        raise ValueError(f"{name} must be a positive even int, got {head_dim!r}")
    return head_dim


def _check_base(base: float, name: str = "base") -> float:
    b = float(base)
    if not b > 1.0:
        raise ValueError(f"{name} (rope theta) must be > 1, got {base!r}")
    return b


def apply_rotary(
    q: Tensor, k: Tensor, cos: Tensor, sin: Tensor, unsqueeze_dim: int = 1
) -> tuple[Tensor, Tensor]:
    """Rotate ``q``/``k`` (``(B, H, L, head_dim)`` by default) with ``(cos, sin)`` of shape ``(B, L, head_dim)``.

    Delegates to transformers' Qwen2.5-Omni ``apply_rotary_pos_emb`` so that the rotation is the
    very one the decoder layers apply.
    """
    from ep_kit.models.hf import apply_rotary_pos_emb

    if cos.shape != sin.shape:
        raise ValueError(
            f"cos and sin must have the same shape, got {tuple(cos.shape)} and {tuple(sin.shape)}"
        )
    if q.shape[-1] != cos.shape[-1] or k.shape[-1] != cos.shape[-1]:
        raise ValueError(
            f"q/k head dim ({q.shape[-1]}/{k.shape[-1]}) must equal the rotary dim {cos.shape[-1]}"
        )
    return apply_rotary_pos_emb(q, k, cos, sin, unsqueeze_dim=unsqueeze_dim)


class MultiAxisRoPE(nn.Module):
    """Rotary embedding whose frequency pairs are split into sections, each rotated by one position axis.

    Args:
        sections: number of consecutive frequency pairs per section (pair 0 = highest frequency).
        section_axes: position axis rotating each section (same length as ``sections``).
        num_axes: number of position axes the module consumes (3 = t,h,w; 4 = t,h,w,t).
        head_dim: rotary head dim; None = take it from the model in :meth:`bind`.
        base: rope theta; None = take it from the model in :meth:`bind`.
    """

    def __init__(
        self,
        sections: Sequence[int],
        section_axes: Sequence[int],
        num_axes: int = 3,
        head_dim: int | None = None,
        base: float | None = None,
    ) -> None:
        super().__init__()
        self.sections = _check_sections(sections, "sections")
        if len(section_axes) != len(self.sections):
            raise ValueError(
                f"section_axes must have one axis per section ({len(self.sections)}), got {list(section_axes)!r}"
            )
        if num_axes not in (3, 4):
            raise ValueError(f"num_axes must be 3 or 4, got {num_axes!r}")
        if any(not 0 <= a < num_axes for a in section_axes):
            raise ValueError(f"section_axes must lie in [0, {num_axes}), got {list(section_axes)!r}")
        self.section_axes = [int(a) for a in section_axes]
        self.num_axes = int(num_axes)
        self.register_buffer("axis_of_pair", self._axis_of_pair(), persistent=False)
        self.head_dim: int | None = None
        self.base: float | None = None
        self.register_buffer("inv_freq", None, persistent=False)
        if head_dim is not None:
            self.head_dim = _check_head_dim(head_dim)
            self._check_sum(self.head_dim)
        if base is not None:
            self.base = _check_base(base)
        if self.head_dim is not None and self.base is not None:
            self._build()

    # ------------------------------------------------------------------ setup
    def _axis_of_pair(self) -> Tensor:
        return torch.cat(
            [torch.full((n,), a, dtype=torch.long) for n, a in zip(self.sections, self.section_axes, strict=True)]
        )

    @property
    def num_pairs(self) -> int:
        return int(sum(self.sections))

    def _check_sum(self, head_dim: int) -> None:
        if 2 * self.num_pairs != head_dim:
            raise ValueError(
                f"{type(self).__name__} sections {self.sections} sum to {self.num_pairs} pairs, "
                f"but head_dim {head_dim} needs head_dim/2 = {head_dim // 2}"
            )

    def _build(self) -> None:
        assert self.head_dim is not None and self.base is not None
        dim = self.head_dim
        # Same expression (and float32 arithmetic) as transformers' default rope init.
        inv_freq = 1.0 / (self.base ** (torch.arange(0, dim, 2, dtype=torch.float) / dim))
        device = self.axis_of_pair.device
        self.inv_freq = inv_freq.to(device)

    def bind(self, head_dim: int, base: float) -> MultiAxisRoPE:
        """Fill ``head_dim``/``base`` from the model, or check that the configured ones agree with it.

        Raises ``ValueError`` naming both values on a mismatch, or when the sections do not sum to
        ``head_dim / 2``. Returns ``self``.
        """
        head_dim = _check_head_dim(head_dim, "model head_dim")
        base = _check_base(base, "model rope_theta")
        if self.head_dim is not None and self.head_dim != head_dim:
            raise ValueError(
                f"{type(self).__name__} head_dim={self.head_dim} differs from the model's head_dim={head_dim}"
            )
        if self.base is not None and self.base != base:
            raise ValueError(
                f"{type(self).__name__} base={self.base} differs from the model's rope_theta={base}"
            )
        self._check_sum(head_dim)
        self.head_dim, self.base = head_dim, base
        self._build()
        return self

    @property
    def is_bound(self) -> bool:
        return self.inv_freq is not None

    @property
    def temporal_pairs(self) -> Tensor:
        """Indices of the pairs rotated by a temporal axis (t or the duplicated t)."""
        is_t = torch.zeros_like(self.axis_of_pair, dtype=torch.bool)
        for a in TEMPORAL_AXES:
            is_t |= self.axis_of_pair == a
        return torch.nonzero(is_t).flatten()

    def extra_repr(self) -> str:
        return f"sections={self.sections}, section_axes={self.section_axes}, head_dim={self.head_dim}, base={self.base}"

    # -------------------------------------------------------------- positions
    def expand_positions(self, pos3: Tensor) -> Tensor:
        """Positions ``(3 or 4, B, L)`` -> ``(num_axes, B, L)``: a 4th axis is a copy of t."""
        if pos3.ndim != 3 or pos3.shape[0] not in (3, 4):
            raise ValueError(f"positions must have shape (3 or 4, B, L), got {tuple(pos3.shape)}")
        if pos3.shape[0] == self.num_axes:
            return pos3
        if self.num_axes == 4:
            return torch.cat([pos3, pos3[:1]], dim=0)
        # A 4-axis input to a 3-axis layout: the 4th axis is by definition t again, drop it.
        return pos3[:3]

    # ---------------------------------------------------------------- forward
    def forward(self, positions: Tensor, dtype: torch.dtype = torch.float32) -> tuple[Tensor, Tensor]:
        """``(cos, sin)``, each ``(B, L, head_dim)`` in ``dtype``, for positions ``(A, B, L)``.

        ``A`` may be 3 or 4 (a missing 4th axis is derived from t); ``(B, L)`` positions count as
        text (every axis equal).
        """
        if self.inv_freq is None:
            raise RuntimeError(
                f"{type(self).__name__} has no head_dim/base yet: pass them to the constructor or call .bind()"
            )
        if positions.ndim == 2:
            positions = positions[None].expand(3, -1, -1)
        positions = self.expand_positions(positions)
        inv_freq = self.inv_freq.to(device=positions.device, dtype=torch.float)
        axis = self.axis_of_pair.to(positions.device)
        # (P, B, L) -> (B, L, P): the position each pair rotates by; same float32 product as transformers.
        pos = positions[axis].float().permute(1, 2, 0)
        freqs = pos * inv_freq
        emb = torch.cat((freqs, freqs), dim=-1)
        return emb.cos().to(dtype), emb.sin().to(dtype)

    def rotate(self, q: Tensor, k: Tensor, positions: Tensor) -> tuple[Tensor, Tensor]:
        """Rotate ``q``/``k`` (``(B, H, L, head_dim)``) by their positions."""
        cos, sin = self(positions, dtype=q.dtype)
        return apply_rotary(q, k, cos, sin)

    apply_rotary = staticmethod(apply_rotary)


class TMRoPE(MultiAxisRoPE):
    """Qwen2.5-Omni's time-aligned multimodal RoPE: sections ``[t, h, w]`` over the pairs, highest first."""

    def __init__(
        self,
        mrope_section: Sequence[int] = (16, 24, 24),
        head_dim: int | None = None,
        base: float | None = None,
    ) -> None:
        mrope_section = list(mrope_section)
        if len(mrope_section) != 3:
            raise ValueError(f"TMRoPE mrope_section needs 3 entries (t, h, w), got {mrope_section!r}")
        mrope_section = _check_sections(mrope_section, "mrope_section")
        super().__init__(mrope_section, [0, 1, 2], num_axes=3, head_dim=head_dim, base=base)
        self.mrope_section = mrope_section


class SyncRoPE(MultiAxisRoPE):
    """Sync-RoPE: sections ``[t_high, h, w, t_low]``; the lowest-frequency pairs rotate by t again.

    Positions gain a 4th axis equal to t (:meth:`expand_positions`). ``[16, 24, 24, 0]`` is TMRoPE.
    """

    def __init__(
        self,
        sections: Sequence[int] | None = (18, 18, 18, 10),
        head_dim: int | None = None,
        base: float | None = None,
    ) -> None:
        # None: the paper's split of whatever head_dim the model has, chosen when bound (or now, given head_dim).
        self.derive_sections = sections is None
        if sections is None:
            sections = sync_sections(head_dim) if head_dim is not None else (18, 18, 18, 10)
        sections = list(sections)
        if len(sections) != 4:
            raise ValueError(f"SyncRoPE sections needs 4 entries (t_high, h, w, t_low), got {sections!r}")
        super().__init__(
            _check_sections(sections, "sections"), [0, 1, 2, 3], num_axes=4, head_dim=head_dim, base=base
        )

    def bind(self, head_dim: int, base: float) -> MultiAxisRoPE:
        """As :meth:`MultiAxisRoPE.bind`; with ``sections=None`` the sections are :func:`sync_sections` of ``head_dim``."""
        if self.derive_sections:
            self.sections = sync_sections(_check_head_dim(head_dim, "model head_dim"))
            self.axis_of_pair = self._axis_of_pair().to(self.axis_of_pair.device)
        return super().bind(head_dim, base)


def sync_sections(head_dim: int) -> list[int]:
    """The paper's Sync-RoPE split ``[18, 18, 18, 10]`` of 64 pairs, scaled to ``head_dim / 2`` pairs.

    ``t_high = h = w = round(18 / 64 * pairs)`` and ``t_low`` takes the rest: ``[18, 18, 18, 10]``
    for head_dim 128 (Qwen2.5-Omni 3B/7B), ``[2, 2, 2, 2]`` for the toy thinker's head_dim 16.
    ``ValueError`` when the head is too small to give every section a pair.
    """
    pairs = _check_head_dim(head_dim) // 2
    each = round(18 * pairs / 64)
    if each < 1 or pairs - 3 * each < 1:
        raise ValueError(f"head_dim {head_dim} is too small for Sync-RoPE's four sections (needs >= 8)")
    return [each, each, each, pairs - 3 * each]
