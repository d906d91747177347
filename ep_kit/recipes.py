"""Which ``--config`` files make up a shipped training recipe.

The EchoingPixels recipe of each scale, ``recipes/cs2_ste_20.yaml`` and ``recipes/toy/cs2_ste_20.yaml``,
holds the whole method. The other budgets (``cs2_ste_10``, ``cs2_ste_5``, ``cs2_ste_10_7b``) and every
ablation row (``ablation_*``) are overlays on it that hold only what differs, and run after it::

    ep-kit fit --config recipes/cs2_ste_20.yaml --config recipes/ablation_causal.yaml

(later ``--config`` files override earlier ones key by key; a ``class_path`` that changes drops the
previous class's ``init_args`` the new class does not take). The table drivers form a row's config
list with :func:`recipe_configs`, so a row runs exactly as its header comment says.

:func:`method_from_recipe` reads the method a recipe runs (its reducer, budget and rotary layout)
from the same files, parsed by the kit's own CLI parser: the efficiency benchmark, the FLOP model
and the tables take their methods from the recipes users run, never from a list of their own.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import yaml

if TYPE_CHECKING:
    from ep_kit.reducers.base import TokenReducer
    from ep_kit.rope import MultiAxisRoPE

#: the EchoingPixels recipe every budget and ablation overlay of the same folder is laid over.
BASE = "cs2_ste_20.yaml"
#: file-name prefixes of the overlays on :data:`BASE`.
OVERLAY_PREFIXES = ("cs2_ste_", "ablation_")


def overlay_base(recipe: Path | str) -> Path | None:
    """The recipe ``recipe`` is an overlay on (``cs2_ste_20.yaml`` in its folder), or None for a whole recipe.

    A budget or ablation file is an overlay when its folder holds the EchoingPixels recipe (the
    shipped ``recipes/`` and ``recipes/toy/``); a file of that name elsewhere is taken as whole.
    """
    path = Path(recipe)
    if path.name == BASE or not path.name.startswith(OVERLAY_PREFIXES):
        return None
    base = path.parent / BASE
    return base if base.is_file() else None


def recipe_configs(recipe: Path | str) -> list[Path]:
    """The config files of ``recipe`` in ``--config`` order: ``[base, recipe]`` for an overlay, else ``[recipe]``."""
    path = Path(recipe)
    base = overlay_base(path)
    return [path] if base is None else [base, path]


def config_args(recipe: Path | str) -> list[str]:
    """``["--config", base, "--config", recipe]`` (or one ``--config`` for a whole recipe)."""
    return [a for c in recipe_configs(recipe) for a in ("--config", str(c))]


# ------------------------------------------------------------------------------ methods of recipes
@dataclass
class RecipeMethod:
    """The token-reduction method a recipe runs, built from its files exactly as ``ep-kit`` would.

    Attributes:
        name: the stem of the last config file (the row's label, e.g. ``fastv_20``).
        reducer: the recipe's ``model.reducer``, instantiated (None: the full model).
        keep_ratio: the recipe's ``model.keep_ratio``.
        rope: the recipe's ``model.rope``, instantiated (None: the checkpoint's own TMRoPE).
        configs: the config files, in ``--config`` order.
        candidate_modalities: the recipe's ``model.candidate_modalities``.
        reducer_config: ``model.reducer`` as parsed (``class_path``/``init_args``; None for the full
            model): two methods with equal ones run the same reducer (e.g. CS2 at two budgets).
    """

    name: str
    reducer: TokenReducer | None
    keep_ratio: float
    rope: MultiAxisRoPE | None
    configs: tuple[Path, ...]
    candidate_modalities: tuple[str, ...] = ("video", "audio")
    reducer_config: dict[str, Any] | None = None


def _sets_reducer(path: Path) -> bool:
    """Whether the YAML file ``path`` holds a ``model.reducer`` entry (inline, or in a ``model: FILE`` it names)."""
    data = yaml.safe_load(path.read_text()) or {}
    model = data.get("model") if isinstance(data, dict) else None
    if isinstance(model, str) and (path.parent / model).is_file():
        model = yaml.safe_load((path.parent / model).read_text())
    return isinstance(model, dict) and "reducer" in model


def method_from_recipe(configs: Sequence[str | Path] | str | Path) -> RecipeMethod:
    """Parse ``configs`` (a base, then overlays) as ``ep-kit --config A --config B`` does; build only the method.

    The kit's own CLI parser (:class:`ep_kit.cli.EPKitCLI`, same links and ``null`` handling) merges
    the files, so overlays, ``class_path`` changes and relative file references resolve as in a
    run; nothing but ``model.reducer`` and ``model.rope`` is instantiated (no thinker, data or
    trainer), so recipes with ``/path/to`` placeholders work. Raises ``FileNotFoundError`` for a
    missing file and ``ValueError`` naming the files when they do not parse or none of them sets
    ``model.reducer`` (a full-model row says ``reducer: null``).
    """
    files = [Path(configs)] if isinstance(configs, (str, Path)) else [Path(c) for c in configs]
    if not files:
        raise ValueError("method_from_recipe needs at least one config file")
    for path in files:
        if not path.is_file():
            raise FileNotFoundError(f"recipe {path} does not exist")
    named = " + ".join(str(p) for p in files)
    if not any(_sets_reducer(p) for p in files):
        raise ValueError(
            f"{named}: no model.reducer in these configs, so they name no method "
            "(a method recipe sets model.reducer, the full model sets it to null; an overlay goes after its base)"
        )
    model = _parse_model_config(files, named)
    built = _instantiate_method_parts(model.get("reducer"), model.get("rope"), named)
    reducer_cfg = model.get("reducer")
    return RecipeMethod(
        name=files[-1].stem,
        reducer=built.reducer,
        keep_ratio=float(model.get("keep_ratio")),
        rope=built.rope,
        configs=tuple(files),
        candidate_modalities=tuple(model.get("candidate_modalities") or ("video", "audio")),
        reducer_config=None if reducer_cfg is None else plain_config(reducer_cfg),
    )


def plain_config(value: Any) -> Any:
    """A parsed jsonargparse value as plain dicts/lists (private ``__path__`` entries dropped)."""
    if hasattr(value, "as_dict"):
        value = value.as_dict()
    if isinstance(value, dict):
        return {k: plain_config(v) for k, v in value.items() if k != "__path__"}
    if isinstance(value, list):
        return [plain_config(v) for v in value]
    return value


def _parse_model_config(files: Sequence[Path], named: str) -> Any:
    """``model`` of the merged config of ``files``, parsed by the kit's CLI parser without instantiating anything."""
    from jsonargparse import ArgumentError

    from ep_kit.cli import parse

    args = [a for p in files for a in ("--config", str(p))]
    # A parse must not reseed the caller's random generators: the recipe's seed is for runs.
    args.append("--seed_everything=false")
    try:
        cli = parse(args, exit_on_error=False)
    except (ArgumentError, SystemExit) as err:
        raise ValueError(f"{named}: not a valid ep-kit config: {err}") from err
    return cli.config.model


