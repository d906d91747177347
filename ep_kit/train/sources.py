"""Where the thinker comes from: a local Qwen2.5-Omni directory, or a tiny thinker for the toy scale.

A recipe picks one of these by ``class_path`` (``model.thinker``). They only say *how to obtain* the
transformers thinker; the reduction components (rope, reducer, budget) are passed in by
:class:`~ep_kit.train.module.EPKitModule`, so the same source serves every ablation row.

* :class:`PretrainedThinker` -- a released checkpoint (3B / 7B) from disk; no download, ever.
* :class:`TinyThinker` -- the tiny random-weight thinker of the synthetic benchmark, optionally
  initialised from the cached toy "pretrained base" (the output of ``recipes/toy/pretrain.yaml``).
  When that base is missing and ``pretrain_config`` is set, it is built first by running that
  recipe in a child process (so its seeds and logger state never leak into the calling run).
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal

import torch
from lightning.pytorch.utilities import rank_zero_info

from ep_kit.models.omni import OmniThinker, read_thinker_config
from ep_kit.models.tiny import tiny_thinker_config

#: file a finished base export carries, so a half-written directory is never taken for a base.
BASE_DONE = "ep_kit_base.json"
DTYPES: dict[str, torch.dtype | str] = {
    "auto": "auto",
    "float32": torch.float32,
    "bfloat16": torch.bfloat16,
    "float16": torch.float16,
}


def _dtype(name: str) -> torch.dtype | str:
    if name not in DTYPES:
        raise ValueError(f"dtype must be one of {sorted(DTYPES)}, got {name!r}")
    return DTYPES[name]


class ThinkerSource:
    """Base: ``build(**components) -> OmniThinker``; ``components`` are OmniThinker's keyword arguments."""

    def build(self, **components: Any) -> OmniThinker:  # pragma: no cover - abstract
        raise NotImplementedError

    def describe(self) -> str:
        return type(self).__name__


class PretrainedThinker(ThinkerSource):
    """A local Qwen2.5-Omni checkpoint directory (full model or thinker-only).

    Args:
        path: the directory (``config.json`` + safetensors); a kit export also works.
        dtype: ``auto`` | ``float32`` | ``bfloat16`` | ``float16`` weights on load.
        attn_implementation: ``sdpa`` (default), ``eager`` or ``flash_attention_2``.
    """

    def __init__(
        self,
        path: str,
        dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto",
        attn_implementation: Literal["sdpa", "eager", "flash_attention_2"] = "sdpa",
    ) -> None:
        self.path = str(path)
        self.dtype = _dtype(dtype)
        self.attn_implementation = attn_implementation

    def build(self, **components: Any) -> OmniThinker:
        root = Path(self.path)
        if not root.exists():
            raise FileNotFoundError(
                f"model.thinker.init_args.path: {root} does not exist (point it at a local Qwen2.5-Omni directory, "
                "e.g. --model.thinker.init_args.path /data/Qwen2.5-Omni-3B)"
            )
        return OmniThinker.from_pretrained(
            root, dtype=self.dtype, attn_implementation=self.attn_implementation, **components
        )

    def describe(self) -> str:
        return f"PretrainedThinker({self.path})"


class TinyThinker(ThinkerSource):
    """The tiny thinker of the synthetic benchmark (kit's byte-level vocabulary, real transformers classes).

    Args:
        hidden_size, num_layers, num_heads, num_kv_heads, head_dim, intermediate_size,
        vision_depth, vision_hidden_size, vision_heads, audio_layers, audio_d_model, audio_heads:
            sizes passed to :func:`ep_kit.models.tiny.tiny_thinker_config`.
        mrope_section: TMRoPE sections of the *config* (default: 16:24:24 proportion of head_dim/2).
        attn_implementation: ``sdpa`` or ``eager``.
        init_from: directory of a saved tiny base (written by ``recipes/toy/pretrain.yaml`` through
            ``EPKitModule(export_thinker=...)``); None = random weights.
        pretrain_config: recipe that writes ``init_from`` when it is missing (``ep-kit fit --config
            pretrain_config``, run once in a child process). None = a missing base is an error.
    """

    def __init__(
        self,
        hidden_size: int = 64,
        num_layers: int = 4,
        num_heads: int = 4,
        num_kv_heads: int = 2,
        head_dim: int | None = None,
        intermediate_size: int | None = None,
        mrope_section: list[int] | None = None,
        vision_depth: int = 1,
        vision_hidden_size: int = 32,
        vision_heads: int = 2,
        audio_layers: int = 1,
        audio_d_model: int = 32,
        audio_heads: int = 2,
        attn_implementation: Literal["sdpa", "eager"] = "sdpa",
        init_from: str | None = None,
        pretrain_config: str | None = None,
    ) -> None:
        self.sizes = {
            "hidden_size": hidden_size,
            "num_layers": num_layers,
            "num_heads": num_heads,
            "num_kv_heads": num_kv_heads,
            "head_dim": head_dim,
            "intermediate_size": intermediate_size,
            "mrope_section": None if mrope_section is None else list(mrope_section),
            "vision_depth": vision_depth,
            "vision_hidden_size": vision_hidden_size,
            "vision_heads": vision_heads,
            "audio_layers": audio_layers,
            "audio_d_model": audio_d_model,
            "audio_heads": audio_heads,
        }
        self.attn_implementation = attn_implementation
        self.init_from = init_from
        self.pretrain_config = pretrain_config

    def config(self):
        """The transformers thinker config these sizes describe."""
        return tiny_thinker_config(vocab="tiny", attn_implementation=self.attn_implementation, **self.sizes)

    def build(self, **components: Any) -> OmniThinker:
        config = self.config()
        if self.init_from is None:
            return OmniThinker.from_config(config, **components)
        root = Path(self.init_from)
        if not is_base_dir(root) or self._stale(root):
            self._make_base(root)
        _check_same_architecture(config, read_thinker_config(root), root)
        return OmniThinker.from_pretrained(
            root, dtype=torch.float32, attn_implementation=self.attn_implementation, **components
        )

    def _stale(self, root: Path) -> bool:
        """True when the base was built by ``build_base`` from another version of ``pretrain_config``.

        A base without a recorded digest (built by hand) is taken as it is.
        """
        if self.pretrain_config is None or not Path(self.pretrain_config).is_file():
            return False
        recorded = json.loads((root / BASE_DONE).read_text()).get("recipe_digest")
        if recorded is None or recorded == recipe_digest(Path(self.pretrain_config)):
            return False
        rank_zero_info(f"[ep-kit] toy base {root} was built from another {self.pretrain_config}: rebuilding it")
        return True

    def _make_base(self, root: Path) -> None:
        if self.pretrain_config is None:
            raise FileNotFoundError(
                f"model.thinker.init_args.init_from: the toy base {root} does not exist. Build it with "
                "`ep-kit fit --config recipes/toy/pretrain.yaml`, or set model.thinker.init_args.pretrain_config "
                "so that it is built on first use"
            )
        recipe = Path(self.pretrain_config)
        if not recipe.is_file():
            raise FileNotFoundError(f"model.thinker.init_args.pretrain_config: {recipe} does not exist")
        build_base(recipe, root)

    def describe(self) -> str:
        return f"TinyThinker(init_from={self.init_from})"


