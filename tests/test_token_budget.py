"""Per-sample token budget: fewer frames first, then the audio policy; text never cut; model limit.

Clips are real mp4 files from :func:`write_av_clip`: a 20-minute one (1 fps, 28x56 px, silent mono
audio with one tone at 5-6 s) stands in for a Video-MME "long" video. Frames are 28x56 so the
processor never resizes them: a pair of frames (one temporal patch) is (28/28) * (56/28) = 2 video
tokens. Audio is 25 tokens per second (640 samples = 4 mel hops of 160 = one token).
"""

from __future__ import annotations

import warnings

import av
import numpy as np
import pytest
import torch

from ep_kit.data.datamodule import AVDataModule, SyntheticSource
from ep_kit.data.media import VideoClip, load_audio
from ep_kit.data.processor import (
    AVInputBuilder,
    SampleEncoder,
    _share,
    audio_token_count,
    build_processor,
)
from ep_kit.data.synthetic import write_av_clip
from ep_kit.tokens import TINY_SPECIAL_TOKENS

SR = 16000
H, W = 28, 56
PAIR_TOKENS = (H // 28) * (W // 28)  # video tokens per temporal patch of 2 frames
VIDEO_ID = TINY_SPECIAL_TOKENS["<|VIDEO|>"]
AUDIO_ID = TINY_SPECIAL_TOKENS["<|AUDIO|>"]
QUESTION = "Which tone was heard? A. low B. middle C. high D. very high"
LONG_SECONDS = 1200


def _write(path, seconds: int, fps: float, tone_at: float) -> str:
    frames = np.zeros((int(seconds * fps), H, W, 3), dtype=np.uint8)
    frames[::5] = (200, 40, 40)
    audio = np.zeros(seconds * SR, dtype=np.float32)
    t = np.arange(SR) / SR
    start = int(tone_at * SR)
    audio[start : start + SR] = 0.5 * np.sin(2 * np.pi * 700 * t)
    write_av_clip(path, frames, fps, audio)
    return str(path)


@pytest.fixture(scope="module")
def clips(tmp_path_factory) -> dict[str, str]:
    root = tmp_path_factory.mktemp("budget")
    return {
        "long": _write(root / "long.mp4", LONG_SECONDS, 1.0, tone_at=5.0),
        "medium": _write(root / "medium.mp4", 40, 2.0, tone_at=10.0),
        "short": _write(root / "short.mp4", 4, 4.0, tone_at=1.0),
    }


@pytest.fixture(scope="module")
def builder() -> AVInputBuilder:
    return AVInputBuilder(
        build_processor("tiny", audio_chunk_seconds=30, min_pixels=28 * 28, max_pixels=H * W)
    )


def _encoder(builder, **knobs) -> SampleEncoder:
    return SampleEncoder(builder, fps=2.0, min_pixels=28 * 28, max_pixels=H * W, max_frames=64, **knobs)


def _messages(question: str = QUESTION) -> list[dict]:
    return [{"role": "user", "content": [{"type": "video"}, {"type": "text", "text": question}]}]


def _count(sample, token_id: int) -> int:
    return int((sample["input_ids"] == token_id).sum())


def _text_tokens(builder: AVInputBuilder, question: str = QUESTION) -> list[int]:
    """The prompt's non-media tokens, by hand: the chat text with the video as its bos/eos markers."""
    text = builder.render(_messages(question), add_generation_prompt=True)
    text = text.replace("<|VIDEO|>", "<|audio_bos|><|audio_eos|>")
    return builder.tokenizer.encode(text, add_special_tokens=False)


def _audit_cut(caught) -> list[str]:
    return [str(w.message) for w in caught if "audio cut" in str(w.message)]


# ------------------------------------------------------------------ arithmetic
def test_audio_token_count_matches_the_processor():
    kit = AVInputBuilder(build_processor("tiny", audio_chunk_seconds=2))
    messages = [{"role": "user", "content": [{"type": "audio"}, {"type": "text", "text": "?"}]}]
    for n in (640, 1300, 16000, 32000, 32001, 40000, 640 * 77 + 1):
        sample = kit.encode(messages, audios=[np.zeros(n, dtype=np.float32)])
        assert audio_token_count(n, 160, 2 * SR) == _count(sample, AUDIO_ID), n
    assert [audio_token_count(s * SR) for s in (1, 2, 30, 1800)] == [25, 50, 750, 45000]
    assert audio_token_count(640 * 123) == 123


def test_share_cuts_longest_tracks_first():
    # 30 + 2c <= 200 -> c = 85: the short track stays whole.
    assert _share([100, 30, 500], 200) == [85, 30, 85]
    assert _share([10, 20], 100) == [10, 20]


def test_knobs_are_validated(builder):
    with pytest.raises(ValueError, match="audio_policy"):
        _encoder(builder, audio_policy="drop")
    with pytest.raises(ValueError, match="max_tokens"):
        _encoder(builder, max_tokens=0)


# ------------------------------------------------------------------ load_audio(max_seconds)
def test_load_audio_max_seconds_stops_decoding_early(clips, monkeypatch):
    full = load_audio(clips["long"])
    assert len(full) == LONG_SECONDS * SR
    fed = []
    real = av.AudioResampler

    class Counting:
        def __init__(self, *args, **kwargs):
            self.inner = real(*args, **kwargs)

        def resample(self, frame):
            fed.append(0 if frame is None else frame.samples)
            return self.inner.resample(frame)

    monkeypatch.setattr(av, "AudioResampler", Counting)
    head = load_audio(clips["long"], max_seconds=30.0)
    np.testing.assert_array_equal(head, full[: 30 * SR])
    assert 30 * SR <= sum(fed) < 31 * SR  # ~30 s decoded out of 1200 s
    with pytest.raises(ValueError, match="max_seconds"):
        load_audio(clips["long"], max_seconds=0)


# ------------------------------------------------------------------ budget
def test_sample_under_budget_is_unchanged(builder, clips):
    ref = _encoder(builder).encode(_messages(), [clips["short"]], add_generation_prompt=True)
    length = len(ref["input_ids"])
    for budget in (length, 10 * length):  # exactly at the budget still fits
        got = _encoder(builder, max_tokens=budget).encode(
            _messages(), [clips["short"]], add_generation_prompt=True
        )
        assert got.keys() == ref.keys()
        for key in ref:
            assert torch.equal(got[key], ref[key]), key


def test_fewer_frames_first_without_audio(clips):
    """40 s at 2 fps, frames only: 80 source frames -> 64 kept (the cap) = 64 video tokens; cut to 22 frames."""
    frames_only = AVInputBuilder(
        build_processor("tiny", audio_chunk_seconds=30, min_pixels=28 * 28, max_pixels=H * W), use_audio_in_video=False
    )
    ref = _encoder(frames_only).encode(_messages(), [clips["medium"]], add_generation_prompt=True)
    assert int(ref["video_grid_thw"][0, 0]) * 2 == 64 and _count(ref, VIDEO_ID) == 32 * PAIR_TOKENS
    assert _count(ref, AUDIO_ID) == 0
    budget = len(ref["input_ids"]) - 41  # room for 64 - 41 = 23 video tokens -> 22 frames (even)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        got = _encoder(frames_only, max_tokens=budget).encode(
            _messages(), [clips["medium"]], add_generation_prompt=True
        )
    frames = 22
    assert int(got["video_grid_thw"][0, 0]) == frames // 2
    assert _count(got, VIDEO_ID) == frames // 2 * PAIR_TOKENS == 22
    assert len(got["input_ids"]) == budget - 1
    assert not _audit_cut(caught)
    # The kept frames still span the whole clip: 11 grids of 2 / (22 / 80 * 2) s each = 80 source frames.
    spg = float(got["video_second_per_grid"][0])
    assert spg == pytest.approx(2 / (frames / 80 * 2.0)) and spg * 11 == pytest.approx(40.0)


