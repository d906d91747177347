"""A callback the reliability tests give ``ep-kit fit`` subprocesses (importable with ``PYTHONPATH=tests``).

:class:`RecordSamples` appends, per rank, one json line per trained batch: the optimizer step it
went into, its question ids (multiple-choice data) and whether it carried any audio/video, so a
test can check which samples a run trained on, on every rank.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from lightning.pytorch import Callback, LightningModule, Trainer


class RecordSamples(Callback):
    """Append ``{"rank", "epoch", "step", "ids", "media"}`` to ``<out_dir>/rank<N>.jsonl`` per training batch.

    ``step`` is ``trainer.global_step`` after the batch's optimizer step (1 for the first batch), so
    a checkpoint of step ``s`` holds exactly the batches recorded with ``step <= s``.
    """

    def __init__(self, out_dir: str) -> None:
        self.out_dir = out_dir

    def on_train_batch_end(
        self, trainer: Trainer, pl_module: LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        path = Path(self.out_dir) / f"rank{trainer.global_rank}.jsonl"
        path.parent.mkdir(parents=True, exist_ok=True)
        record = {
            "rank": trainer.global_rank,
            "epoch": trainer.current_epoch,
            "step": trainer.global_step,
            "ids": [str(i) for i in batch.get("question_id") or []],
            "media": "pixel_values_videos" in batch or "input_features" in batch,
        }
        with path.open("a") as handle:
            handle.write(json.dumps(record) + "\n")
