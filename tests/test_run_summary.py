"""Runs say where they went: the end-of-run summary, its next command (run here), and line progress off a terminal.

Expected paths are found on disk (``rglob``) and the summary's next command is executed as printed,
so a wrong path or a command that does not run fails the test.
"""

from __future__ import annotations

import json
import re
import shlex
from pathlib import Path

import pytest
from _toy import TOY_ROW, toy_args

from ep_kit.cli import run
from ep_kit.train.callbacks import LineProgress


def _summary(out: str) -> dict[str, str]:
    """``{field: value}`` of the ``[ep-kit]`` summary lines (``next`` holds the command)."""
    fields = {}
    pattern = re.compile(r"^\[ep-kit\] +(?:\w+ finished: )?(run directory|config|best ckpt|last ckpt|metrics|predictions|next:)"
                         r"\s+(.+)$")
    for line in out.splitlines():
        m = pattern.match(line.strip())
        if m:
            fields.setdefault(m[1].rstrip(":"), m[2])
    return fields


def _ep_kit(command: str) -> list[str]:
    argv = shlex.split(command)
    assert argv[0] == "ep-kit"
    return argv[1:]


@pytest.mark.slow
def test_fit_test_predict_summaries_name_their_files_and_the_next_command_runs(tmp_path, capsys):
    args = [*toy_args(tmp_path, num_train=4, num_val=2, num_test=2), "--trainer.enable_progress_bar=true"]
    run(["fit", "--config", str(TOY_ROW), *args])
    out = capsys.readouterr().out
    # off a terminal (pytest captures stdout): progress as lines, first and last batch of each loop
    assert "[ep-kit] train epoch 0 batch 1/1" in out
    assert "[ep-kit] validate epoch 0 batch 1/1" in out
    fit = _summary(out)
    run_dir = next((tmp_path / "runs").rglob("config.yaml")).parent
    last = next((tmp_path / "runs").rglob("last.ckpt"))
    assert Path(fit["run directory"]).resolve() == run_dir.resolve()
    assert Path(fit["last ckpt"]).resolve() == last.resolve()
    assert fit["best ckpt"].startswith("none")  # the toy recipe keeps only last.ckpt
    assert Path(fit["metrics"]).resolve() == (run_dir / "metrics.csv").resolve()
    assert fit["next"].startswith("ep-kit test --config")

    run(_ep_kit(fit["next"]))  # the printed command, as printed
    test = _summary(capsys.readouterr().out)
    test_dir = Path(test["run directory"])
    assert test_dir.resolve() != run_dir.resolve()
    metrics = json.loads((test_dir / "test_metrics.json").read_text())
    assert metrics["test/count"] == 2
    assert test["next"].startswith("ep-kit predict --config") and "--ckpt_path" in test["next"]

    run(_ep_kit(test["next"]))
    predict = _summary(capsys.readouterr().out)
    rows = [json.loads(line) for line in Path(predict["predictions"]).read_text().splitlines()]
    assert len(rows) == 2
    assert all({"question", "options", "answer", "target", "correct", "kept_video", "kept_audio"} <= set(r)
               for r in rows)
    assert predict["next"].startswith("ep-kit answer --video CLIP.mp4")


def test_line_progress_rejects_a_negative_interval():
    with pytest.raises(ValueError, match="every_n_seconds"):
        LineProgress(every_n_seconds=-1)


def test_tensorboard_is_one_logger_option(tmp_path, capsys):
    """The README's ``--trainer.logger=TensorBoardLogger``: event files in the run directory the summary names."""
    args = [a for a in toy_args(tmp_path, num_train=4, num_val=2, num_test=2) if not a.startswith("--trainer.logger")]
    run(["fit", "--config", str(TOY_ROW), *args, "--trainer.logger=TensorBoardLogger",
         f"--trainer.logger.save_dir={tmp_path / 'tb'}"])
    fit = _summary(capsys.readouterr().out)
    events = list((tmp_path / "tb").rglob("events.out.tfevents.*"))
    assert events and Path(fit["run directory"]).resolve() == events[0].parent.resolve()
