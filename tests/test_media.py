"""Media decoding: known frames and a known tone survive encode -> decode (checked numerically)."""

from __future__ import annotations

import numpy as np
import pytest

from ep_kit.data.media import load_audio, load_video
from ep_kit.data.synthetic import write_av_clip

SR = 16000
# Four solid colours, one per second, at 10 fps for 4 s.
COLOURS = [(220, 20, 20), (20, 200, 20), (20, 40, 220), (230, 220, 30)]


def _clip(path, seconds=4, fps=10, size=(56, 56), tone=(880.0, 1.5, 2.5), audio=True):
    n = seconds * fps
    frames = np.zeros((n, size[0], size[1], 3), dtype=np.uint8)
    for i in range(n):
        frames[i] = COLOURS[(i // fps) % len(COLOURS)]
    wave = None
    if audio:
        t = np.arange(seconds * SR) / SR
        freq, on, off = tone
        wave = np.where((t >= on) & (t < off), 0.5 * np.sin(2 * np.pi * freq * t), 0.0).astype(np.float32)
    write_av_clip(path, frames, fps, wave)
    return path


def test_frames_sampled_at_2fps_with_expected_colours(tmp_path):
    clip = load_video(_clip(tmp_path / "a.mp4"), fps=2.0, min_pixels=28 * 28, max_pixels=56 * 56)
    # 40 source frames at 10 fps -> 8 frames spread over [0, 39]: 0, 6, 11, 17, 22, 28, 33, 39.
    assert tuple(clip.frames.shape) == (8, 3, 56, 56)
    assert clip.fps == pytest.approx(2.0)
    assert clip.seconds_per_grid == pytest.approx(1.0)
    expected = [COLOURS[idx // 10] for idx in (0, 6, 11, 17, 22, 28, 33, 39)]
    means = clip.frames.float().mean(dim=(2, 3)).numpy()
    np.testing.assert_allclose(means, np.array(expected, dtype=float), atol=6.0)
    assert clip.numpy().shape == (8, 56, 56, 3)


def test_audio_track_tone_frequency_and_onset(tmp_path):
    path = _clip(tmp_path / "a.mp4", tone=(880.0, 1.5, 2.5))
    wave = load_audio(path)
    assert wave.dtype == np.float32 and wave.ndim == 1
    assert abs(len(wave) / SR - 4.0) < 0.1
    onset = np.argmax(np.abs(wave) > 0.1) / SR
    assert abs(onset - 1.5) < 0.03
    seg = wave[int(1.7 * SR) : int(2.3 * SR)]
    spectrum = np.abs(np.fft.rfft(seg * np.hanning(len(seg))))
    peak = np.argmax(spectrum) * SR / len(seg)
    assert abs(peak - 880.0) < 5.0
    assert np.abs(wave[: int(1.4 * SR)]).max() < 0.02  # silence before the tone
    clip = load_video(path, fps=2.0, min_pixels=28 * 28, max_pixels=56 * 56, with_audio=True)
    np.testing.assert_allclose(clip.audio, wave)


def test_resize_to_multiples_of_28_within_bounds(tmp_path):
    path = _clip(tmp_path / "b.mp4", size=(60, 100), audio=False)
    # smart_resize by hand: 60x100 rounds to 56x112 = 6272 px > 4000, scale by sqrt(6000/4000):
    # floor(60/1.2247/28)*28 = 28, floor(100/1.2247/28)*28 = 56.
    clip = load_video(path, fps=2.0, min_pixels=28 * 28, max_pixels=4000)
    assert tuple(clip.frames.shape[-2:]) == (28, 56)
    # Upscaling to the min-pixel bound keeps the aspect: 60x100 -> at least 12544 px.
    big = load_video(path, fps=2.0, min_pixels=12544, max_pixels=10**6)
    h, w = big.frames.shape[-2:]
    assert h % 28 == 0 and w % 28 == 0 and h * w >= 12544 and abs(w / h - 100 / 60) < 0.25


def test_even_frame_count_and_max_frames(tmp_path):
    path = _clip(tmp_path / "c.mp4", seconds=3, fps=3, audio=False)  # 9 frames, 3 s
    clip = load_video(path, fps=2.0, min_pixels=28 * 28, max_pixels=56 * 56)
    assert clip.num_frames == 6  # 3 s * 2 fps, even
    capped = load_video(path, fps=2.0, min_pixels=28 * 28, max_pixels=56 * 56, max_frames=4, min_frames=2)
    assert capped.num_frames == 4
    odd = load_video(path, fps=2.0, min_pixels=28 * 28, max_pixels=56 * 56, max_frames=5, min_frames=2)
    assert odd.num_frames == 4  # rounded down to a multiple of the temporal patch


def test_missing_file_names_it(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.mp4"):
        load_video(tmp_path / "nope.mp4")
    with pytest.raises(FileNotFoundError, match="nope.wav"):
        load_audio(tmp_path / "nope.wav")


def test_corrupt_file_names_it(tmp_path):
    bad = tmp_path / "corrupt.mp4"
    bad.write_bytes(b"\x00\x01not a video at all" * 50)
    with pytest.raises(ValueError, match="corrupt.mp4"):
        load_video(bad)


def test_video_without_audio_when_audio_required(tmp_path):
    path = _clip(tmp_path / "silent.mp4", audio=False)
    load_video(path, fps=2.0, min_pixels=28 * 28, max_pixels=56 * 56)  # fine without audio
    with pytest.raises(ValueError, match=r"silent\.mp4.*no audio stream"):
        load_video(path, fps=2.0, min_pixels=28 * 28, max_pixels=56 * 56, with_audio=True)


def test_clip_too_short_for_one_temporal_patch(tmp_path):
    frames = np.full((1, 56, 56, 3), 128, dtype=np.uint8)
    path = tmp_path / "one.mp4"
    write_av_clip(path, frames, 2.0, None)
    with pytest.raises(ValueError, match=r"one\.mp4.*1 frame"):
        load_video(path, min_pixels=28 * 28, max_pixels=56 * 56)
