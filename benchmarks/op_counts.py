"""Operator and host-sync counts of one evaluation prefill per method (the launch-bound side of a GPU).

Why: at a 5% budget the reduced decoder runs on a few hundred tokens, so on a GPU each kernel is
short and the stage can become bound by how many operators are launched and by how often the host
waits for the device (``.item()``, ``bool(tensor)``, ``nonzero``, boolean indexing), not by FLOPs.
Those counts do not depend on the device, so they are measured here on CPU: a
``TorchDispatchMode`` records every aten operator one ``model.prefill(batch)`` dispatches, in eval
mode under ``torch.no_grad`` (what evaluation and generation run), on the toy recipes' methods.

Counted as host syncs (each one stalls a CUDA stream until the device catches up): ``_local_scalar_dense``
(``.item()``, ``int()``, ``bool()``), ``equal`` / ``allclose`` (a Python bool), ``Tensor.tolist`` / ``Tensor.numpy`` (counted by wrapping them: they
read memory below the dispatcher), ``nonzero``, ``masked_select``, ``unique*``,
``repeat_interleave`` without ``output_size`` and ``index``/``index_put`` with a boolean index (they
run ``nonzero`` inside).

    python benchmarks/op_counts.py                          # -> runs/op_counts/op_counts.{json,md}
    python benchmarks/op_counts.py --out benchmarks/results   # the recorded run
"""

from __future__ import annotations

import argparse
import collections
import json
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch.utils._python_dispatch import TorchDispatchMode

from ep_kit.models import OmniThinker
from ep_kit.models.tiny import SampleSpec, make_av_batch, tiny_thinker_config
from ep_kit.recipes import baseline_keys, method_configs, method_from_recipe

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_OUT = ROOT / "runs" / "op_counts"
BUDGETS = (20, 10, 5)
SYNC_NAMES = ("_local_scalar_dense", "equal", "is_nonzero", "allclose", "nonzero", "masked_select", "unique", "_unique",
              "_unique2", "unique_dim", "unique_consecutive")


class OpCounter(TorchDispatchMode):
    """Counts aten operators by name, and host syncs by the operator that causes them."""

    def __init__(self) -> None:
        super().__init__()
        self.ops: collections.Counter[str] = collections.Counter()
        self.syncs: collections.Counter[str] = collections.Counter()

    def __enter__(self):
        # ``Tensor.tolist`` / ``numpy`` read memory directly, below the dispatcher: wrap them to count them.
        self._saved = {name: getattr(torch.Tensor, name) for name in ("tolist", "numpy")}
        for name, method in self._saved.items():
            setattr(torch.Tensor, name, self._counting(name, method))
        return super().__enter__()

    def __exit__(self, *exc):
        for name, method in self._saved.items():
            setattr(torch.Tensor, name, method)
        return super().__exit__(*exc)

    def _counting(self, name, method):
        def wrapper(tensor, *args, **kwargs):
            self.ops[name] += 1
            self.syncs[name] += 1
            return method(tensor, *args, **kwargs)

        return wrapper

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = func._schema.name.removeprefix("aten::")
        self.ops[name] += 1
        if self._syncs(name, args, kwargs):
            self.syncs[name] += 1
        return func(*args, **kwargs)

    @staticmethod
    def _syncs(name: str, args: Sequence[Any], kwargs: dict[str, Any]) -> bool:
        if name in SYNC_NAMES:
            return True
        if name == "repeat_interleave":
            return kwargs.get("output_size") is None
        if name in ("index", "index_put", "index_put_", "_index_put_impl_"):
            indices = args[1] if len(args) > 1 else kwargs.get("indices", ())
            return any(isinstance(i, torch.Tensor) and i.dtype == torch.bool for i in indices or ())
        return False


def recipes() -> list[Path]:
    """The main table's toy rows: full, EchoingPixels at 20/10/5 %, every baseline at 20/10/5 %."""
    rows = ROOT / "recipes" / "toy" / "baselines"
    out = [rows / "full.yaml", *(ROOT / "recipes" / "toy" / f"cs2_ste_{p}.yaml" for p in BUDGETS)]
    return out + [rows / f"{m}_{p}.yaml" for m in baseline_keys(rows) for p in BUDGETS if (rows / f"{m}_{p}.yaml").is_file()]


STAGES = ("embed", "reduce", "decoder")