def _instantiate_method_parts(reducer: Any, rope: Any, named: str) -> Any:
    """``reducer`` and ``rope`` parsed configs -> instances, through jsonargparse (as the CLI builds them)."""
    from jsonargparse import ArgumentError, ArgumentParser

    from ep_kit.reducers.base import TokenReducer
    from ep_kit.rope import MultiAxisRoPE

    parser = ArgumentParser(exit_on_error=False)
    parser.add_argument("--reducer", type=TokenReducer | None, default=None)
    parser.add_argument("--rope", type=MultiAxisRoPE | None, default=None)
    try:
        return parser.instantiate_classes(parser.parse_object({"reducer": reducer, "rope": rope}))
    except (ArgumentError, TypeError, ValueError) as err:
        raise ValueError(f"{named}: model.reducer / model.rope could not be built: {err}") from err


def baseline_keys(rows_dir: Path | str) -> list[str]:
    """The training-free methods with row recipes ``<key>_<pct>.yaml`` in ``rows_dir``, sorted by key.

    The one discovery rule of the table drivers: a new baseline's recipes add its rows, with no edit
    to the main table or the efficiency benchmark.
    """
    keys = set()
    for path in Path(rows_dir).glob("*_*.yaml"):
        key, _, pct = path.stem.rpartition("_")
        if pct.isdigit():
            keys.add(key)
    return sorted(keys)


#: file names of the evaluation base a ``baselines/`` overlay goes on, looked up in its folder, then one up.
EVALUATION_BASES = ("base.yaml", "eval_3b.yaml")


def evaluation_base(recipe: Path | str) -> Path | None:
    """The evaluation base a training-free overlay ``baselines/<row>.yaml`` goes on, or None for other files.

    ``recipes/toy/baselines/base.yaml`` for the toy rows, ``recipes/eval_3b.yaml`` for the real ones
    (the base each row's header comment names).
    """
    path = Path(recipe)
    if path.parent.name != "baselines" or path.name in EVALUATION_BASES:
        return None
    for folder in (path.parent, path.parent.parent):
        for name in EVALUATION_BASES:
            if (folder / name).is_file():
                return folder / name
    return None


def method_configs(recipe: Path | str, eval_base: Path | str | None = None) -> list[Path]:
    """The config files a row recipe runs with, base first: ``[evaluation base, overlay]`` for a
    training-free ``baselines/`` row (``eval_base`` overrides its default), :func:`recipe_configs`
    otherwise (``[cs2_ste_20.yaml, overlay]`` for a budget or ablation overlay)."""
    path = Path(recipe)
    base = evaluation_base(path)
    if base is None:
        return recipe_configs(path)
    return [Path(eval_base) if eval_base is not None else base, path]
