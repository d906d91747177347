"""Saving and loading: the kit's trained weights, HF-style export, and official EchoingPixels checkpoints.

* :func:`save_kit_weights` / :func:`load_kit_weights` -- the kit's trainable extras (sieve layers,
  scorer; optionally the LLM) as ``ep_kit_weights.safetensors`` plus ``ep_kit_config.json``
  describing the components they belong to (checked on load, so sieve weights never land in a
  differently-shaped reducer silently).
* :func:`export_hf` (``OmniThinker.save_pretrained``) -- a directory ``from_pretrained`` can read:
  the thinker via transformers' ``save_pretrained`` (config + weights) plus the kit's extras. The
  thinker text config also gets the official fields ``av_refiner_layers`` / ``compression_ratio``.
  ``ep_kit_config.json`` (version 2) records the components as ``class_path`` / ``init_args``
  (:mod:`ep_kit.models.components`); :func:`saved_components` rebuilds them on load.
* :func:`load_official_checkpoint` -- the official EchoingPixels layout: sieve under
  ``thinker.model.bidir_encoder.layers.{i}.*``, scorer under ``thinker.model.compressor.*``, the
  rest in the released (pre-5.21) thinker naming (``thinker.model.layers.*``,
  ``thinker.audio_tower.*``, ``thinker.visual.*``, ``thinker.lm_head.*``), mapped to transformers
  5.24's ``model.language_model`` / ``model.audio_tower`` / ``model.visual`` layout. Keys already
  in the new layout are accepted too; talker/token2wav weights are ignored.
"""

from __future__ import annotations

import json
import logging
import re
import warnings
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch import Tensor

from ep_kit.budget import check_ratio
from ep_kit.models.components import build_components, record

if TYPE_CHECKING:  # pragma: no cover - the wrapper imports this module, never the other way round
    from ep_kit.models.omni import OmniThinker

log = logging.getLogger(__name__)

KIT_WEIGHTS = "ep_kit_weights.safetensors"
KIT_CONFIG = "ep_kit_config.json"
FORMAT = "ep-kit-weights"
LLM_PREFIXES = ("thinker.model.language_model.", "thinker.lm_head.")
IGNORED_PREFIXES = ("talker.", "token2wav.")


@dataclass
class LoadReport:
    """What a load did: keys the model expected but did not get, keys with no home, keys skipped."""

    missing: list[str] = field(default_factory=list)
    unexpected: list[str] = field(default_factory=list)
    ignored: list[str] = field(default_factory=list)
    config: dict[str, Any] = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        return not self.missing and not self.unexpected


def _raise_if_bad(report: LoadReport, source: str, strict: bool) -> None:
    if strict and not report.ok:
        def show(keys: list[str]) -> str:
            return ", ".join(keys[:20]) + (f" ... ({len(keys)} in all)" if len(keys) > 20 else "")

        raise ValueError(
            f"{source}: missing keys [{show(report.missing)}]; unexpected keys [{show(report.unexpected)}]"
        )


def _assign(model: OmniThinker, provided: Mapping[str, Tensor], expected: set[str], report: LoadReport) -> None:
    report.missing = sorted(expected - provided.keys())
    report.unexpected = sorted(provided.keys() - expected)
    matched = {k: v for k, v in provided.items() if k in expected}
    model.load_state_dict(matched, strict=False)


