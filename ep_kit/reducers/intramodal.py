"""IntraModal baseline: every modality is reduced on its own, by a unimodal redundancy rule.

This is the "reduce each stream separately" family the paper compares against: no cross-modal
signal, no training. Each candidate modality of a sample keeps ``keep_count(n_m, r)`` of its own
``n_m`` tokens (so the total can exceed ``keep_count(n_video + n_audio, r)`` by at most one token
per modality, from the per-modality ceil), ranked by one score per token computed on the merged
input embeddings (the LLM's input, before any decoder layer):

* video ``"temporal"`` (default): temporal redundancy. ``1 - cos(x, x')`` where ``x'`` is the token
  at the same spatial position (same h/w rotary position) in the previous frame (previous distinct
  temporal position among the sample's video tokens). Tokens of the first frame -- and any without
  a match -- compare with the next frame instead; a single-frame image compares with its frame's
  mean. Static content is dropped first, changes are kept.
* audio ``"neighbour"`` (default): ``1 - cos(x, x_prev)`` with the previous audio token of the sample
  (the first audio token uses the next one): steady sounds are dropped first, onsets kept.
* ``"norm"`` (either modality): the L2 norm of the embedding (a salience proxy).

Lower index wins ties; text and non-candidates are always kept, with their original positions.
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor

from ep_kit.budget import keep_counts
from ep_kit.reducers.base import ReductionContext, TokenReducer
from ep_kit.selectors import top_k_mask
from ep_kit.sequence import Modality, TokenSequence


def _cos_dissimilarity(x: Tensor, y: Tensor) -> Tensor:
    return 1.0 - F.cosine_similarity(x.float(), y.float(), dim=-1)


def _same_location(code: Tensor, sorted_code: Tensor, order: Tensor, shift: int) -> Tensor:
    """Local index of the token whose location code is ``code + shift`` (another frame), or -1."""
    want = code + shift
    pos = torch.searchsorted(sorted_code, want).clamp(max=len(sorted_code) - 1)
    return torch.where(sorted_code[pos] == want, order[pos], torch.full_like(pos, -1))


def temporal_dissimilarity(seq: TokenSequence, mask: Tensor) -> Tensor:
    """``(B, L)`` float32: ``1 - cos`` of each masked (video) token with the same h/w location in the previous frame.

    Frames are the distinct temporal positions (axis 0) of the masked tokens of a sample; the
    location is the (h, w) position pair (axes 1, 2). See the module docstring for fallbacks.
    0 outside ``mask``.
    """
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


def neighbour_dissimilarity(seq: TokenSequence, mask: Tensor) -> Tensor:
    """``(B, L)`` float32: ``1 - cos`` of each masked token with the previous masked token of its sample.

    The first masked token compares with the next one; a lone token scores 0. 0 outside ``mask``.
    """
    out = torch.zeros(mask.shape, dtype=torch.float32, device=mask.device)
    for b in range(mask.shape[0]):
        idx = mask[b].nonzero().squeeze(-1)
        if idx.numel() < 2:
            continue
        x = seq.hidden[b, idx]
        prev = torch.cat([x[1:2], x[:-1]])
        out[b, idx] = _cos_dissimilarity(x, prev)
    return out


def norm_score(seq: TokenSequence, mask: Tensor) -> Tensor:
    """``(B, L)`` float32 L2 norm of the hidden state, 0 outside ``mask``."""
    return seq.hidden.float().norm(dim=-1) * mask


VIDEO_RULES = {"temporal": temporal_dissimilarity, "norm": norm_score}
AUDIO_RULES = {"neighbour": neighbour_dissimilarity, "norm": norm_score}


class IntraModal(TokenReducer):
    """Per-modality unimodal reduction at budget ``r`` per modality.

    Args:
        video_rule: ``"temporal"`` (dissimilarity to the same location in the previous frame) or
            ``"norm"``.
        audio_rule: ``"neighbour"`` (dissimilarity to the previous audio token) or ``"norm"``.
    """

    def __init__(
        self,
        video_rule: Literal["temporal", "norm"] = "temporal",
        audio_rule: Literal["neighbour", "norm"] = "neighbour",
    ) -> None:
        super().__init__()
        if video_rule not in VIDEO_RULES:
            raise ValueError(
                f"IntraModal video_rule must be one of {sorted(VIDEO_RULES)}, got {video_rule!r}"
            )
        if audio_rule not in AUDIO_RULES:
            raise ValueError(
                f"IntraModal audio_rule must be one of {sorted(AUDIO_RULES)}, got {audio_rule!r}"
            )
        self.video_rule = video_rule
        self.audio_rule = audio_rule

    def extra_repr(self) -> str:
        return f"video_rule={self.video_rule!r}, audio_rule={self.audio_rule!r}"

    def scores(self, seq: TokenSequence, candidates: Tensor) -> Tensor:
        """``(B, L)`` unimodal scores of the candidates (higher = keep)."""
        video = candidates & (seq.modality == int(Modality.VIDEO))
        audio = candidates & (seq.modality == int(Modality.AUDIO))
        return VIDEO_RULES[self.video_rule](seq, video) + AUDIO_RULES[self.audio_rule](seq, audio)

    def select(self, seq: TokenSequence, candidates: Tensor, ratio: float) -> Tensor:
        """``(B, L)`` bool: per modality, the top ``keep_count(n_m, ratio)`` candidates."""
        scores = self.scores(seq, candidates)
        keep = torch.zeros_like(candidates)
        for m in (Modality.VIDEO, Modality.AUDIO):
            pool = candidates & (seq.modality == int(m))
            keep |= top_k_mask(scores, pool, keep_counts(pool.sum(-1), ratio))
        return keep

    def before_llm(self, seq: TokenSequence, ctx: ReductionContext) -> TokenSequence:
        candidates = ctx.candidates & seq.attention_mask
        keep = self.select(seq, candidates, ctx.keep_ratio)
        ctx.stats["intramodal_k"] = keep.sum(-1)
        return seq.keep(keep | ~candidates)
