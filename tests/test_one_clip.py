"""``ep_kit.data.build_batch``: one clip and a question -> a model batch.

References: the tiny tokenizer's own ids for the option letters and the prompt text, the
processor's placeholder counts for the clip, and the errors naming the file.
"""

from __future__ import annotations

import numpy as np
import pytest

from ep_kit.data import build_batch, build_tiny_tokenizer
from ep_kit.data.synthetic import Event, render_events, write_av_clip
from ep_kit.tokens import TINY_SPECIAL_TOKENS


@pytest.fixture
def clip(tmp_path):
    frames, audio = render_events([Event("flash", 0.0, 1.0, colour="red")], seconds=2.0, fps=4.0, size=56)
    write_av_clip(tmp_path / "clip.mp4", frames, 4.0, audio)
    write_av_clip(tmp_path / "mute.mp4", frames, 4.0, None)
    return tmp_path


def test_options_give_the_lettered_prompt_and_the_letter_ids(clip):
    batch = build_batch("tiny", video=clip / "clip.mp4", question="Which colour?", options=["red", "green", "blue"])
    tok = build_tiny_tokenizer()
    assert batch["choice_token_ids"].tolist() == [[tok.encode(c, add_special_tokens=False)[0] for c in "ABC"]]
    text = tok.decode(batch["input_ids"][0])
    assert "Which colour?\nA. red\nB. green\nC. blue" in text and text.endswith("assistant\n")
    ids = batch["input_ids"][0]
    # 2 s of audio at 25 tokens per second; AAC's encoder delay adds at most one 1024-sample frame (64 ms)
    assert 50 <= int((ids == TINY_SPECIAL_TOKENS["<|AUDIO|>"]).sum()) <= 52
    assert int((ids == TINY_SPECIAL_TOKENS["<|VIDEO|>"]).sum()) > 0 and "labels" not in batch


def test_a_clip_without_audio_and_a_missing_file_are_named(clip):
    with pytest.raises(ValueError, match="mute.mp4 has no audio stream"):
        build_batch("tiny", video=clip / "mute.mp4", question="q?")
    batch = build_batch("tiny", video=clip / "mute.mp4", question="q?", use_audio_in_video=False)
    assert "input_features" not in batch and batch["pixel_values_videos"].shape[0] > 0
    with pytest.raises(FileNotFoundError, match="nope.mp4"):
        build_batch("tiny", video=clip / "nope.mp4", question="q?")
    with pytest.raises(ValueError, match="2 to 10 answers"):
        build_batch("tiny", video=clip / "clip.mp4", question="q?", options=["only"])
    assert np.isfinite(batch["pixel_values_videos"].numpy()).all()
