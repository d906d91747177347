"""Shared helpers of the training/CLI/recipe tests: a tiny synthetic benchmark and toy CLI arguments."""

from __future__ import annotations

from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
TOY_ROW = REPO / "recipes" / "toy" / "cs2_ste_20.yaml"


def toy_args(root: Path, *, num_train: int = 8, num_val: int = 5, num_test: int = 5, epochs: int = 1) -> list[str]:
    """Overrides that shrink a toy recipe to seconds: random tiny thinker, 2-second clips at 28 px, original types."""
    return [
        "--model.thinker.init_args.init_from=null",
        f"--data.init_args.source.init_args.root={root / 'synthetic'}",
        f"--data.init_args.source.init_args.num_train={num_train}",
        f"--data.init_args.source.init_args.num_val={num_val}",
        f"--data.init_args.source.init_args.num_test={num_test}",
        "--data.init_args.source.init_args.seconds=2",
        "--data.init_args.source.init_args.resolution=28",
        # the original five question types (the probes need >= 4 s clips; tests/test_synthetic.py covers them)
        "--data.init_args.source.init_args.question_types=null",
        f"--data.init_args.cache_dir={root / 'cache'}",
        "--data.init_args.batch_size=4",
        "--data.init_args.eval_batch_size=4",
        f"--trainer.logger.init_args.save_dir={root / 'runs'}",
        f"--trainer.max_epochs={epochs}",
        "--trainer.log_every_n_steps=1",  # a few batches per epoch: log each (and no "interval too long" warning)
        "--trainer.enable_progress_bar=false",
    ]
