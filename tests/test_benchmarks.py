"""Benchmark readers on small fixture files written in each benchmark's public annotation format."""

from __future__ import annotations

import json

import pytest

from ep_kit.data.benchmarks import (
    SkipReport,
    format_mc_prompt,
    read_benchmark,
    read_daily_omni,
    read_mlvu,
    read_videomme,
    read_worldsense,
)


def _write(path, data):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data))
    return path


VIDEOMME_ROWS = [
    {
        "video_id": "001",
        "duration": "short",
        "domain": "Knowledge",
        "sub_category": "Humanity & History",
        "url": "https://www.youtube.com/watch?v=fFjv93ACGo8",
        "videoID": "fFjv93ACGo8",
        "question_id": "001-1",
        "task_type": "Counting Problem",
        "question": "How many red socks are above the fireplace?",
        "options": ["A. 0.", "B. 1.", "C. 2.", "D. 3."],
        "answer": "C",
    },
    {
        "video_id": "001",
        "duration": "short",
        "domain": "Knowledge",
        "sub_category": "Humanity & History",
        "url": "https://www.youtube.com/watch?v=fFjv93ACGo8",
        "videoID": "fFjv93ACGo8",
        "question_id": "001-2",
        "task_type": "Information Synopsis",
        "question": "What is the genre of this video?",
        "options": ["A. A news report.", "B. A documentary.", "C. A comedy.", "D. A cartoon."],
        "answer": "B",
    },
]


def test_videomme_json_and_jsonl(tmp_path):
    ann = _write(tmp_path / "videomme.json", VIDEOMME_ROWS)
    samples = read_videomme(ann, tmp_path / "videos")
    assert [s.question_id for s in samples] == ["001-1", "001-2"]
    s = samples[0]
    assert s.video_path == str(tmp_path / "videos" / "fFjv93ACGo8.mp4")
    assert s.options == ["0.", "1.", "2.", "3."]
    assert s.answer_letter == "C" and s.answer_index == 2
    assert s.category == "Counting Problem" and s.benchmark == "videomme"
    assert s.extra["duration"] == "short" and s.extra["domain"] == "Knowledge"
    jl = tmp_path / "videomme.jsonl"
    jl.write_text("\n".join(json.dumps(r) for r in VIDEOMME_ROWS) + "\n")
    no_audio = read_benchmark("videomme_noaudio", jl, tmp_path / "videos")
    assert [s.benchmark for s in no_audio] == ["videomme_noaudio"] * 2
    assert [s.answer_letter for s in no_audio] == ["C", "B"]


def test_mlvu_task_files_answer_is_option_text(tmp_path):
    ann_dir = tmp_path / "json"
    _write(
        ann_dir / "1_plotQA.json",
        [
            {
                "video": "movie101_66.mp4",
                "duration": 246,
                "question": "What color is the main male character in the video?",
                "candidates": ["Yellow", "Red", "Green", "Blue"],
                "answer": "Yellow",
                "question_type": "plotQA",
            }
        ],
    )
    _write(
        ann_dir / "4_count.json",
        [
            {
                "video": "count_1.mp4",
                "duration": 300,
                "question": "How many times does the dog jump?",
                "candidates": ["2", "3", "4", "5"],
                "answer": "4",
                "question_type": "count",
            }
        ],
    )
    (tmp_path / "video" / "4_count").mkdir(parents=True)
    (tmp_path / "video" / "4_count" / "count_1.mp4").write_bytes(b"")
    samples = read_mlvu(ann_dir, tmp_path / "video")
    assert [s.answer_letter for s in samples] == ["A", "C"]
    assert [s.category for s in samples] == ["plotQA", "count"]
    assert samples[0].video_path == str(tmp_path / "video" / "movie101_66.mp4")
    assert samples[1].video_path == str(tmp_path / "video" / "4_count" / "count_1.mp4")  # task folder layout
    assert samples[0].question_id == "1_plotQA-0" and samples[0].benchmark == "mlvu"


