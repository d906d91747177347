"""Turn conversations with decoded media into Qwen2.5-Omni model inputs, through transformers.

Why through the real ``Qwen2_5OmniProcessor``: the placeholder layout (how many video/audio tokens,
how they interleave in 2-second chunks with ``use_audio_in_video``) must be exactly what the model
and its ``get_rope_index`` expect. This module only adds what the processor does not do:

* :func:`build_processor` composes the processor offline (tiny tokenizer or a local model
  directory) with a Whisper window of ``audio_chunk_seconds`` instead of the checkpoint's 300 s
  (which pads every call to 300 s of audio: about 50x slower), frames already sampled by
  :mod:`ep_kit.data.media` (``do_sample_frames=False``), audio never truncated silently.
* :class:`AVInputBuilder` renders a conversation, calls the processor for ONE sample, and adds
  ``labels`` (assistant turns only, -100 elsewhere) and ``answer_mask``. Audio features are trimmed
  to their real length (padding carries no information: the audio tower drops it through
  ``feature_attention_mask``); :func:`ep_kit.data.collate.collate_av` pads a batch back.
* :class:`SampleEncoder` decodes the media files of one conversation, keeps the encoded sample
  within an optional token budget (fewer frames first, then an audio policy; text is never cut)
  and caches it on disk, keyed by files and knobs.
"""

from __future__ import annotations

import dataclasses
import hashlib
import io
import json
import logging
import os
import re
import tempfile
import warnings
import zlib
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from torch import Tensor
from transformers import (
    PreTrainedTokenizerBase,
    Qwen2_5OmniProcessor,
    Qwen2VLImageProcessor,
    Qwen2VLVideoProcessor,
    WhisperFeatureExtractor,
)

from ep_kit.data.media import (
    AUDIO_SAMPLE_RATE,
    TEMPORAL_PATCH,
    VIDEO_MAX_PIXELS,
    VIDEO_MIN_PIXELS,
    VideoClip,
    audio_duration,
    load_audio,
    load_video,
)
from ep_kit.data.tokenizer import build_tiny_tokenizer
from ep_kit.sequence import answer_span
from ep_kit.tokens import audio_tokens_from_mel

IGNORE_INDEX = -100
MEDIA_TAG = re.compile(r"<(video|audio|image)>")
AudioPolicy = Literal["truncate", "error"]
log = logging.getLogger(__name__)


def _feature_extractor(
    chunk_seconds: int, base: WhisperFeatureExtractor | None = None
) -> WhisperFeatureExtractor:
    if chunk_seconds <= 0:
        raise ValueError(f"audio_chunk_seconds must be positive, got {chunk_seconds}")
    return WhisperFeatureExtractor(
        feature_size=base.feature_size if base is not None else 128,
        sampling_rate=base.sampling_rate if base is not None else AUDIO_SAMPLE_RATE,
        hop_length=base.hop_length if base is not None else 160,
        n_fft=base.n_fft if base is not None else 400,
        padding_value=base.padding_value if base is not None else 0.0,
        chunk_length=chunk_seconds,
        return_attention_mask=True,
    )


def build_processor(
    source: str | Path | PreTrainedTokenizerBase = "tiny",
    audio_chunk_seconds: int = 30,
    min_pixels: int = VIDEO_MIN_PIXELS,
    max_pixels: int = VIDEO_MAX_PIXELS,
) -> Qwen2_5OmniProcessor:
    """A ``Qwen2_5OmniProcessor`` built without network access.

    Args:
        source: ``"tiny"`` (the kit's byte-level tokenizer), a tokenizer instance, or a local
            Qwen2.5-Omni model directory (its processor files are loaded with
            ``local_files_only=True``).
        audio_chunk_seconds: Whisper window; each call pads audio up to it (longer audio is kept
            whole, never truncated).
        min_pixels / max_pixels: per-frame pixel bounds of the image/video processors; must match
            the bounds used to decode frames so the processor does not resize again.
    """
    if isinstance(source, (str, Path)) and str(source) != "tiny":
        model_dir = Path(source)
        if not model_dir.is_dir():
            raise FileNotFoundError(
                f"processor source must be 'tiny' or a local model directory, got {source!r}"
            )
        processor = Qwen2_5OmniProcessor.from_pretrained(str(model_dir), local_files_only=True)
        processor.feature_extractor = _feature_extractor(audio_chunk_seconds, processor.feature_extractor)
        size = {"shortest_edge": min_pixels, "longest_edge": max_pixels}
        processor.video_processor.size = size
        processor.image_processor.size = size
        # Frames arrive already sized within the pixel bounds (ep_kit.data.media): no per-frame cap,
        # as for the tiny processor (and it silences transformers' per-sample notice about the cap).
        processor.video_processor.cap_pixels_per_frame = False
        return processor
    tokenizer = build_tiny_tokenizer() if isinstance(source, (str, Path)) else source
    size = {"shortest_edge": min_pixels, "longest_edge": max_pixels}
    return Qwen2_5OmniProcessor(
        image_processor=Qwen2VLImageProcessor(size=size),
        video_processor=Qwen2VLVideoProcessor(size=size, cap_pixels_per_frame=False),
        feature_extractor=_feature_extractor(audio_chunk_seconds),
        tokenizer=tokenizer,
        chat_template=tokenizer.chat_template,
    )


