"""Data reliability: bad instruction rows, bad benchmark annotations, damaged media, pickle-only model dirs.

Every case is a small file written here in the format it stands for; expectations are worked out by
hand (line numbers, counts, sizes), never copied from the code's output.
"""

from __future__ import annotations

import json
import logging
import re
import warnings

import av
import numpy as np
import pytest
import torch

from ep_kit.data.benchmarks import (
    SkipReport,
    read_daily_omni,
    read_mlvu,
    read_videomme,
    read_worldsense,
)
from ep_kit.data.collate import collate_av
from ep_kit.data.datamodule import AVDataModule, InstructSource
from ep_kit.data.instruct import read_instruct_jsonl
from ep_kit.data.media import load_audio, load_video
from ep_kit.data.synthetic import write_av_clip
from ep_kit.models import OmniThinker

SR = 16000
PIXELS = {"min_pixels": 28 * 28, "max_pixels": 56 * 56}


def _clip(path, n_frames=8, fps=4.0, size=(56, 56), audio_seconds=2.0, seed=0):
    frames = np.random.default_rng(seed).integers(0, 255, (n_frames, *size, 3), dtype=np.uint8)
    wave = None
    if audio_seconds:
        t = np.arange(int(audio_seconds * SR)) / SR
        wave = (0.4 * np.sin(2 * np.pi * 500 * t)).astype(np.float32)
    write_av_clip(path, frames, fps, wave)
    return path


def _row(video="clip.mp4", answer="Red."):
    return {
        "messages": [
            {"role": "user", "content": "<video>What colour appears?"},
            {"role": "assistant", "content": answer},
        ],
        "videos": [video],
    }


def _jsonl(path, lines):
    path.write_text("\n".join(line if isinstance(line, str) else json.dumps(line) for line in lines) + "\n")
    return path


# ------------------------------------------------------------------ instruction data
def test_instruct_missing_media_fails_when_read_naming_file_and_line(tmp_path):
    _clip(tmp_path / "clip.mp4")
    ann = _jsonl(tmp_path / "train.jsonl", [_row(), _row("gone.mp4")])
    with pytest.raises(FileNotFoundError, match=r"train\.jsonl line 2: video file not found: .*gone\.mp4"):
        read_instruct_jsonl(ann)
    audio_row = {
        "messages": [{"role": "user", "content": "<audio>Which sound?"}, {"role": "assistant", "content": "A tone."}],
        "audios": ["sounds/missing.wav"],
    }
    _jsonl(ann, [_row(), "", audio_row])  # the blank line still counts: the bad row is line 3
    with pytest.raises(FileNotFoundError, match=r"train\.jsonl line 3: audio file not found: .*missing\.wav"):
        read_instruct_jsonl(ann)
    # A media_root that does not exist is named, since every row then fails the same way.
    with pytest.raises(FileNotFoundError, match=r"line 1: video file not found: .*\(media_root .*nowhere does not exist\)"):
        read_instruct_jsonl(ann, media_root=tmp_path / "nowhere")
    # Through the data module: setup fails before any training step.
    dm = AVDataModule(InstructSource(train=str(ann)), batch_size=2, **PIXELS)
    with pytest.raises(FileNotFoundError, match=r"train\.jsonl line 3"):
        dm.setup("fit")


def test_instruct_non_utf8_file_names_file_and_line(tmp_path):
    ann = tmp_path / "latin1.jsonl"
    good = json.dumps(_row()).encode()
    bad = json.dumps(_row(answer="Rouge vif")).encode().replace(b"vif", b"\xe9clatant")  # latin-1 e-acute
    ann.write_bytes(good + b"\n" + bad + b"\n")
    with pytest.raises(ValueError, match=r"latin1\.jsonl line 2: not UTF-8 text \(byte 0xe9"):
        read_instruct_jsonl(ann)


