"""Token scorers: one importance score per token, high = keep.

A scorer sees the whole :class:`~ep_kit.sequence.TokenSequence` (usually the sieve's refined hidden
states) and returns ``(B, L)`` float32 scores. Scores are only meaningful at candidate tokens (the
selector masks the rest). Every constructor takes ``hidden_size`` first, so a YAML config can pass
a scorer class as a factory ``Callable[[int], Scorer]`` whose size is only known once the model is
loaded.

* :class:`MLPScorer` -- the paper's learned head (RMSNorm -> Linear(D, D) -> SiLU -> Linear(D, 1)),
  trained through the straight-through selector by the LM loss. Submodule names follow the official
  checkpoint (``ln``, ``score_head.0``, ``score_head.2``) so its weights load by name.
* :class:`SimilarityScorer` -- training-free heuristics (the paper's "similarity" ablation).
* :class:`RandomScorer` -- uniform random scores, the floor any scorer must beat.
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ep_kit.sequence import Modality, TokenSequence


def _check_hidden_size(hidden_size: int) -> int:
    if isinstance(hidden_size, bool) or not isinstance(hidden_size, int) or hidden_size <= 0:
        raise ValueError(f"hidden_size must be a positive int, got {hidden_size!r}")
    return hidden_size


class Scorer(nn.Module):
    """Base class: ``forward(seq) -> (B, L)`` float32 scores. ``trainable`` says whether it has
    parameters the LM loss should update (False: no gradient flows back through its scores)."""

    trainable: bool = True

    def __init__(self, hidden_size: int) -> None:
        super().__init__()
        self.hidden_size = _check_hidden_size(hidden_size)

    def _check(self, seq: TokenSequence) -> None:
        if seq.hidden.shape[-1] != self.hidden_size:
            raise ValueError(
                f"{type(self).__name__}(hidden_size={self.hidden_size}) got hidden states of size "
                f"{seq.hidden.shape[-1]} (TokenSequence.hidden shape {tuple(seq.hidden.shape)})"
            )

    def forward(self, seq: TokenSequence) -> Tensor:  # pragma: no cover - abstract
        raise NotImplementedError


class MLPScorer(Scorer):
    """RMSNorm -> Linear(D, D) -> SiLU -> Linear(D, 1): the learned importance head of CS2."""

    trainable = True

    def __init__(self, hidden_size: int, eps: float = 1e-6) -> None:
        super().__init__(hidden_size)
        from transformers.models.qwen2_5_omni.modeling_qwen2_5_omni import Qwen2_5OmniRMSNorm

        self.ln = Qwen2_5OmniRMSNorm(hidden_size, eps=eps)
        self.score_head = nn.Sequential(
            nn.Linear(hidden_size, hidden_size), nn.SiLU(), nn.Linear(hidden_size, 1)
        )

    def forward(self, seq: TokenSequence) -> Tensor:
        self._check(seq)
        h = seq.hidden.to(self.score_head[0].weight.dtype)
        return self.score_head(self.ln(h)).squeeze(-1).float()


class SimilarityScorer(Scorer):
    """Training-free scores from cosine similarities of hidden states (no parameters, no gradient).

    Args:
        hidden_size: model hidden size (only checked).
        reference: ``"instruction"`` -- cosine similarity of each token to the mean hidden state of
            the sample's non-answer text tokens (the instruction); samples without such text fall
            back to the mean of their audio/video tokens. ``"neighbour"`` -- ``1 - cos(h_i, h_prev)``
            with ``h_prev`` the previous token of the same modality in the same sample (the first
            one scores 2, the maximum): keeps tokens that are new, drops repeats.
    """

    trainable = False

    def __init__(
        self, hidden_size: int, reference: Literal["instruction", "neighbour"] = "instruction"
    ) -> None:
        super().__init__(hidden_size)
        if reference not in ("instruction", "neighbour"):
            raise ValueError(
                f"SimilarityScorer reference must be 'instruction' or 'neighbour', got {reference!r}"
            )
        self.reference = reference

    def extra_repr(self) -> str:
        return f"hidden_size={self.hidden_size}, reference={self.reference!r}"

    @torch.no_grad()
    def forward(self, seq: TokenSequence) -> Tensor:
        self._check(seq)
        h = seq.hidden.detach().float()
        if self.reference == "instruction":
            scores = self._instruction(seq, h)
        else:
            scores = self._neighbour(seq, h)
        return torch.where(seq.attention_mask, scores, torch.zeros_like(scores))

    @staticmethod
    def _instruction(seq: TokenSequence, h: Tensor) -> Tensor:
        text = seq.is_modality(Modality.TEXT) & ~seq.answer_mask
        av = seq.av_mask
        has_text = text.any(-1, keepdim=True)
        pool = torch.where(has_text, text, av).float()  # (B, L)
        ref = (pool[..., None] * h).sum(1) / pool.sum(1, keepdim=True).clamp_min(1.0)  # (B, D)
        return F.cosine_similarity(h, ref[:, None, :].expand_as(h), dim=-1, eps=1e-8)

    @staticmethod
    def _neighbour(seq: TokenSequence, h: Tensor) -> Tensor:
        B, L, _ = h.shape
        idx = torch.arange(L, device=h.device).expand(B, L)
        prev = torch.full((B, L), -1, dtype=torch.long, device=h.device)
        for m in (Modality.TEXT, Modality.VIDEO, Modality.AUDIO):
            mask = seq.is_modality(m)
            last_incl = torch.cummax(torch.where(mask, idx, torch.full_like(idx, -1)), dim=-1).values
            last_before = torch.cat([torch.full_like(last_incl[:, :1], -1), last_incl[:, :-1]], dim=-1)
            prev = torch.where(mask, last_before, prev)
        h_prev = torch.gather(h, 1, prev.clamp_min(0)[..., None].expand_as(h))
        novelty = 1.0 - F.cosine_similarity(h, h_prev, dim=-1, eps=1e-8)
        return torch.where(prev >= 0, novelty, torch.full_like(novelty, 2.0))


class RandomScorer(Scorer):
    """Uniform random scores in [0, 1) from its own ``torch.Generator`` (reproducible when seeded)."""

    trainable = False

    def __init__(self, hidden_size: int, seed: int | None = None) -> None:
        super().__init__(hidden_size)
        self.seed = seed
        self._generator: torch.Generator | None = None

    def extra_repr(self) -> str:
        return f"hidden_size={self.hidden_size}, seed={self.seed}"

    def _gen(self) -> torch.Generator:
        if self._generator is None:
            g = torch.Generator()
            if self.seed is None:
                g.seed()
            else:
                g.manual_seed(int(self.seed))
            self._generator = g
        return self._generator

    def __getstate__(self) -> dict:
        state = self.__dict__.copy()
        state["_generator"] = None  # generators do not pickle/deepcopy everywhere; re-created on use
        return state

    def forward(self, seq: TokenSequence) -> Tensor:
        self._check(seq)
        scores = torch.rand(seq.attention_mask.shape, generator=self._gen(), dtype=torch.float32)
        return scores.to(seq.hidden.device)
