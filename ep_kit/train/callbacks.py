"""Callbacks of the ep-kit CLI: the prediction writer and a fault-injection stop for resume tests.

* :class:`AnswerWriter` writes ``ep-kit predict`` answers as jsonl (one line per question: question
  id, predicted and correct letter, kept tokens), so budgets can be compared question by question.
* :class:`StopAfterSteps` raises after N optimizer steps, the way a killed job stops: used by the
  kill-and-resume test and handy to check a recipe resumes.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from lightning.pytorch import Callback, LightningModule, Trainer
from lightning.pytorch.callbacks import BasePredictionWriter


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

    def on_predict_epoch_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if self._file is not None:
            print(f"[ep-kit] predictions written to {self._file}", flush=True)


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