def test_instruct_skip_bad_counts_every_bad_row(tmp_path, caplog):
    _clip(tmp_path / "clip.mp4")
    lines = [
        _row(),  # line 1: good
        "{not json",  # line 2
        {"messages": [{"role": "user", "content": "<video>Q"}], "videos": ["clip.mp4"]},  # line 3: no answer
        _row("gone.mp4"),  # line 4: missing media
        "",  # line 5: blank, not a row
        _row(answer="Blue."),  # line 6: good
    ]
    ann = _jsonl(tmp_path / "train.jsonl", lines)
    report = SkipReport()
    rows = read_instruct_jsonl(ann, skip_bad=True, report=report)
    assert [r["line"] for r in rows] == [1, 6]
    assert [w for w, _ in report.skipped] == [f"{ann} line {i}" for i in (2, 3, 4)]
    reasons = [r for _, r in report.skipped]
    assert reasons[0].startswith("invalid json") and "no assistant message" in reasons[1]
    assert "gone.mp4" in reasons[2]
    with pytest.raises(ValueError, match="SkipReport"):
        read_instruct_jsonl(ann, skip_bad=True)
    # Through the source: the data module logs the report at setup and the dataset has the 2 good rows.
    source = InstructSource(train=str(ann), skip_bad=True)
    dm = AVDataModule(source, batch_size=2, **PIXELS)
    with caplog.at_level(logging.WARNING, logger="ep_kit.data.datamodule"):
        dm.setup("fit")
    assert "3 sample(s) skipped" in caplog.text and f"{ann} line 4" in caplog.text
    assert source.report.count == 3 and len(dm.datasets["train"][0][0]) == 2
    # Only bad rows left: still an error, naming how many were bad and the first.
    _jsonl(ann, ["{not json", _row("gone.mp4")])
    with pytest.raises(ValueError, match=r"train\.jsonl: no instruction rows \(2 bad line\(s\); first: .*line 1"):
        read_instruct_jsonl(ann, skip_bad=True, report=SkipReport())


def test_instruct_decode_error_mid_run_names_line_or_is_skipped(tmp_path):
    _clip(tmp_path / "clip.mp4")
    (tmp_path / "corrupt.mp4").write_bytes(b"\x00\x01not a video at all" * 50)  # exists, does not decode
    ann = _jsonl(tmp_path / "train.jsonl", [_row(), _row("corrupt.mp4"), _row(answer="Blue.")])
    strict = AVDataModule(InstructSource(train=str(ann)), batch_size=3, **PIXELS)
    strict.setup("fit")  # the file exists: building passes
    ds = strict.datasets["train"][0][0]
    with pytest.raises(ValueError, match=r"train\.jsonl line 2: cannot encode the sample: .*corrupt\.mp4"):
        ds[1]

    source = InstructSource(train=str(ann), skip_bad=True)
    dm = AVDataModule(source, batch_size=3, **PIXELS)
    dm.setup("fit")
    assert source.report.count == 0
    batches = list(dm.train_dataloader())  # one batch of 3 rows, the corrupt one dropped: the run goes on
    assert [b["input_ids"].shape[0] for b in batches] == [2]
    assert batches[0]["video_grid_thw"].shape == (2, 3)
    tok = dm.tokenizer
    labels = batches[0]["labels"]
    answers = sorted(tok.decode(labels[b][labels[b] != -100]) for b in range(2))
    assert answers == ["Blue.<|im_end|>", "Red.<|im_end|>"]
    assert [w for w, _ in source.report.skipped] == [f"{ann} line 2"]
    assert "corrupt.mp4" in source.report.skipped[0][1]
    list(dm.train_dataloader())  # a second epoch: the bad sample is not decoded or counted again
    assert source.report.count == 1
    summary = source.skip_summary()
    assert f"train: {ann}: 1 row(s) skipped (3 passed the build-time checks)" in summary
    assert f"{ann} line 2: cannot encode the sample" in summary


def test_collate_drops_none_samples_and_refuses_an_all_none_batch():
    def sample(ids):
        n = len(ids)
        return {
            "input_ids": torch.tensor(ids),
            "attention_mask": torch.ones(n, dtype=torch.long),
            "labels": torch.tensor([-100] * (n - 1) + [ids[-1]]),
            "answer_mask": torch.tensor([False] * (n - 1) + [True]),
        }

    batch = collate_av([sample([5, 6, 7]), None, sample([8, 9])], pad_token_id=0)
    assert batch["input_ids"].tolist() == [[5, 6, 7], [8, 9, 0]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1], [1, 1, 0]]
    assert batch["labels"].tolist() == [[-100, -100, 7], [-100, 9, -100]]
    with pytest.raises(ValueError, match=r"every sample of this batch \(2 of 2\) was skipped"):
        collate_av([None, None], pad_token_id=0)


