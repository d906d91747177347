"""Selectors: turn per-token scores into a per-sample Top-K keep mask (and straight-through weights).

The budget is one unit for every method: a sample with ``n`` candidate tokens keeps
``k = keep_count(n, r) = min(n, max(1, ceil(r * n)))`` of them (0 when it has none). Tokens outside
the candidate pool (text, answers, padding) are never selected here; the caller always keeps text.

Straight-through selectors return a ``weight`` that the caller multiplies into the hidden states
before gathering the kept tokens: it is exactly ``1.0`` in the forward pass on kept tokens (so the
LLM sees unscaled states) and carries the gradient of the soft weights ``y_soft`` backward (so the
LM loss trains the scorer). It is written ``y_hard + (y_soft - y_soft.detach())``, which equals the
paper's ``y_hard - y_soft.detach() + y_soft`` but is exact in floating point.

Ties are broken deterministically: the lower token index wins.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from ep_kit.budget import check_ratio, keep_count, keep_counts
from ep_kit.sequence import Modality


@dataclass
class Selection:
    """Result of a selector.

    Attributes:
        keep: ``(B, L)`` bool, True on the selected candidates only (never on non-candidates).
        weight: ``(B, L)`` float32 straight-through weights, or None (no gradient path: a hard
            selector, autograd off, or scores outside the autograd graph). 1.0 on
            kept tokens and on non-candidates in the forward pass; values on dropped candidates are
            irrelevant (they are dropped).
        k: ``(B,)`` long, number of tokens kept per sample (the realised budget).
    """

    keep: Tensor
    weight: Tensor | None
    k: Tensor

    def apply(self, hidden: Tensor) -> Tensor:
        """Multiply ``hidden`` (``(B, L, D)``) by the weights in its own dtype (identity when None)."""
        if self.weight is None:
            return hidden
        return hidden * self.weight[..., None].to(hidden.dtype)


def nan_at_candidates(scores: Tensor, candidates: Tensor) -> Tensor:
    """0-dim bool device tensor: some candidate's score is NaN (no host sync until it is read)."""
    return (torch.isnan(scores.detach()) & candidates).any()


def _check_inputs(scores: Tensor, candidates: Tensor, modality: Tensor | None, check_nan: bool = True) -> None:
    if scores.ndim != 2:
        raise ValueError(f"scores must have shape (B, L), got {tuple(scores.shape)}")
    if tuple(candidates.shape) != tuple(scores.shape):
        raise ValueError(
            f"candidates shape {tuple(candidates.shape)} must equal scores shape {tuple(scores.shape)}"
        )
    if candidates.dtype != torch.bool:
        raise ValueError(f"candidates must be a bool tensor, got {candidates.dtype}")
    if modality is not None and tuple(modality.shape) != tuple(scores.shape):
        raise ValueError(
            f"modality shape {tuple(modality.shape)} must equal scores shape {tuple(scores.shape)}"
        )
    if check_nan and bool(nan_at_candidates(scores, candidates)):
        raise ValueError("scores contain NaN at candidate tokens")


def top_k_mask(scores: Tensor, candidates: Tensor, k: Tensor) -> Tensor:
    """``(B, L)`` bool: the ``k[b]`` highest-scoring candidates of each row; lower index wins ties.

    Candidates always rank before non-candidates, even at score ``-inf``.
    """
    s = scores.detach()
    order = torch.sort(s, dim=-1, descending=True, stable=True).indices
    cand_sorted = torch.gather(candidates, 1, order)
    order = torch.gather(order, 1, torch.sort((~cand_sorted).to(torch.int8), dim=-1, stable=True).indices)
    rank_kept = torch.arange(scores.shape[-1], device=scores.device)[None, :] < k[:, None]
    keep = torch.zeros_like(candidates)
    keep.scatter_(1, order, rank_kept)
    return keep & candidates


def masked_softmax(logits: Tensor, candidates: Tensor) -> Tensor:
    """Softmax over each row's candidates (float32); 0 elsewhere and on rows without candidates."""
    logits = logits.float()
    neg_inf = torch.full_like(logits, float("-inf"))
    has = candidates.any(-1, keepdim=True)
    masked = torch.where(candidates, logits, neg_inf)
    masked = torch.where(has, masked, torch.zeros_like(masked))  # no NaN for empty rows
    return torch.softmax(masked, dim=-1) * candidates


class Selector(nn.Module):
    """Base: ``forward(scores, candidates, ratio, modality) -> Selection``.

    ``check_nan=False`` skips the NaN check (a host sync) for callers that make it themselves,
    fused with their own sync (:class:`~ep_kit.reducers.score_select.ScoreSelect`).
    """

    def forward(
        self, scores: Tensor, candidates: Tensor, ratio: float, modality: Tensor | None = None, check_nan: bool = True
    ) -> Selection:
        _check_inputs(scores, candidates, modality, check_nan)
        r = check_ratio(ratio)
        k = keep_counts(candidates.sum(-1), r)
        return self._select(scores, candidates, k)

    def _select(self, scores: Tensor, candidates: Tensor, k: Tensor) -> Selection:  # pragma: no cover
        raise NotImplementedError

    def kept_count(self, n_video: int, n_audio: int, ratio: float) -> int:
        """Candidates kept from a sample with these pools: one joint ``keep_count(n_video + n_audio, r)``."""
        return keep_count(n_video + n_audio, ratio)


