"""Decode video frames and audio tracks with PyAV, following Qwen2.5-Omni's preprocessing rules.

Why by hand: the model was trained on frames sampled by its own utility rules (2 fps, an even
number of frames so every temporal patch of 2 is full, each frame resized to multiples of 28
between a min and a max pixel count, aspect ratio kept) and on 16 kHz mono audio. The processor's
own video loader needs torchcodec and re-samples frames; here frames are sampled once, cached, and
handed to the processor with ``do_sample_frames=False``. The frame-size rule is transformers'
``smart_resize`` itself, so the processor never resizes the frames a second time.

Every error names the file: missing, undecodable, no video stream, no audio stream when the
audio track is required, too few frames for one temporal patch, a frame whose aspect ratio cannot
be resized within the pixel bounds, or ``max_frames`` below one temporal patch. A file that decodes
clearly shorter than its container declares (typically an mp4 cut off on disk with its index at the
start) warns with :class:`TruncatedMediaWarning` naming the file and both durations: the frames and
audio that do decode are still used, so the warning is the only sign of the loss.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass
from pathlib import Path

import av
import numpy as np
import torch
import torchvision.transforms.v2.functional as tvF
from torch import Tensor

from ep_kit.models.hf import smart_resize

#: Qwen2.5-Omni's video defaults (pixels per frame, frames, frame factor).
PATCH_FACTOR = 28
TEMPORAL_PATCH = 2
VIDEO_MIN_PIXELS = 128 * 28 * 28
VIDEO_MAX_PIXELS = 768 * 28 * 28
FPS_MIN_FRAMES = 4
FPS_MAX_FRAMES = 768
AUDIO_SAMPLE_RATE = 16000
#: What decoding a bad media file raises (missing, unreadable, corrupt, undecodable): the errors a
#: data set with ``skip_bad`` counts and skips.
MEDIA_ERRORS: tuple[type[Exception], ...] = (ValueError, OSError, av.FFmpegError)
#: ``smart_resize`` refuses frames whose long side is more than this many times the short side.
MAX_ASPECT_RATIO = 200
#: A decoded track shorter than ``1 - SHORT_MEDIA_TOLERANCE`` of its declared duration is reported.
#: Container metadata and decoders routinely disagree by a frame or an AAC priming block; 10% is
#: well above that and well below what a file cut off on disk loses.
SHORT_MEDIA_TOLERANCE = 0.1


class TruncatedMediaWarning(UserWarning):
    """A media file decoded to clearly less than its container declares (truncated or damaged).

    Turn it into an error with ``warnings.filterwarnings("error", category=TruncatedMediaWarning)``.
    """


@dataclass
class VideoClip:
    """Frames sampled from one video (plus, optionally, its audio track).

    Attributes:
        frames: ``(T, 3, H, W)`` uint8, ``T`` even, ``H`` and ``W`` multiples of 28.
        fps: the realised sampling rate (frames kept per second of source video); the processor
            turns it into ``video_second_per_grid = 2 / fps``.
        path: source file, for error messages.
        audio: the audio track as 16 kHz mono float32 (``None`` if not loaded).
    """

    frames: Tensor
    fps: float
    path: str | None = None
    audio: np.ndarray | None = None

    @property
    def seconds_per_grid(self) -> float:
        """Seconds covered by one temporal patch (2 frames)."""
        return TEMPORAL_PATCH / self.fps

    @property
    def num_frames(self) -> int:
        return int(self.frames.shape[0])

    def numpy(self) -> np.ndarray:
        """Frames as ``(T, H, W, 3)`` uint8."""
        return self.frames.permute(0, 2, 3, 1).contiguous().numpy()


def _check_exists(path: str | Path, what: str) -> Path:
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"{what} file not found: {p}")
    return p


def _open(path: Path, what: str) -> av.container.InputContainer:
    try:
        return av.open(str(path))
    except (av.FFmpegError, UnicodeDecodeError) as err:
        raise ValueError(f"cannot open {what} file {path} (corrupt or unsupported): {err}") from err


def sample_frame_count(
    total_frames: int, video_fps: float, fps: float, min_frames: int, max_frames: int
) -> int:
    """Frames to keep: ``fps`` per second, clamped to ``[min_frames, max_frames]``, even, <= total."""
    upper = math.floor(min(max_frames, total_frames) / TEMPORAL_PATCH) * TEMPORAL_PATCH
    lower = math.ceil(min_frames / TEMPORAL_PATCH) * TEMPORAL_PATCH
    wanted = total_frames / video_fps * fps
    n = min(max(wanted, lower), upper, total_frames)
    return int(math.floor(n / TEMPORAL_PATCH) * TEMPORAL_PATCH)


def sample_indices(total_frames: int, n: int) -> list[int]:
    """``n`` frame indices spread evenly from the first to the last frame."""
    return torch.linspace(0, total_frames - 1, n).round().long().tolist()


def frame_size(
    height: int, width: int, min_pixels: int, max_pixels: int, path: str | Path | None = None
) -> tuple[int, int]:
    """``smart_resize``'s multiple-of-28 size for a ``height x width`` frame, or a clear error naming the file.

    Two cases ``smart_resize`` itself gets wrong for a pipeline: an aspect ratio above
    :data:`MAX_ASPECT_RATIO` (it raises without naming the file), and a frame so elongated that even
    a 28-pixel short side puts it over ``max_pixels`` (it silently returns a size over the bound, and
    the processor then resizes those frames a second time, e.g. 28x2000 -> 28x448 -> 28x224 for
    ``max_pixels=3136``).
    """
    name = f"video file {path}" if path is not None else "video frame"
    if min(height, width) < 1:
        raise ValueError(f"{name}: frames are {height}x{width} pixels (an empty frame)")
    ratio = max(height, width) / min(height, width)
    if ratio > MAX_ASPECT_RATIO:
        raise ValueError(
            f"{name}: frames are {height}x{width} (aspect ratio {ratio:.0f}:1); Qwen2.5-Omni's resizing "
            f"accepts at most {MAX_ASPECT_RATIO}:1 -- crop or pad the video"
        )
    new_h, new_w = smart_resize(height, width, factor=PATCH_FACTOR, min_pixels=min_pixels, max_pixels=max_pixels)
    if new_h * new_w > max_pixels and min(new_h, new_w) == PATCH_FACTOR:
        # (Over the bound with a longer short side is smart_resize rounding an upscale to min_pixels up:
        # the processor does the same, nothing is resized twice.) The short side cannot go below one patch, so such a frame is only accepted unshrunk: the
        # smallest max_pixels that works is its rounded size (or the upscaled one, below min_pixels).
        full = round(height / PATCH_FACTOR) * PATCH_FACTOR * round(width / PATCH_FACTOR) * PATCH_FACTOR
        need = full if full >= min_pixels else new_h * new_w
        raise ValueError(
            f"{name}: frames of {height}x{width} (aspect ratio {ratio:.1f}:1) cannot be resized within "
            f"max_pixels={max_pixels} with both sides multiples of {PATCH_FACTOR} (the short side stops at "
            f"{PATCH_FACTOR}: {new_h}x{new_w} = {new_h * new_w} pixels); raise max_pixels to at least {need} "
            "or crop the video"
        )
    return new_h, new_w


def resize_frames(
    frames: Tensor, min_pixels: int, max_pixels: int, path: str | Path | None = None
) -> Tensor:
    """Resize ``(T, 3, H, W)`` uint8 frames to the multiple-of-28 size ``smart_resize`` picks.

    ``path`` only names the file in errors (see :func:`frame_size`).
    """
    height, width = frames.shape[-2:]
    new_h, new_w = frame_size(int(height), int(width), min_pixels, max_pixels, path)
    if (new_h, new_w) == (height, width):
        return frames
    return tvF.resize(frames, [new_h, new_w], interpolation=tvF.InterpolationMode.BICUBIC, antialias=True)


def _decode_rgb(path: Path, wanted: set[int] | None) -> tuple[list[np.ndarray], int, float]:
    """Decode the video stream; keep frames whose index is in ``wanted`` (all when None)."""
    container = _open(path, "video")
    try:
        if not container.streams.video:
            raise ValueError(f"video file {path} has no video stream")
        stream = container.streams.video[0]
        stream.thread_type = "AUTO"
        rate = stream.average_rate or stream.guessed_rate
        video_fps = float(rate) if rate else 0.0
        kept, count = [], 0
        try:
            for frame in container.decode(stream):
                if wanted is None or count in wanted:
                    kept.append(frame.to_ndarray(format="rgb24"))
                count += 1
        except av.FFmpegError as err:
            raise ValueError(f"cannot decode video file {path} (corrupt?): {err}") from err
    finally:
        container.close()
    return kept, count, video_fps


def _frame_count_hint(path: Path) -> tuple[int, float, float | None]:
    """Declared frame count, frame rate and duration in seconds (``None``: not declared)."""
    container = _open(path, "video")
    try:
        if not container.streams.video:
            raise ValueError(f"video file {path} has no video stream")
        stream = container.streams.video[0]
        rate = stream.average_rate or stream.guessed_rate
        return int(stream.frames or 0), float(rate) if rate else 0.0, _stream_seconds(stream)
    finally:
        container.close()


def _stream_seconds(stream: av.stream.Stream) -> float | None:
    """The duration ``stream`` itself declares (``None``: none).

    Only the stream's own: the container's duration is that of its longest stream, so comparing a
    shorter track against it would report a healthy file as truncated.
    """
    if stream.duration is not None and stream.time_base is not None:
        return float(stream.duration * stream.time_base)
    return None


def _warn_if_short(what: str, declared: float | None, decoded: float, detail: str = "") -> None:
    """Warn when ``decoded`` seconds fall clearly short of the ``declared`` ones (see :data:`SHORT_MEDIA_TOLERANCE`)."""
    if declared is None or declared <= 0:
        return
    if decoded < declared * (1 - SHORT_MEDIA_TOLERANCE) and declared - decoded > 0.1:
        warnings.warn(
            f"{what} decoded to {decoded:.2f} s{detail} but its container declares {declared:.2f} s: "
            "the file is probably truncated or damaged (only the decoded part is used)",
            TruncatedMediaWarning,
            stacklevel=3,
        )


def load_video(
    path: str | Path,
    fps: float = 2.0,
    min_pixels: int = VIDEO_MIN_PIXELS,
    max_pixels: int = VIDEO_MAX_PIXELS,
    max_frames: int = FPS_MAX_FRAMES,
    min_frames: int = FPS_MIN_FRAMES,
    with_audio: bool = False,
    audio_max_seconds: float | None = None,
) -> VideoClip:
    """Sample a video at ``fps`` with Qwen2.5-Omni's rules; optionally load its audio track.

    ``with_audio=True`` (audio-in-video) also decodes the audio track and raises ``ValueError``
    naming the file when the video has none; ``audio_max_seconds`` keeps (and decodes) only its
    first seconds (see :func:`load_audio`). ``max_frames`` must be at least 2 (one temporal patch).
    A video that decodes to clearly fewer frames than its container declares warns
    (:class:`TruncatedMediaWarning`) and is sampled from the frames that decode.
    """
    if fps <= 0:
        raise ValueError(f"fps must be positive, got {fps} (video file {path})")
    if max_frames < TEMPORAL_PATCH:
        raise ValueError(
            f"max_frames must be >= {TEMPORAL_PATCH} (one temporal patch of {TEMPORAL_PATCH} frames), "
            f"got {max_frames} (video file {path})"
        )
    p = _check_exists(path, "video")
    total, video_fps, declared_seconds = _frame_count_hint(p)
    declared_frames = total
    frames = None
    if total >= TEMPORAL_PATCH and video_fps > 0:
        n = sample_frame_count(total, video_fps, fps, min_frames, max_frames)
        idx = sample_indices(total, n)
        kept, count, video_fps = _decode_rgb(p, set(idx))
        if count == total:  # container metadata was right: one pass was enough
            frames = np.stack([kept[i] for i in _positions(idx)])
    if frames is None:  # no (or wrong) frame count in the metadata: decode all, then pick
        kept, count, video_fps = _decode_rgb(p, None)
        if count < TEMPORAL_PATCH:
            raise ValueError(
                f"video file {p} has {count} frame(s); at least {TEMPORAL_PATCH} are needed for one temporal patch"
            )
        if video_fps <= 0:
            raise ValueError(f"video file {p} has no frame rate in its metadata")
        if declared_frames > count:
            _warn_if_short(
                f"video file {p}",
                declared_frames / video_fps,
                count / video_fps,
                f" ({count} of the {declared_frames} frames its stream declares)",
            )
        elif declared_frames == 0:  # no frame count declared: compare durations
            _warn_if_short(f"video file {p}", declared_seconds, count / video_fps, f" ({count} frames)")
        total = count
        n = sample_frame_count(total, video_fps, fps, min_frames, max_frames)
        idx = sample_indices(total, n)
        frames = np.stack([kept[i] for i in idx])
    tensor = resize_frames(
        torch.from_numpy(frames).permute(0, 3, 1, 2).contiguous(), min_pixels, max_pixels, path=p
    )
    realised_fps = len(idx) / total * video_fps
    audio = load_audio(p, max_seconds=audio_max_seconds) if with_audio else None
    return VideoClip(frames=tensor, fps=realised_fps, path=str(p), audio=audio)


def _positions(indices: list[int]) -> list[int]:
    """Map sampled frame indices (possibly repeated) to positions in the deduplicated kept list."""
    order = {frame: i for i, frame in enumerate(sorted(set(indices)))}
    return [order[i] for i in indices]


def audio_duration(path: str | Path) -> float | None:
    """Seconds of the first audio stream from the container metadata (``None`` if it has none).

    Why metadata: a budgeted decode stops early, yet its warning must still say how long the
    track really was.
    """
    p = _check_exists(path, "media")
    container = _open(p, "media")
    try:
        if not container.streams.audio:
            return None
        stream = container.streams.audio[0]
        if stream.duration is not None and stream.time_base is not None:
            return float(stream.duration * stream.time_base)
        return container.duration / av.time_base if container.duration is not None else None
    finally:
        container.close()


def load_audio(path: str | Path, sr: int = AUDIO_SAMPLE_RATE, max_seconds: float | None = None) -> np.ndarray:
    """The first audio stream of a file as mono float32 at ``sr`` Hz (PyAV's resampler).

    ``max_seconds`` keeps only the first ``round(max_seconds * sr)`` samples and stops decoding as
    soon as they are in hand, so a token budget that keeps 30 s of a 60-minute track decodes about
    30 s, not 60 minutes. ``None`` decodes the whole track. A track that decodes to clearly less
    than its container declares (or than ``max_seconds``, when shorter) warns
    (:class:`TruncatedMediaWarning`) naming the file and both durations.
    """
    if max_seconds is not None and max_seconds <= 0:
        raise ValueError(f"max_seconds must be positive, got {max_seconds} (audio file {path})")
    limit = None if max_seconds is None else int(round(max_seconds * sr))
    p = _check_exists(path, "audio")
    container = _open(p, "audio")
    try:
        if not container.streams.audio:
            raise ValueError(f"media file {p} has no audio stream (needed for audio / use_audio_in_video)")
        stream = container.streams.audio[0]
        declared = _stream_seconds(stream)
        try:
            chunks = _decode_audio(container, stream, sr, limit)
        except av.FFmpegError as err:
            raise ValueError(f"cannot decode audio of {p} (corrupt?): {err}") from err
    finally:
        container.close()
    if not chunks:
        raise ValueError(f"audio stream of {p} decoded to no samples")
    wave = np.concatenate(chunks).astype(np.float32, copy=False)
    if declared is not None and max_seconds is not None:
        declared = min(declared, max_seconds)
    _warn_if_short(f"audio track of {p}", declared, wave.size / sr)
    return wave if limit is None else wave[:limit]


def _decode_audio(
    container: av.container.InputContainer, stream: av.AudioStream, sr: int, limit: int | None
) -> list[np.ndarray]:
    """Resampled mono chunks of ``stream``; stops once ``limit`` samples are decoded (all when None)."""
    resampler = av.AudioResampler(format="flt", layout="mono", rate=sr)
    chunks: list[np.ndarray] = []
    total = 0
    for frame in container.decode(stream):
        for out in resampler.resample(frame):
            chunks.append(out.to_ndarray().reshape(-1))
            total += chunks[-1].size
        if limit is not None and total >= limit:
            return chunks
    for out in resampler.resample(None):
        chunks.append(out.to_ndarray().reshape(-1))
    return chunks
