"""Resumable table rows: each row is ``ep-kit fit`` (when it trains) then ``ep-kit test``, run once.

Why: a real-scale table is a dozen multi-GPU jobs of hours each; a preempted or crashed driver must
not redo finished rows, and an interrupted training must continue from its last checkpoint. Each
row owns a directory under the driver's output folder:

* ``rows/<key>/fit/version_0/checkpoints/last.ckpt`` -- the training run (fixed logger version, so a
  rerun finds it and passes ``--ckpt_path`` to continue);
* ``rows/<key>/fit_done.json`` -- written once the fit finished (the checkpoint that is evaluated);
* ``rows/<key>/test/version_0/test_metrics.json`` -- written by the module at the end of ``test``;
* ``rows/<key>/result.json`` -- metrics, commands, checkpoint, commit: a finished row, never rerun.

Every step is a plain ``ep-kit`` command line (recorded in the result), run in a child process by
default so that Lightning launches DDP / DeepSpeed / FSDP ranks exactly as from a shell; ``launch``
replaces ``ep-kit`` (``srun ep-kit``, ``torchrun --nproc-per-node 4 -m ep_kit.cli``). ``in_process=True`` runs the same
arguments through :func:`ep_kit.cli.run` in this process (single-process runs: tests, CPU smoke).
"""

from __future__ import annotations

import json
import shlex
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from ep_kit.recipes import config_args

#: the command that runs ``ep-kit`` in a child process (the current interpreter's installation).
EP_KIT = (sys.executable, "-m", "ep_kit.cli")
METRICS_FILE = "test_metrics.json"


@dataclass
class RowSpec:
    """One table row: ``fit`` arguments (None for a training-free row) and ``test`` arguments."""

    key: str
    test: list[str]
    fit: list[str] | None = None


@dataclass
class RowResult:
    """A finished row: what was measured, how, and with which weights."""

    key: str
    metrics: dict[str, float]
    commands: list[str]
    checkpoint: str | None
    commit: str
    seconds: float
    resumed: bool = field(default=False)


def git_commit(repo: Path) -> str:
    """Short commit of ``repo`` (``+uncommitted`` when tracked code differs; results folders excluded)."""
    try:
        head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=repo, capture_output=True, text=True)
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no", "--", ".", ":!benchmarks/results"],
            cwd=repo, capture_output=True, text=True,
        ).stdout
    except OSError:
        return "unknown"
    return (head.stdout.strip() or "unknown") + ("+uncommitted" if dirty.strip() else "")


def logger_args(save_dir: Path, name: str) -> list[str]:
    """A CSV logger at a fixed version, so a rerun finds the same run directory."""
    return [
        "--trainer.logger=lightning.pytorch.loggers.CSVLogger",
        f"--trainer.logger.init_args.save_dir={save_dir}",
        f"--trainer.logger.init_args.name={name}",
        "--trainer.logger.init_args.version=0",
    ]


class RowRunner:
    """Runs :class:`RowSpec` s into ``root/rows/<key>``, skipping finished rows and resuming fits.

    Args:
        root: the driver's output folder.
        launch: the command that runs ``ep-kit`` in a child process (default: this Python's
            ``-m ep_kit.cli``; e.g. ``srun ep-kit`` on SLURM).
        extra: arguments appended to every ``fit`` and ``test`` (hardware overlays, path files).
        fit_extra: arguments appended to every ``fit`` only (e.g. a training trainer file, ``max_steps``).
        test_extra: arguments appended to every ``test`` only (e.g. an evaluation trainer file).
        in_process: run through :func:`ep_kit.cli.run` in this process instead of a child.
        repo: repository whose commit is recorded.
    """

    def __init__(
        self,
        root: Path,
        launch: Sequence[str] = EP_KIT,
        extra: Sequence[str] = (),
        fit_extra: Sequence[str] = (),
        test_extra: Sequence[str] = (),
        in_process: bool = False,
        repo: Path | None = None,
    ) -> None:
        self.root = Path(root)
        self.launch = list(launch)
        self.extra = list(extra)
        self.fit_extra = list(fit_extra)
        self.test_extra = list(test_extra)
        self.in_process = in_process
        self.repo = repo or Path(__file__).resolve().parents[1]

    def row_dir(self, key: str) -> Path:
        return self.root / "rows" / key

    def run(self, spec: RowSpec) -> RowResult:
        d = self.row_dir(spec.key)
        done = d / "result.json"
        if done.is_file():
            return RowResult(**{**json.loads(done.read_text()), "resumed": True})
        d.mkdir(parents=True, exist_ok=True)
        start, commands = time.time(), []
        checkpoint = self._fit(spec, d, commands) if spec.fit is not None else None
        test = ["test", *spec.test, *self.extra, *self.test_extra, *logger_args(d, "test")]
        if checkpoint is not None:
            test.append(f"--model.init_from={checkpoint}")
        commands.append(self._call(test))
        metrics_file = d / "test" / "version_0" / METRICS_FILE
        if not metrics_file.is_file():
            raise RuntimeError(f"row {spec.key}: `ep-kit test` wrote no {metrics_file}")
        result = RowResult(
            key=spec.key, metrics=json.loads(metrics_file.read_text()), commands=commands,
            checkpoint=checkpoint, commit=git_commit(self.repo), seconds=round(time.time() - start, 1),
        )
        payload = asdict(result)
        payload.pop("resumed")
        done.write_text(json.dumps(payload, indent=2, sort_keys=True))
        return result

    def _fit(self, spec: RowSpec, d: Path, commands: list[str]) -> str:
        marker = d / "fit_done.json"
        if marker.is_file():
            info = json.loads(marker.read_text())
            commands.extend(info["commands"])
            return info["checkpoint"]
        last = d / "fit" / "version_0" / "checkpoints" / "last.ckpt"
        args = ["fit", *(spec.fit or []), *self.extra, *self.fit_extra, *logger_args(d, "fit")]
        if last.exists():  # an interrupted fit: continue where its last checkpoint left off
            args.append(f"--ckpt_path={last}")
        commands.append(self._call(args))
        if not last.exists():
            raise RuntimeError(f"row {spec.key}: `ep-kit fit` left no {last} (is ModelCheckpoint(save_last=True) set?)")
        marker.write_text(json.dumps({"checkpoint": str(last), "commands": commands}, indent=2))
        return str(last)

    def _call(self, args: list[str]) -> str:
        """Run one ``ep-kit`` command (child process or in process); returns it as a shell line."""
        line = " ".join(shlex.quote(a) for a in ["ep-kit", *args])
        print(f"[runs] {line}", flush=True)
        if self.in_process:
            _run_in_process(args)
        else:
            result = subprocess.run([*self.launch, *args], check=False)
            if result.returncode != 0:
                raise RuntimeError(f"`{line}` failed with exit code {result.returncode}")
        return line