def test_frames_first_down_to_half_the_budget_then_audio(builder, clips):
    """With audio, frames are cut only while the video holds more than half of the room after the text."""
    text = len(_text_tokens(builder))
    budget = text + 60  # half the room = 30 video tokens = 30 frames (2 tokens per pair of 28x56 frames)
    with pytest.warns(UserWarning, match="audio cut"):
        got = _encoder(builder, max_tokens=budget).encode(_messages(), [clips["long"]], add_generation_prompt=True)
    assert int(got["video_grid_thw"][0, 0]) == 15 and _count(got, VIDEO_ID) == 30
    assert _count(got, AUDIO_ID) == 30 and len(got["input_ids"]) == budget


def test_long_clip_keeps_its_frames_and_cuts_audio(builder, clips):
    """A 20-minute clip: its 64 frames (64 tokens) are under half of 600, so only the audio is cut."""
    budget = 600
    with pytest.warns(UserWarning, match="audio cut") as caught:
        got = _encoder(builder, max_tokens=budget).encode(
            _messages(), [clips["long"]], add_generation_prompt=True
        )
    ids = got["input_ids"]
    text = _text_tokens(builder)
    video = 32 * PAIR_TOKENS  # frames at their cap: 64 frames, 32 temporal patches
    audio = budget - len(text) - video  # the rest of the budget, 40 ms (one token) at a time
    assert len(ids) == budget
    assert int(got["video_grid_thw"][0, 0]) == 32 and _count(got, VIDEO_ID) == video
    assert _count(got, AUDIO_ID) == audio == audio_token_count(audio * 640)
    assert int(got["feature_attention_mask"].sum()) == 4 * audio  # audio * 40 ms of mel at 10 ms
    # The prompt is intact: removing media tokens gives exactly the hand-tokenized chat text.
    assert ids[(ids != VIDEO_ID) & (ids != AUDIO_ID)].tolist() == text
    tok = builder.tokenizer
    end = ids.tolist().index(TINY_SPECIAL_TOKENS["<|vision_eos|>"]) + 1
    assert tok.decode(ids[end : end + len(tok.encode(QUESTION))]) == QUESTION
    # The first seconds are kept: the 5-6 s tone is the loudest stretch of the mel features.
    loud = int(got["input_features"][0].mean(0).argmax())
    assert 500 <= loud < 600
    messages = [str(w.message) for w in caught if "audio cut" in str(w.message)]
    assert len(messages) == 1
    assert clips["long"] in messages[0] and "1200.00 s" in messages[0]
    assert f"{audio / 25:.2f} s" in messages[0] and "[64]" in messages[0] and f"{budget} tokens" in messages[0]


