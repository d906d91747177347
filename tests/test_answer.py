"""``ep-kit answer`` on a generated clip, and the kept-token records and figure it writes.

References are computed by hand: token counts from the clip's frame grid (frames x merged patches)
and its decoded audio length (Whisper hop and the audio encoder's two stride-2 stages), the
budget with :func:`ep_kit.budget.keep_count`, grid cells from the token order.
"""

from __future__ import annotations

import json

import numpy as np
import torch
from _toy import TOY_ROW
from matplotlib.patches import Rectangle

from ep_kit.budget import keep_count
from ep_kit.cli import main
from ep_kit.data.media import load_audio
from ep_kit.data.synthetic import Event, render_events, write_av_clip
from ep_kit.kept import kept_figure, kept_positions
from ep_kit.sequence import Modality
from ep_kit.tokens import audio_tokens_from_mel

T, V, A, P = int(Modality.TEXT), int(Modality.VIDEO), int(Modality.AUDIO), int(Modality.PAD)


def test_kept_positions_maps_token_order_to_grid_cells_and_times():
    # 2 temporal patches of a 4x6-patch frame (merge 2: 2x3 = 6 cells each), audio interleaved after patch 0.
    modality = torch.tensor([T] + [V] * 6 + [A] * 3 + [V] * 6 + [A] * 2 + [T, P])
    kept = torch.tensor([0, 3, 8, 12, 16, 18, -1])  # text 0, video ranks 2 and 8, audio ranks 1 and 3, text 18
    out = kept_positions(modality, kept, (2, 4, 6), 0.5, 2, 25.0)
    assert out == [
        {"modality": "video", "index": 3, "rank": 2, "frame": 0, "row": 0, "col": 2, "time": 0.0},
        {"modality": "audio", "index": 8, "rank": 1, "time": 0.04},
        {"modality": "video", "index": 12, "rank": 8, "frame": 1, "row": 0, "col": 2, "time": 0.5},
        {"modality": "audio", "index": 16, "rank": 3, "time": 0.12},
    ]


def test_kept_figure_has_one_panel_per_temporal_patch_and_outlines_the_kept_cells():
    frames = np.zeros((6, 56, 84, 3), dtype=np.uint8)  # 3 temporal patches, 4x6 patches: 2x3 cells
    positions = [
        {"modality": "video", "frame": 0, "row": 1, "col": 2},
        {"modality": "video", "frame": 2, "row": 0, "col": 0},
        {"modality": "video", "frame": 2, "row": 1, "col": 1},
        {"modality": "audio", "time": 0.2},
    ]
    fig = kept_figure(frames, positions, (3, 4, 6), n_audio=50, audio_tokens_per_second=25.0)
    panels, audio = fig.axes[:3], fig.axes[3]
    assert len(fig.axes) == 4
    boxes = [[p for p in ax.patches if isinstance(p, Rectangle)] for ax in panels]
    assert [len(b) for b in boxes] == [1, 0, 2]
    assert boxes[0][0].get_xy() == (2 * 28.0, 1 * 28.0)  # col 2, row 1 of 28-pixel cells
    assert audio.get_xlim() == (0.0, 2.0)  # 50 tokens at 25 per second


def _clip(path):
    frames, audio = render_events(
        [Event("flash", 0.5, 1.0, colour="red"), Event("tone", 2.0, 1.0, pitch="low")], 4, 10, 56
    )
    write_av_clip(path, frames, 10, audio)
    return path


def test_answer_command_prints_the_answer_and_writes_what_was_kept(tmp_path, capsys):
    clip = _clip(tmp_path / "clip.mp4")
    out = tmp_path / "out"
    main(["answer", "--video", str(clip), "--question", "Which colour flashes?", "--options", "red", "green",
          "blue", "yellow", "--config", str(TOY_ROW), "--keep_ratio", "0.2", "--output_dir", str(out)])
    printed = capsys.readouterr().out
    record = json.loads((out / "kept.json").read_text())
    assert (out / "kept.png").stat().st_size > 0

    # By hand: the toy recipe samples 2 frames/s at 56 px: 4 s = 8 frames = 4 temporal patches of
    # 4x4 vision patches, 2x2 merged: 16 video tokens; audio: one token per 4 mel frames (hop 160).
    n_video = (4 * 2 / 2) * (56 // 28) ** 2
    n_audio = audio_tokens_from_mel(len(load_audio(clip)) // 160)
    counts = record["counts"]
    assert counts["video"]["total"] == n_video
    assert counts["audio"]["total"] == n_audio
    assert counts["video"]["kept"] + counts["audio"]["kept"] == keep_count(int(n_video + n_audio), 0.2)
    tokens = record["tokens"]
    for name in ("video", "audio"):
        assert sum(t["modality"] == name for t in tokens) == counts[name]["kept"]
    assert len({t["index"] for t in tokens}) == len(tokens)
    for t in tokens:
        if t["modality"] == "video":
            assert 0 <= t["frame"] < 4 and 0 <= t["row"] < 2 and 0 <= t["col"] < 2
        else:
            assert 0 <= t["time"] < 4.1
    assert record["answer"][0] in "ABCD" and record["answer"][3:] in ("red", "green", "blue", "yellow")
    assert f"answer: {record['answer']}" in printed
    assert f"video {counts['video']['kept']}/16, audio {counts['audio']['kept']}/{n_audio}" in printed


def test_answer_without_options_generates_and_reports_a_missing_clip(tmp_path, capsys):
    import pytest

    clip = _clip(tmp_path / "clip.mp4")
    main(["answer", "--video", str(clip), "--question", "What happens?", "--config", str(TOY_ROW),
          "--keep_ratio", "0.5", "--max_new_tokens", "3", "--output_dir", str(tmp_path / "o")])
    record = json.loads((tmp_path / "o" / "kept.json").read_text())
    assert record["options"] is None and isinstance(record["answer"], str)
    n = record["counts"]["video"]["total"] + record["counts"]["audio"]["total"]
    assert record["counts"]["video"]["kept"] + record["counts"]["audio"]["kept"] == keep_count(n, 0.5)
    with pytest.raises(FileNotFoundError, match="--video: .*nowhere.mp4 does not exist"):
        main(["answer", "--video", str(tmp_path / "nowhere.mp4"), "--question", "?", "--config", str(TOY_ROW)])
