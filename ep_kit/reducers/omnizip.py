"""OmniZip (training-free, Qwen2.5-Omni): audio-guided, time-windowed audio/video token compression.

What this implementation does, step by step (every simplification of OmniZip's published method
is named here):

1. **Budget split.** The common unit is the keep ratio ``r`` over the A/V pool of a sample:
   ``k = keep_count(n_audio + n_video, r)`` tokens survive in total, exactly. ``audio_ratio`` and
   ``video_ratio`` are OmniZip's native *pruning* rates (defaults 0.3 and 0.6: it keeps 70% of
   audio and 40% of video at its own operating point). At budget ``r`` both keep rates are scaled
   by one common factor, so audio stays ``(1 - audio_ratio) / (1 - video_ratio)`` times as densely
   kept as video::

       k_audio = round(k * (1-a) n_audio / ((1-a) n_audio + (1-v) n_video)),   k_video = k - k_audio

   (clipped to the pool sizes, with at least one token per non-empty modality when ``k >= 2``).
2. **Audio salience.** The attention each audio-encoder frame *receives* in the audio tower's last
   layer: that layer's input is captured with a forward pre-hook while the wrapper encodes the
   audio (no second encoder pass), and ``softmax(q k^T / sqrt(d))`` is recomputed with the layer's
   own normalisation and query/key projections inside each attention chunk of the tower; column
   sums averaged over heads (:meth:`ReducerHost.audio_token_salience`). Frames map to LLM audio tokens through the
   tower's stride-2 average pooling (token ``j`` of an audio = frames ``2j, 2j+1``; 25 tokens/s), so
   a token's salience is the mean of its two frames.
3. **Audio anchors + merging.** The ``k_audio`` most salient audio tokens of a sample are kept as
   anchors. Every other audio token is assigned to its most cosine-similar anchor; each anchor
   absorbs at most ``merge_group`` of its assigned tokens (most similar first) as the similarity-
   weighted average ``(x_a + sum_j s_j x_j) / (1 + sum_j s_j)`` with ``s_j = max(cos, 0)``. Tokens not
   absorbed are dropped. Merging changes hidden states, never the kept count.
4. **Audio-guided video budget per window.** Windows are ``window_seconds`` of temporal rotary
   position (``position_id_per_seconds`` = 25 per second), counted from the first token of each
   modality in the sample. ``r_i`` = share of the window's audio tokens kept as anchors (0 for a
   window without audio). The window's pruning rate is ``clip(0.75 - 0.4 r_i, 0.35, 0.75)``; its
   keep weight ``(1 - p_i) * n_i`` is normalised so the windows share exactly ``k_video`` tokens
   (largest remainder, capped at the window size).
5. **Inside a window** the budget is split over its frames (distinct temporal positions)
   proportionally to their sizes; frames alternate between *spatial* pruning (even frames of the
   window: density-peak clustering score ``rho * delta``, DPC-kNN with ``knn`` neighbours on the
   embeddings) and *temporal* pruning (odd frames: ``1 - cos`` with the token at the same h/w
   location of the previous frame; density-peak when there is no previous frame).

Text and non-candidates are always kept with their original positions; only the prefill is reduced.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

from ep_kit.budget import check_ratio, keep_count
from ep_kit.reducers.base import ReducerHost, ReductionContext, TokenReducer
from ep_kit.sequence import Modality, TokenSequence


# ----------------------------------------------------------------- pure rules
def split_budget(
    k: int, n_audio: int, n_video: int, audio_ratio: float, video_ratio: float
) -> tuple[int, int]:
    """``(k_audio, k_video)`` summing to ``k`` (step 1 of the module docstring)."""
    if k > n_audio + n_video:
        raise ValueError(f"budget k={k} exceeds the pool of {n_audio + n_video} tokens")
    wa, wv = (1 - audio_ratio) * n_audio, (1 - video_ratio) * n_video
    k_a = round(k * wa / (wa + wv)) if wa + wv > 0 else 0
    k_a = min(max(k_a, k - n_video, 0), n_audio)
    if k >= 2 and n_audio > 0 and n_video > 0:
        k_a = min(max(k_a, 1), k - 1)
    return k_a, k - k_a


def window_prune_rate(audio_keep_rate: Tensor) -> Tensor:
    """OmniZip's per-window video pruning rate ``clip(0.75 - 0.4 r_i, 0.35, 0.75)``."""
    return (0.75 - 0.4 * audio_keep_rate).clamp(0.35, 0.75)


