"""Synthetic AV benchmark: deterministic, balanced, answers recomputed from the event lists."""

from __future__ import annotations

import json
from collections import Counter

import numpy as np
import pytest

from ep_kit.data.benchmarks import LETTERS
from ep_kit.data.media import load_audio, load_video
from ep_kit.data.synthetic import SyntheticAVBenchmark

SR = 16000
RGB = {"red": (230, 25, 25), "green": (25, 210, 25), "blue": (25, 50, 235), "yellow": (235, 225, 25)}
HZ = {"low": 250.0, "middle": 700.0, "high": 1800.0, "very high": 4500.0}


def _bench(root, seed=0, **kw):
    knobs = {"num_train": 20, "num_val": 8, "num_test": 10, "seconds": 4, "events": 2, "resolution": 56}
    knobs.update(kw)
    return SyntheticAVBenchmark(root, seed=seed, **knobs)


@pytest.fixture(scope="module")
def bench(tmp_path_factory):
    return _bench(tmp_path_factory.mktemp("synth")).prepare()


def _recompute(row) -> str:
    """The answer text from the event list alone (independent of the generator's code path)."""
    flashes = sorted((e for e in row["events"] if e["kind"] == "flash"), key=lambda e: e["onset"])
    tones = sorted((e for e in row["events"] if e["kind"] == "tone"), key=lambda e: e["onset"])
    q = row["question"]
    kind = row["question_type"]
    if kind == "av_saliency":
        pitch = q[len("Colour during the ") : -len(" tone?")]
        (t,) = [e for e in tones if e["pitch"] == pitch]
        (f,) = [e for e in flashes if e["onset"] <= t["onset"] < e["onset"] + e["duration"]]
        return f["colour"]
    if kind == "temporal_order":
        named = q[len("Which came first, ") : -1].split(" or ")
        first = min((e for e in flashes if e["colour"] in named), key=lambda e: e["onset"])
        assert max(e["onset"] for e in flashes if e["colour"] in named) - first["onset"] >= 3.0  # far apart
        return first["colour"]
    if kind == "sound_only":
        (t,) = tones
        return t["pitch"]
    if kind == "picture_only":
        (f,) = flashes
        return f["colour"]
    if kind == "sync":
        (f,) = flashes
        if not tones:
            return "no sound"
        (t,) = tones
        if f["onset"] == t["onset"]:
            return "together"
        return "sound first" if t["onset"] < f["onset"] else "flash first"
    raise AssertionError(kind)


def test_answers_recomputed_from_events(bench, tmp_path):
    shuffled = _bench(tmp_path, num_train=10, num_val=0, num_test=0, shuffle_options=True).prepare()
    for b, split in [(bench, "train"), (bench, "val"), (bench, "test"), (shuffled, "train")]:
        for row in b.rows(split):
            assert len(row["options"]) == 4 and len(set(row["options"])) == 4
            letter = "ABCD"[row["options"].index(_recompute(row))]
            assert letter == row["answer"], row
    # Canonical order by default: the same four options in the same order for a question type.
    for qtype in ("av_saliency", "sound_only", "sync"):
        assert len({tuple(r["options"]) for r in bench.rows("train") if r["question_type"] == qtype}) == 1
    assert len({tuple(r["options"]) for r in shuffled.rows("train")}) > 3


def test_answers_balanced_and_all_question_types(bench):
    for split, n in (("train", 20), ("val", 8), ("test", 10)):
        rows = bench.rows(split)
        assert len(rows) == n
        counts = Counter(r["answer"] for r in rows)
        assert max(counts.values()) - min(counts.get(x, 0) for x in "ABCD") <= 1
    types = Counter(r["question_type"] for r in bench.rows("train"))
    assert set(types) == {"av_saliency", "temporal_order", "sound_only", "picture_only", "sync"}
    assert set(types.values()) == {4}


def test_deterministic_per_seed_and_idempotent(tmp_path):
    small = {"num_train": 5, "num_val": 2, "num_test": 2}
    one = _bench(tmp_path / "one", **small).prepare()
    two = _bench(tmp_path / "two", **small).prepare()
    for split in ("train", "val", "test"):
        assert one.rows(split) == two.rows(split)
    a = load_video(one.directory / "train/train-00003.mp4", min_pixels=784, max_pixels=3136).frames
    b = load_video(two.directory / "train/train-00003.mp4", min_pixels=784, max_pixels=3136).frames
    assert (a == b).all()
    np.testing.assert_array_equal(
        load_audio(one.directory / "train/train-00003.mp4"),
        load_audio(two.directory / "train/train-00003.mp4"),
    )
    other_seed = _bench(tmp_path / "two", seed=1, **small).prepare()
    assert other_seed.directory != two.directory
    assert other_seed.rows("train") != two.rows("train")
    manifest = two.directory / "manifest.json"
    stamp = manifest.stat().st_mtime_ns
    two.prepare()  # cached: nothing rewritten
    assert manifest.stat().st_mtime_ns == stamp
    assert json.loads(manifest.read_text())["seed"] == 0


