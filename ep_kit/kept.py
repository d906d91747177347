"""Where the kept tokens of one sample came from, as records and as a picture.

Why: a keep ratio and a kept count say how much was kept, not what. :func:`kept_positions` maps
every kept audio/video token of a prefill back to its place in the clip (frame grid cell or audio
time) and :func:`kept_figure` draws it: one panel per temporal patch with the kept cells outlined,
and the audio timeline with the kept tokens marked. ``ep-kit answer`` writes both.

The mapping uses the processor's token order, which the model's ``get_rope_index`` relies on too:
video tokens of one video come temporal patch by temporal patch, each row-major over the merged
``(h / merge) x (w / merge)`` grid (interleaving with audio chunks does not change their order),
and audio tokens follow each other at ``positions_per_second`` tokens per second (25: one per 40 ms).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
from matplotlib.figure import Figure
from matplotlib.patches import Rectangle
from torch import Tensor

from ep_kit.sequence import Modality


def kept_positions(
    modality: Tensor,
    kept_source_index: Tensor,
    video_grid_thw: Sequence[int] | Tensor | None,
    second_per_grid: float,
    spatial_merge_size: int,
    audio_tokens_per_second: float,
) -> list[dict[str, Any]]:
    """One record per kept audio/video token of ONE sample, in input order.

    Args:
        modality: ``(L,)`` modality id of every token of the full (unreduced) sequence.
        kept_source_index: ``(L_kept,)`` input column of every kept token (``-1`` on padding).
        video_grid_thw: the video's ``(t, h, w)`` grid in vision patches (None: no video).
        second_per_grid: seconds one temporal patch covers (``video_second_per_grid``).
        spatial_merge_size: vision patches merged per token side (2 in Qwen2.5-Omni).
        audio_tokens_per_second: audio tokens per second of audio.

    Records: ``modality`` ("video"/"audio"), ``index`` (input column), ``rank`` (index among the
    tokens of its modality); video adds ``frame`` (temporal patch), ``row``/``col`` (merged grid
    cell) and ``time`` (start second of the patch); audio adds ``time`` (start second).
    """
    modality = modality.detach().cpu()
    kept = {int(i) for i in kept_source_index.detach().cpu().tolist() if int(i) >= 0}
    cols = {m: (modality == m).nonzero().flatten().tolist() for m in (Modality.VIDEO, Modality.AUDIO)}
    cells = 0
    if video_grid_thw is not None:
        _, h, w = (int(x) for x in video_grid_thw)
        hm, wm = h // spatial_merge_size, w // spatial_merge_size
        cells = hm * wm
    out: list[dict[str, Any]] = []
    for m, columns in cols.items():
        for rank, col in enumerate(columns):
            if col not in kept:
                continue
            if m == Modality.VIDEO:
                if cells == 0:
                    raise ValueError("the sequence has video tokens but no video_grid_thw was given")
                frame, cell = divmod(rank, cells)
                row, c = divmod(cell, wm)
                out.append({"modality": "video", "index": col, "rank": rank, "frame": frame, "row": row,
                            "col": c, "time": round(frame * second_per_grid, 4)})
            else:
                out.append({"modality": "audio", "index": col, "rank": rank,
                            "time": round(rank / audio_tokens_per_second, 4)})
    out.sort(key=lambda r: r["index"])
    return out


def kept_figure(
    frames: np.ndarray,
    positions: Sequence[dict[str, Any]],
    grid: tuple[int, int, int],
    n_audio: int,
    audio_tokens_per_second: float,
    spatial_merge_size: int = 2,
    title: str = "",
) -> Figure:
    """Frame panels with kept video cells outlined, and the audio timeline with kept tokens marked.

    ``frames``: ``(T, H, W, 3)`` uint8 frames the model saw (two per temporal patch; the first of
    each pair is drawn). ``grid``: the video's ``(t, h, w)`` in vision patches. One panel per
    temporal patch, then one audio axis (when ``n_audio`` > 0). Built without pyplot, so it never
    touches the caller's backend: save it with ``fig.savefig``.
    """
    t, h, w = grid
    hm, wm = h // spatial_merge_size, w // spatial_merge_size
    panels = t
    fig = Figure(figsize=(max(6.0, 1.6 * panels), 2.0 + (1.0 if n_audio else 0.0)), layout="constrained")
    rows = 2 if n_audio else 1
    gs = fig.add_gridspec(rows, panels, height_ratios=[3, 1][:rows])
    kept_video = [p for p in positions if p["modality"] == "video"]
    for f in range(panels):
        ax = fig.add_subplot(gs[0, f])
        image = frames[min(2 * f, len(frames) - 1)]
        H, W = image.shape[:2]
        ax.imshow(image, alpha=0.45)
        cell_h, cell_w = H / hm, W / wm
        for p in kept_video:
            if p["frame"] == f:
                ax.add_patch(Rectangle((p["col"] * cell_w, p["row"] * cell_h), cell_w, cell_h,
                                       fill=False, edgecolor="red", linewidth=1.5))
        n_kept = sum(p["frame"] == f for p in kept_video)
        ax.set_title(f"patch {f}: {n_kept}/{hm * wm}", fontsize=8)
        ax.set_xticks([])
        ax.set_yticks([])
    if n_audio:
        ax = fig.add_subplot(gs[1, :])
        seconds = n_audio / audio_tokens_per_second
        step = 1.0 / audio_tokens_per_second
        ax.broken_barh([(i * step, step) for i in range(n_audio)], (0, 1), facecolors="lightgrey")
        kept_audio = [p["time"] for p in positions if p["modality"] == "audio"]
        ax.broken_barh([(s, step) for s in kept_audio], (0, 1), facecolors="tab:blue")
        ax.set_xlim(0, seconds)
        ax.set_yticks([])
        ax.set_xlabel(f"audio (s): {len(kept_audio)}/{n_audio} tokens kept")
    if title:
        fig.suptitle(title, fontsize=9)
    return fig