def split_media_tags(text: str) -> list[dict[str, str]]:
    """``"<video>What is this?"`` -> ``[{"type": "video"}, {"type": "text", "text": "What is this?"}]``."""
    parts: list[dict[str, str]] = []
    pos = 0
    for m in MEDIA_TAG.finditer(text):
        if m.start() > pos:
            parts.append({"type": "text", "text": text[pos : m.start()]})
        parts.append({"type": m.group(1)})
        pos = m.end()
    if pos < len(text):
        parts.append({"type": "text", "text": text[pos:]})
    return parts


def media_order(messages: Sequence[dict[str, Any]]) -> list[str]:
    """Media part types ('video' / 'audio' / 'image') in the order they appear in the conversation."""
    order = []
    for message in messages:
        content = message["content"]
        if isinstance(content, str):
            continue
        order += [part["type"] for part in content if part["type"] in ("video", "audio", "image")]
    return order


class AVInputBuilder:
    """Conversation + decoded media -> one sample of model inputs (processor keys + labels).

    Args:
        processor: a Qwen2.5-Omni processor (see :func:`build_processor`).
        use_audio_in_video: interleave each video's audio track (``VideoClip.audio``) with its
            frames in 2-second chunks, as the model was trained; a clip without audio is an error.
        system_prompt: replaces the chat template's default system turn when not None.
    """

    def __init__(
        self,
        processor: Qwen2_5OmniProcessor,
        use_audio_in_video: bool = True,
        system_prompt: str | None = None,
    ) -> None:
        self.processor = processor
        self.tokenizer = processor.tokenizer
        self.use_audio_in_video = use_audio_in_video
        self.system_prompt = system_prompt
        self.template = processor.chat_template or self.tokenizer.chat_template
        if self.template is None:
            raise ValueError("processor and tokenizer have no chat template")
        self.im_start = self._single_id("<|im_start|>")
        self.im_end = self._single_id("<|im_end|>")
        self.assistant_header = self.tokenizer.encode("assistant\n", add_special_tokens=False)

    def _single_id(self, token: str) -> int:
        idx = self.tokenizer.convert_tokens_to_ids(token)
        if idx is None or idx == self.tokenizer.unk_token_id:
            raise ValueError(f"tokenizer has no token {token}")
        return int(idx)

    def letter_ids(self, letters: Sequence[str]) -> list[int]:
        """Token id of each option letter (each must encode to exactly one token)."""
        out = []
        for letter in letters:
            ids = self.tokenizer.encode(letter, add_special_tokens=False)
            if len(ids) != 1:
                raise ValueError(f"option letter {letter!r} encodes to {len(ids)} tokens, expected 1")
            out.append(ids[0])
        return out

    def render(self, messages: Sequence[dict[str, Any]], add_generation_prompt: bool) -> str:
        """The chat-template text, media as bos/placeholder/eos triples."""
        messages = list(messages)
        if self.system_prompt is not None and (not messages or messages[0]["role"] != "system"):
            messages = [{"role": "system", "content": self.system_prompt}] + messages
        return self.tokenizer.apply_chat_template(
            messages, chat_template=self.template, tokenize=False, add_generation_prompt=add_generation_prompt
        )

    def processor_call(
        self,
        texts: list[str],
        videos: Sequence[VideoClip],
        audios: Sequence[np.ndarray],
        order: Sequence[str],
    ) -> dict[str, Any]:
        """Call the transformers processor once (all texts, all media in text order)."""
        kwargs: dict[str, Any] = {"return_tensors": "pt", "padding": len(texts) > 1, "padding_side": "right"}
        frames = [clip.frames for clip in videos]
        slots: list[np.ndarray] = []
        from_video: list[int | None] = []
        v_iter, a_iter = 0, 0
        for kind in order:  # audio slots in the order their tokens appear in the text
            if kind == "video":
                if self.use_audio_in_video:
                    clip = videos[v_iter]
                    if clip.audio is None:
                        raise ValueError(
                            f"use_audio_in_video is on but video {clip.path or v_iter} has no audio track loaded"
                        )
                    slots.append(clip.audio)
                    from_video.append(v_iter)
                v_iter += 1
            elif kind == "audio":
                slots.append(audios[a_iter])
                from_video.append(None)
                a_iter += 1
        if frames:
            rates = {round(clip.fps, 6) for clip in videos}
            if len(rates) > 1:
                raise ValueError(
                    f"videos of one processor call must share one sampling fps, got {sorted(rates)}"
                )
            kwargs["videos"] = frames
            # The processor class carries its own default frame-size bounds that override the video
            # processor's: pass the video processor's bounds explicitly so frames are not resized.
            size = self.processor.video_processor.size
            kwargs["videos_kwargs"] = {
                "fps": float(videos[0].fps),
                "do_sample_frames": False,
                "size": {"shortest_edge": size["shortest_edge"], "longest_edge": size["longest_edge"]},
            }
            if self.use_audio_in_video:
                kwargs["load_audio_from_video"] = True
                kwargs["audio_from_video_indices"] = from_video
        if slots:
            kwargs["audio"] = [np.asarray(a, dtype=np.float32) for a in slots]
            kwargs["audio_kwargs"] = {"truncation": False, "sampling_rate": AUDIO_SAMPLE_RATE}
        return dict(self.processor(text=texts, **kwargs))

    def encode(
        self,
        messages: Sequence[dict[str, Any]],
        videos: Sequence[VideoClip] = (),
        audios: Sequence[np.ndarray] = (),
        add_generation_prompt: bool = False,
    ) -> dict[str, Tensor]:
        """One sample: ``input_ids`` (L,), ``attention_mask``, ``labels``, ``answer_mask`` and media keys.

        ``messages`` content is a string or a list of ``{"type": "video"|"audio"|"text"}`` parts;
        the k-th video part takes ``videos[k]``, the k-th audio part ``audios[k]``. Use
        ``add_generation_prompt=True`` (and no assistant turn) for a prompt that ends where the
        model must answer. Media feature tensors keep the processor's layout with audio features
        trimmed to their real length.
        """
        order = media_order(messages)
        n_video, n_audio = order.count("video"), order.count("audio")
        if n_video != len(videos) or n_audio != len(audios):
            raise ValueError(
                f"conversation has {n_video} video and {n_audio} audio parts but {len(videos)} videos and "
                f"{len(audios)} audios were given"
            )
        if "image" in order:
            raise ValueError("image parts are not supported by AVInputBuilder")
        text = self.render(messages, add_generation_prompt)
        out = self.processor_call([text], videos, audios, order)
        input_ids = out["input_ids"][0].long()
        sample: dict[str, Tensor] = {
            "input_ids": input_ids,
            "attention_mask": out["attention_mask"][0].long(),
        }
        labels = self.assistant_labels(input_ids)
        sample["labels"] = labels
        sample["answer_mask"] = answer_span(labels, IGNORE_INDEX)  # the answer and all after it
        if "pixel_values_videos" in out:
            sample["pixel_values_videos"] = out["pixel_values_videos"]
            sample["video_grid_thw"] = out["video_grid_thw"].long()
            sample["video_second_per_grid"] = torch.as_tensor(out["video_second_per_grid"], dtype=torch.float)
        if "input_features" in out:
            mask = out["feature_attention_mask"].long()
            width = int(mask.sum(-1).max())
            sample["input_features"] = out["input_features"][..., :width].contiguous()
            sample["feature_attention_mask"] = mask[:, :width].contiguous()
        return sample

    def assistant_labels(self, input_ids: Tensor) -> Tensor:
        """Labels = ids of every assistant turn's content and its ``<|im_end|>``; -100 elsewhere."""
        ids = input_ids.tolist()
        labels = [IGNORE_INDEX] * len(ids)
        header = self.assistant_header
        i = 0
        while i < len(ids):
            if ids[i] == self.im_start and ids[i + 1 : i + 1 + len(header)] == header:
                j = i + 1 + len(header)
                while j < len(ids) and ids[j] != self.im_end:
                    labels[j] = ids[j]
                    j += 1
                if j < len(ids):
                    labels[j] = ids[j]
                i = j
            i += 1
        return torch.tensor(labels, dtype=torch.long)