def _unshared(state: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """Contiguous CPU copies safetensors accepts (tied tensors would otherwise share storage)."""
    seen: set[int] = set()
    out = {}
    for k, v in state.items():
        t = v.detach().contiguous()
        if t.data_ptr() in seen:
            t = t.clone()
        seen.add(t.data_ptr())
        out[k] = t.cpu()
    return out


# ---------------------------------------------------------------------- kit weights
def component_config(model: OmniThinker, include_llm: bool = False) -> dict[str, Any]:
    """The small JSON describing which components the saved weights belong to."""
    red = model.reducer
    reducer_cfg = None
    if red is not None:
        reducer_cfg = {"class": f"{type(red).__module__}.{type(red).__qualname__}", **red.component_fields()}
    return {
        "format": FORMAT,
        "version": 2,
        # Version 2: the components as class_path/init_args, rebuilt by OmniThinker.from_pretrained.
        "components": record(model),
        "keep_ratio": model.keep_ratio,
        "candidate_modalities": list(model.candidate_modalities),
        "rope": {"class": type(model.rope).__name__, "sections": list(model.rope.sections)},
        "reducer": reducer_cfg,
        "include_llm": include_llm,
    }


def kit_state_dict(model: OmniThinker, include_llm: bool = False) -> dict[str, Tensor]:
    """The kit's trainable extras, keyed as in ``model.state_dict()`` (``reducer.*``, optionally LLM)."""
    state = model.state_dict()
    keep = ("reducer.",) + (LLM_PREFIXES if include_llm else ())
    return {k: v for k, v in state.items() if k.startswith(keep)}


def save_kit_weights(model: OmniThinker, directory: str | Path, include_llm: bool = False) -> Path:
    """Write ``ep_kit_weights.safetensors`` + ``ep_kit_config.json`` into ``directory``; returns the weights path."""
    root = Path(directory)
    root.mkdir(parents=True, exist_ok=True)
    config = component_config(model, include_llm)
    path = root / KIT_WEIGHTS
    save_file(_unshared(kit_state_dict(model, include_llm)), str(path), metadata={"format": FORMAT})
    (root / KIT_CONFIG).write_text(json.dumps(config, indent=2))
    return path


def _check_components(saved: dict[str, Any], model: OmniThinker, source: Path) -> None:
    current = component_config(model)
    if (saved.get("reducer") or {}).get("class") != (current.get("reducer") or {}).get("class"):
        raise ValueError(
            f"{source}: weights were saved for reducer {(saved.get('reducer') or {}).get('class')!r}, "
            f"the model has {(current.get('reducer') or {}).get('class')!r}"
        )
    for key in ("num_layers", "prefusion"):
        a, b = (saved.get("reducer") or {}).get(key), (current.get("reducer") or {}).get(key)
        if a is not None and b is not None and a != b:
            raise ValueError(f"{source}: saved reducer {key}={a!r} but the model's reducer has {key}={b!r}")
    if saved.get("rope") and saved["rope"] != current["rope"]:
        raise ValueError(f"{source}: saved rope {saved['rope']} differs from the model's rope {current['rope']}")


def load_kit_weights(model: OmniThinker, directory: str | Path, strict: bool = True) -> LoadReport:
    """Load what :func:`save_kit_weights` wrote; checks the component config first.

    ``strict`` raises ``ValueError`` listing missing/unexpected keys. The keep ratio is not
    changed (budgets are chosen at run time); the saved one is in ``report.config``.
    """
    root = Path(directory)
    weights, cfg_file = root / KIT_WEIGHTS, root / KIT_CONFIG
    for f in (weights, cfg_file):
        if not f.is_file():
            raise FileNotFoundError(f"{f} does not exist (write it with ep_kit.models.checkpoint.save_kit_weights)")
    saved = json.loads(cfg_file.read_text())
    if saved.get("format") != FORMAT:
        raise ValueError(f"{cfg_file}: format {saved.get('format')!r} is not {FORMAT!r}")
    _check_components(saved, model, cfg_file)
    provided = load_file(str(weights))
    expected = set(kit_state_dict(model, include_llm=bool(saved.get("include_llm"))))
    report = LoadReport(config=saved)
    _assign(model, provided, expected, report)
    _raise_if_bad(report, str(weights), strict)
    return report


def export_hf(model: OmniThinker, directory: str | Path) -> Path:
    """HF-style directory: thinker ``save_pretrained`` (config + weights) + the kit's extras and config."""
    root = Path(directory)
    model.thinker.save_pretrained(str(root))
    cfg_file = root / "config.json"
    cfg = json.loads(cfg_file.read_text())
    red = model.reducer
    if red is not None and red.sieve_layers > 0:
        cfg.setdefault("text_config", {})["av_refiner_layers"] = int(red.sieve_layers)
    cfg.setdefault("text_config", {})["compression_ratio"] = model.keep_ratio
    cfg_file.write_text(json.dumps(cfg, indent=2, sort_keys=True))
    save_kit_weights(model, root, include_llm=False)
    return root


# ------------------------------------------------------------------- official layout
_SIEVE = re.compile(r"^model\.bidir_encoder\.layers\.(\d+)\.(.+)$")


def map_official_key(key: str) -> str | None:
    """Official/released key -> ``OmniThinker.state_dict()`` key; None for talker/token2wav weights."""
    if key.startswith(IGNORED_PREFIXES):
        return None
    k = key[len("thinker.") :] if key.startswith("thinker.") else key
    m = _SIEVE.match(k)
    if m:
        return f"reducer.layers.{m.group(1)}.{m.group(2)}"
    if k.startswith("model.compressor."):
        return "reducer.scorer." + k[len("model.compressor.") :]
    if k.startswith(("audio_tower.", "visual.")):
        return "thinker.model." + k
    if k.startswith("model.") and not k.startswith(("model.language_model.", "model.visual.", "model.audio_tower.")):
        return "thinker.model.language_model." + k[len("model.") :]
    return "thinker." + k


def _weight_files(root: Path) -> list[Path]:
    files = sorted(root.glob("*.safetensors"))
    files = [f for f in files if f.name != KIT_WEIGHTS]
    if not files:
        raise FileNotFoundError(f"{root} holds no *.safetensors weight files")
    return files


def _dir_keys(root: Path) -> list[str]:
    keys: list[str] = []
    for f in _weight_files(root):
        with safe_open(str(f), framework="pt") as handle:
            keys.extend(handle.keys())
    return keys


def _read_dir(root: Path) -> tuple[dict[str, Tensor], dict[str, Any]]:
    if not root.is_dir():
        raise FileNotFoundError(f"checkpoint directory {root} does not exist")
    cfg_file = root / "config.json"
    if not cfg_file.is_file():
        raise FileNotFoundError(f"{root} is not a checkpoint directory: no config.json in it")
    state: dict[str, Tensor] = {}
    for f in _weight_files(root):
        state.update(load_file(str(f)))
    return state, json.loads(cfg_file.read_text())


def _official_text_config(config: Mapping[str, Any]) -> Mapping[str, Any]:
    if "thinker_config" in config:
        config = config["thinker_config"]
    return config.get("text_config", config)


def load_official_checkpoint(
    source: str | Path | Mapping[str, Tensor],
    model: OmniThinker,
    strict: bool = True,
    config: Mapping[str, Any] | None = None,
    extras_only: bool = False,
) -> LoadReport:
    """Load an official EchoingPixels checkpoint (directory or state dict) into ``model``.

    The text config fields ``av_refiner_layers`` (sieve depth, must equal the reducer's
    ``sieve_layers``) and ``compression_ratio`` are read from the directory's ``config.json`` or from
    ``config``. The compression ratio the checkpoint was trained at is reported
    (``report.config``, and logged) but never replaces the run's ``model.keep_ratio``: the budget
    is chosen at run time. ``extras_only`` loads only the sieve and scorer
    (the thinker was already loaded by transformers). ``strict`` raises ``ValueError`` listing
    missing and unexpected keys.
    """
    if isinstance(source, (str, Path)):
        state, file_cfg = _read_dir(Path(source))
        config = config if config is not None else file_cfg
        name = str(source)
    else:
        state, name = dict(source), "state dict"
    text_cfg = _official_text_config(config or {})
    report = LoadReport(config=dict(text_cfg))
    depth = text_cfg.get("av_refiner_layers")
    red = model.reducer
    if depth is not None:
        if red is None or red.sieve_layers == 0:
            raise ValueError(f"{name}: checkpoint has a sieve (av_refiner_layers={depth}) but the model has no CS2 reducer")
        if int(depth) != int(red.sieve_layers):
            raise ValueError(
                f"{name}: av_refiner_layers={depth} but the model's CS2 reducer has num_layers={red.sieve_layers}"
            )
    if text_cfg.get("compression_ratio") is not None:
        trained = check_ratio(text_cfg["compression_ratio"], f"{name}: compression_ratio")
        log.info("%s was trained at compression_ratio %s; this run keeps keep_ratio %s", name, trained, model.keep_ratio)

    mapped: dict[str, Tensor] = {}
    for key, value in state.items():
        target = map_official_key(key)
        if target is None or (extras_only and not target.startswith("reducer.")):
            report.ignored.append(key)
            continue
        mapped[target] = value
    expected = set(model.state_dict())
    if extras_only:
        expected = {k for k in expected if k.startswith("reducer.")}
    if model.config.get_text_config().tie_word_embeddings or model.config.tie_word_embeddings:
        expected.discard("thinker.lm_head.weight")
    _assign(model, mapped, expected, report)
    _raise_if_bad(report, name, strict)
    return report


def read_kit_config(root: Path) -> dict[str, Any] | None:
    """``ep_kit_config.json`` of a directory (None when it has none); ``ValueError`` naming a broken one."""
    cfg_file = root / KIT_CONFIG
    if not cfg_file.is_file():
        return None
    try:
        saved = json.loads(cfg_file.read_text())
    except json.JSONDecodeError as err:
        raise ValueError(f"{cfg_file} is not valid JSON: {err}") from err
    if not isinstance(saved, dict) or saved.get("format") != FORMAT:
        raise ValueError(f"{cfg_file}: format {getattr(saved, 'get', lambda _: None)('format')!r} is not {FORMAT!r}")
    return saved


def saved_components(root: Path, given: Mapping[str, Any]) -> dict[str, Any]:
    """The components a directory's record rebuilds, for the ``OmniThinker`` arguments not in ``given``.

    * no ``ep_kit_config.json``: a plain transformers directory (or the official layout) -> ``{}``;
    * a record (written by ``save_pretrained`` / ``ep-kit export``) -> its rope, reducer, keep ratio
      and candidate modalities, rebuilt; one that cannot be rebuilt is a ``ValueError`` naming the
      file and the component;
    * kit weights saved before records existed (version 1) -> ``{}`` when the caller gives the
      ``reducer``, else a ``ValueError`` saying what to pass (the weights need their reducer).
    """
    saved = read_kit_config(root)
    if saved is None:
        return {}
    if "components" in saved:
        if not isinstance(saved["components"], Mapping):
            raise ValueError(f"{root / KIT_CONFIG}: 'components' must be a mapping, got {saved['components']!r}")
        return build_components(saved["components"], str(root / KIT_CONFIG), skip=tuple(given))
    if "reducer" not in given:
        raise ValueError(
            f"{root}: holds ep-kit weights ({KIT_WEIGHTS}) but {KIT_CONFIG} records no components "
            "(written before component records): give the components they were saved with, e.g. "
            "OmniThinker.from_pretrained(dir, rope=..., reducer=..., keep_ratio=...), then save_pretrained "
            "again to record them"
        )
    return {}


def load_extras_from_dir(model: OmniThinker, root: Path) -> LoadReport | None:
    """Called by ``OmniThinker.from_pretrained``: load the kit's or the official sieve/scorer if present."""
    if (root / KIT_WEIGHTS).is_file():
        if model.reducer is None:  # the record has none, or the caller chose reducer=None
            log.info("%s: no reducer, so no reducer weights loaded", root)
            return None
        return load_kit_weights(model, root, strict=True)
    keys = _dir_keys(root)
    if not any(_SIEVE.match(k.removeprefix("thinker.")) or "model.compressor." in k for k in keys):
        return None
    if model.reducer is None or model.reducer.sieve_layers == 0:
        warnings.warn(f"{root} holds official sieve weights but no CS2 reducer was given: not loaded", stacklevel=3)
        return None
    with torch.no_grad():
        return load_official_checkpoint(root, model, strict=True, extras_only=True)
