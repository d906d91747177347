"""Where the thinker comes from: a local Qwen2.5-Omni directory, or a tiny thinker for the toy scale.

A recipe picks one of these by ``class_path`` (``model.thinker``). They only say *how to obtain* the
transformers thinker; the reduction components (rope, reducer, budget) are passed in by
:class:`~ep_kit.train.module.EPKitModule`, so the same source serves every ablation row.

* :class:`PretrainedThinker` -- a released checkpoint (3B / 7B) from disk; no download, ever.
* :class:`TinyThinker` -- the tiny thinker of the synthetic benchmark: random weights, or loaded
  from a toy "pretrained base" directory, usually the one shipped with the kit
  (``init_from: shipped`` = :data:`SHIPPED_BASE`; built by ``python -m ep_kit.toy_base build``,
  see :mod:`ep_kit.toy_base`). Building a thinker never trains: a missing base is an error.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Literal

import torch

from ep_kit.models.feature_cache import EncoderFeatureCache
from ep_kit.models.omni import OmniThinker, read_thinker_config
from ep_kit.models.tiny import tiny_thinker_config

#: file a finished base export carries, so a half-written directory is never taken for a base.
BASE_DONE = "ep_kit_base.json"
#: the toy base shipped with the kit (in the package, so a clone and an installed kit both have it).
SHIPPED_BASE = Path(__file__).resolve().parents[1] / "assets" / "toy_base"
#: ``TinyThinker(init_from=SHIPPED)`` names :data:`SHIPPED_BASE` wherever the kit is installed.
SHIPPED = "shipped"
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
    """Base: ``build(feature_cache=None, **components) -> OmniThinker``; ``components`` are OmniThinker's
    keyword arguments, ``feature_cache`` its on-disk cache of frozen encoder outputs
    (:class:`~ep_kit.models.feature_cache.EncoderFeatureCache`; where the thinker comes from does not
    matter to it: its keys hold a digest of the encoders' weights)."""

    def build(
        self, feature_cache: EncoderFeatureCache | None = None, **components: Any
    ) -> OmniThinker:  # pragma: no cover - abstract
        raise NotImplementedError


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

    def build(self, feature_cache: EncoderFeatureCache | None = None, **components: Any) -> OmniThinker:
        root = Path(self.path)
        if not root.exists():
            raise FileNotFoundError(
                f"model.thinker.init_args.path: {root} does not exist (point it at a local Qwen2.5-Omni directory, "
                "e.g. --model.thinker.init_args.path /data/Qwen2.5-Omni-3B)"
            )
        return OmniThinker.from_pretrained(
            root,
            dtype=self.dtype,
            attn_implementation=self.attn_implementation,
            feature_cache=feature_cache,
            **components,
        )


class TinyThinker(ThinkerSource):
    """The tiny thinker of the synthetic benchmark (kit's byte-level vocabulary, real transformers classes).

    Args:
        hidden_size, num_layers, num_heads, num_kv_heads, head_dim, intermediate_size,
        vision_depth, vision_hidden_size, vision_heads, audio_layers, audio_d_model, audio_heads:
            sizes passed to :func:`ep_kit.models.tiny.tiny_thinker_config`.
        mrope_section: TMRoPE sections of the *config* (default: 16:24:24 proportion of head_dim/2).
        attn_implementation: ``sdpa`` or ``eager``.
        rope_theta: the rotary base; default 1e4, the shipped toy base's. With 8 frequency pairs per
            head, it gives the slowest pairs (Sync-RoPE's ``t_low``) a readable but unwrapped turn over the toy's 8-32 s
            clips (0.26-0.8 rad over 800 positions), as the released 64 pairs at 1e6 do over hours; at
            1e6 those pairs turn < 0.03 rad over 32 s and Sync-RoPE and TMRoPE are the same toy model.
        init_from: ``shipped`` (the toy base shipped with the kit, :data:`SHIPPED_BASE`), or the
            directory of another tiny base (``python -m ep_kit.toy_base build DIR``, or any fit with
            ``--model.export_thinker=DIR``); None = random weights. It is only loaded: a missing
            base is an error that names the command that builds it.
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
        rope_theta: float = 10_000.0,
        init_from: str | None = None,
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
            "rope_theta": float(rope_theta),
        }
        self.attn_implementation = attn_implementation
        self.init_from = init_from

    def config(self):
        """The transformers thinker config these sizes describe."""
        return tiny_thinker_config(vocab="tiny", attn_implementation=self.attn_implementation, **self.sizes)

    def build(self, feature_cache: EncoderFeatureCache | None = None, **components: Any) -> OmniThinker:
        config = self.config()
        if self.init_from is None:
            return OmniThinker.from_config(config, feature_cache=feature_cache, **components)
        root = base_dir(self.init_from)
        if not is_base_dir(root):
            raise FileNotFoundError(
                f"model.thinker.init_args.init_from: {root} is not a toy base (config.json and {BASE_DONE}); "
                f"use the shipped one (init_from: {SHIPPED}) or build one with "
                f"`python -m ep_kit.toy_base build {root}` (from a clone of the repository)"
            )
        _check_same_architecture(config, read_thinker_config(root), root)
        return OmniThinker.from_pretrained(
            root,
            dtype=torch.float32,
            attn_implementation=self.attn_implementation,
            feature_cache=feature_cache,
            **components,
        )


def base_dir(init_from: str | Path) -> Path:
    """The directory ``TinyThinker(init_from=...)`` loads: :data:`SHIPPED_BASE` for ``shipped``."""
    return SHIPPED_BASE if str(init_from) == SHIPPED else Path(init_from)


def is_base_dir(root: Path) -> bool:
    """True when ``root`` holds a finished base export (config, weights and the done marker)."""
    return (root / BASE_DONE).is_file() and (root / "config.json").is_file()


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
        "text_config.rope_theta": (_theta(expected), _theta(found)),
    }
    bad = {k: v for k, v in pairs.items() if v[0] != v[1]}
    if bad:
        detail = ", ".join(f"{k}: recipe {a} vs base {b}" for k, (a, b) in bad.items())
        raise ValueError(f"{root / 'config.json'}: the toy base does not match model.thinker sizes ({detail})")


def _theta(config) -> float:
    text = config.text_config
    params = getattr(text, "rope_parameters", None) or {}
    return float(params.get("rope_theta", getattr(text, "rope_theta", 0.0)))


def write_base_marker(root: Path, info: dict[str, Any]) -> None:
    """Mark ``root`` as a finished base export (written last, after the weights)."""
    (root / BASE_DONE).write_text(json.dumps(info, indent=2, sort_keys=True))
