"""Batch per-sample model inputs the way the Qwen2.5-Omni processor batches them.

Why not call the processor on the whole batch: samples are processed once and cached (decoding
and feature extraction dominate), and a batch may mix videos sampled at different fps, which one
processor call cannot express (it takes one scalar fps). The layout is the processor's: token rows
right-padded (the kit's :class:`~ep_kit.sequence.TokenSequence` convention), flattened video
patches and audio features concatenated in sample order, one ``video_grid_thw`` /
``video_second_per_grid`` row per video, one ``feature_attention_mask`` row per audio.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor

from ep_kit.data.processor import IGNORE_INDEX

TOKEN_KEYS = ("input_ids", "attention_mask", "labels", "answer_mask")
VIDEO_KEYS = ("pixel_values_videos", "video_grid_thw", "video_second_per_grid")
META_KEYS = ("question_id", "category", "benchmark", "question", "options")


def collate_av(
    samples: Sequence[dict[str, Any] | None],
    pad_token_id: int,
    use_audio_in_video: bool = True,
    feature_pad_to: int | None = None,
) -> dict[str, Any]:
    """Pad and concatenate per-sample inputs (see :meth:`AVInputBuilder.encode`).

    ``feature_pad_to`` pads audio features to a fixed width (the processor pads to its Whisper
    window, e.g. 3000 frames for 30 s); ``None`` pads to the longest audio in the batch. Padded
    mel frames are zeros (the processor's hold the log-mel of its zero padding); the audio tower
    drops them through ``feature_attention_mask``, so the model sees the same features.
    Evaluation samples may carry ``choice_token_ids`` / ``answer_index`` (stacked, plus a
    ``choice_mask`` of real options) and
    ``question_id`` / ``category`` / ``benchmark`` / ``question`` / ``options`` (kept as lists).

    ``None`` samples (a dataset with ``skip_bad`` that could not decode them, counted in its skip
    report) are dropped, so the batch is smaller. A batch whose samples are *all* ``None`` raises
    ``ValueError`` rather than returning an empty marker: every training and evaluation step (and
    every rank of a distributed run, which must step together) expects real inputs, so an empty
    batch could only be skipped by code outside the data pipeline. Such a batch means a long run
    of unreadable files; the dataset's warnings and skip report name them.
    """
    if not samples:
        raise ValueError("cannot collate an empty list of samples")
    n_given = len(samples)
    samples = [s for s in samples if s is not None]
    if not samples:
        raise ValueError(
            f"every sample of this batch ({n_given} of {n_given}) was skipped as unreadable (skip_bad): "
            "see the skip report / warnings naming their files; fix or remove them, or use a larger batch size"
        )
    lengths = [int(s["input_ids"].shape[0]) for s in samples]
    B, L = len(samples), max(lengths)
    fills = {"input_ids": pad_token_id, "attention_mask": 0, "labels": IGNORE_INDEX, "answer_mask": 0}
    batch: dict[str, Any] = {}
    for key in TOKEN_KEYS:
        if key not in samples[0]:
            continue
        dtype = torch.bool if key == "answer_mask" else torch.long
        out = torch.full((B, L), fills[key], dtype=dtype)
        for b, s in enumerate(samples):
            out[b, : lengths[b]] = s[key].to(dtype)
        batch[key] = out

    with_video = [s for s in samples if "pixel_values_videos" in s]
    if with_video:
        for key in VIDEO_KEYS:
            batch[key] = torch.cat([s[key] for s in with_video])

    with_audio = [s for s in samples if "input_features" in s]
    if with_audio:
        widths = [int(s["input_features"].shape[-1]) for s in with_audio]
        width = max(widths) if feature_pad_to is None else feature_pad_to
        if width < max(widths):
            raise ValueError(
                f"feature_pad_to={feature_pad_to} is shorter than an audio of {max(widths)} frames"
            )
        feats, masks = [], []
        for s in with_audio:
            pad = width - s["input_features"].shape[-1]
            feats.append(torch.nn.functional.pad(s["input_features"], (0, pad)))
            masks.append(torch.nn.functional.pad(s["feature_attention_mask"], (0, pad)))
        batch["input_features"] = torch.cat(feats)
        batch["feature_attention_mask"] = torch.cat(masks)

    if "choice_token_ids" in samples[0]:
        batch["choice_token_ids"], batch["choice_mask"] = _stack_choices(
            [s["choice_token_ids"] for s in samples]
        )
        batch["answer_index"] = torch.tensor([int(s["answer_index"]) for s in samples], dtype=torch.long)
    for key in META_KEYS:
        if key in samples[0]:
            batch[key] = [s[key] for s in samples]
    batch["use_audio_in_video"] = bool(use_audio_in_video)
    return batch


def _stack_choices(rows: list[Tensor]) -> tuple[Tensor, Tensor]:
    """``(B, n_options)`` letter ids and a bool mask of real options.

    A sample with fewer options repeats its last letter in the padded slots; mask them out
    (``choice_mask``) before taking an argmax.
    """
    n = max(int(r.numel()) for r in rows)
    out = torch.empty(len(rows), n, dtype=torch.long)
    mask = torch.zeros(len(rows), n, dtype=torch.bool)
    for b, r in enumerate(rows):
        r = r.long().reshape(-1)
        out[b, : r.numel()] = r
        out[b, r.numel() :] = r[-1]
        mask[b, : r.numel()] = True
    return out, mask
