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
* :class:`SampleEncoder` decodes the media files of one conversation and caches the encoded
  sample on disk, keyed by files and knobs.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

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
    VIDEO_MAX_PIXELS,
    VIDEO_MIN_PIXELS,
    VideoClip,
    load_audio,
    load_video,
)
from ep_kit.data.tokenizer import build_tiny_tokenizer

IGNORE_INDEX = -100
MEDIA_TAG = re.compile(r"<(video|audio|image)>")


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
        sample["answer_mask"] = labels != IGNORE_INDEX
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


class SampleEncoder:
    """Media files + conversation -> one sample of model inputs, cached on disk.

    Why a cache: decoding video, resampling audio and extracting mel features dominate data time
    and give the same tensors every epoch and every ablation row. The cache key hashes the media
    files (path, size, mtime), the conversation and every knob that changes the tensors (fps,
    pixel bounds, frame cap, audio-in-video, tokenizer, system prompt, prompt/answer mode).

    Args:
        builder: turns decoded media into inputs (holds the processor and chat settings).
        fps / min_pixels / max_pixels / max_frames: frame sampling (see :func:`load_video`).
        cache_dir: where encoded samples are stored (``None``: no cache).
    """

    def __init__(
        self,
        builder: AVInputBuilder,
        fps: float = 2.0,
        min_pixels: int = VIDEO_MIN_PIXELS,
        max_pixels: int = VIDEO_MAX_PIXELS,
        max_frames: int = 768,
        cache_dir: str | Path | None = None,
    ) -> None:
        self.builder = builder
        self.fps = fps
        self.min_pixels = min_pixels
        self.max_pixels = max_pixels
        self.max_frames = max_frames
        self.cache_dir = Path(cache_dir) if cache_dir is not None else None
        tok = builder.tokenizer
        self._knobs = {
            "fps": fps,
            "min_pixels": min_pixels,
            "max_pixels": max_pixels,
            "max_frames": max_frames,
            "use_audio_in_video": builder.use_audio_in_video,
            "system_prompt": builder.system_prompt,
            "tokenizer": [type(tok).__name__, len(tok), tok.name_or_path, builder.template],
            "whisper_window": builder.processor.feature_extractor.chunk_length,
            "version": 1,
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
                return torch.load(path, weights_only=True)
        clips = [
            load_video(
                v,
                fps=self.fps,
                min_pixels=self.min_pixels,
                max_pixels=self.max_pixels,
                max_frames=self.max_frames,
                with_audio=self.builder.use_audio_in_video,
            )
            for v in videos
        ]
        waves = [load_audio(a) for a in audios]
        sample = self.builder.encode(messages, clips, waves, add_generation_prompt=add_generation_prompt)
        if path is not None:
            path.parent.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(dir=path.parent, suffix=".tmp")
            os.close(fd)
            torch.save(sample, tmp)
            os.replace(tmp, path)
        return sample