def test_clip_content_matches_event_list(bench):
    row = next(r for r in bench.rows("train") if r["question_type"] == "av_saliency")
    path = bench.directory / row["video"]
    clip = load_video(path, fps=2.0, min_pixels=784, max_pixels=3136, with_audio=True)
    assert clip.num_frames == 8 and tuple(clip.frames.shape[-2:]) == (56, 56)
    # Encoded at 4 fps: 16 frames; 8 sampled at indices 0,2,4,6,9,11,13,15 -> times below.
    times = [i / 4 for i in (0, 2, 4, 6, 9, 11, 13, 15)]
    means = clip.frames.float().mean(dim=(2, 3)).numpy()
    for t, mean in zip(times, means, strict=True):
        on = [
            e for e in row["events"] if e["kind"] == "flash" and e["onset"] <= t < e["onset"] + e["duration"]
        ]
        expected = RGB[on[0]["colour"]] if on else (0, 0, 0)
        np.testing.assert_allclose(mean, expected, atol=8.0)
    wave = load_audio(path)
    for e in (e for e in row["events"] if e["kind"] == "tone"):
        seg = wave[int((e["onset"] + 0.2) * SR) : int((e["onset"] + 0.8) * SR)]
        spectrum = np.abs(np.fft.rfft(seg * np.hanning(len(seg))))
        assert abs(np.argmax(spectrum) * SR / len(seg) - HZ[e["pitch"]]) < 10.0
        before = (
            wave[int((e["onset"] - 0.3) * SR) : int((e["onset"] - 0.05) * SR)] if e["onset"] >= 1 else None
        )
        if before is not None and not any(
            x["kind"] == "tone" and x["onset"] < e["onset"] <= x["onset"] + x["duration"]
            for x in row["events"]
        ):
            assert np.abs(before).max() < 0.05  # onset: silence just before the tone


def test_samples_and_bad_knobs(bench, tmp_path):
    samples = bench.samples("val")
    assert len(samples) == 8 and samples[0].benchmark == "synthetic_av"
    assert samples[0].category == "av_saliency" and samples[0].video_path.endswith("val/val-00000.mp4")
    with pytest.raises(ValueError, match="events"):
        _bench(tmp_path, events=5)
    with pytest.raises(ValueError, match="seconds"):
        _bench(tmp_path, seconds=1)
    with pytest.raises(FileNotFoundError, match="prepare"):
        _bench(tmp_path / "never").rows("train")


# ---------------------------------------------------------------------------------------------- probes
PROBE_MIX = ["query", "binding", "order_long", "distractor", "quota"]


@pytest.fixture(scope="module")
def probes(tmp_path_factory):
    return SyntheticAVBenchmark(
        tmp_path_factory.mktemp("probes"), num_train=0, num_val=0, num_test=20, seconds=6, resolution=112,
        question_types=PROBE_MIX, dense_seconds=8, long_seconds=[8, 12],
    ).prepare()


def _at(events, t):
    return [e for e in events if e["onset"] <= t < e["onset"] + e["duration"]]


def _recompute_probe(row) -> str:
    """A probe's answer from its event list, by the rule the question states (not the generator's path)."""
    ev, q, kind = row["events"], row["question"], row["question_type"]
    flashes = [e for e in ev if e["kind"] == "flash"]
    tones = [e for e in ev if e["kind"] == "tone"]
    if kind == "query":  # "Tone during the <colour> flash?": the colour shows once; every second is busy
        colour = q[len("Tone during the ") : -len(" flash?")]
        (f,) = [e for e in flashes if e["colour"] == colour]
        assert len(flashes) == len(tones) == row["seconds"]  # more events than 20% of the tokens keep whole
        (t,) = [e for e in _at(tones, f["onset"])]
        return t["pitch"]
    if kind == "binding":  # "Colour during the <pitch> tone?" among 4 flashes and 4 tones
        assert len(flashes) == len(tones) == 4 and len({e["pitch"] for e in tones}) == 4
        (t,) = [e for e in tones if e["pitch"] == q[len("Colour during the ") : -len(" tone?")]]
        (f,) = _at(flashes, t["onset"])
        return f["colour"]
    if kind == "order_long":
        a, b = q[len("Which came first, ") : -1].split(" or ")
        first, second = sorted(flashes, key=lambda e: e["onset"])
        assert {first["colour"], second["colour"]} == {a, b}
        assert first["onset"] < row["seconds"] / 4 and second["onset"] >= row["seconds"] * 3 / 4  # far apart
        return first["colour"]
    if kind == "distractor":
        (sq,) = [e for e in flashes if e["size"] > 0]
        assert sq["level"] < 0.5 and all(e["level"] == 1.0 for e in flashes if e is not sq) and len(flashes) == 4
        return sq["colour"]
    if kind == "quota":
        if q == "Which tone was heard?":
            (t,) = tones
            assert len(flashes) == row["seconds"]  # the other modality is busy every second
            return t["pitch"]
        (f,) = flashes
        assert q == "Which colour was shown?" and len(tones) == row["seconds"]
        return f["colour"]
    raise AssertionError(kind)


