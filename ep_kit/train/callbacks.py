"""Callbacks of the ep-kit CLI: the prediction writer, line progress, the run summary, a fault-injection stop.

* :class:`AnswerWriter` writes ``ep-kit predict`` answers as jsonl (one line per question: the
  question and options, the answer, the target and whether they agree, kept tokens per modality),
  so budgets can be compared question by question.
* :class:`LineProgress` logs progress as periodic plain lines: the CLI uses it when stdout is not a
  terminal (a redirected or batch-scheduled run), where Lightning's live bar would print nothing.
* :func:`run_summary` is what the CLI prints when a run ends: where its files went and what to run next.
* :class:`StopAfterSteps` raises after N optimizer steps, the way a killed job stops: used by the
  kill-and-resume test and handy to check a recipe resumes.
"""

from __future__ import annotations

import json
import shlex
import time
from pathlib import Path
from typing import Any

from lightning.pytorch import Callback, LightningModule, Trainer
from lightning.pytorch.callbacks import BasePredictionWriter, ModelCheckpoint, ProgressBar


class AnswerWriter(BasePredictionWriter):
    """Write predictions as jsonl.

    Args:
        output_path: the file to write; None = ``<trainer.log_dir>/predictions.jsonl``. With several
            ranks each writes ``<stem>.rank<N>.jsonl`` beside it.
    """

    def __init__(self, output_path: str | None = None) -> None:
        super().__init__(write_interval="batch")
        self.output_path = output_path
        self._file: Path | None = None

    def _target(self, trainer: Trainer) -> Path:
        if self.output_path is not None:
            path = Path(self.output_path)
        else:
            path = Path(trainer.log_dir or ".") / "predictions.jsonl"
        if trainer.world_size > 1:
            path = path.with_name(f"{path.stem}.rank{trainer.global_rank}{path.suffix}")
        return path

    def on_predict_epoch_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._file = self._target(trainer)
        self._file.parent.mkdir(parents=True, exist_ok=True)
        self._file.write_text("")

    def write_on_batch_end(
        self,
        trainer: Trainer,
        pl_module: LightningModule,
        prediction: Any,
        batch_indices: Any,
        batch: Any,
        batch_idx: int,
        dataloader_idx: int,
    ) -> None:
        if self._file is None or not prediction:
            return
        with self._file.open("a") as handle:
            for record in prediction:
                handle.write(json.dumps(record) + "\n")

    @property
    def written(self) -> Path | None:
        """The file the last ``predict`` wrote (None before one ran)."""
        return self._file


class LineProgress(ProgressBar):
    """Progress as plain lines, one at the first and last batch of every loop and every ``every_n_seconds`` between.

    Why: Lightning's live bars redraw one terminal line; with stdout redirected to a file the Rich
    bar writes nothing at all, so a long run looks dead. Each line names the stage, epoch, batch
    count, elapsed time and the progress-bar metrics (e.g. ``train/loss``).

    Args:
        every_n_seconds: least time between two lines of one loop (0: a line per batch).
    """

    def __init__(self, every_n_seconds: float = 30.0) -> None:
        super().__init__()
        if every_n_seconds < 0:
            raise ValueError(f"LineProgress.every_n_seconds must be >= 0, got {every_n_seconds}")
        self.every_n_seconds = float(every_n_seconds)
        self._enabled = True
        self._start = 0.0
        self._last = 0.0

    def disable(self) -> None:
        self._enabled = False

    def enable(self) -> None:
        self._enabled = True

    def _begin(self) -> None:
        self._start = self._last = time.monotonic()
        self.reset_dataloader_idx_tracker()

    def _line(self, stage: str, done: int, total: int | float, trainer: Trainer, pl_module: LightningModule) -> None:
        now = time.monotonic()
        first_or_last = done == 1 or done == total
        if not self._enabled or trainer.sanity_checking or (
            not first_or_last and now - self._last < self.every_n_seconds
        ):
            return
        self._last = now
        of = "?" if total == float("inf") else int(total)
        metrics = {k: v for k, v in self.get_metrics(trainer, pl_module).items() if k != "v_num"}
        shown = "  ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in metrics.items())
        epoch = f" epoch {trainer.current_epoch}" if stage in ("train", "validate") else ""
        print(f"[ep-kit] {stage}{epoch} batch {done}/{of} ({now - self._start:.0f}s)  {shown}".rstrip(), flush=True)

    def _loader_line(
        self, stage: str, kind: str, batch_idx: int, dataloader_idx: int, trainer: Trainer, pl_module: LightningModule
    ) -> None:
        """An evaluation loop's line: the base class counts batches per loader (``total_<kind>_batches_current_dataloader``)."""
        self.has_dataloader_changed(dataloader_idx)
        self._line(stage, batch_idx + 1, getattr(self, f"total_{kind}_batches_current_dataloader"), trainer, pl_module)

    def on_train_epoch_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._begin()

    def on_train_batch_end(
        self, trainer: Trainer, pl_module: LightningModule, outputs: Any, batch: Any, batch_idx: int, *args: Any
    ) -> None:
        self._line("train", batch_idx + 1, self.total_train_batches, trainer, pl_module)

    def on_validation_epoch_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._begin()

    def on_validation_batch_end(
        self,
        trainer: Trainer,
        pl_module: LightningModule,
        outputs: Any,
        batch: Any,
        batch_idx: int,
        dataloader_idx: int = 0,
    ) -> None:
        self._loader_line("validate", "val", batch_idx, dataloader_idx, trainer, pl_module)

    def on_test_epoch_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._begin()

    def on_test_batch_end(
        self,
        trainer: Trainer,
        pl_module: LightningModule,
        outputs: Any,
        batch: Any,
        batch_idx: int,
        dataloader_idx: int = 0,
    ) -> None:
        self._loader_line("test", "test", batch_idx, dataloader_idx, trainer, pl_module)

    def on_predict_epoch_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._begin()

    def on_predict_batch_end(
        self,
        trainer: Trainer,
        pl_module: LightningModule,
        outputs: Any,
        batch: Any,
        batch_idx: int,
        dataloader_idx: int = 0,
    ) -> None:
        self._loader_line("predict", "predict", batch_idx, dataloader_idx, trainer, pl_module)