# ------------------------------------------------------------------ benchmark readers
VIDEOMME = {
    "video_id": "001",
    "duration": "short",
    "domain": "Knowledge",
    "videoID": "fFjv93ACGo8",
    "task_type": "Counting Problem",
    "question": "How many red socks are above the fireplace?",
    "options": ["A. 0.", "B. 1.", "C. 2.", "D. 3."],
    "answer": "C",
}


def _write(path, data):
    path.write_text(json.dumps(data))
    return path


def test_duplicate_question_ids_name_both_rows_or_are_renamed(tmp_path):
    rows = [
        {**VIDEOMME, "question_id": "001-1"},
        {**VIDEOMME, "question_id": "001-2"},
        {**VIDEOMME, "question_id": "001-1", "answer": "A"},
    ]
    ann = _write(tmp_path / "videomme.json", rows)
    with pytest.raises(ValueError, match=r"videomme\.json row 2: duplicate question_id '001-1' \(first at .*videomme\.json row 0\)"):
        read_videomme(ann, tmp_path)
    report = SkipReport()
    with pytest.warns(UserWarning, match=r"row 2: duplicate question_id '001-1'.*kept as '001-1#2'"):
        samples = read_videomme(ann, tmp_path, skip_bad=True, report=report)
    assert [s.question_id for s in samples] == ["001-1", "001-2", "001-1#2"]
    assert [s.answer_letter for s in samples] == ["C", "C", "A"]  # all three questions are scored
    assert report.count == 0 and len(report.renamed) == 1 and report.renamed[0][0] == f"{ann} row 2"
    assert "1 sample(s) kept under a new question id" in report.summary()
    # WorldSense harness rows take their id from "index": a repeated index is a repeated id.
    flat = {"video_path": "v.mp4", "question": "Q?", "candidates": ["A. x", "B. y"], "answer": "A"}
    ws = _write(tmp_path / "ws.json", [{**flat, "index": 3}, {**flat, "index": 3}])
    with pytest.raises(ValueError, match=r"ws\.json row 1: duplicate question_id '3' \(first at .*ws\.json row 0\)"):
        read_worldsense(ws, tmp_path)


def test_options_must_be_a_list_of_2_to_10_strings(tmp_path):
    # A dict used to become its keys ("A", "B"), and answer "B" then matched a letter: a silent wrong question.
    dict_opts = _write(
        tmp_path / "videomme.json", [{**VIDEOMME, "question_id": "q", "options": {"A": "0", "B": "1"}, "answer": "B"}]
    )
    with pytest.raises(ValueError, match=r"videomme\.json row 0: options must be a list of 2 to 10 strings, got dict"):
        read_videomme(dict_opts, tmp_path)
    daily = {"Question": "Q?", "Answer": "A", "video_id": "vid", "Type": "t"}
    bare = _write(tmp_path / "qa.json", [{**daily, "Choice": "A bell"}])
    with pytest.raises(ValueError, match=r"qa\.json row 0: options 'A bell' are a string, not a list"):
        read_daily_omni(bare, tmp_path)
    mlvu = {"video": "m.mp4", "question": "Q?", "answer": "c0", "question_type": "count"}
    (tmp_path / "mlvu").mkdir()
    eleven = _write(tmp_path / "mlvu" / "4_count.json", [{**mlvu, "candidates": [f"c{i}" for i in range(11)]}])
    with pytest.raises(ValueError, match=r"4_count\.json row 0: options must be a list of 2 to 10 strings .*got 11"):
        read_mlvu(eleven, tmp_path)
    ws = {"video_path": "v.mp4", "question": "How many?", "answer": "A", "index": 0}
    numbers = _write(tmp_path / "ws.json", [{**ws, "candidates": ["A. 1", 2, "C. 3"]}])
    with pytest.raises(ValueError, match=r"ws\.json row 0: options must be strings; not a string: \[1\] int"):
        read_worldsense(numbers, tmp_path)
    # Lists stored as text (json, or a Python repr with an apostrophe) are still lists.
    as_text = _write(
        tmp_path / "text.json",
        [
            {**daily, "Choice": json.dumps(["A. a bell", "B. a dog"])},
            {**daily, "video_id": "v2", "Choice": repr(["A. it's a bell", "B. a dog"])},
        ],
    )
    assert [s.options for s in read_daily_omni(as_text, tmp_path)] == [["a bell", "a dog"], ["it's a bell", "a dog"]]
    # With skip_bad a bad options field is a counted skip like any other row error.
    report = SkipReport()
    assert read_videomme(dict_opts, tmp_path, skip_bad=True, report=report) == []
    assert report.count == 1 and "got dict" in report.skipped[0][1]