def test_probe_answers_follow_from_their_events(probes):
    rows = probes.rows("test")
    assert Counter(r["question_type"] for r in rows) == {p: 4 for p in PROBE_MIX}
    assert [r["seconds"] for r in rows if r["question_type"] == "order_long"] == [8, 12, 8, 12]
    assert {r["seconds"] for r in rows if r["question_type"] == "query"} == {8}
    for r in rows:
        assert r["options"][LETTERS.index(r["answer"])] == _recompute_probe(r), r["question_id"]
    quota = [r["question"] for r in rows if r["question_type"] == "quota"]
    assert len(set(quota)) == 2  # both directions appear


def test_probe_clip_has_its_own_length_and_the_dim_square_where_its_events_say(probes):
    rows = probes.rows("test")
    for r in rows[:5]:
        clip = load_video(probes.directory / r["video"], max_frames=64)
        assert clip.frames.shape[0] == 2 * r["seconds"]  # 2 fps, each clip as long as its row says
        assert abs(len(load_audio(probes.directory / r["video"])) / SR - r["seconds"]) < 0.1
    (d,) = [r for r in rows if r["question_type"] == "distractor"][:1]
    (sq,) = [e for e in d["events"] if e["size"] > 0]
    clip = load_video(probes.directory / d["video"], max_frames=64, min_pixels=28 * 28, max_pixels=112 * 112)
    assert tuple(clip.frames.shape[-2:]) == (112, 112)  # not resized: cell (r, c) is pixels 28r.., 28c..
    frame = clip.frames[int(sq["onset"] * 2)]
    frame = frame.permute(1, 2, 0).numpy().astype(float)  # (H, W, 3)
    r0, c0, n = 28 * sq["row"], 28 * sq["col"], 28 * sq["size"]
    inside = frame[r0 + 4 : r0 + n - 4, c0 + 4 : c0 + n - 4].reshape(-1, 3).mean(0)
    assert np.allclose(inside, 0.45 * np.array(RGB[sq["colour"]]), atol=14)  # dim, its own colour
    outside = np.ones(frame.shape[:2], bool)
    outside[max(0, r0 - 4) : r0 + n + 4, max(0, c0 - 4) : c0 + n + 4] = False
    assert frame[outside].max() < 20  # black elsewhere


def test_probe_token_mix_is_mostly_video_like_real_clips(tmp_path):
    """At the toy recipes' 280 px, 100 video tokens per second beside 25 audio tokens: 80% video."""
    from ep_kit.data.datamodule import AVDataModule, SyntheticSource

    source = SyntheticSource(root=str(tmp_path / "b"), num_train=0, num_val=0, num_test=5, seconds=6, resolution=280,
                             question_types=PROBE_MIX, dense_seconds=12, long_seconds=[16])
    dm = AVDataModule(source, eval_batch_size=5, cache_dir=str(tmp_path / "cache"))
    dm.prepare_data()
    dm.setup("test")
    batch = next(iter(dm.test_dataloader()))
    from ep_kit.tokens import TINY_SPECIAL_TOKENS

    ids = batch["input_ids"]
    video = (ids == TINY_SPECIAL_TOKENS["<|VIDEO|>"]).sum(-1)
    audio = (ids == TINY_SPECIAL_TOKENS["<|AUDIO|>"]).sum(-1)
    seconds = [r["seconds"] for r in source.bench.rows("test")]
    assert video.tolist() == [100 * s for s in seconds]
    assert all(abs(a - 25 * s) <= 2 for a, s in zip(audio.tolist(), seconds, strict=True))  # (+ AAC padding)
    share = video.sum() / (video.sum() + audio.sum())
    assert 0.75 <= float(share) <= 0.85


def test_probe_knobs_are_checked(tmp_path):
    with pytest.raises(ValueError, match="question_types"):
        SyntheticAVBenchmark(tmp_path, question_types=["query", "nonsense"])
    with pytest.raises(ValueError, match="long_seconds"):
        SyntheticAVBenchmark(tmp_path, question_types=["order_long"], long_seconds=[4])
    with pytest.raises(ValueError, match="seconds >= 4"):
        SyntheticAVBenchmark(tmp_path, question_types=["binding"], seconds=2)
    # the original benchmark's knobs (and so its directory) do not change when no probe is asked for
    assert "question_types" not in SyntheticAVBenchmark(tmp_path).knobs