def audio_token_count(
    num_samples: int, hop_length: int = 160, window_samples: int = 30 * AUDIO_SAMPLE_RATE
) -> int:
    """LLM audio tokens the processor gives ``num_samples`` of 16 kHz audio (25 per second).

    Mel frames are what the Whisper extractor's ``feature_attention_mask`` sums to: ``ceil(n / hop)``
    inside its padded window of ``window_samples``, ``n // hop`` beyond it (longer audio is kept
    whole). Tokens follow transformers' ``_get_feat_extract_output_lengths``
    (:func:`ep_kit.tokens.audio_tokens_from_mel`). ``4 * hop`` samples (40 ms) are exactly one token.
    """
    mel = -(-num_samples // hop_length) if num_samples <= window_samples else num_samples // hop_length
    return audio_tokens_from_mel(mel)


def _share(counts: Sequence[int], room: int) -> list[int]:
    """Per-track token caps: the largest common cap ``c`` with ``sum(min(t, c)) <= room``.

    Why a common cap: with several audio tracks the longest are cut first and short ones stay whole.
    """
    lo, hi = 0, max(counts, default=0)
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if sum(min(t, mid) for t in counts) <= room:
            lo = mid
        else:
            hi = mid - 1
    return [min(t, lo) for t in counts]


def _names(files: Sequence[str]) -> str:
    return ", ".join(dict.fromkeys(files)) or "text-only sample"


def save_sample(sample: dict[str, Tensor], path: Path) -> None:
    """Write an encoded sample, zlib-compressed, atomically (parallel workers never read half a file).

    Why compressed: ``pixel_values`` are float32 patches, 1.9 MB per second of 280-pixel video, so the
    probe benchmark's 1900 clips took 26 GB uncompressed; the synthetic frames (and real letterboxed or
    static frames) repeat, and zlib's fastest level shrinks such a sample about 150x in ~70 ms, once,
    and inflates it in ~15 ms. The tensors are stored exactly (lossless).
    """
    buffer = io.BytesIO()
    torch.save(sample, buffer)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, suffix=".tmp")
    with os.fdopen(fd, "wb") as f:
        f.write(zlib.compress(buffer.getbuffer(), 1))
    os.replace(tmp, path)