def test_daily_omni_qa_json(tmp_path):
    ann = _write(
        tmp_path / "qa.json",
        [
            {
                "Question": "What sound is heard when the man opens the door?",
                "Choice": ["A. A bell", "B. A dog barking", "C. Music", "D. Silence"],
                "Answer": "B",
                "video_id": "G_VTkkb34gw",
                "Type": "AV Event Alignment",
                "video_category": "Daily Life",
                "video_duration": "30s",
            }
        ],
    )
    (s,) = read_daily_omni(ann, tmp_path / "Videos")
    assert s.video_path == str(tmp_path / "Videos" / "G_VTkkb34gw" / "G_VTkkb34gw_video.mp4")
    assert s.options == ["A bell", "A dog barking", "Music", "Silence"]
    assert s.answer_letter == "B" and s.category == "AV Event Alignment"
    assert s.extra == {"video_category": "Daily Life", "video_duration": "30s"}


def test_worldsense_both_layouts(tmp_path):
    flat = _write(
        tmp_path / "worldsense_flat.json",
        [
            {
                "index": 7,
                "video_path": "videos/abc.mp4",
                "question": "What instrument is playing?",
                "candidates": ["A. Piano", "B. Violin", "C. Drums", "D. Guitar"],
                "answer": "D",
                "task_type": "Audio Recognition",
                "task_domain": "Recognition",
                "duration": "<1min",
                "audio_class": ["music"],
            }
        ],
    )
    (s,) = read_worldsense(flat, tmp_path)
    assert s.question_id == "7" and s.answer_letter == "D" and s.options[3] == "Guitar"
    assert s.video_path == str(tmp_path / "videos" / "abc.mp4") and s.category == "Audio Recognition"
    nested = _write(
        tmp_path / "worldsense_qa.json",
        {
            "vid01": {
                "domain": "Music",
                "duration": 95.0,
                "task1": {
                    "question": "Who sings first?",
                    "candidates": ["A. The man", "B. The woman", "C. The child", "D. Nobody"],
                    "answer": "B",
                    "task_type": "Temporal Localization",
                },
                "task2": {
                    "question": "How many drums?",
                    "candidates": ["A. 1", "B. 2", "C. 3", "D. 4"],
                    "answer": "A",
                    "task_type": "Object Counting",
                },
            }
        },
    )
    samples = read_worldsense(nested, tmp_path / "v")
    assert [s.question_id for s in samples] == ["vid01-task1", "vid01-task2"]
    assert samples[0].video_path == str(tmp_path / "v" / "vid01.mp4")
    assert [s.answer_letter for s in samples] == ["B", "A"]
    assert samples[1].category == "Object Counting"


def test_missing_field_names_file_and_row(tmp_path):
    rows = [dict(VIDEOMME_ROWS[0]), {k: v for k, v in VIDEOMME_ROWS[1].items() if k != "answer"}]
    ann = _write(tmp_path / "bad.json", rows)
    with pytest.raises(ValueError, match=r"bad\.json row 1: missing field\(s\) \['answer'\]"):
        read_videomme(ann, tmp_path)
    rows[1]["answer"] = "Z"
    _write(ann, rows)
    with pytest.raises(ValueError, match=r"bad\.json row 1: answer 'Z'"):
        read_videomme(ann, tmp_path)
    with pytest.raises(FileNotFoundError, match="absent.json"):
        read_daily_omni(tmp_path / "absent.json", tmp_path)


def test_skip_flag_counts_every_skip(tmp_path):
    rows = [dict(VIDEOMME_ROWS[0]), {k: v for k, v in VIDEOMME_ROWS[1].items() if k != "question"}]
    ann = _write(tmp_path / "mixed.json", rows)
    report = SkipReport()
    samples = read_videomme(ann, tmp_path, skip_bad=True, report=report)
    assert len(samples) == 1 and report.count == 1
    assert "mixed.json row 1" in report.skipped[0][0] and "question" in report.skipped[0][1]
    assert "1 sample(s) skipped" in report.summary()
    # Missing media is a counted skip too when files are checked.
    report2 = SkipReport()
    assert read_videomme(ann, tmp_path, skip_bad=True, report=report2, check_files=True) == []
    assert report2.count == 2 and "fFjv93ACGo8.mp4" in report2.skipped[0][1]
    with pytest.raises(ValueError, match="SkipReport"):
        read_videomme(ann, tmp_path, skip_bad=True)


