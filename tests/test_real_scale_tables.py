"""Real-scale table drivers and distributed runs, end to end on the stand-in (CPU).

* ``benchmarks/ablation.py --scale real`` and ``benchmarks/main_table.py --scale real`` with
  ``--standin DIR --quick``: every row fits (when it trains) and tests; the tables carry the paper's
  numbers, each row's commands, commit, checkpoint and realised budget.
* :class:`ep_kit.runs.RowRunner`: a finished row is not run again; an interrupted fit continues
  from its ``last.ckpt``; the default child-process launch works.
* 2-process CPU DDP: ``ep-kit fit`` + ``ep-kit test`` with ``--trainer.devices=2 --trainer.strategy=ddp``,
  whose test metrics equal a 1-process test of the same checkpoint.
"""

from __future__ import annotations

import csv
import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from _toy import REPO

from ep_kit.data.benchmarks import BENCHMARK_GROUPS
from ep_kit.runs import RowRunner, RowSpec

RECIPES = REPO / "recipes"


def load_script(name: str):
    spec = importlib.util.spec_from_file_location(name, REPO / "benchmarks" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # dataclasses look their module up
    spec.loader.exec_module(module)
    return module


def cpu_args(standin, cache: Path) -> list[str]:
    return ["--config", str(standin.cpu), f"--data.init_args.cache_dir={cache}"]


@pytest.mark.slow
def test_ablation_real_scale_on_the_standin(standin, tmp_path):
    ablation = load_script("ablation")
    md = ablation.main(["--scale", "real", "--standin", str(standin.root), "--quick", "--in-process",
                        "--out", str(tmp_path)])
    text = md.read_text()
    rows = list(csv.DictReader((tmp_path / "ablation_real_quick.csv").open()))
    assert [r["recipe"] for r in rows] == [r[0] for r in ablation.ROWS]  # every row, paper order
    for r in rows:
        assert float(r["paper_daily_omni"]) == dict((k, p) for k, _, p in ablation.ROWS)[r["recipe"]]
        assert Path(r["checkpoint"]).is_file() and r["checkpoint"].endswith("last.ckpt")
        assert "ep-kit fit --config" in r["commands"] and "ep-kit test --config" in r["commands"]
        assert abs(float(r["realised_keep_ratio"]) - 0.2) < 0.01  # every ablation row is at 20%
    assert "Commit: `" in text and "## Runs" in text and (tmp_path / "ablation_real_quick.png").is_file()
    # each row's test wrote its questions: Daily-Omni intervals and the orderings' verdicts (28 pairs)
    assert "## Daily-Omni with intervals" in text and text.count("| reproduced |") + text.count(
        "| refuted |") + text.count("| unresolved |") == 28


@pytest.mark.slow
def test_main_table_real_scale_on_the_standin_and_resume(standin, tmp_path):
    mt = load_script("main_table")
    argv = ["--scale", "real", "--standin", str(standin.root), "--quick", "--in-process", "--out", str(tmp_path)]
    assert mt.main(argv) == 0
    rows = list(csv.DictReader((tmp_path / "main_table_real_quick.csv").open()))
    cells = [(r["method"], r["budget"]) for r in rows]
    assert cells[0] == ("Full", "100%") and len(cells) == 1 + len(mt.METHODS) * 3
    full = rows[0]
    for group, column in (("audio_visual", "AV avg"), ("video_only", "Video avg")):
        # Group averages come from the shared definition: the mean of the member benchmarks.
        mean = sum(float(full[b]) for b in BENCHMARK_GROUPS[group]) / len(BENCHMARK_GROUPS[group])
        assert float(full[column]) == pytest.approx(mean, abs=0.06)
    assert full["paper AV avg"] == "56.1" and full["paper Rel"] == "100.0"
    ep = [r for r in rows if r["method"] == "EchoingPixels"]
    assert [r["paper Rel"] for r in ep] == ["99.0", "95.2", "91.0"]
    assert all(Path(r["checkpoint"]).is_file() for r in ep)
    assert all(r["checkpoint"] == "-" for r in rows if r["method"] not in ("EchoingPixels",))
    # Resume: a finished row is never run again; a row whose results are gone runs its test again
    # with its finished fit's checkpoint (no new training).
    root = tmp_path / "main_table_real_quick" / "rows"
    kept = {p: p.stat().st_mtime_ns for p in root.glob("*/result.json")}
    (root / "fastv_10" / "result.json").unlink()
    assert mt.main(argv) == 0
    redone = {p for p, t in kept.items() if not p.is_file() or p.stat().st_mtime_ns != t}
    assert redone == {root / "fastv_10" / "result.json"}


@pytest.mark.slow
def test_interrupted_fit_continues_from_its_last_checkpoint(standin, tmp_path):
    recipe = str(RECIPES / "cs2_ste_20.yaml")
    spec = RowSpec(
        "row",
        fit=["--config", recipe, "--config", str(standin.paths_train)],
        test=["--config", recipe, "--config", str(RECIPES / "eval_benchmarks.yaml"), "--config", str(standin.paths_eval)],
    )
    extra = cpu_args(standin, tmp_path / "cache")
    crash = tmp_path / "crash.yaml"  # checkpoint every step, die in step 2 before its checkpoint (a killed job)
    crash.write_text(
        "trainer:\n  callbacks:\n"
        "    - class_path: lightning.pytorch.callbacks.ModelCheckpoint\n"
        "      init_args: {save_last: true, every_n_train_steps: 1, save_top_k: -1}\n"
        "    - class_path: ep_kit.train.callbacks.StopAfterSteps\n      init_args: {steps: 2}\n"
    )
    first = RowRunner(tmp_path, extra=extra, fit_extra=["--config", str(crash)], in_process=True)
    with pytest.raises(RuntimeError, match="simulated kill"):
        first.run(spec)
    d = first.row_dir("row")
    last = d / "fit" / "version_0" / "checkpoints" / "last.ckpt"
    assert torch.load(last, map_location="cpu", weights_only=False)["global_step"] == 1
    assert not (d / "fit_done.json").exists()
    result = RowRunner(tmp_path, extra=extra, fit_extra=["--trainer.max_steps=3"], in_process=True).run(spec)
    assert any("--ckpt_path=" in c and c.startswith("ep-kit fit") for c in result.commands)
    ckpt = torch.load(result.checkpoint, map_location="cpu", weights_only=False)
    assert ckpt["global_step"] == 3  # trained on from step 1, not restarted
    assert result.metrics["test/count"] == 10


@pytest.mark.slow
def test_runner_child_process_launch(standin, tmp_path):
    """The default launch: each step is a real ``python -m ep_kit.cli`` process."""
    spec = RowSpec("full", test=["--config", str(RECIPES / "eval_3b.yaml"), "--config", str(standin.paths_eval)])
    result = RowRunner(tmp_path, extra=cpu_args(standin, tmp_path / "cache")).run(spec)
    assert result.commands[0].startswith("ep-kit test --config") and result.metrics["test/count"] == 10
    assert set(BENCHMARK_GROUPS["audio_visual"]) <= {k.split("/")[2] for k in result.metrics if k.startswith("test/acc/")}


def ep_kit(*args: str, cwd: Path) -> None:
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    result = subprocess.run([sys.executable, "-m", "ep_kit.cli", *args], cwd=cwd, env=env,
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]


@pytest.mark.slow
def test_two_process_ddp_fit_and_test_match_one_process(standin, tmp_path):
    recipe = str(RECIPES / "cs2_ste_20.yaml")
    cache = tmp_path / "cache"
    ddp = ["--trainer.devices=2", "--trainer.strategy=ddp"]

    def logger(name: str) -> list[str]:
        return [f"--trainer.logger.init_args.save_dir={tmp_path}", f"--trainer.logger.init_args.name={name}",
                "--trainer.logger.init_args.version=0"]

    ep_kit("fit", "--config", recipe, "--config", str(standin.paths_train), *cpu_args(standin, cache), *ddp,
           "--trainer.max_steps=2", *logger("fit"), cwd=tmp_path)
    ckpt = tmp_path / "fit" / "version_0" / "checkpoints" / "last.ckpt"
    assert torch.load(ckpt, map_location="cpu", weights_only=False)["global_step"] == 2
    test = ["test", "--config", recipe, "--config", str(RECIPES / "eval_benchmarks.yaml"),
            "--config", str(standin.paths_eval), *cpu_args(standin, cache), f"--model.init_from={ckpt}"]
    ep_kit(*test, *ddp, *logger("test2"), cwd=tmp_path)
    ep_kit(*test, *logger("test1"), cwd=tmp_path)
    two = json.loads((tmp_path / "test2" / "version_0" / "test_metrics.json").read_text())
    one = json.loads((tmp_path / "test1" / "version_0" / "test_metrics.json").read_text())
    assert one["test/count"] == 10 and two.keys() == one.keys()
    for key in one:
        assert two[key] == pytest.approx(one[key], abs=1e-6), key
