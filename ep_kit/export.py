"""``ep-kit export CKPT DIR``: a training checkpoint of ``ep-kit fit`` -> a model directory.

Why: a Lightning checkpoint holds the whole training module (optimizer state, loops, the data
configuration); what one evaluates, shares or loads in code is the model. The checkpoint's
hyper-parameters rebuild the module (``EPKitModule.load_from_checkpoint``: thinker source, rope,
reducer, budget, then its weights), and :meth:`~ep_kit.models.omni.OmniThinker.save_pretrained`
writes the directory ``OmniThinker.from_pretrained(DIR)`` rebuilds the same model from, with no
other argument. The thinker source the checkpoint names (a model directory, or the toy base) must
still exist: its config gives the architecture.
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from pathlib import Path


def export_checkpoint(ckpt: str | Path, directory: str | Path, overwrite: bool = False) -> Path:
    """Rebuild the module of ``ckpt`` and save its model to ``directory``; returns the directory.

    ``directory`` must not exist or be empty unless ``overwrite`` (a finished export is never
    replaced by accident). ``ckpt`` must be a Lightning checkpoint file of ``ep-kit fit``
    (``ValueError`` naming it otherwise).
    """
    from ep_kit.train.module import EPKitModule, read_lightning_checkpoint

    ckpt, out = Path(ckpt), Path(directory)
    if not ckpt.is_file():
        raise FileNotFoundError(f"ep-kit export: checkpoint {ckpt} does not exist (a last.ckpt of ep-kit fit)")
    read_lightning_checkpoint(ckpt, "ep-kit export CKPT")
    if out.exists() and (not out.is_dir() or any(out.iterdir())) and not overwrite:
        raise FileExistsError(f"ep-kit export: {out} exists and is not empty (pass --overwrite to replace its files)")
    module = EPKitModule.load_from_checkpoint(ckpt, map_location="cpu")
    return module.model.save_pretrained(out)


def main(argv: Sequence[str] | None = None) -> None:
    """``ep-kit export CKPT DIR [--overwrite]``."""
    parser = argparse.ArgumentParser(
        prog="ep-kit export",
        description="Turn a checkpoint of `ep-kit fit` into a directory OmniThinker.from_pretrained(DIR) loads "
        "(transformers thinker files + the reducer's weights + its components and budget).",
    )
    parser.add_argument("ckpt", help="a Lightning checkpoint written by ep-kit fit (e.g. runs/.../checkpoints/last.ckpt)")
    parser.add_argument("directory", help="the model directory to write")
    parser.add_argument("--overwrite", action="store_true", help="write into a non-empty directory")
    args = parser.parse_args(list(argv) if argv is not None else None)
    out = export_checkpoint(args.ckpt, args.directory, overwrite=args.overwrite)
    print(f"[ep-kit] exported {args.ckpt} to {out}; load it with OmniThinker.from_pretrained({str(out)!r})", flush=True)


if __name__ == "__main__":
    main()