def test_harness_prompt_format():
    prompt = format_mc_prompt("Which?", ["A. red", "green"], with_audio=True)
    lines = prompt.split("\n")
    assert lines[0].startswith("Select the best answer") and "video and its audio" in lines[0]
    assert "(A, B)" in lines[0]
    assert lines[1:4] == ["Which?", "A. red", "B. green"]
    assert lines[-1] == "Answer with the option's letter from the given choices directly."
    assert "its audio" not in format_mc_prompt("Which?", ["x", "y"], with_audio=False)
    assert format_mc_prompt("Q", ["x", "y"], instruction=None, suffix=None) == "Q\nA. x\nB. y"


def _main_table_script():
    import importlib.util
    import sys
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "benchmarks" / "main_table.py"
    spec = importlib.util.spec_from_file_location("main_table_writer", path)
    mt = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mt  # dataclasses look their module up
    spec.loader.exec_module(mt)
    return mt


def _table_row(method, budget, av, video):
    return {"method": method, "budget": budget, "AV avg": av, "Video avg": video, "AV rel": "n/a", "Video rel": "n/a",
            "Rel": "n/a", "overall acc": "n/a", "realised": "n/a", "layer-avg": "n/a", "n": "4", "note": ""}


MAIN_ROWS = [
    _table_row("Full", "100%", "60.0", "80.0"),
    _table_row("FastV", "20%", "55.0", "70.0"),
    _table_row("FastV", "10%", "50.0", "n/a"),
    _table_row("EchoingPixels", "20%", "58.0", "79.0"),
]


def test_main_table_writer_records_command_commit_and_figure(tmp_path):
    mt = _main_table_script()
    md, csv_path = mt.write_outputs(MAIN_ROWS, tmp_path, "toy", "python benchmarks/main_table.py --scale toy", "hdr", "abc1234")
    text = md.read_text()
    assert "Command: `python benchmarks/main_table.py --scale toy`" in text and "Commit: `abc1234`" in text
    assert "![accuracy against budget](main_table_toy.png)" in text
    assert (tmp_path / "main_table_toy.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert csv_path.read_text().splitlines()[0].startswith("method,budget,AV avg,Video avg")


def test_main_table_figure_plots_accuracy_against_budget_per_method(tmp_path):
    mt = _main_table_script()
    av, video = mt.table_figure(MAIN_ROWS, "t").axes
    lines = {ln.get_label(): (list(ln.get_xdata()), list(ln.get_ydata())) for ln in av.lines}
    # budgets ascending; Full is the horizontal reference at its accuracy
    assert lines["FastV"] == ([10.0, 20.0], [50.0, 55.0])
    assert lines["EchoingPixels"] == ([20.0], [58.0])
    assert lines["Full (100%)"][1] == [60.0, 60.0]
    assert av.get_xscale() == "log"
    video_lines = {ln.get_label(): list(ln.get_ydata()) for ln in video.lines}
    assert video_lines["FastV"] == [70.0]  # the n/a cell is left out, not drawn as 0
    # a recorded csv is redrawn without evaluating anything; a csv of another table is named
    mt.write_outputs(MAIN_ROWS, tmp_path / "rec", "toy", "cmd", "hdr", "abc1234")
    png = mt.plot_from(tmp_path / "rec" / "main_table_toy.csv", tmp_path / "fig")
    assert png == tmp_path / "fig" / "main_table_toy.png" and png.read_bytes()[:4] == b"\x89PNG"
    other = tmp_path / "other.csv"
    other.write_text("a,b\n1,2\n")
    with pytest.raises(ValueError, match=r"other\.csv has no column\(s\) \['AV avg', 'Video avg', 'budget', 'method'\]"):
        mt.plot_from(other, tmp_path / "fig")