def is_base_dir(root: Path) -> bool:
    """True when ``root`` holds a finished base export (config, weights and the done marker)."""
    return (root / BASE_DONE).is_file() and (root / "config.json").is_file()


def recipe_digest(recipe: Path) -> str:
    """sha256 of a recipe file and of the YAML files it names (its ``_base`` parts), in order.

    Recorded in the base's marker by :func:`build_base`, so an edited pretraining recipe is noticed
    instead of silently reusing the base an older version built.
    """
    h = hashlib.sha256(recipe.read_bytes())
    for name in re.findall(r"[\w./-]+\.ya?ml", recipe.read_text()):
        part = recipe.parent / name
        if part.is_file():
            h.update(name.encode() + part.read_bytes())
    return h.hexdigest()


def build_base(recipe: Path, root: Path, extra_args: Sequence[str] = ()) -> None:
    """Run ``ep-kit fit --config recipe`` in a child process so that it exports the base to ``root``.

    The recipe's ``model.export_thinker`` is pointed at ``root``. A child process keeps the
    pretraining run's seeding, loggers and threads out of the caller. The marker of the finished
    base records :func:`recipe_digest` of ``recipe`` (``extra_args`` are not part of it).
    """
    if int(os.environ.get("LOCAL_RANK", "0")) != 0 or int(os.environ.get("NODE_RANK", "0")) != 0:
        raise FileNotFoundError(
            f"the toy base {root} is missing on a non-zero rank; build it first with "
            f"`ep-kit fit --config {recipe}` (multi-process runs never build it themselves)"
        )
    rank_zero_info(f"[ep-kit] toy base {root} not found: building it with `ep-kit fit --config {recipe}` ...")
    cmd = [
        sys.executable,
        "-m",
        "ep_kit.cli",
        "fit",
        "--config",
        str(recipe),
        f"--model.export_thinker={root}",
        *extra_args,
    ]
    start = time.time()
    (root / BASE_DONE).unlink(missing_ok=True)  # a rebuild killed half-way must not look finished
    result = subprocess.run(cmd, check=False)
    if result.returncode != 0 or not is_base_dir(root):
        raise RuntimeError(
            f"building the toy base with {' '.join(cmd)} failed (exit {result.returncode}); run it by hand to see why"
        )
    marker = json.loads((root / BASE_DONE).read_text())
    write_base_marker(root, {**marker, "recipe": str(recipe), "recipe_digest": recipe_digest(recipe)})
    rank_zero_info(f"[ep-kit] toy base written to {root} in {time.time() - start:.0f} s")


def _check_same_architecture(expected, found, root: Path) -> None:
    """The base must have the sizes the recipe declares (else weights would not fit, or fit wrongly)."""
    pairs = {
        "text_config.hidden_size": (expected.text_config.hidden_size, found.text_config.hidden_size),
        "text_config.num_hidden_layers": (expected.text_config.num_hidden_layers, found.text_config.num_hidden_layers),
        "text_config.num_attention_heads": (
            expected.text_config.num_attention_heads,
            found.text_config.num_attention_heads,
        ),
        "text_config.vocab_size": (expected.text_config.vocab_size, found.text_config.vocab_size),
        "vision_config.depth": (expected.vision_config.depth, found.vision_config.depth),
        "audio_config.encoder_layers": (expected.audio_config.encoder_layers, found.audio_config.encoder_layers),
    }
    bad = {k: v for k, v in pairs.items() if v[0] != v[1]}
    if bad:
        detail = ", ".join(f"{k}: recipe {a} vs base {b}" for k, (a, b) in bad.items())
        raise ValueError(f"{root / 'config.json'}: the toy base does not match model.thinker sizes ({detail})")


def write_base_marker(root: Path, info: dict[str, Any]) -> None:
    """Mark ``root`` as a finished base export (written last, after the weights)."""
    (root / BASE_DONE).write_text(json.dumps(info, indent=2, sort_keys=True))
