"""One clip and one question -> the batch ``OmniThinker`` takes (``model(batch)``, ``generate``, ``prefill``).

Why: asking the model about one's own clip should not need the data module. This is the same path
the data module runs for an evaluation sample -- :func:`~ep_kit.data.processor.build_processor`,
:class:`~ep_kit.data.processor.AVInputBuilder` (the transformers Qwen2.5-Omni processor, audio
interleaved with the frames), :class:`~ep_kit.data.processor.SampleEncoder` (PyAV decoding at the
model's frame and pixel rules, optional token budget), the harnesses' multiple-choice prompt
(:func:`~ep_kit.data.benchmarks.format_mc_prompt`) and :func:`~ep_kit.data.collate.collate_av` --
with one sample.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from transformers import Qwen2_5OmniProcessor

from ep_kit.data.benchmarks import LETTERS, format_mc_prompt
from ep_kit.data.collate import collate_av
from ep_kit.data.media import VIDEO_MAX_PIXELS, VIDEO_MIN_PIXELS
from ep_kit.data.processor import AVInputBuilder, SampleEncoder, build_processor
from ep_kit.tokens import TINY_SPECIAL_TOKENS

if TYPE_CHECKING:  # pragma: no cover
    from ep_kit.models.omni import OmniThinker


def processor_source(model: OmniThinker) -> str:
    """Where ``model``'s processor comes from: ``"tiny"`` for the kit's byte-level vocabulary, else its directory.

    ``ValueError`` when the model was not loaded from a directory (give the processor or its
    directory to :func:`build_batch` instead).
    """
    config = model.config
    if config.video_token_id == TINY_SPECIAL_TOKENS["<|VIDEO|>"]:
        return "tiny"
    root = getattr(config, "_name_or_path", "") or ""
    if not root or not Path(root).is_dir():
        raise ValueError(
            "the model was not loaded from a local directory, so its processor is unknown: pass the processor "
            "(ep_kit.data.build_processor(DIR)) or the model directory to build_batch"
        )
    return root


def build_batch(
    processor: Qwen2_5OmniProcessor | str | Path | OmniThinker,
    video: str | Path,
    question: str,
    options: Sequence[str] | None = None,
    *,
    use_audio_in_video: bool = True,
    fps: float = 2.0,
    min_pixels: int = VIDEO_MIN_PIXELS,
    max_pixels: int = VIDEO_MAX_PIXELS,
    max_frames: int = 768,
    max_tokens: int | None = None,
    system_prompt: str | None = None,
) -> dict[str, Any]:
    """A batch of one sample: ``video`` (with its audio track) and ``question``, ending where the model answers.

    Args:
        processor: a Qwen2.5-Omni processor, ``"tiny"`` (the kit's tiny vocabulary), a local model
            directory (its processor files), or an ``OmniThinker`` (:func:`processor_source`).
        video: the clip (any container PyAV reads); its audio track is interleaved with the frames
            unless ``use_audio_in_video=False``. A clip without audio needs ``use_audio_in_video=False``.
        question: the question text.
        options: answer options; when given the prompt lists them as ``A. ...`` (the benchmarks'
            harness prompt) and the batch carries ``choice_token_ids`` / ``choice_mask`` (the option
            letters' token ids), as evaluation batches do.
        fps, min_pixels, max_pixels, max_frames: frame sampling (Qwen2.5-Omni's defaults).
        max_tokens: token budget of the sample (fewer frames, then shorter audio; None: no limit).
        system_prompt: replaces the chat template's default system turn when given.

    Returns the batch (``input_ids``, ``attention_mask``, video and audio features, ...). Missing or
    undecodable media raise errors naming the file.
    """
    if not isinstance(processor, Qwen2_5OmniProcessor):
        source = processor if isinstance(processor, (str, Path)) else processor_source(processor)
        processor = build_processor(source, min_pixels=min_pixels, max_pixels=max_pixels)
    builder = AVInputBuilder(processor, use_audio_in_video=use_audio_in_video, system_prompt=system_prompt)
    encoder = SampleEncoder(builder, fps, min_pixels, max_pixels, max_frames, max_tokens=max_tokens)
    if options is not None and not 2 <= len(options) <= len(LETTERS):
        raise ValueError(f"options must hold 2 to {len(LETTERS)} answers, got {len(options)}")
    prompt = format_mc_prompt(question, list(options), with_audio=use_audio_in_video) if options else question
    messages = [{"role": "user", "content": [{"type": "video"}, {"type": "text", "text": prompt}]}]
    sample: dict[str, Any] = dict(encoder.encode(messages, [video], add_generation_prompt=True))
    del sample["labels"]  # a prompt: nothing to predict yet
    if options:
        sample["choice_token_ids"] = torch.tensor(builder.letter_ids(LETTERS[: len(options)]), dtype=torch.long)
        sample["answer_index"] = -1  # unknown
    pad = processor.tokenizer.pad_token_id
    return collate_av([sample], pad_token_id=int(pad if pad is not None else 0), use_audio_in_video=use_audio_in_video)
