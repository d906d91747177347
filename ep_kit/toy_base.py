"""The toy base: the tiny pretrained thinker every toy recipe starts from, shipped with the kit.

It lives in ``ep_kit/assets/toy_base/`` (``config.json``, ``model.safetensors``, and the record
``ep_kit_base.json``: how, from which commit and in which numeric environment it was built, and the
sha256 of its weights). Toy recipes name it ``init_from: shipped``; nothing builds it on use.
The kit's own command builds it (about 2.5 minutes on 2 CPU cores), from a clone of the repository::

    python -m ep_kit.toy_base build                # rebuild the shipped base in place (and its record)
    python -m ep_kit.toy_base build /tmp/base      # build a copy elsewhere
    python -m ep_kit.toy_base digest /tmp/base     # its weights' digest, compared with the shipped record

``build`` runs ``ep-kit fit --config recipes/toy/pretrain.yaml --model.export_thinker=DIR`` (12
epochs of the tiny thinker from scratch on the synthetic benchmark, seed 0) in a child process
whose numeric environment is pinned (:data:`NUMERIC_ENV`: a fixed thread count and the AVX2 code
paths of ATen, MKL and oneDNN), so that the same code and packages rebuild the same weights bit for
bit; ``tests/test_toy_base.py`` (slow) rebuilds it and checks the digest. Arguments after ``--`` go
to ``ep-kit fit`` (e.g. where the synthetic data and the logs go).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from ep_kit.train.sources import BASE_DONE, SHIPPED_BASE, is_base_dir, write_base_marker

REPO = Path(__file__).resolve().parents[1]
RECIPE = "recipes/toy/pretrain.yaml"
#: the command that builds the base (named by the errors and by the record).
BUILD_COMMAND = "python -m ep_kit.toy_base build"
#: environment of the pretraining process. Thread count and instruction-set code paths change the
#: summation order of float reductions, hence the trained weights (on a 2-core AVX-512 machine the
#: default code paths train another base than these). Pinned, the weights should not depend on the
#: machine's core count nor on whether its CPU has AVX-512 (checked on one CPU kind only).
NUMERIC_ENV = {
    "OMP_NUM_THREADS": "2",
    "MKL_NUM_THREADS": "2",
    "ATEN_CPU_CAPABILITY": "avx2",
    "MKL_CBWR": "AVX2",
    "ONEDNN_MAX_CPU_ISA": "AVX2",
}


def weights_digest(root: str | Path) -> str:
    """sha256 of a base's weights: every tensor of its safetensors files, by name, with dtype and shape.

    Computed on the tensors, not on the file bytes, so the file's header layout does not matter.
    """
    import torch
    from safetensors.torch import load_file

    files = sorted(Path(root).glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"{root}: no safetensors weights")
    tensors: dict[str, Any] = {}
    for f in files:
        tensors.update(load_file(str(f)))
    h = hashlib.sha256()
    for name in sorted(tensors):
        t = tensors[name].contiguous()
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        h.update(t.view(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def record(root: str | Path = SHIPPED_BASE) -> dict[str, Any]:
    """The record (``ep_kit_base.json``) of a base directory."""
    return json.loads((Path(root) / BASE_DONE).read_text())


def build(out: str | Path = SHIPPED_BASE, fit_args: Sequence[str] = (), recipe: str | Path | None = None) -> dict:
    """Build a base into ``out`` with the pretraining recipe; returns its record.

    ``fit_args`` are appended to the ``ep-kit fit`` command line (not part of the record's command
    when they only move files, e.g. ``--data.init_args.source.init_args.root=...``).
    """
    recipe = Path(recipe) if recipe is not None else REPO / RECIPE
    if not recipe.is_file():
        raise FileNotFoundError(f"{recipe} not found: the toy base is built from a clone of the ep-kit repository")
    out = Path(out).resolve()
    cmd = [sys.executable, "-m", "ep_kit.cli", "fit", "--config", str(recipe), f"--model.export_thinker={out}",
           "--trainer.enable_progress_bar=false", *fit_args]
    if out.exists():
        (out / BASE_DONE).unlink(missing_ok=True)  # a rebuild killed half-way must not look finished
    start = time.time()
    result = subprocess.run(cmd, cwd=recipe.parents[2], env={**os.environ, **NUMERIC_ENV}, check=False)
    if result.returncode != 0 or not is_base_dir(out):
        raise RuntimeError(f"building the toy base failed (exit {result.returncode}): {' '.join(cmd)}")
    from importlib.metadata import version

    from ep_kit.runs import git_commit

    info = {
        **record(out),  # what the export wrote: global_step, epochs
        "command": f"{BUILD_COMMAND} (= ep-kit fit --config {RECIPE} --model.export_thinker=DIR)",
        "commit": git_commit(REPO),
        "numeric_env": NUMERIC_ENV,
        "packages": {p: version(p) for p in ("torch", "transformers", "lightning", "av", "numpy")},
        "weights_sha256": weights_digest(out),
    }
    write_base_marker(out, info)
    print(f"toy base written to {out} in {time.time() - start:.0f} s; weights sha256 {info['weights_sha256']}")
    return info


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    fit_args: list[str] = []
    if "--" in argv:
        i = argv.index("--")
        argv, fit_args = argv[:i], argv[i + 1 :]
    parser = argparse.ArgumentParser(prog="python -m ep_kit.toy_base", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="what", required=True)
    b = sub.add_parser("build", help="pretrain the toy base into DIR (default: the shipped one, in place)")
    b.add_argument("dir", nargs="?", default=str(SHIPPED_BASE))
    d = sub.add_parser("digest", help="print the weights' digest of DIR and compare it with the shipped record")
    d.add_argument("dir", nargs="?", default=str(SHIPPED_BASE))
    args = parser.parse_args(argv)
    if args.what == "build":
        build(args.dir, fit_args)
        return 0
    digest, expected = weights_digest(args.dir), record()["weights_sha256"]
    print(f"{digest}  {args.dir}\n{expected}  {SHIPPED_BASE} (recorded)")
    return 0 if digest == expected else 1


if __name__ == "__main__":
    sys.exit(main())
