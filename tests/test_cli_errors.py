"""What ``ep-kit`` says when the configuration is wrong, and its help for every component.

The expected placeholders are read from the recipe files themselves (YAML), not from the CLI; the
component list is discovered by walking the kit's modules, independent of what the packages export.
"""

from __future__ import annotations

import contextlib
import importlib
import inspect
import io
import pkgutil
from pathlib import Path

import pytest
import yaml
from _toy import REPO, TOY_ROW

from ep_kit.cli import main, parse

RECIPES = REPO / "recipes"


def _exit_code(args: list[str], capsys) -> tuple[int, str, str]:
    with pytest.raises(SystemExit) as exc:
        main(args)
    out, err = capsys.readouterr()
    return exc.value.code, out, err


def test_no_recipe_names_what_is_required(capsys):
    code, _, err = _exit_code(["fit"], capsys)
    assert code == 2
    assert "ep-kit fit needs a recipe: --config FILE" in err
    assert "NoneType" not in err and "Traceback" not in err


def _placeholders(*files: Path) -> set[str]:
    """``/path/to`` values of the given YAML files (found by hand, not through the CLI)."""
    found: set[str] = set()

    def walk(v):
        if isinstance(v, dict):
            for x in v.values():
                walk(x)
        elif isinstance(v, list):
            for x in v:
                walk(x)
        elif isinstance(v, str) and v.startswith("/path/to/"):
            found.add(v)

    for f in files:
        walk(yaml.safe_load(f.read_text()))
    return found


def test_all_placeholder_paths_are_reported_together_without_a_traceback(capsys):
    code, _, err = _exit_code(["fit", "--config", str(RECIPES / "cs2_ste_20.yaml")], capsys)
    assert code == 2
    expected = _placeholders(RECIPES / "_base" / "thinker_3b.yaml", RECIPES / "_base" / "data_instruct_3b.yaml")
    reported = [line.strip() for line in err.splitlines() if line.endswith("(placeholder)")]
    assert {line.split(": ", 1)[1].removesuffix(" (placeholder)") for line in reported} == expected
    # data.init_args.processor is linked from the thinker path: reported once, as the thinker's
    assert len(reported) == len(expected) == 3
    assert "model.thinker.init_args.path: /path/to/Qwen2.5-Omni-3B (placeholder)" in err
    assert "Traceback" not in err and len(err.splitlines()) <= 8


def test_a_missing_path_is_reported_with_the_placeholders(tmp_path, capsys):
    missing = tmp_path / "nowhere"
    code, _, err = _exit_code(
        ["test", "--config", str(RECIPES / "eval_3b.yaml"), f"--model.thinker.init_args.path={missing}"], capsys
    )
    assert code == 2
    assert f"model.thinker.init_args.path: {missing} (does not exist)" in err
    expected = _placeholders(RECIPES / "_base" / "data_eval.yaml")
    assert {line.split(": ", 1)[1].removesuffix(" (placeholder)") for line in err.splitlines()
            if line.endswith("(placeholder)")} == expected
    assert "Traceback" not in err


def test_print_config_lists_unset_placeholders_on_stderr(capsys):
    code, out, err = _exit_code(["fit", "--config", str(RECIPES / "cs2_ste_20.yaml"), "--print_config"], capsys)
    assert code == 0
    assert yaml.safe_load(out)["model"]["thinker"]["init_args"]["path"] == "/path/to/Qwen2.5-Omni-3B"
    assert "# 3 path(s) of this configuration are not set:" in err
    assert "#   data.init_args.source.init_args.train: /path/to/av_instruct/train.jsonl (placeholder)" in err


def test_toy_recipe_print_config_has_no_note(capsys):
    code, _, err = _exit_code(["fit", "--config", str(TOY_ROW), "--print_config"], capsys)
    assert code == 0 and "not set" not in err


def _defined_subclasses(package: str, base: type) -> list[type]:
    """Concrete classes deriving from ``base`` defined in ``package`` or its submodules (walked, not imported by name)."""
    module = importlib.import_module(package)
    names = [package]
    if hasattr(module, "__path__"):
        names += [f"{package}.{m.name}" for m in pkgutil.iter_modules(module.__path__)]
    found = []
    for name in names:
        mod = importlib.import_module(name)
        for _, cls in inspect.getmembers(mod, inspect.isclass):
            if cls.__module__ == name and issubclass(cls, base) and cls is not base:
                found.append(cls)
    return found


def _help(args: list[str]) -> str:
    out = io.StringIO()
    with contextlib.redirect_stdout(out), pytest.raises(SystemExit) as exc:
        parse(args)
    assert exc.value.code == 0, args
    return out.getvalue()


def _components():
    from ep_kit.masks import AttentionMode
    from ep_kit.reducers.base import TokenReducer
    from ep_kit.scorers import Scorer
    from ep_kit.selectors import Selector

    return [
        ("ep_kit.reducers", TokenReducer, "--model.reducer.help", False),
        ("ep_kit.scorers", Scorer, "--model.reducer.init_args.scorer.help", True),
        ("ep_kit.selectors", Selector, "--model.reducer.init_args.selector.help", True),
        ("ep_kit.masks", AttentionMode, "--model.reducer.init_args.attention.help", True),
    ]


@pytest.mark.parametrize("package,base,flag,needs_reducer", _components(), ids=lambda v: str(v).split(".")[-1])
def test_every_component_is_exported_and_has_help_by_its_short_name(package, base, flag, needs_reducer):
    classes = _defined_subclasses(package, base)
    assert len(classes) >= 3, package
    exported = importlib.import_module(package)
    for cls in classes:
        assert getattr(exported, cls.__name__, None) is cls, f"{cls.__module__}.{cls.__name__} not exported from {package}"
        args = (["--config", str(TOY_ROW)] if needs_reducer else []) + [flag, cls.__name__]
        text = _help(args)
        assert f"help={package}.{cls.__name__}" in text, (cls, text[:300])