def _needs_gradient(scores: Tensor) -> bool:
    """Whether straight-through weights can carry a gradient: autograd on and the scores in the graph.

    Under ``torch.no_grad`` (evaluation, generation) the weights would be exactly 1 with no backward:
    skipping them saves the softmax, the multiply into the hidden states and their launches.
    """
    return torch.is_grad_enabled() and scores.requires_grad


def _straight_through(keep: Tensor, y_soft: Tensor, candidates: Tensor) -> Tensor:
    weight = keep.float() + (y_soft - y_soft.detach())
    return torch.where(candidates, weight, torch.ones_like(weight))


def _check_tau(tau: float) -> float:
    t = float(tau)
    if not t > 0.0:
        raise ValueError(f"tau must be > 0, got {tau!r}")
    return t


class HardTopK(Selector):
    """Plain Top-K, no gradient (for training-free scorers and evaluation-only methods)."""

    def _select(self, scores: Tensor, candidates: Tensor, k: Tensor) -> Selection:
        return Selection(keep=top_k_mask(scores, candidates, k), weight=None, k=k)


class STETopK(Selector):
    """Top-K with straight-through soft weights ``y_soft = softmax(scores / tau)`` over the candidates."""

    def __init__(self, tau: float = 1.0) -> None:
        super().__init__()
        self.tau = _check_tau(tau)

    def extra_repr(self) -> str:
        return f"tau={self.tau}"

    def _select(self, scores: Tensor, candidates: Tensor, k: Tensor) -> Selection:
        keep = top_k_mask(scores, candidates, k)
        if not _needs_gradient(scores):
            return Selection(keep=keep, weight=None, k=k)
        y_soft = masked_softmax(scores.float() / self.tau, candidates)
        return Selection(keep=keep, weight=_straight_through(keep, y_soft, candidates), k=k)


class GumbelTopK(Selector):
    """Gumbel-Softmax Top-K: in training mode Top-K and ``y_soft`` use ``scores + Gumbel noise``.

    In eval mode there is no noise (it then selects exactly what :class:`HardTopK` selects).
    """

    def __init__(self, tau: float = 1.0) -> None:
        super().__init__()
        self.tau = _check_tau(tau)

    def extra_repr(self) -> str:
        return f"tau={self.tau}"

    def _select(self, scores: Tensor, candidates: Tensor, k: Tensor) -> Selection:
        s = scores.float()
        if self.training:
            gumbel = -torch.empty_like(s).exponential_().log()
            s = s + gumbel
        keep = top_k_mask(s, candidates, k)
        if not _needs_gradient(scores):
            return Selection(keep=keep, weight=None, k=k)
        y_soft = masked_softmax(s / self.tau, candidates)
        return Selection(keep=keep, weight=_straight_through(keep, y_soft, candidates), k=k)


class PerModalityTopK(Selector):
    """Apply ``selector`` to each modality's candidates separately, with the ratio per modality.

    ``k_m = keep_count(n_m, r)`` per sample and modality; soft weights are normalised per pool.
    """

    def __init__(self, selector: Selector) -> None:
        super().__init__()
        if not isinstance(selector, Selector):
            raise ValueError(f"PerModalityTopK needs a Selector, got {type(selector).__name__}")
        self.selector = selector

    def forward(
        self, scores: Tensor, candidates: Tensor, ratio: float, modality: Tensor | None = None, check_nan: bool = True
    ) -> Selection:
        if modality is None:
            raise ValueError("PerModalityTopK needs the modality ids (modality=None given)")
        _check_inputs(scores, candidates, modality, check_nan)
        check_ratio(ratio)
        keep = torch.zeros_like(candidates)
        weight: Tensor | None = torch.ones(scores.shape, dtype=torch.float32, device=scores.device)
        k = torch.zeros(scores.shape[0], dtype=torch.long, device=scores.device)
        # Every modality's pool is selected, empty or not (an empty pool keeps 0): asking the host
        # which pools are empty would cost a sync per modality. Padding is never a candidate.
        for m in (Modality.VIDEO, Modality.AUDIO, Modality.TEXT):
            pool = candidates & (modality == int(m))
            sel = self.selector(scores, pool, ratio, modality, check_nan=False)
            keep |= sel.keep
            k += sel.k
            if sel.weight is None:
                weight = None
            elif weight is not None:
                weight = torch.where(pool, sel.weight, weight)
        return Selection(keep=keep, weight=weight, k=k)

    def kept_count(self, n_video: int, n_audio: int, ratio: float) -> int:
        """``keep_count`` per modality pool, summed."""
        return keep_count(n_video, ratio) + keep_count(n_audio, ratio)
