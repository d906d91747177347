"""The model's components as ``class_path`` / ``init_args`` records, and the components rebuilt from them.

Why: a saved model directory must say which rotary layout, reducer (with its attention mode, scorer
and selector) and budget its weights belong to, in the form recipes and ``ep-kit --print_config``
use, so that ``OmniThinker.from_pretrained(dir)`` rebuilds the same model and a person can read (or
copy into a recipe) what was saved.

* :func:`describe` turns a component object into that record. A component's constructor arguments
  are read back from its attributes of the same name (``x_factory`` when the class keeps the
  factory it was given apart from what it built, as :class:`~ep_kit.reducers.ScoreSelect` does
  with ``scorer``); a class whose arguments cannot be read back is a ``ValueError`` naming it, so a
  record is never silently incomplete. Factories (a class, a ``functools.partial`` of one, or what
  jsonargparse builds for a ``Callable[[int], Scorer]`` argument) are recorded as the class and
  its keyword arguments.
* :func:`build_components` parses a record with jsonargparse, the parser LightningCLI uses for
  the recipes, and instantiates it.
"""

from __future__ import annotations

import functools
import importlib
import inspect
from collections.abc import Mapping, Sequence
from typing import Any

from jsonargparse import ArgumentParser
from torch import nn

#: the ``OmniThinker`` arguments a saved directory records (and ``from_pretrained`` rebuilds).
RECORDED = ("rope", "reducer", "keep_ratio", "candidate_modalities")


def class_path(cls: type) -> str:
    """The shortest import path of ``cls`` (``ep_kit.reducers.CS2`` rather than ``ep_kit.reducers.cs2.CS2``)."""
    parts = cls.__module__.split(".")
    for i in range(1, len(parts) + 1):
        module = ".".join(parts[:i])
        try:
            if getattr(importlib.import_module(module), cls.__qualname__, None) is cls:
                return f"{module}.{cls.__qualname__}"
        except ImportError:  # pragma: no cover - a parent package that cannot be imported alone
            continue
    return f"{cls.__module__}.{cls.__qualname__}"


def _factory_target(value: functools.partial) -> tuple[type, dict[str, Any]]:
    """The class and keyword arguments of a partial (jsonargparse wraps the class in its instantiator)."""
    func, args = value.func, value.args
    if not isinstance(func, type) and args and isinstance(args[0], type):
        func, args = args[0], args[1:]
    if not isinstance(func, type) or args:
        raise ValueError(f"cannot record the factory {value!r}: only a class with keyword arguments can be recorded")
    return func, dict(value.keywords)


def _init_parameters(cls: type) -> list[inspect.Parameter]:
    if cls.__init__ in (object.__init__, nn.Module.__init__):  # no constructor of its own: no arguments
        return []
    params = list(inspect.signature(cls.__init__).parameters.values())[1:]
    bad = [p.name for p in params if p.kind in (p.VAR_POSITIONAL, p.VAR_KEYWORD, p.POSITIONAL_ONLY)]
    if bad:
        raise ValueError(f"cannot record {cls.__qualname__}: its constructor takes {bad} (*args/**kwargs/positional-only)")
    return params


def describe(value: Any, where: str = "component") -> Any:
    """``value`` as a recipe would write it: plain values as they are, components as class_path/init_args.

    ``where`` names the value in errors (e.g. ``reducer.init_args.selector``).
    """
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    if isinstance(value, (list, tuple)):
        return [describe(v, f"{where}[{i}]") for i, v in enumerate(value)]
    if isinstance(value, Mapping):
        return {str(k): describe(v, f"{where}.{k}") for k, v in value.items()}
    if isinstance(value, type):
        return {"class_path": class_path(value)}
    if isinstance(value, functools.partial):
        cls, kwargs = _factory_target(value)
        out: dict[str, Any] = {"class_path": class_path(cls)}
        if kwargs:
            out["init_args"] = {k: describe(v, f"{where}.init_args.{k}") for k, v in kwargs.items()}
        return out
    cls = type(value)
    init_args: dict[str, Any] = {}
    for param in _init_parameters(cls):
        name = param.name
        attribute = f"{name}_factory" if hasattr(value, f"{name}_factory") else name
        if not hasattr(value, attribute):
            raise ValueError(
                f"cannot record {where} ({class_path(cls)}): it keeps no attribute for its argument {name!r}, "
                "so the saved directory could not rebuild it"
            )
        init_args[name] = describe(getattr(value, attribute), f"{where}.init_args.{name}")
    out = {"class_path": class_path(cls)}
    if init_args:
        out["init_args"] = init_args
    return out


def record(model: Any) -> dict[str, Any]:
    """The :data:`RECORDED` arguments of an ``OmniThinker`` (its rope, reducer and budget) as a record."""
    return {
        "rope": describe(model.rope, "rope"),
        "reducer": describe(model.reducer, "reducer"),
        "keep_ratio": float(model.keep_ratio),
        "candidate_modalities": list(model.candidate_modalities),
    }


def _parser() -> ArgumentParser:
    from ep_kit.reducers.base import TokenReducer
    from ep_kit.rope import MultiAxisRoPE

    parser = ArgumentParser(exit_on_error=False)
    parser.add_argument("--rope", type=MultiAxisRoPE | None, default=None)
    parser.add_argument("--reducer", type=TokenReducer | None, default=None)
    parser.add_argument("--keep_ratio", type=float, default=1.0)
    parser.add_argument("--candidate_modalities", type=list[str], default=["video", "audio"])
    return parser


def build_components(saved: Mapping[str, Any], source: str, skip: Sequence[str] = ()) -> dict[str, Any]:
    """Instantiate a :func:`record` (``OmniThinker`` keyword arguments); ``skip`` = arguments the caller gives.

    Raises ``ValueError`` naming ``source`` and the component that cannot be rebuilt (unknown
    class, wrong arguments, missing entry).
    """
    missing = [k for k in RECORDED if k not in saved and k not in skip]
    if missing:
        raise ValueError(f"{source}: the component record has no {missing} (expected {list(RECORDED)})")
    parser = _parser()
    out: dict[str, Any] = {}
    for key in RECORDED:
        if key in skip:
            continue
        try:
            parsed = parser.parse_object({key: saved[key]})
            out[key] = parser.instantiate_classes(parsed)[key]
        except Exception as err:  # jsonargparse and the components' own checks raise several types
            raise ValueError(f"{source}: cannot rebuild the model's {key} from {saved[key]!r}: {err}") from err
    return out