def load_sample(path: Path) -> dict[str, Tensor]:
    """Read a sample written by :func:`save_sample`."""
    return torch.load(io.BytesIO(zlib.decompress(path.read_bytes())), weights_only=True)


class SampleEncoder:
    """Media files + conversation -> one sample of model inputs, cached on disk, within a token budget.

    Why a cache: decoding video, resampling audio and extracting mel features dominate data time
    and give the same tensors every epoch and every ablation row. The cache key hashes the media
    files (path, size, mtime), the conversation and every knob that changes the tensors (fps,
    pixel bounds, frame cap, token budget, audio policy, audio-in-video, tokenizer, system prompt,
    prompt/answer mode).

    Why a budget: a long clip (a 30-minute Video-MME video) with its full audio track (25 tokens per
    second: 45,000 tokens) silently overflows the model context. With ``max_tokens`` set, a sample
    (``len(input_ids)``) that does not fit is shrunk in this order:

    1. fewer frames: re-decoded with a frame cap computed from the measured video tokens per frame,
       down to 2 frames (one temporal patch) per video; frames stay spread over the whole clip;
    2. the audio policy, only when audio is still the problem: ``"truncate"`` keeps the first seconds
       of each audio track that fit (40 ms steps, longest tracks cut first) and warns naming the file,
       the seconds before and after, the frame count and the final length; ``"error"`` raises.

    The video is not cut with its audio: the processor (and the model's ``get_rope_index``) interleave
    audio and video by 2-second chunks of their own timestamps and simply continue with video-only
    chunks once the audio ends, so a truncated track keeps its true timing while the frames still
    cover the whole clip. The prompt text is never truncated: a sample whose text and minimum media do
    not fit raises ``ValueError``. A fitting sample is encoded once and is identical to an unbudgeted
    one (only audio beyond ``max_tokens + 1`` tokens is left undecoded, and such a track never fits).

    Args:
        builder: turns decoded media into inputs (holds the processor and chat settings).
        fps / min_pixels / max_pixels / max_frames: frame sampling (see :func:`load_video`).
        cache_dir: where encoded samples are stored (``None``: no cache).
        max_tokens: per-sample token budget (``None``: no length control).
        audio_policy: what to do when audio alone keeps a sample over ``max_tokens`` (see above).
        max_position_embeddings: the model's context; a longer sample raises ``ValueError`` when
            ``max_tokens`` is set (the budget is above the model limit), else warns.
    """

    def __init__(
        self,
        builder: AVInputBuilder,
        fps: float = 2.0,
        min_pixels: int = VIDEO_MIN_PIXELS,
        max_pixels: int = VIDEO_MAX_PIXELS,
        max_frames: int = 768,
        cache_dir: str | Path | None = None,
        max_tokens: int | None = None,
        audio_policy: AudioPolicy = "truncate",
        max_position_embeddings: int | None = None,
    ) -> None:
        for name, value in (("max_tokens", max_tokens), ("max_position_embeddings", max_position_embeddings)):
            if value is not None and value < 1:
                raise ValueError(f"{name} must be >= 1 or None, got {value}")
        if audio_policy not in ("truncate", "error"):
            raise ValueError(f"audio_policy must be 'truncate' or 'error', got {audio_policy!r}")
        self.builder = builder
        self.fps = fps
        self.min_pixels = min_pixels
        self.max_pixels = max_pixels
        self.max_frames = max_frames
        self.cache_dir = Path(cache_dir) if cache_dir is not None else None
        self.max_tokens = max_tokens
        self.audio_policy = audio_policy
        self.max_position_embeddings = max_position_embeddings
        extractor = builder.processor.feature_extractor
        self._hop, self._window = int(extractor.hop_length), int(extractor.n_samples)
        tok = builder.tokenizer
        self._knobs = {
            "fps": fps,
            "min_pixels": min_pixels,
            "max_pixels": max_pixels,
            "max_frames": max_frames,
            "max_tokens": max_tokens,
            "audio_policy": audio_policy,
            "max_position_embeddings": max_position_embeddings,
            "use_audio_in_video": builder.use_audio_in_video,
            "system_prompt": builder.system_prompt,
            "tokenizer": [type(tok).__name__, len(tok), tok.name_or_path, builder.template],
            "whisper_window": extractor.chunk_length,
            "version": 2,  # 2: zlib-compressed files
        }

    def key(
        self, messages: Sequence[dict[str, Any]], videos: Sequence[str], audios: Sequence[str], prompt: bool
    ) -> str:
        files = []
        for p in [*videos, *audios]:
            st = Path(p).stat() if Path(p).exists() else None
            files.append([str(p), st.st_size if st else None, st.st_mtime_ns if st else None])
        blob = json.dumps([self._knobs, list(messages), files, prompt], sort_keys=True, default=str)
        return hashlib.sha1(blob.encode()).hexdigest()

    def encode(
        self,
        messages: Sequence[dict[str, Any]],
        videos: Sequence[str | Path] = (),
        audios: Sequence[str | Path] = (),
        add_generation_prompt: bool = False,
    ) -> dict[str, Tensor]:
        """Decode (or load from cache) and encode one conversation; media errors name the file."""
        videos, audios = [str(v) for v in videos], [str(a) for a in audios]
        path = None
        if self.cache_dir is not None:
            key = self.key(messages, videos, audios, add_generation_prompt)
            path = self.cache_dir / key[:2] / f"{key}.pt"
            if path.is_file():
                sample = load_sample(path)
                self._check_positions(sample, [*videos, *audios])
                return sample
        sample = self._encode_media(messages, videos, audios, add_generation_prompt)
        self._check_positions(sample, [*videos, *audios])
        if path is not None:
            save_sample(sample, path)
        return sample

    # ------------------------------------------------------------------ token budget
    def _encode_media(
        self, messages: Sequence[dict[str, Any]], videos: list[str], audios: list[str], prompt: bool
    ) -> dict[str, Tensor]:
        """Decode and encode once; over ``max_tokens``: fewer frames first, then the audio policy."""

        def build(clips: list[VideoClip], waves: list[np.ndarray]) -> dict[str, Tensor]:
            return self.builder.encode(messages, clips, waves, add_generation_prompt=prompt)

        seconds = self._audio_cap_seconds()
        clips = [self._load_clip(v, self.max_frames, seconds) for v in videos]
        waves = [load_audio(a, max_seconds=seconds) for a in audios]
        sample = build(clips, waves)
        if self._fits(sample):
            return sample
        clips, sample = self._fewer_frames(clips, waves, sample, build)
        if self._fits(sample):
            return sample
        return self._apply_audio_policy(clips, waves, audios, sample, build)

    def _audio_cap_seconds(self) -> float | None:
        """Audio worth ``max_tokens + 1`` tokens: a longer track cannot fit, so no more is decoded."""
        if self.max_tokens is None:
            return None
        return (self.max_tokens + 1) * 4 * self._hop / AUDIO_SAMPLE_RATE

    def _fits(self, sample: dict[str, Tensor]) -> bool:
        return self.max_tokens is None or len(sample["input_ids"]) <= self.max_tokens

    def _count(self, sample: dict[str, Tensor], token_id: int) -> int:
        return int((sample["input_ids"] == token_id).sum())

    def _load_clip(
        self, path: str, max_frames: int, audio_seconds: float | None, with_audio: bool = True
    ) -> VideoClip:
        return load_video(
            path,
            fps=self.fps,
            min_pixels=self.min_pixels,
            max_pixels=self.max_pixels,
            max_frames=max_frames,
            with_audio=self.builder.use_audio_in_video and with_audio,
            audio_max_seconds=audio_seconds,
        )

    def _fewer_frames(
        self, clips: list[VideoClip], waves: list[np.ndarray], sample: dict[str, Tensor], build: Callable
    ) -> tuple[list[VideoClip], dict[str, Tensor]]:
        """Re-decode with a smaller frame cap until the sample fits or the frames reach their floor.

        The floor is 2 frames per video without audio; with audio it is the cap whose video tokens
        fill half of what ``max_tokens`` leaves after the text: below that the audio is what overflows (a 30-minute clip has
        45,000 audio tokens), so the audio policy cuts it instead of leaving the video 2 frames.
        Audio tracks already decoded are reused: only the frames change.
        """
        cap = max((clip.num_frames for clip in clips), default=0)
        floor = self._frame_floor(sample, cap)
        while cap > floor and not self._fits(sample):
            cap = max(floor, self._frame_cap(sample, cap))
            clips = [self._fewer(clip, cap) for clip in clips]
            sample = build(clips, waves)
            log.info(
                "%s: frame cap %d to fit max_tokens=%d",
                _names([str(c.path) for c in clips]),
                cap,
                self.max_tokens,
            )
        return clips, sample

    def _frame_floor(self, sample: dict[str, Tensor], cap: int) -> int:
        """The smallest frame cap :meth:`_fewer_frames` goes to (see there); even and >= 2."""
        n_video = self._count(sample, self.builder.processor.video_token_id)
        n_audio = self._count(sample, self.builder.processor.audio_token_id)
        if not n_audio or not n_video:
            return TEMPORAL_PATCH
        half = (self.max_tokens - (len(sample["input_ids"]) - n_video - n_audio)) // 2  # of the room after text
        frames = half * cap // n_video // TEMPORAL_PATCH * TEMPORAL_PATCH
        return max(TEMPORAL_PATCH, min(frames, cap))

    def _frame_cap(self, sample: dict[str, Tensor], cap: int) -> int:
        """The largest even frame cap whose video tokens (measured per frame at ``cap``) fit the room left."""
        n_video = self._count(sample, self.builder.processor.video_token_id)
        room = self.max_tokens - (len(sample["input_ids"]) - n_video)
        wanted = room * cap // n_video if n_video else 0
        wanted = wanted // TEMPORAL_PATCH * TEMPORAL_PATCH
        return max(TEMPORAL_PATCH, min(wanted, cap - TEMPORAL_PATCH))

    def _fewer(self, clip: VideoClip, cap: int) -> VideoClip:
        if clip.num_frames <= cap:
            return clip
        fewer = self._load_clip(str(clip.path), cap, None, with_audio=False)
        return dataclasses.replace(fewer, audio=clip.audio)

    def _apply_audio_policy(
        self,
        clips: list[VideoClip],
        waves: list[np.ndarray],
        audio_paths: list[str],
        sample: dict[str, Tensor],
        build: Callable,
    ) -> dict[str, Tensor]:
        """At the minimum frame count and still over budget: cut audio (``truncate``) or raise (``error``)."""
        in_video = [i for i, clip in enumerate(clips) if clip.audio is not None]
        tracks = [(str(clips[i].path), clips[i].audio) for i in in_video]
        tracks += list(zip(audio_paths, waves, strict=True))
        fixed = len(sample["input_ids"]) - self._count(sample, self.builder.processor.audio_token_id)
        files = _names([str(clip.path) for clip in clips] + audio_paths)
        frames = [clip.num_frames for clip in clips]
        self._refuse(tracks, files, frames, len(sample["input_ids"]), fixed)
        keep = _share([self._tokens(a) for _, a in tracks], self.max_tokens - fixed)
        # 4 mel hops (640 samples, 40 ms) are exactly one token; a track that fits whole stays whole.
        cut = [
            a[: k * 4 * self._hop] if k < self._tokens(a) else a
            for (_, a), k in zip(tracks, keep, strict=True)
        ]
        clips = list(clips)
        for i, audio in zip(in_video, cut, strict=False):
            clips[i] = dataclasses.replace(clips[i], audio=audio)
        sample = build(clips, cut[len(in_video) :])
        length = len(sample["input_ids"])
        self._warn_cut(tracks, cut, frames, length)
        if not self._fits(sample):  # the arithmetic above mirrors the processor: never overflow silently
            raise ValueError(f"{files}: {length} tokens after cutting audio > max_tokens={self.max_tokens}")
        return sample

    def _refuse(
        self, tracks: list[tuple[str, np.ndarray]], files: str, frames: list[int], length: int, fixed: int
    ) -> None:
        """Raise when the text cannot fit even with minimal media, or when ``audio_policy="error"``.

        ``fixed`` is every non-audio token (text and video at its minimum); one 40 ms token per
        audio track is the least audio the processor can still encode.
        """
        if fixed + len(tracks) > self.max_tokens:
            raise ValueError(
                f"{files}: the prompt text with the minimum media ({frames} frames, 40 ms of audio per "
                f"track) needs {fixed + len(tracks)} tokens > max_tokens={self.max_tokens}; text is never "
                "truncated: shorten the prompt or raise max_tokens"
            )
        if self.audio_policy == "error":
            seconds = ", ".join(f"{p}: {self._full_seconds(p, a):.2f} s" for p, a in tracks)
            raise ValueError(
                f"{files}: {length} tokens > max_tokens={self.max_tokens} with {frames} frames because of "
                f"{length - fixed} audio tokens (audio {seconds}); raise max_tokens, set "
                "audio_policy='truncate', or turn off use_audio_in_video"
            )

    def _tokens(self, audio: np.ndarray) -> int:
        return audio_token_count(len(audio), self._hop, self._window)

    @staticmethod
    def _full_seconds(path: str, audio: np.ndarray) -> float:
        """A track's full length from its file's metadata (a budgeted decode stops early)."""
        seconds = audio_duration(path) if Path(path).is_file() else None
        return seconds if seconds is not None else len(audio) / AUDIO_SAMPLE_RATE

    def _warn_cut(
        self, tracks: list[tuple[str, np.ndarray]], cut: list[np.ndarray], frames: list[int], length: int
    ) -> None:
        for (path, before), after in zip(tracks, cut, strict=True):
            if len(after) < len(before):
                warnings.warn(
                    f"{path}: audio cut from {self._full_seconds(path, before):.2f} s to its first "
                    f"{len(after) / AUDIO_SAMPLE_RATE:.2f} s to fit max_tokens={self.max_tokens} "
                    f"(audio_policy='truncate'); video frames {frames}; sample {length} tokens",
                    stacklevel=5,
                )

    def _check_positions(self, sample: dict[str, Tensor], files: list[str]) -> None:
        """A sample longer than the model context: an error under a budget (set above it), else a warning."""
        limit, length = self.max_position_embeddings, len(sample["input_ids"])
        if limit is None or length <= limit:
            return
        msg = f"{_names(files)}: sample of {length} tokens is longer than max_position_embeddings={limit}"
        if self.max_tokens is not None:
            raise ValueError(f"{msg}; max_tokens={self.max_tokens} is above the model limit: lower it")
        warnings.warn(f"{msg}; set max_tokens to bound sample length", stacklevel=3)
