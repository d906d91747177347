"""A behaviour fingerprint of every toy recipe: run it before and after a refactor and diff the two.

For each recipe (CS2 budgets, ablation rows, training-free baselines on their evaluation base) the
script builds the module and data exactly as ``ep-kit`` does (:func:`ep_kit.cli.run`), on random
weights (``init_from=null``, so no toy base is needed) and a small synthetic split, and records

* the forward on the first training batch: loss, logits sum and the kept tokens' source columns
  (their sha256), the realised keep ratio;
* for trained recipes: the losses of two optimiser steps (``ep-kit fit``), then the test metrics;
* for baselines: the test metrics (``ep-kit test``).

Everything is seeded by the recipe (``seed_everything``), so two checkouts with the same behaviour
give the same JSON; a refactor that claims "behaviour unchanged" shows it with::

    python benchmarks/recipe_fingerprint.py --out /tmp/before.json   # on the old commit
    python benchmarks/recipe_fingerprint.py --out /tmp/after.json    # on the new one
    python benchmarks/recipe_fingerprint.py --compare /tmp/before.json /tmp/after.json

Nothing is written unless ``--out`` is given.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import sys
import tempfile
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]

TRAINED = [
    "cs2_ste_20",
    "cs2_ste_10",
    "cs2_ste_5",
    "ablation_causal",
    "ablation_gumbel",
    "ablation_intramodal",
    "ablation_no_prefusion",
    "ablation_no_syncrope",
    "ablation_per_modality",
    "ablation_similarity",
]
BASELINES = [f"{m}_{p}" for m in ("fastv", "pyramiddrop", "omnizip", "intramodal", "random") for p in (20, 10, 5)]


def small_data(work: Path) -> list[str]:
    """Overrides for a small synthetic split under ``work`` (same for every recipe)."""
    src = "--data.init_args.source.init_args"
    return [
        f"{src}.root={work / 'synthetic'}",
        f"{src}.num_train=16",
        f"{src}.num_val=0",
        f"{src}.num_test=12",
        f"--data.init_args.cache_dir={work / 'samples'}",
        "--data.init_args.batch_size=4",
        "--data.init_args.eval_batch_size=6",
        "--model.thinker.init_args.init_from=null",
        "--trainer.logger=false",
        f"--trainer.default_root_dir={work / 'root'}",
        "--trainer.enable_progress_bar=false",
        "--trainer.enable_model_summary=false",
        "--trainer.max_steps=2",
        "--trainer.limit_val_batches=0",
    ]


def forward_digest(module: Any, datamodule: Any) -> dict[str, Any]:
    import torch

    datamodule.setup("fit")
    batch = next(iter(datamodule.train_dataloader()))
    torch.manual_seed(0)
    module.eval()
    with torch.no_grad():
        out = module.model(batch)
    module.train()
    source = out.kept.source_index.cpu().numpy().tobytes()
    return {
        "loss": None if out.loss is None else round(float(out.loss), 5),
        "logits_sum": round(float(out.logits.double().sum()), 2),
        "kept_sha": hashlib.sha256(source).hexdigest()[:16],
        "kept_tokens": int(out.kept.attention_mask.sum()),
        "realised_keep_ratio": round(float(out.stats["realised_keep_ratio"]), 5),
    }


class LossLog:
    """A Lightning callback that records the training loss of each step."""

    def __new__(cls):
        from lightning.pytorch.callbacks import Callback

        class _Log(Callback):
            def __init__(self) -> None:
                self.losses: list[float] = []

            def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
                loss = outputs["loss"] if isinstance(outputs, dict) else outputs
                self.losses.append(round(float(loss), 5))

        return _Log()


def fingerprint(name: str, configs: list[str], work: Path, train: bool) -> dict[str, Any]:
    from ep_kit.cli import program_argv, run

    args = [a for c in configs for a in ("--config", c)] + small_data(work)
    with program_argv():
        cli = run(args, run_subcommand=False)
    record: dict[str, Any] = {"forward": forward_digest(cli.model, cli.datamodule)}
    if train:
        log = LossLog()
        cli.trainer.callbacks.append(log)
        cli.trainer.fit(cli.model, datamodule=cli.datamodule)
        record["train_losses"] = log.losses
    metrics = cli.trainer.test(cli.model, datamodule=cli.datamodule, verbose=False)[0]
    record["test"] = {k: round(float(v), 5) for k, v in sorted(metrics.items())}
    print(f"[fingerprint] {name}: {json.dumps(record)}", flush=True)
    return record


def compare(a: dict[str, Any], b: dict[str, Any], tol: float = 1e-4) -> list[str]:
    """Names and fields that differ (numbers beyond ``tol`` relative)."""
    diffs: list[str] = []

    def walk(x: Any, y: Any, where: str) -> None:
        if isinstance(x, dict) and isinstance(y, dict):
            for key in sorted(set(x) | set(y)):
                walk(x.get(key), y.get(key), f"{where}.{key}")
        elif isinstance(x, list) and isinstance(y, list) and len(x) == len(y):
            for i, (u, v) in enumerate(zip(x, y, strict=True)):
                walk(u, v, f"{where}[{i}]")
        elif isinstance(x, float) and isinstance(y, float):
            if not math.isclose(x, y, rel_tol=tol, abs_tol=tol):
                diffs.append(f"{where}: {x} vs {y}")
        elif x != y:
            diffs.append(f"{where}: {x!r} vs {y!r}")

    walk(a, b, "")
    return diffs


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, help="write the fingerprint JSON here (nothing is written without it)")
    parser.add_argument("--only", nargs="*", help="recipe names (default: every toy recipe)")
    parser.add_argument("--compare", nargs=2, type=Path, metavar=("BEFORE", "AFTER"))
    args = parser.parse_args(argv)
    if args.compare:
        before, after = (json.loads(p.read_text()) for p in args.compare)
        diffs = compare(before, after)
        print("\n".join(diffs) if diffs else f"identical: {len(before)} recipes")
        return 1 if diffs else 0
    import os

    from ep_kit.recipes import recipe_configs

    os.chdir(ROOT)
    names = args.only or [*TRAINED, *BASELINES]
    result: dict[str, Any] = {}
    with tempfile.TemporaryDirectory(prefix="ep-kit-fingerprint-") as tmp:
        work = Path(tmp)
        for name in names:
            if name in TRAINED:
                configs = [str(c) for c in recipe_configs(f"recipes/toy/{name}.yaml")]  # an overlay on its base
                result[name] = fingerprint(name, configs, work, train=True)
            else:
                configs = ["recipes/toy/baselines/base.yaml", f"recipes/toy/baselines/{name}.yaml"]
                result[name] = fingerprint(name, configs, work, train=False)
    if args.out:
        args.out.write_text(json.dumps(result, indent=1, sort_keys=True))
        print(f"[fingerprint] wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