def count(model: OmniThinker, batch: dict[str, Any]) -> dict[str, Any]:
    """Operators and syncs of one prefill, split at the prefill's stage boundaries (its ``clock`` marks)."""
    with torch.no_grad():
        model.prefill(batch)  # warm-up: one-off work (caches, lazy inits) is not counted
        with OpCounter() as counter:
            snap = lambda: (sum(counter.ops.values()), collections.Counter(counter.syncs))  # noqa: E731
            marks = model.prefill(batch, clock=snap).marks
    out: dict[str, Any] = {}
    for stage, (a, b) in zip(STAGES, zip(marks[:-1], marks[1:], strict=True), strict=True):
        syncs = b[1] - a[1]
        out[stage] = {"ops": b[0] - a[0], "syncs": sum(syncs.values()), "sync_ops": dict(syncs)}
    out["ops"] = sum(out[s]["ops"] for s in STAGES)
    out["syncs"] = sum(out[s]["syncs"] for s in STAGES)
    return out


def run(batch_size: int, only: Sequence[str] | None = None) -> dict[str, Any]:
    torch.manual_seed(0)
    config = tiny_thinker_config(hidden_size=64, num_layers=8, vision_depth=2, audio_layers=2)
    thinker = OmniThinker.from_config(config).thinker.eval()
    specs = [SampleSpec(prompt_len=16, answer_len=0, frames=8, height=56, width=84, audio_seconds=4.0),
             SampleSpec(prompt_len=9, answer_len=0, frames=6, height=56, width=56, audio_seconds=3.0)][:batch_size]
    batch = make_av_batch(config, specs, with_labels=False)
    rows = []
    for recipe in recipes():
        if only and recipe.stem not in only:
            continue
        method = method_from_recipe(method_configs(recipe))
        model = OmniThinker(thinker, rope=method.rope, reducer=method.reducer, keep_ratio=method.keep_ratio,
                            candidate_modalities=method.candidate_modalities).eval()
        rows.append({"method": method.name, **count(model, batch)})
    return {"batch_size": batch_size, "layers": config.text_config.num_hidden_layers, "rows": rows}


def to_markdown(result: dict[str, Any]) -> str:
    lines = [
        "# Operators and host syncs per evaluation prefill",
        "",
        f"Command: `{result['command']}`  ",
        f"Commit: `{result['commit']}`; torch {result['torch']}.  ",
        f"One `model.prefill(batch)` in eval mode under `torch.no_grad`, after one warm-up, on the toy thinker "
        f"({result['layers']} decoder layers) with a batch of {result['batch_size']} clips of different lengths; "
        "counts are aten operators seen by a TorchDispatchMode (device independent), split at the prefill's stage "
        "boundaries: embed (transformers' encoders, placeholder scatter, positions of the full sequence), reduce "
        "(the pre-LLM reducer: CS2's sieve, scorer and Top-K; Random, IntraModal, OmniZip) and decoder (the LLM "
        "with in-LLM drops: FastV, PyramidDrop).",
        "",
        "| method | ops: embed / reduce / decoder | syncs: embed / reduce / decoder | reduce + decoder syncs by operator |",
        "|---|---|---|---|",
    ]
    for r in result["rows"]:
        merged = collections.Counter(r["reduce"]["sync_ops"]) + collections.Counter(r["decoder"]["sync_ops"])
        by = ", ".join(f"{k} {v}" for k, v in sorted(merged.items())) or "-"
        ops = " / ".join(str(r[s]["ops"]) for s in STAGES)
        syncs = " / ".join(str(r[s]["syncs"]) for s in STAGES)
        lines.append(f"| {r['method']} | {ops} | {syncs} | {by} |")
    return "\n".join(lines) + "\n"


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    argv = list(sys.argv[1:] if argv is None else argv)
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--batch-size", type=int, default=2, choices=(1, 2))
    p.add_argument("--out", type=Path, default=DEFAULT_OUT, help="output directory (default runs/op_counts)")
    p.add_argument("--tag", default="", help="suffix of the output file names")
    p.add_argument("--only", nargs="+", default=None, metavar="STEM", help="recipe stems to count (default: all)")
    args = p.parse_args(argv)
    git = lambda *a: subprocess.run(["git", *a], capture_output=True, text=True, cwd=ROOT).stdout.strip()  # noqa: E731
    result = {
        "command": "python benchmarks/op_counts.py " + " ".join(argv),
        "commit": git("rev-parse", "--short", "HEAD") + (" + uncommitted changes" if git("status", "--porcelain") else ""),
        "torch": torch.__version__,
        **run(args.batch_size, args.only),
    }
    args.out.mkdir(parents=True, exist_ok=True)
    stem = "op_counts" + (f"_{args.tag}" if args.tag else "")
    (args.out / f"{stem}.json").write_text(json.dumps(result, indent=2) + "\n")
    (args.out / f"{stem}.md").write_text(to_markdown(result))
    print(to_markdown(result))
    return result


if __name__ == "__main__":
    main()