def _run_in_process(args: list[str]) -> Any:
    from ep_kit.cli import program_argv, run

    with program_argv():  # the CLI must see exactly ``args``
        return run(args)


# ------------------------------------------------------------------------- table drivers
@dataclass
class RealScale:
    """What a real-scale table driver needs: the runner and the two path overlays."""

    runner: RowRunner
    paths_train: Path
    paths_eval: Path
    source: str  # "stand-in DIR" or "local data", for the results header

    def trained_row(self, key: str, recipe: Path | str, seed: int, *test_extra: str) -> RowSpec:
        """Fit ``recipe`` on the training paths, then test its weights on every benchmark.

        A budget or ablation overlay runs on its EchoingPixels base (:func:`ep_kit.recipes.config_args`).
        """
        seed_arg = f"--seed_everything={seed}"
        evaluation = self.runner.repo / "recipes" / "eval_benchmarks.yaml"
        recipe_args = config_args(recipe)
        return RowSpec(
            key,
            fit=[*recipe_args, "--config", str(self.paths_train), seed_arg],
            test=[*recipe_args, "--config", str(evaluation), "--config", str(self.paths_eval), seed_arg, *test_extra],
        )

    def evaluation_row(self, key: str, *configs: Path | str) -> RowSpec:
        """Test ``configs`` (an evaluation base and its overlays) on every benchmark; nothing is trained."""
        return RowSpec(key, test=[a for c in (*configs, self.paths_eval) for a in ("--config", str(c))])


def add_real_scale_arguments(parser: Any) -> None:
    """The options both table drivers take at ``--scale real`` (argparse)."""
    g = parser.add_argument_group("real scale")
    g.add_argument("--standin", type=Path, help="run on the stand-in in DIR (written there if missing), on CPU")
    g.add_argument("--paths-train", type=Path, help="path overlay for training (model dir, instruction data)")
    g.add_argument("--paths-eval", type=Path, help="path overlay for evaluation (model dir, the benchmarks)")
    g.add_argument("--model", help="the local Qwen2.5-Omni directory (overrides model.thinker.init_args.path)")
    g.add_argument("--trainer", type=Path, help="trainer file for training rows (GPUs, nodes, strategy)")
    g.add_argument("--eval-trainer", type=Path, help="trainer file for evaluations")
    g.add_argument("--launch", default="", help='the command that runs ep-kit, e.g. "srun ep-kit" or '
                   '"torchrun --nproc-per-node 4 -m ep_kit.cli" (default: this Python, -m ep_kit.cli)')
    g.add_argument("--in-process", action="store_true", help="run each step in this process (single process)")


def real_scale_from_args(args: Any, out: Path, quick: bool) -> RealScale:
    """Build the runner from the parsed options; ``--standin`` writes the stand-in when missing."""
    extra: list[str] = []
    if args.standin is not None:
        from ep_kit.standin import write_standin

        s = write_standin(args.standin)
        paths_train, paths_eval, source = s.paths_train, s.paths_eval, f"stand-in {s.root}"
        extra += ["--config", str(s.cpu), f"--data.init_args.cache_dir={out / 'sample-cache'}"]
    elif args.paths_train is None or args.paths_eval is None:
        raise SystemExit("--scale real needs --standin DIR, or --paths-train and --paths-eval (see README, Real scale)")
    else:
        paths_train, paths_eval, source = args.paths_train, args.paths_eval, "local data"
    for path in (paths_train, paths_eval, args.trainer, args.eval_trainer):
        if path is not None and not Path(path).is_file():
            raise SystemExit(f"{path} does not exist")
    if args.model:
        extra.append(f"--model.thinker.init_args.path={args.model}")
    fit_extra = (["--trainer", str(args.trainer)] if args.trainer else []) + (["--trainer.max_steps=2"] if quick else [])
    test_extra = ["--trainer", str(args.eval_trainer)] if args.eval_trainer else []
    launch = shlex.split(args.launch) if args.launch else list(EP_KIT)
    runner = RowRunner(out, launch=launch, extra=extra, fit_extra=fit_extra, test_extra=test_extra,
                       in_process=args.in_process)
    return RealScale(runner, Path(paths_train), Path(paths_eval), source)