def test_skip_bad_covers_malformed_jsonl_lines_and_worldsense_entries(tmp_path):
    lines = [
        json.dumps({**VIDEOMME, "question_id": "q0"}),
        "{broken",
        json.dumps({k: v for k, v in VIDEOMME.items()}),  # no question_id: falls back to <videoID>-<row>
    ]
    ann = tmp_path / "videomme.jsonl"
    ann.write_text("\n".join(lines) + "\n")
    with pytest.raises(ValueError, match=r"videomme\.jsonl line 2: invalid json"):
        read_videomme(ann, tmp_path)
    report = SkipReport()
    samples = read_videomme(ann, tmp_path, skip_bad=True, report=report)
    # The broken line keeps its place: the last row is still row 2 (0-based), so its id does not shift.
    assert [s.question_id for s in samples] == ["q0", "fFjv93ACGo8-2"]
    assert [w for w, _ in report.skipped] == [f"{ann} row 1"]
    assert f"{ann} row 1: line 2: invalid json" in report.skipped[0][1]

    task = {"question": "Who sings?", "candidates": ["A. man", "B. woman"], "answer": "B", "task_type": "T"}
    nested = _write(
        tmp_path / "worldsense.json",
        {"vid01": {"task1": task}, "vid02": ["not", "an", "object"], "vid03": {"domain": "Music"}},
    )
    with pytest.raises(ValueError, match=r"worldsense\.json video vid02: expected an object, got list"):
        read_worldsense(nested, tmp_path)
    report = SkipReport()
    samples = read_worldsense(nested, tmp_path, skip_bad=True, report=report)
    assert [s.question_id for s in samples] == ["vid01-task1"]
    assert [w for w, _ in report.skipped] == [f"{nested} video vid02", f"{nested} video vid03"]
    assert "no task1..taskN" in report.skipped[1][1]


def test_benchmark_file_that_is_not_utf8_names_it(tmp_path):
    ann = tmp_path / "qa.json"
    ann.write_bytes(b'[{"Question": "Caf\xe9?"}]')  # latin-1 e-acute
    with pytest.raises(ValueError, match=r"qa\.json line 1: not UTF-8 text \(byte 0xe9"):
        read_daily_omni(ann, tmp_path)


# ------------------------------------------------------------------ media
def _faststart(src, dst):
    """Re-mux with the index (moov) before the data, as streaming-friendly mp4s are written."""
    with av.open(str(src)) as inp, av.open(str(dst), "w", options={"movflags": "faststart"}) as out:
        streams = {s.index: out.add_stream_from_template(s) for s in inp.streams}
        for packet in inp.demux():
            if packet.dts is None:
                continue
            packet.stream = streams[packet.stream.index]
            out.mux(packet)
    return dst