def allocate(total: int, sizes: list[int], weights: list[float]) -> list[int]:
    """Split ``total`` into integer shares proportional to ``weights``, each at most ``sizes[i]``.

    Rounds of "proportional share of what is left, floored, capped at the free room"; when no window
    gets a whole token any more, the last tokens go one each to the windows with the largest share
    (lower index on ties). Raises ``ValueError`` if ``total`` exceeds ``sum(sizes)``.
    """
    if total > sum(sizes):
        raise ValueError(f"cannot allocate {total} tokens over windows holding {sum(sizes)}")
    counts = [0] * len(sizes)
    left = total
    while left > 0:
        open_ = [i for i in range(len(sizes)) if counts[i] < sizes[i]]
        wsum = sum(max(weights[i], 1e-12) for i in open_)
        share = {i: left * max(weights[i], 1e-12) / wsum for i in open_}
        add = {i: min(math.floor(share[i]), sizes[i] - counts[i]) for i in open_}
        if sum(add.values()) == 0:
            for i in sorted(open_, key=lambda i: (-share[i], i))[:left]:
                counts[i] += 1
            left = 0
        else:
            for i, a in add.items():
                counts[i] += a
            left -= sum(add.values())
    return counts


def density_peak_scores(x: Tensor, knn: int = 5) -> Tensor:
    """DPC-kNN score ``rho * delta`` per row of ``x`` (``(n, D)``): dense cluster centres score high.

    ``rho_i = exp(-mean of squared distances to the knn nearest neighbours)``; ``delta_i`` = distance
    to the nearest point of higher density (the largest distance for the densest point).
    """
    n = x.shape[0]
    if n == 1:
        return torch.ones(1, dtype=torch.float32, device=x.device)
    x = x.float()
    d = torch.cdist(x[None], x[None])[0] / math.sqrt(x.shape[-1])
    kk = min(knn, n - 1)
    nearest = d.topk(kk + 1, dim=-1, largest=False).values[:, 1:]
    rho = torch.exp(-(nearest**2).mean(-1))
    rho = rho + torch.arange(n, device=x.device) * 1e-9 * -1  # deterministic tie break: lower index denser
    higher = rho[None, :] > rho[:, None]
    delta = torch.where(higher, d, torch.full_like(d, float("inf"))).amin(-1)
    delta = torch.where(torch.isinf(delta), d.amax(-1), delta)
    return rho * delta


def top_indices(scores: Tensor, k: int) -> Tensor:
    """Indices of the ``k`` largest scores, lower index first on ties."""
    order = torch.sort(scores, descending=True, stable=True).indices
    return order[:k]


def merge_into_anchors(x: Tensor, anchors: Tensor, group: int) -> Tensor:
    """Hidden states of ``x`` (``(n, D)``) after merging non-anchors into anchors (step 3).

    ``anchors`` is a bool ``(n,)`` mask. Returns ``(n, D)``: anchor rows replaced by their merged
    state, other rows unchanged (they are dropped by the caller).
    """
    if group <= 0 or bool(anchors.all()) or not bool(anchors.any()):
        return x
    a_idx = anchors.nonzero().squeeze(-1)
    o_idx = (~anchors).nonzero().squeeze(-1)
    sim = F.cosine_similarity(x[o_idx].float()[:, None], x[a_idx].float()[None], dim=-1)  # (n_o, n_a)
    best_sim, best = sim.max(-1)  # lower anchor index wins ties
    out = x.clone()
    for j, a in enumerate(a_idx.tolist()):
        mine = (best == j).nonzero().squeeze(-1)
        if mine.numel() == 0:
            continue
        chosen = mine[top_indices(best_sim[mine], group)]
        w = best_sim[chosen].clamp(min=0).to(x.dtype)
        out[a] = (x[a] + (w[:, None] * x[o_idx[chosen]]).sum(0)) / (1 + w.sum())
    return out


