"""Token scorers: one importance score per token, high = keep.

A scorer sees the whole :class:`~ep_kit.sequence.TokenSequence` (the sieve's refined hidden states
for CS2, the merged input embeddings for the training-free reducers) and returns ``(B, L)`` float32
scores. Scores are only meaningful at candidate tokens (the selector masks the rest). Every
constructor takes ``hidden_size`` first, so a YAML config can pass a scorer class as a factory
``Callable[[int], Scorer]`` whose size is only known once the model is loaded.

* :class:`MLPScorer` -- the paper's learned head (RMSNorm -> Linear(D, D) -> SiLU -> Linear(D, 1)),
  trained through the straight-through selector by the LM loss. Submodule names follow the official
  checkpoint (``ln``, ``score_head.0``, ``score_head.2``) so its weights load by name.
* :class:`SimilarityScorer` -- training-free: cosine similarity to the instruction (the paper's
  "similarity" ablation).
* :class:`RandomScorer` -- uniform random scores, the floor any scorer must beat.
* Unimodal redundancy rules (the IntraModal baseline): :class:`TemporalNoveltyScorer` (change from
  the same location in the previous frame), :class:`NeighbourNoveltyScorer` (change from the
  previous token of the same modality), :class:`NormScorer` (embedding norm), combined per modality
  by :class:`PerModalityScorer`.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ep_kit.models.hf import rms_norm
from ep_kit.sequence import Modality, TokenSequence


def _check_hidden_size(hidden_size: int) -> int:
    if isinstance(hidden_size, bool) or not isinstance(hidden_size, int) or hidden_size <= 0:
        raise ValueError(f"hidden_size must be a positive int, got {hidden_size!r}")
    return hidden_size


class Scorer(nn.Module):
    """Base class: ``forward(seq) -> (B, L)`` float32 scores."""

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

    def __init__(self, hidden_size: int, eps: float = 1e-6) -> None:
        super().__init__(hidden_size)
        self.ln = rms_norm(hidden_size, eps=eps)
        self.score_head = nn.Sequential(
            nn.Linear(hidden_size, hidden_size), nn.SiLU(), nn.Linear(hidden_size, 1)
        )

    def forward(self, seq: TokenSequence) -> Tensor:
        self._check(seq)
        h = seq.hidden.to(self.score_head[0].weight.dtype)
        return self.score_head(self.ln(h)).squeeze(-1).float()


class SimilarityScorer(Scorer):
    """Training-free: cosine similarity of each token to the instruction (no parameters, no gradient).

    The reference is the mean hidden state of the sample's non-answer text tokens; samples without
    such text fall back to the mean of their audio/video tokens.
    """

    @torch.no_grad()
    def forward(self, seq: TokenSequence) -> Tensor:
        self._check(seq)
        h = seq.hidden.detach().float()
        text = seq.is_modality(Modality.TEXT) & ~seq.answer_mask
        av = seq.av_mask
        has_text = text.any(-1, keepdim=True)
        pool = torch.where(has_text, text, av).float()  # (B, L)
        ref = (pool[..., None] * h).sum(1) / pool.sum(1, keepdim=True).clamp_min(1.0)  # (B, D)
        scores = F.cosine_similarity(h, ref[:, None, :].expand_as(h), dim=-1, eps=1e-8)
        return torch.where(seq.attention_mask, scores, torch.zeros_like(scores))


class RandomScorer(Scorer):
    """Uniform random scores in [0, 1).

    Args:
        hidden_size: model hidden size (only checked).
        seed: an int gives a private CPU generator seeded once, so a run (a sequence of calls) is
            reproducible on any device; None draws from torch's global generator (seeded by the
            run's ``seed_everything``).
    """

    def __init__(self, hidden_size: int, seed: int | None = None) -> None:
        super().__init__(hidden_size)
        self.seed = seed
        self._generator: torch.Generator | None = None

    def extra_repr(self) -> str:
        return f"hidden_size={self.hidden_size}, seed={self.seed}"

    def _gen(self) -> torch.Generator | None:
        if self._generator is None and self.seed is not None:
            self._generator = torch.Generator().manual_seed(int(self.seed))
        return self._generator

    def __getstate__(self) -> dict:
        state = self.__dict__.copy()
        state["_generator"] = None  # generators do not pickle/deepcopy everywhere; re-created on use
        return state

    def forward(self, seq: TokenSequence) -> Tensor:
        self._check(seq)
        scores = torch.rand(seq.attention_mask.shape, generator=self._gen(), dtype=torch.float32)
        return scores.to(seq.hidden.device)


# ------------------------------------------------------------------ unimodal redundancy rules
def _cos_dissimilarity(x: Tensor, y: Tensor) -> Tensor:
    return 1.0 - F.cosine_similarity(x.float(), y.float(), dim=-1)


def _same_location(code: Tensor, sorted_code: Tensor, order: Tensor, shift: int) -> Tensor:
    """Local index of the token whose location code is ``code + shift`` (another frame), or -1."""
    want = code + shift
    pos = torch.searchsorted(sorted_code, want).clamp(max=len(sorted_code) - 1)
    return torch.where(sorted_code[pos] == want, order[pos], torch.full_like(pos, -1))


class MaskedRule(Scorer):
    """A rule that scores the tokens of one pool (``score(seq, mask)``); ``forward`` scores each
    modality as its own pool."""

    def score(self, seq: TokenSequence, mask: Tensor) -> Tensor:  # pragma: no cover - abstract
        raise NotImplementedError

    @torch.no_grad()
    def forward(self, seq: TokenSequence) -> Tensor:
        self._check(seq)
        out = torch.zeros(seq.attention_mask.shape, dtype=torch.float32, device=seq.hidden.device)
        for m in (Modality.TEXT, Modality.VIDEO, Modality.AUDIO):
            out = out + self.score(seq, seq.is_modality(m))
        return out


class TemporalNoveltyScorer(MaskedRule):
    """``1 - cos(x, x')`` with ``x'`` the token at the same h/w location in the previous frame.

    Frames are the distinct temporal positions (axis 0) of the pool's tokens in a sample; the
    location is the (h, w) position pair. Tokens of the first frame (and any without a match)
    compare with the next frame; a single-frame image compares with its frame's mean. Static content
    scores low (dropped first), changes score high.
    """

    def score(self, seq: TokenSequence, mask: Tensor) -> Tensor:
        out = torch.zeros(mask.shape, dtype=torch.float32, device=mask.device)
        for b in range(mask.shape[0]):
            idx = mask[b].nonzero().squeeze(-1)
            if idx.numel() == 0:
                continue
            t, h, w = (seq.positions[a, b, idx] for a in range(3))
            x = seq.hidden[b, idx]
            _, frame = torch.unique(t, return_inverse=True)
            hh, ww = h - h.min(), w - w.min()
            H, W = int(hh.max()) + 1, int(ww.max()) + 1
            code = (frame * H + hh) * W + ww
            sorted_code, order = torch.sort(code)
            ref = _same_location(code, sorted_code, order, -H * W)
            ref = torch.where(ref >= 0, ref, _same_location(code, sorted_code, order, H * W))
            score = torch.zeros(len(idx), dtype=torch.float32, device=mask.device)
            has = ref >= 0
            if bool(has.any()):
                score[has] = _cos_dissimilarity(x[has], x[ref[has]])
            if bool((~has).any()):  # single frame: compare with the frame mean
                for f in frame[~has].unique():
                    sel = (~has) & (frame == f)
                    mean = x[frame == f].mean(0, keepdim=True)
                    score[sel] = _cos_dissimilarity(x[sel], mean.expand(int(sel.sum()), -1))
            out[b, idx] = score
        return out


class NeighbourNoveltyScorer(MaskedRule):
    """``1 - cos(x, x_prev)`` with the previous token of the pool in the same sample.

    The first token compares with the next one; a lone token scores 0. Steady content (a held
    sound) scores low, onsets high.
    """

    def score(self, seq: TokenSequence, mask: Tensor) -> Tensor:
        out = torch.zeros(mask.shape, dtype=torch.float32, device=mask.device)
        for b in range(mask.shape[0]):
            idx = mask[b].nonzero().squeeze(-1)
            if idx.numel() < 2:
                continue
            x = seq.hidden[b, idx]
            prev = torch.cat([x[1:2], x[:-1]])
            out[b, idx] = _cos_dissimilarity(x, prev)
        return out


class NormScorer(MaskedRule):
    """The L2 norm of each token's hidden state (a salience proxy)."""

    def score(self, seq: TokenSequence, mask: Tensor) -> Tensor:
        return seq.hidden.float().norm(dim=-1) * mask


class PerModalityScorer(Scorer):
    """Video tokens scored by ``video``, audio tokens by ``audio`` (each a :class:`MaskedRule` factory).

    Args:
        hidden_size: model hidden size.
        video: rule for video (and image) tokens (default :class:`TemporalNoveltyScorer`).
        audio: rule for audio tokens (default :class:`NeighbourNoveltyScorer`).
    """

    def __init__(
        self,
        hidden_size: int,
        video: Callable[[int], MaskedRule] | None = None,
        audio: Callable[[int], MaskedRule] | None = None,
    ) -> None:
        super().__init__(hidden_size)
        self.video = (video or TemporalNoveltyScorer)(hidden_size)
        self.audio = (audio or NeighbourNoveltyScorer)(hidden_size)
        for name, rule in (("video", self.video), ("audio", self.audio)):
            if not isinstance(rule, MaskedRule):
                raise TypeError(f"PerModalityScorer {name} must build a MaskedRule scorer, got {type(rule).__name__}")

    @torch.no_grad()
    def forward(self, seq: TokenSequence) -> Tensor:
        self._check(seq)
        return self.video.score(seq, seq.is_modality(Modality.VIDEO)) + self.audio.score(
            seq, seq.is_modality(Modality.AUDIO)
        )