def test_audio_shorter_than_video_interleaves_then_video_only(builder):
    """What the truncate policy relies on: the processor needs no equal durations.

    16 frames at 2 fps, 56x56: 8 grids of 4 tokens at positions 0, 25, ..., 175 -> 2 grids per 2-second
    chunk (50 positions); 2.5 s of audio = 62 tokens -> chunks of 50 and 12. Layout by hand:
    v8 a50 v8 a12 v8 v8.
    """
    kit = AVInputBuilder(build_processor("tiny", min_pixels=28 * 28, max_pixels=56 * 56))
    clip = VideoClip(
        frames=torch.zeros(16, 3, 56, 56, dtype=torch.uint8),
        fps=2.0,
        path="mem",
        audio=np.zeros(int(2.5 * SR), dtype=np.float32),
    )
    ids = kit.encode(_messages("?"), [clip], add_generation_prompt=True)["input_ids"].tolist()
    start = ids.index(TINY_SPECIAL_TOKENS["<|audio_bos|>"])
    end = ids.index(TINY_SPECIAL_TOKENS["<|audio_eos|>"])
    v, a = VIDEO_ID, AUDIO_ID
    assert ids[start + 1 : end] == [v] * 8 + [a] * 50 + [v] * 8 + [a] * 12 + [v] * 16