def test_truncated_video_warns_with_declared_and_decoded_durations(tmp_path):
    from ep_kit.data.media import TruncatedMediaWarning

    # 40 frames at 10 fps and 4 s of audio: the container declares 4.00 s for both.
    src = _clip(tmp_path / "src.mp4", n_frames=40, fps=10.0, audio_seconds=4.0)
    fast = _faststart(src, tmp_path / "fast.mp4")
    data = fast.read_bytes()
    assert data.find(b"moov") < data.find(b"mdat")  # index first: a cut file still opens
    with warnings.catch_warnings():
        warnings.simplefilter("error", TruncatedMediaWarning)  # the intact file is not reported
        assert load_video(fast, fps=2.0, with_audio=True, **PIXELS).num_frames == 8
    cut = tmp_path / "cut.mp4"
    cut.write_bytes(data[: int(len(data) * 0.6)])
    with pytest.warns(TruncatedMediaWarning) as record:
        clip = load_video(cut, fps=2.0, with_audio=True, **PIXELS)
    messages = [str(w.message) for w in record]
    video = [m for m in messages if m.startswith(f"video file {cut}")]
    assert len(video) == 1
    m = re.search(r"decoded to (\d+\.\d+) s \((\d+) of the 40 frames its stream declares\) but its container declares 4\.00 s", video[0])
    assert m is not None
    decoded_frames = int(m.group(2))
    assert 2 <= decoded_frames < 36 and float(m.group(1)) == pytest.approx(decoded_frames / 10, abs=0.005)
    assert clip.fps < 2.0  # sampled from fewer frames than the 40 declared
    audio = [m for m in messages if m.startswith(f"audio track of {cut}")]
    assert audio and re.search(r"decoded to \d\.\d\d s but its container declares 4\.00 s", audio[0])
    with pytest.warns(TruncatedMediaWarning, match=r"audio track of .*cut\.mp4"):
        assert len(load_audio(cut)) < 0.9 * 4 * SR


def test_extreme_aspect_ratios_and_max_frames_below_one_patch_name_the_file(tmp_path):
    wide = _clip(tmp_path / "wide.mp4", n_frames=4, size=(28, 2000), audio_seconds=0)
    # smart_resize by hand: 28x2000 is 28x1988 at multiples of 28 = 55664 px > 3136, so it scales by
    # sqrt(56000/3136) = 4.23 but the short side stays at 28: 28x448 = 12544 px, still over the bound.
    with pytest.raises(
        ValueError,
        match=r"wide\.mp4: frames of 28x2000 .*max_pixels=3136 .*28x448 = 12544 pixels\); raise max_pixels to at least 55664",
    ):
        load_video(wide, fps=2.0, **PIXELS)
    assert tuple(load_video(wide, fps=2.0, min_pixels=784, max_pixels=55664).frames.shape) == (4, 3, 28, 1988)
    # 5712 / 28 = 204 > smart_resize's 200:1 limit.
    wider = _clip(tmp_path / "wider.mp4", n_frames=2, size=(28, 5712), audio_seconds=0)
    with pytest.raises(ValueError, match=r"wider\.mp4: frames are 28x5712 \(aspect ratio 204:1\).*at most 200:1"):
        load_video(wider, fps=2.0, min_pixels=784, max_pixels=10**6)
    clip = _clip(tmp_path / "c.mp4", audio_seconds=0)
    for cap in (1, 0):
        with pytest.raises(ValueError, match=rf"max_frames must be >= 2 .*got {cap} \(video file .*c\.mp4\)"):
            load_video(clip, fps=2.0, max_frames=cap, **PIXELS)


# ------------------------------------------------------------------ model directories
def test_pickle_only_model_directory_says_safetensors_are_needed(tiny_config, tmp_path):
    config = tiny_config(hidden_size=32, num_layers=1)
    thinker = OmniThinker.from_config(config).thinker
    config.save_pretrained(str(tmp_path))
    torch.save(thinker.state_dict(), tmp_path / "pytorch_model.bin")
    with pytest.raises(
        FileNotFoundError,
        match=rf"{re.escape(str(tmp_path))} holds only PyTorch pickle weights \(pytorch_model\.bin\), no \*\.safetensors",
    ):
        OmniThinker.from_pretrained(tmp_path, dtype=torch.float32)
    (tmp_path / "pytorch_model.bin").unlink()
    with pytest.raises(FileNotFoundError, match=r"holds no model weights \(\*\.safetensors\)"):
        OmniThinker.from_pretrained(tmp_path, dtype=torch.float32)