# ---------------------------------------------------------------- reducer
class OmniZip(TokenReducer):
    """OmniZip at the common budget (module docstring).

    Args:
        audio_ratio: native audio pruning rate (sets the audio/video keep-rate proportion).
        video_ratio: native video pruning rate.
        merge_group: ``g``, the most non-anchor audio tokens merged into one anchor.
        window_seconds: length of the audio-guided video windows.
        knn: neighbours of the density-peak score.
    """

    def __init__(
        self,
        audio_ratio: float = 0.3,
        video_ratio: float = 0.6,
        merge_group: int = 3,
        window_seconds: float = 2.0,
        knn: int = 5,
    ) -> None:
        super().__init__()
        for name, v in (("audio_ratio", audio_ratio), ("video_ratio", video_ratio)):
            if not 0.0 <= float(v) < 1.0:
                raise ValueError(f"OmniZip {name} (a pruning rate) must be in [0, 1), got {v}")
        if int(merge_group) < 0:
            raise ValueError(f"OmniZip merge_group must be >= 0, got {merge_group}")
        if float(window_seconds) <= 0:
            raise ValueError(f"OmniZip window_seconds must be > 0, got {window_seconds}")
        if int(knn) < 1:
            raise ValueError(f"OmniZip knn must be >= 1, got {knn}")
        self.audio_ratio = float(audio_ratio)
        self.video_ratio = float(video_ratio)
        self.merge_group = int(merge_group)
        self.window_seconds = float(window_seconds)
        self.knn = int(knn)
        self.positions_per_second = 25.0

    def extra_repr(self) -> str:
        return (
            f"audio_ratio={self.audio_ratio}, video_ratio={self.video_ratio}, merge_group={self.merge_group}, "
            f"window_seconds={self.window_seconds}, knn={self.knn}"
        )

    # ---------------------------------------------------------- audio salience
    def attach(self, model: ReducerHost) -> None:
        """Ask the model to capture the audio encoder's last-layer input while it embeds (no second pass)."""
        self.positions_per_second = model.positions_per_second
        model.enable_audio_salience()

    # ------------------------------------------------------------ selection
    def _windows(self, t: Tensor) -> Tensor:
        width = self.window_seconds * self.positions_per_second
        return torch.floor((t - t.min()).double() / width).long()

    def _video_keep(
        self, seq: TokenSequence, b: int, v_idx: Tensor, k_v: int, win_rate: dict[int, float]
    ) -> Tensor:
        """Local indices (into ``v_idx``) of the kept video tokens of sample ``b``."""
        t = seq.positions[0, b, v_idx]
        win = self._windows(t)
        wins = win.unique().tolist()
        sizes = [int((win == w).sum()) for w in wins]
        rates = window_prune_rate(torch.tensor([win_rate.get(w, 0.0) for w in wins], dtype=torch.float64))
        weights = [(1 - float(p)) * n for p, n in zip(rates, sizes, strict=True)]
        counts = allocate(k_v, sizes, weights)
        x = seq.hidden[b, v_idx]
        hw = seq.positions[1:3, b, v_idx]
        frame_values = t.unique()
        kept: list[Tensor] = []
        for w, c in zip(wins, counts, strict=True):
            if c == 0:
                continue
            in_w = (win == w).nonzero().squeeze(-1)
            frames = t[in_w].unique()
            f_sizes = [int((t[in_w] == f).sum()) for f in frames]
            f_counts = allocate(c, f_sizes, [float(s) for s in f_sizes])
            for j, (f, fc) in enumerate(zip(frames, f_counts, strict=True)):
                if fc == 0:
                    continue
                local = in_w[t[in_w] == f]
                scores = None
                if j % 2 == 1:
                    prev_pos = int((frame_values < f).sum()) - 1
                    if prev_pos >= 0:
                        prev = (t == frame_values[prev_pos]).nonzero().squeeze(-1)
                        scores = self._temporal_scores(x, hw, local, prev)
                if scores is None:
                    scores = density_peak_scores(x[local], self.knn)
                kept.append(local[top_indices(scores, fc)])
        return torch.cat(kept) if kept else v_idx[:0]

    @staticmethod
    def _temporal_scores(x: Tensor, hw: Tensor, local: Tensor, prev: Tensor) -> Tensor:
        """``1 - cos`` with the same h/w location in the previous frame (2 when the location is missing there)."""
        key_prev = {(int(hw[0, i]), int(hw[1, i])): int(i) for i in prev}
        ref = torch.tensor([key_prev.get((int(hw[0, i]), int(hw[1, i])), -1) for i in local], device=x.device)
        scores = torch.full((len(local),), 2.0, dtype=torch.float32, device=x.device)
        has = ref >= 0
        if bool(has.any()):
            scores[has] = 1 - F.cosine_similarity(x[local[has]].float(), x[ref[has]].float(), dim=-1)
        return scores

    def before_llm(self, seq: TokenSequence, ctx: ReductionContext) -> TokenSequence:
        r = check_ratio(ctx.keep_ratio)
        candidates = ctx.candidates & seq.attention_mask
        audio_mask = seq.is_modality(Modality.AUDIO)
        salience_all = ctx.model.audio_token_salience(ctx.batch) if bool(audio_mask.any()) else None
        if salience_all is not None and salience_all.shape[0] != int(audio_mask.sum()):
            raise ValueError(
                f"OmniZip: {salience_all.shape[0]} audio salience values for {int(audio_mask.sum())} audio tokens"
            )
        hidden = seq.hidden.clone()
        keep = torch.zeros_like(candidates)
        offset = 0
        k_audio, k_video = [], []
        for b in range(seq.batch_size):
            a_all = audio_mask[b].nonzero().squeeze(-1)
            sal = salience_all[offset : offset + len(a_all)] if salience_all is not None else None
            offset += len(a_all)
            a_cand = candidates[b, a_all] if len(a_all) else a_all.bool()
            a_idx = a_all[a_cand]
            v_idx = (candidates[b] & (seq.modality[b] == int(Modality.VIDEO))).nonzero().squeeze(-1)
            k = keep_count(len(a_idx) + len(v_idx), r)
            k_a, k_v = split_budget(k, len(a_idx), len(v_idx), self.audio_ratio, self.video_ratio)
            k_audio.append(k_a)
            k_video.append(k_v)
            win_rate: dict[int, float] = {}
            if len(a_idx):
                assert sal is not None
                s = sal[a_cand]
                anchors = torch.zeros(len(a_idx), dtype=torch.bool, device=s.device)
                anchors[top_indices(s, k_a)] = True
                hidden[b, a_idx] = merge_into_anchors(seq.hidden[b, a_idx], anchors, self.merge_group)
                keep[b, a_idx[anchors]] = True
                a_win = self._windows(seq.positions[0, b, a_idx])
                for w in a_win.unique().tolist():
                    in_w = a_win == w
                    win_rate[w] = float(anchors[in_w].float().mean())
            if len(v_idx):
                keep[b, v_idx[self._video_keep(seq, b, v_idx, k_v, win_rate)]] = True
        dev = seq.hidden.device
        ctx.stats["omnizip_k_audio"] = torch.tensor(k_audio, device=dev)
        ctx.stats["omnizip_k_video"] = torch.tensor(k_video, device=dev)
        return seq.replace(hidden=hidden).keep(keep | ~candidates)

    def kept_candidates(self, n_video: int, n_audio: int, keep_ratio: float) -> int:
        """Exactly ``keep_count(n_audio + n_video, r)``: merged audio tokens still count once."""
        return keep_count(n_video + n_audio, keep_ratio)