def test_truncated_sample_runs_through_the_thinker(builder, clips):
    """The model's get_rope_index also accepts audio that ends long before the video."""
    from transformers import Qwen2_5OmniThinkerForConditionalGeneration

    from ep_kit.data.collate import collate_av
    from ep_kit.models.tiny import tiny_thinker_config

    with pytest.warns(UserWarning, match="audio cut"):
        sample = _encoder(builder, max_tokens=400).encode(
            _messages(), [clips["long"]], add_generation_prompt=True
        )
    batch = collate_av([sample], pad_token_id=builder.tokenizer.pad_token_id)
    model = Qwen2_5OmniThinkerForConditionalGeneration(tiny_thinker_config()).eval()
    keys = ["input_ids", "attention_mask", "pixel_values_videos", "video_grid_thw", "video_second_per_grid"]
    keys += ["input_features", "feature_attention_mask"]
    with torch.no_grad():
        logits = model(**{k: batch[k] for k in keys}, use_audio_in_video=True).logits
    assert logits.shape[:2] == (1, 400) and torch.isfinite(logits).all()


def test_audio_policy_error_names_file_and_knobs(builder, clips):
    enc = _encoder(builder, max_tokens=600, audio_policy="error")
    with pytest.raises(ValueError, match="audio_policy='truncate'") as err:
        enc.encode(_messages(), [clips["long"]], add_generation_prompt=True)
    assert clips["long"] in str(err.value) and "max_tokens=600" in str(err.value)
    assert "1200.00 s" in str(err.value)


def test_prompt_that_cannot_fit_raises(builder, clips):
    question = "Describe every second of the clip. " * 20  # 700 characters: 700 byte tokens
    enc = _encoder(builder, max_tokens=600)
    with pytest.raises(ValueError, match="never truncated") as err:
        enc.encode(_messages(question), [clips["long"]], add_generation_prompt=True)
    needed = len(_text_tokens(builder, question)) + PAIR_TOKENS + 1  # text + 2 frames + 40 ms of audio
    assert clips["long"] in str(err.value) and f"needs {needed} tokens" in str(err.value)


def test_longer_than_max_position_embeddings(builder, clips):
    length = len(
        _encoder(builder).encode(_messages(), [clips["short"]], add_generation_prompt=True)["input_ids"]
    )
    with pytest.warns(UserWarning, match="max_position_embeddings") as caught:
        _encoder(builder, max_position_embeddings=length - 1).encode(
            _messages(), [clips["short"]], add_generation_prompt=True
        )
    assert any(clips["short"] in str(w.message) and f"{length} tokens" in str(w.message) for w in caught)
    enc = _encoder(builder, max_tokens=10 * length, max_position_embeddings=length - 1)
    with pytest.raises(ValueError, match=f"max_position_embeddings={length - 1}") as err:
        enc.encode(_messages(), [clips["short"]], add_generation_prompt=True)
    assert clips["short"] in str(err.value) and f"{length} tokens" in str(err.value)
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)  # at the limit: no warning
        _encoder(builder, max_position_embeddings=length).encode(
            _messages(), [clips["short"]], add_generation_prompt=True
        )


def test_datamodule_passes_budget_and_keys_the_cache(tmp_path):
    source = SyntheticSource(root=str(tmp_path / "bench"), num_train=1, num_val=1, num_test=1)
    plain = AVDataModule(source).encoder
    budget = AVDataModule(source, max_tokens=512, audio_policy="error", max_position_embeddings=1024).encoder
    assert (budget.max_tokens, budget.audio_policy, budget.max_position_embeddings) == (512, "error", 1024)
    assert (plain.max_tokens, plain.audio_policy, plain.max_position_embeddings) == (None, "truncate", None)
    args = (_messages(), ["clip.mp4"], [], True)
    assert budget.key(*args) != plain.key(*args)
