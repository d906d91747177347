"""The README's "Use the components in your own code" snippet runs as written, on a generated clip.

The snippet is taken from README.md between its ``<!-- snippet: compose-in-code`` marker and
``<!-- /snippet -->`` and executed in a directory holding ``clip.mp4`` (frames and an audio track,
written with PyAV). References: ``keep_count`` for the budgets, the head_dim-16 split the toy
recipes use for Sync-RoPE, and the snippet's own model before saving for the reloaded ones.
"""

from __future__ import annotations

import re
from pathlib import Path

import torch

from ep_kit.budget import keep_count
from ep_kit.data.synthetic import Event, render_events, write_av_clip

README = Path(__file__).resolve().parents[1] / "README.md"


def readme_snippet() -> str:
    text = README.read_text()
    match = re.search(r"<!-- snippet: compose-in-code.*?-->\s*```python\n(.*?)```\s*<!-- /snippet -->", text, re.S)
    assert match, "README.md has no compose-in-code snippet between its markers"
    return match.group(1)


def test_snippet_names_the_one_change_for_a_real_directory():
    lines = [line for line in readme_snippet().splitlines() if line.startswith("MODEL =")]
    assert len(lines) == 1 and 'MODEL = "/data/Qwen2.5-Omni-3B"' in lines[0]


def test_readme_snippet_runs_as_written(tmp_path, monkeypatch):
    frames, audio = render_events(
        [Event("flash", 0.25, 0.5, colour="red"), Event("tone", 1.0, 0.5, pitch="low")], seconds=2.0, fps=4.0, size=56
    )
    write_av_clip(tmp_path / "clip.mp4", frames, 4.0, audio)
    monkeypatch.chdir(tmp_path)
    ns: dict = {"__name__": "readme_snippet"}
    exec(compile(readme_snippet(), str(README), "exec"), ns)

    model, p, out = ns["model"], ns["p"], ns["out"]
    assert model.rope.sections == [2, 2, 2, 2]  # recipes/toy/_base/syncrope.yaml's split of head_dim 16
    n = int(p.stats["n_candidates"][0])
    assert n == int(p.stats["n_video"][0] + p.stats["n_audio"][0]) > 0 and int(p.stats["n_audio"][0]) > 0
    assert int(p.stats["kept_candidates"][0]) == keep_count(n, 0.2)
    assert ns["tokens"].shape[0] == 1 and 1 <= ns["tokens"].shape[1] <= 8
    assert ns["batch"]["choice_token_ids"].shape == (1, 4)

    same, cheaper = ns["same"], ns["cheaper"]
    with torch.no_grad():
        again = same(ns["batch"])
        low = cheaper.prefill(ns["batch"])
    assert torch.equal(again.kept.source_index, out.kept.source_index)
    torch.testing.assert_close(again.logits, out.logits, rtol=0, atol=0)
    assert cheaper.keep_ratio == 0.1 and int(low.stats["kept_candidates"][0]) == keep_count(n, 0.1)