def _shown(path: Path | str) -> str:
    """``path`` relative to the working directory when under it (shorter commands), else absolute."""
    p = Path(path).resolve()
    try:
        return str(p.relative_to(Path.cwd()))
    except ValueError:
        return str(p)


def run_summary(
    trainer: Trainer, subcommand: str, ckpt_path: str | None = None, log_dir: str | None = None
) -> list[str]:
    """Lines naming where a finished ``fit|validate|test|predict`` went and the command to run next.

    The run directory (``trainer.log_dir``, with the ``config.yaml`` that reproduces the run), the
    best and last checkpoints of every :class:`ModelCheckpoint` (``fit``), the metrics file(s), the
    predictions file (``predict``), and the next command: after ``fit`` test the best (else last)
    checkpoint, after ``validate`` test, after ``test`` look at per-question answers with
    ``predict``, after ``predict`` ask about one clip with ``ep-kit answer``. Commands name the
    run's saved ``config.yaml``, so they run exactly this configuration (``model.init_from``
    included), plus ``--ckpt_path`` when the run was given one.
    """
    # ``trainer.log_dir`` broadcasts across ranks: a caller on rank zero only passes ``log_dir`` it read on all.
    log_dir = log_dir if log_dir is not None else trainer.log_dir
    log_dir = Path(log_dir) if log_dir else None
    lines = [f"{subcommand} finished: run directory {_shown(log_dir) if log_dir else '(no logger)'}"]
    config = log_dir / "config.yaml" if log_dir is not None else None
    config_arg = _shown(config) if config is not None and config.is_file() else "RECIPE.yaml"
    if config is not None and config.is_file():
        lines.append(f"  config        {config_arg}")
    best = last = None
    if subcommand == "fit":
        for cb in trainer.checkpoint_callbacks:
            if isinstance(cb, ModelCheckpoint):
                best = best or cb.best_model_path or None
                last = last or cb.last_model_path or None
        lines.append(f"  best ckpt     {_shown(best)}" if best else
                     "  best ckpt     none (no ModelCheckpoint monitors a metric: set monitor and save_top_k)")
        lines.append(f"  last ckpt     {_shown(last)}" if last else "  last ckpt     none (no ModelCheckpoint saves last)")
    if log_dir is not None:
        for name in ("metrics.csv", "test_metrics.json"):
            if (log_dir / name).is_file():
                lines.append(f"  metrics       {_shown(log_dir / name)}")
    written = next((cb.written for cb in trainer.callbacks if isinstance(cb, AnswerWriter) and cb.written), None)
    if written is not None:
        lines.append(f"  predictions   {_shown(written)}")
    ckpt = best or last or ckpt_path
    weights = f" --ckpt_path {shlex.quote(_shown(ckpt))}" if ckpt else ""
    nxt = {
        "fit": f"ep-kit test --config {shlex.quote(config_arg)}{weights}",
        "validate": f"ep-kit test --config {shlex.quote(config_arg)}{weights}",
        "test": f"ep-kit predict --config {shlex.quote(config_arg)}{weights}",
        "predict": "ep-kit answer --video CLIP.mp4 --question \"...\" --options A B C D --config "
        f"{shlex.quote(config_arg)}" + (f" --weights {shlex.quote(_shown(ckpt))}" if ckpt else ""),
    }[subcommand]
    lines.append(f"  next: {nxt}")
    return lines


class StopAfterSteps(Callback):
    """Raise :class:`KeyboardInterrupt`-like :class:`RuntimeError` once ``global_step`` reaches ``steps``.

    Simulates a job killed mid-epoch (after checkpoints for earlier steps were written).
    """

    def __init__(self, steps: int) -> None:
        if steps < 1:
            raise ValueError(f"StopAfterSteps.steps must be >= 1, got {steps}")
        self.steps = int(steps)

    def on_train_batch_end(self, trainer: Trainer, pl_module: LightningModule, *args: Any) -> None:
        if trainer.global_step >= self.steps:
            raise RuntimeError(f"StopAfterSteps: simulated kill after {trainer.global_step} steps")
