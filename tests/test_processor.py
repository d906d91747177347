"""Tiny tokenizer and AVInputBuilder against transformers' Qwen2_5OmniProcessor called directly."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from transformers import (
    Qwen2_5OmniProcessor,
    Qwen2Tokenizer,
    Qwen2VLImageProcessor,
    Qwen2VLVideoProcessor,
    WhisperFeatureExtractor,
)

from ep_kit.data.collate import collate_av
from ep_kit.data.media import VideoClip
from ep_kit.data.processor import AVInputBuilder, build_processor, split_media_tags
from ep_kit.data.tokenizer import build_tiny_tokenizer
from ep_kit.tokens import TINY_SPECIAL_TOKENS

SR = 16000
SMALL = {"shortest_edge": 28 * 28, "longest_edge": 56 * 84}


def _clip(frames: int, h: int, w: int, seconds: float, seed: int) -> VideoClip:
    g = torch.Generator().manual_seed(seed)
    pixels = torch.randint(0, 256, (frames, 3, h, w), generator=g, dtype=torch.uint8)
    rng = np.random.default_rng(seed)
    audio = (0.1 * rng.standard_normal(int(seconds * SR))).astype(np.float32)
    return VideoClip(frames=pixels, fps=2.0, path=f"clip{seed}", audio=audio)


def _reference_processor(tokenizer) -> Qwen2_5OmniProcessor:
    """Composed here from transformers' classes only (not through ep_kit's builder)."""
    return Qwen2_5OmniProcessor(
        image_processor=Qwen2VLImageProcessor(size=SMALL),
        video_processor=Qwen2VLVideoProcessor(size=SMALL),
        feature_extractor=WhisperFeatureExtractor(
            feature_size=128, chunk_length=30, return_attention_mask=True
        ),
        tokenizer=tokenizer,
    )


def _reference_call(proc, texts, clips, padding=False):
    return proc(
        text=texts,
        videos=[c.numpy() for c in clips],
        audio=[c.audio for c in clips],
        load_audio_from_video=True,
        audio_from_video_indices=list(range(len(clips))),
        videos_kwargs={"fps": 2.0, "do_sample_frames": False, "size": SMALL},
        audio_kwargs={"truncation": False},
        padding=padding,
        padding_side="right",
        return_tensors="pt",
    )


def _text(question: str, answer: str | None) -> str:
    out = (
        "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\n"
        f"<|vision_bos|><|VIDEO|><|vision_eos|>{question}<|im_end|>\n<|im_start|>assistant\n"
    )
    return out + (f"{answer}<|im_end|>\n" if answer is not None else "")


# ------------------------------------------------------------------ tokenizer
def test_tiny_tokenizer_ids_and_media_attributes(tmp_path):
    tok = build_tiny_tokenizer()
    assert isinstance(tok, Qwen2Tokenizer)
    assert tok.encode("Ab\n é", add_special_tokens=False) == [65, 98, 10, 32, 0xC3, 0xA9]
    for token, idx in TINY_SPECIAL_TOKENS.items():
        assert tok.convert_tokens_to_ids(token) == idx
        assert tok.encode(token, add_special_tokens=False) == [idx]
    assert tok.video_token == "<|VIDEO|>" and tok.video_token_id == TINY_SPECIAL_TOKENS["<|VIDEO|>"]
    assert tok.audio_token_id == TINY_SPECIAL_TOKENS["<|AUDIO|>"]
    assert tok.image_token_id == TINY_SPECIAL_TOKENS["<|IMAGE|>"]
    assert tok.vision_bos_token == "<|vision_bos|>" and tok.audio_eos_token == "<|audio_eos|>"
    assert tok.pad_token_id == TINY_SPECIAL_TOKENS["<|endoftext|>"]
    assert tok.eos_token_id == TINY_SPECIAL_TOKENS["<|im_end|>"]
    assert tok.decode(tok.encode("héllo <|im_start|>x")) == "héllo <|im_start|>x"

    tok.save_pretrained(str(tmp_path))
    again = Qwen2Tokenizer.from_pretrained(str(tmp_path))
    text = _text("What colour?", "B")
    assert again(text)["input_ids"] == tok(text)["input_ids"]
    assert again.audio_bos_token_id == TINY_SPECIAL_TOKENS["<|audio_bos|>"]
    assert again.chat_template == tok.chat_template


def test_chat_template_matches_qwen_omni_layout():
    tok = build_tiny_tokenizer()
    messages = [
        {"role": "user", "content": [{"type": "video"}, {"type": "text", "text": "What colour?"}]},
        {"role": "assistant", "content": "B"},
    ]
    assert tok.apply_chat_template(messages, tokenize=False) == _text("What colour?", "B")
    prompt = tok.apply_chat_template(messages[:1], tokenize=False, add_generation_prompt=True)
    assert prompt == _text("What colour?", None)
    with_system = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "<x>"}]
    assert tok.apply_chat_template(with_system, tokenize=False) == (
        "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\n<x><|im_end|>\n"
    )
    audio = [{"role": "user", "content": [{"type": "audio"}, {"type": "text", "text": "?"}]}]
    assert "<|audio_bos|><|AUDIO|><|audio_eos|>?" in tok.apply_chat_template(audio, tokenize=False)


def test_split_media_tags():
    assert split_media_tags("<video>Hi <audio>there") == [
        {"type": "video"},
        {"type": "text", "text": "Hi "},
        {"type": "audio"},
        {"type": "text", "text": "there"},
    ]


# ------------------------------------------------------------------ builder vs processor
def test_inputs_equal_transformers_processor_with_audio_in_video():
    tok = build_tiny_tokenizer()
    clip = _clip(frames=8, h=56, w=84, seconds=4.0, seed=0)
    kit = AVInputBuilder(build_processor(tok, min_pixels=28 * 28, max_pixels=56 * 84))
    messages = [
        {"role": "user", "content": [{"type": "video"}, {"type": "text", "text": "What colour?"}]},
        {"role": "assistant", "content": "B"},
    ]
    sample = kit.encode(messages, [clip])
    ref = _reference_call(_reference_processor(tok), [_text("What colour?", "B")], [clip])

    assert torch.equal(sample["input_ids"], ref["input_ids"][0])
    assert torch.equal(sample["video_grid_thw"], ref["video_grid_thw"])
    torch.testing.assert_close(sample["pixel_values_videos"], ref["pixel_values_videos"])
    torch.testing.assert_close(sample["video_second_per_grid"], torch.tensor([1.0]))
    n = int(ref["feature_attention_mask"].sum())
    assert int(sample["feature_attention_mask"].sum()) == n == 400
    torch.testing.assert_close(sample["input_features"], ref["input_features"][..., :n])

    # Token counts by hand: 8 frames at 56x84 -> grid (4, 4, 6) -> 4 * 2 * 3 = 24 video tokens;
    # 4 s -> 400 mel frames -> 200 -> 100 audio tokens; interleaved per 2 s: [12 v, 50 a, 12 v, 50 a].
    assert sample["video_grid_thw"].tolist() == [[4, 4, 6]]
    ids = sample["input_ids"].tolist()
    v, a = TINY_SPECIAL_TOKENS["<|VIDEO|>"], TINY_SPECIAL_TOKENS["<|AUDIO|>"]
    start = ids.index(TINY_SPECIAL_TOKENS["<|audio_bos|>"])
    stop = ids.index(TINY_SPECIAL_TOKENS["<|audio_eos|>"])
    assert ids[start - 1] == TINY_SPECIAL_TOKENS["<|vision_bos|>"]
    assert ids[stop + 1] == TINY_SPECIAL_TOKENS["<|vision_eos|>"]
    assert ids[start + 1 : stop] == [v] * 12 + [a] * 50 + [v] * 12 + [a] * 50

    # Labels: only the answer letter and its <|im_end|>.
    labelled = [(i, t) for i, t in enumerate(sample["labels"].tolist()) if t != -100]
    assert [t for _, t in labelled] == [ord("B"), TINY_SPECIAL_TOKENS["<|im_end|>"]]
    assert labelled[0][0] == len(ids) - 3  # "B", "<|im_end|>", "\n"
    # The answer mask also covers the template's trailing newline: nothing after the answer starts is a key.
    assert sample["answer_mask"].nonzero().flatten().tolist() == [len(ids) - 3, len(ids) - 2, len(ids) - 1]


def test_prompt_mode_ends_at_assistant_turn():
    tok = build_tiny_tokenizer()
    kit = AVInputBuilder(build_processor(tok, min_pixels=28 * 28, max_pixels=56 * 84))
    clip = _clip(frames=4, h=56, w=56, seconds=2.0, seed=1)
    messages = [{"role": "user", "content": [{"type": "video"}, {"type": "text", "text": "Q?"}]}]
    sample = kit.encode(messages, [clip], add_generation_prompt=True)
    ref = _reference_call(_reference_processor(tok), [_text("Q?", None)], [clip])
    assert torch.equal(sample["input_ids"], ref["input_ids"][0])
    assert tok.decode(sample["input_ids"][-11:]) == "<|im_start|>assistant\n"
    assert not sample["answer_mask"].any()
    assert kit.letter_ids(["A", "B", "C", "D"]) == [65, 66, 67, 68]


def test_collated_batch_equals_processor_batch_of_two():
    tok = build_tiny_tokenizer()
    kit = AVInputBuilder(build_processor(tok, min_pixels=28 * 28, max_pixels=56 * 84))
    clips = [
        _clip(frames=8, h=56, w=84, seconds=4.0, seed=2),
        _clip(frames=4, h=56, w=56, seconds=2.5, seed=3),
    ]
    questions = ["First clip, what colour?", "Second?"]
    samples = [
        kit.encode(
            [
                {"role": "user", "content": [{"type": "video"}, {"type": "text", "text": q}]},
                {"role": "assistant", "content": "C"},
            ],
            [c],
        )
        for q, c in zip(questions, clips, strict=True)
    ]
    ref = _reference_call(_reference_processor(tok), [_text(q, "C") for q in questions], clips, padding=True)
    batch = collate_av(samples, pad_token_id=tok.pad_token_id, feature_pad_to=3000)
    assert torch.equal(batch["input_ids"], ref["input_ids"])
    assert torch.equal(batch["attention_mask"], ref["attention_mask"])
    assert torch.equal(batch["video_grid_thw"], ref["video_grid_thw"])
    torch.testing.assert_close(batch["pixel_values_videos"], ref["pixel_values_videos"])
    assert torch.equal(batch["feature_attention_mask"], ref["feature_attention_mask"])
    assert batch["input_features"].shape == ref["input_features"].shape
    # Real mel frames are equal; padded frames (masked out by the audio tower) are zeros here,
    # the processor's hold the log-mel of its zero padding.
    for b, n in enumerate(ref["feature_attention_mask"].sum(-1).tolist()):
        torch.testing.assert_close(batch["input_features"][b, :, :n], ref["input_features"][b, :, :n])
        assert not batch["input_features"][b, :, n:].any()
    assert batch["use_audio_in_video"] is True
    # Default collation pads features only to the longest audio in the batch.
    short = collate_av(samples, pad_token_id=tok.pad_token_id)
    assert short["input_features"].shape[-1] == 400
    assert torch.equal(short["feature_attention_mask"], ref["feature_attention_mask"][:, :400])
    # Right padding: labels -100 and answer_mask False on padding.
    pad = batch["attention_mask"] == 0
    assert pad.any() and (batch["labels"][pad] == -100).all() and not batch["answer_mask"][pad].any()


def test_clip_without_audio_is_an_error_with_audio_in_video():
    kit = AVInputBuilder(build_processor("tiny", min_pixels=28 * 28, max_pixels=56 * 84))
    clip = _clip(frames=4, h=56, w=56, seconds=2.0, seed=4)
    clip.audio = None
    clip.path = "silent_clip.mp4"
    messages = [{"role": "user", "content": [{"type": "video"}, {"type": "text", "text": "Q?"}]}]
    with pytest.raises(ValueError, match="silent_clip.mp4"):
        kit.encode(messages, [clip], add_generation_prompt=True)
    with pytest.raises(ValueError, match="1 video and 0 audio parts but 0 videos"):
        kit.encode(messages, [], add_generation_prompt=True)


def test_long_audio_is_not_truncated():
    kit = AVInputBuilder(
        build_processor("tiny", audio_chunk_seconds=2, min_pixels=28 * 28, max_pixels=56 * 56)
    )
    clip = _clip(frames=8, h=56, w=56, seconds=4.0, seed=5)
    messages = [{"role": "user", "content": [{"type": "video"}, {"type": "text", "text": "Q?"}]}]
    sample = kit.encode(messages, [clip], add_generation_prompt=True)
    assert int(sample["feature_attention_mask"].sum()) == 400  # 4 s kept whole with a 2 s window
    assert (sample["input_ids"] == TINY_SPECIAL_TOKENS["<|AUDIO|>"]).sum() == 100


def test_thinker_logits_equal_on_collated_and_processor_batches():
    """The zero-padded audio frames of the kit's batch change nothing in the stock thinker."""
    from transformers import Qwen2_5OmniThinkerForConditionalGeneration

    from ep_kit.models.tiny import tiny_thinker_config

    tok = build_tiny_tokenizer()
    kit = AVInputBuilder(build_processor(tok, min_pixels=28 * 28, max_pixels=56 * 84))
    clips = [
        _clip(frames=4, h=56, w=84, seconds=2.0, seed=6),
        _clip(frames=4, h=56, w=56, seconds=1.5, seed=7),
    ]
    messages = [{"role": "user", "content": [{"type": "video"}, {"type": "text", "text": "Q?"}]}]
    samples = [kit.encode(messages, [c], add_generation_prompt=True) for c in clips]
    ref = _reference_call(_reference_processor(tok), [_text("Q?", None)] * 2, clips, padding=True)
    batch = collate_av(samples, pad_token_id=tok.pad_token_id)
    torch.manual_seed(0)
    model = Qwen2_5OmniThinkerForConditionalGeneration(tiny_thinker_config()).eval()
    keys = [
        "input_ids",
        "attention_mask",
        "pixel_values_videos",
        "video_grid_thw",
        "video_second_per_grid",
        "input_features",
        "feature_attention_mask",
    ]
    with torch.no_grad():
        ours = model(**{k: batch[k] for k in keys}, use_audio_in_video=True).logits
        theirs = model(**{k: ref[k] for k in keys}, use_audio_in_video=True).logits
    real = batch["attention_mask"].bool()
    torch.testing.assert_close(ours[real], theirs[real])
