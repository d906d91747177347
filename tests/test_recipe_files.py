"""Every YAML file under ``recipes/`` parses through the kit's CLI parser, the way it is meant to be used.

One rule per kind of file (a file no rule covers fails ``test_every_recipe_file_is_covered``):

* whole recipes parse alone: the EchoingPixels recipe of each scale (``cs2_ste_20.yaml``), the evaluation
  recipes, the toy pretraining recipe and the toy evaluation base;
* budget and ablation rows are overlays on ``cs2_ste_20.yaml`` (:mod:`ep_kit.recipes`): parsed on it,
  they change nothing but what they name, their header gives that very command, a budget is the
  number in the file name and an ablation row keeps the paper's 20 %;
* ``eval_benchmarks.yaml`` is an overlay on a trained row: only the trainer and the data change;
* the training-free rows (``baselines/``) are overlays on their evaluation base: only what they name
  changes and the budget is the number in the file name;
* a ``_base/`` part is parsed through a recipe that uses it: every value of the part is in the resolved
  config where the recipe puts it.

Parsing only (links applied, nothing built): one parser serves every file.
``recipes/launch/`` holds shell scripts (``test_recipes.py`` parses their commands).
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import pytest
import yaml
from _toy import REPO

from ep_kit.cli import parse as parse_only
from ep_kit.recipes import overlay_base, plain_config, recipe_configs

RECIPES = REPO / "recipes"
TOY = RECIPES / "toy"
#: whole recipes, each parsed alone.
WHOLE = [
    RECIPES / "cs2_ste_20.yaml",
    RECIPES / "eval_3b.yaml",
    RECIPES / "eval_7b.yaml",
    TOY / "cs2_ste_20.yaml",
    TOY / "pretrain.yaml",
    TOY / "baselines" / "base.yaml",
]
#: overlays that are not training rows -> the recipe they are laid over.
OTHER_OVERLAYS = {RECIPES / "eval_benchmarks.yaml": RECIPES / "cs2_ste_20.yaml"}
#: baseline folders -> their evaluation base.
BASELINE_BASES = {RECIPES / "baselines": RECIPES / "eval_3b.yaml", TOY / "baselines": TOY / "baselines" / "base.yaml"}
#: parts no YAML file names, with how they are used: (recipe, key, extra arguments).
PART_USES = {
    RECIPES / "_base" / "trainer_4gpu_fsdp.yaml": (
        RECIPES / "cs2_ste_20.yaml", "trainer", ["--trainer", str(RECIPES / "_base" / "trainer_4gpu_fsdp.yaml")]
    ),
}
#: the budget of every ablation row (the paper's ablation table).
ABLATION_BUDGET = 0.2


def all_files() -> list[Path]:
    return sorted(RECIPES.rglob("*.yaml"))


def is_part(path: Path) -> bool:
    return "_base" in path.relative_to(RECIPES).parts


def is_row_overlay(path: Path) -> bool:
    return overlay_base(path) is not None


def baseline_base(path: Path) -> Path | None:
    base = BASELINE_BASES.get(path.parent)
    return base if base is not None and path != base else None


def rule(path: Path) -> str | None:
    """The rule that covers ``path`` (None: no rule, the file is untested)."""
    if path in WHOLE:
        return "whole"
    if is_row_overlay(path):
        return "row overlay"
    if path in OTHER_OVERLAYS:
        return "overlay"
    if baseline_base(path) is not None:
        return "baseline overlay"
    if is_part(path) and (path in PART_USES or part_use(path) is not None):
        return "part"
    return None


def configs_of(path: Path) -> list[Path]:
    """The ``--config`` files ``path`` runs with, in order (``path`` last)."""
    if path in OTHER_OVERLAYS:
        return [*recipe_configs(OTHER_OVERLAYS[path]), path]
    base = baseline_base(path)
    if base is not None:
        return [base, path]
    return recipe_configs(path)


# ----------------------------------------------------------------------------------- parsing
@pytest.fixture(scope="module")
def parse():
    """``parse(configs, *extra)`` -> the resolved config as a plain dict (the ``config`` list left out)."""
    cli = parse_only(["--config", str(TOY / "cs2_ste_20.yaml")])
    parser = cli.parser
    cache: dict[tuple, dict] = {}

    def run(configs: list[Path], *extra: str) -> dict:
        key = (*map(str, configs), *extra)
        if key not in cache:
            cfg = parser.parse_args([*(a for c in configs for a in ("--config", str(c))), *extra]).as_dict()
            cfg.pop("config", None)
            cache[key] = plain_config(cfg)
        return cache[key]

    return run


def flatten(value: Any, prefix: str = "") -> dict[str, Any]:
    """``{"a.b.c": leaf}``; lists are leaves."""
    if isinstance(value, dict) and value:
        out: dict[str, Any] = {}
        for k, v in value.items():
            out.update(flatten(v, f"{prefix}.{k}" if prefix else str(k)))
        return out
    return {prefix: value}


def differing_keys(a: dict, b: dict) -> set[str]:
    fa, fb = flatten(a), flatten(b)
    return {k for k in fa.keys() | fb.keys() if k not in fa or k not in fb or fa[k] != fb[k]}


def named_keys(overlay: Path) -> set[str]:
    """What an overlay file names: its leaf keys; a ``class_path`` names its whole object (a new class
    brings its own ``init_args``)."""
    raw = yaml.safe_load(overlay.read_text()) or {}
    return {k[: -len(".class_path")] if k.endswith(".class_path") else k for k in flatten(raw)}


def covered(key: str, names: set[str]) -> bool:
    return any(key == n or key.startswith(n + ".") for n in names)


def get(cfg: dict, dotted: str) -> Any:
    for part in dotted.split("."):
        cfg = cfg[part]
    return cfg


def contains(resolved: Any, part: Any) -> bool:
    """Every value of ``part`` is in ``resolved`` (extra keys in ``resolved``: the classes' defaults)."""
    if isinstance(part, dict):
        return isinstance(resolved, dict) and all(k in resolved and contains(resolved[k], v) for k, v in part.items())
    if isinstance(part, list):  # a YAML list may resolve to a tuple (e.g. AdamW's betas)
        return isinstance(resolved, (list, tuple)) and len(resolved) == len(part) and all(
            contains(r, p) for r, p in zip(resolved, part, strict=True)
        )
    return resolved == part


def part_use(part: Path) -> tuple[Path, str, list[str]] | None:
    """(a recipe that names ``part``, the key it puts it under, extra arguments), or None if none does."""
    if part in PART_USES:
        return PART_USES[part]
    for recipe in all_files():
        if is_part(recipe):
            continue
        raw = yaml.safe_load(recipe.read_text()) or {}
        for key, value in flatten(raw).items():
            if isinstance(value, str) and value.endswith(".yaml") and (recipe.parent / value).resolve() == part:
                return recipe, key, []
    return None


# ------------------------------------------------------------------------------------- tests
def test_every_recipe_file_is_covered():
    """A new YAML file under recipes/ needs a rule here (and so gets tested) before it can ship."""
    files = all_files()
    assert RECIPES / "cs2_ste_20.yaml" in files and TOY / "cs2_ste_20.yaml" in files
    uncovered = [str(p.relative_to(REPO)) for p in files if rule(p) is None]
    assert not uncovered, f"no rule parses these files (add one to tests/test_recipe_files.py): {uncovered}"
    assert not [p for p in (*WHOLE, *OTHER_OVERLAYS, *PART_USES) if not p.is_file()]


@pytest.mark.parametrize("path", WHOLE, ids=lambda p: str(p.relative_to(RECIPES)))
def test_whole_recipe_parses_alone(path, parse):
    assert recipe_configs(path) == [path]
    cfg = parse([path])
    model = cfg["model"]
    if path.name == "cs2_ste_20.yaml":  # the whole EchoingPixels method
        reducer = model["reducer"]["init_args"]
        assert model["reducer"]["class_path"] == "ep_kit.reducers.CS2" and model["keep_ratio"] == 0.2
        assert reducer["attention"]["class_path"] == "ep_kit.masks.Bidirectional" and reducer["prefusion"] is True
        assert reducer["scorer"]["class_path"] == "ep_kit.scorers.MLPScorer"
        assert reducer["selector"] == {"class_path": "ep_kit.selectors.STETopK", "init_args": {"tau": 1.0}}
        assert model["rope"]["class_path"] == "ep_kit.rope.SyncRoPE"
    else:  # evaluation bases and the toy base's pretraining: the stock model
        assert model["reducer"] is None and model["keep_ratio"] == 1.0
    if path.parent == RECIPES:
        size = "7B" if "7b" in path.stem else "3B"
        assert model["thinker"]["init_args"]["path"] == f"/path/to/Qwen2.5-Omni-{size}"
        assert cfg["data"]["init_args"]["processor"] == model["thinker"]["init_args"]["path"]  # linked


ROW_OVERLAYS = [p for p in all_files() if is_row_overlay(p)]


def test_every_budget_and_ablation_row_is_an_overlay():
    names = {str(p.relative_to(RECIPES)) for p in ROW_OVERLAYS}
    rows = {f"ablation_{a}.yaml" for a in
            ("causal", "gumbel", "intramodal", "no_prefusion", "no_syncrope", "per_modality", "similarity")}
    rows |= {"cs2_ste_10.yaml", "cs2_ste_5.yaml"}
    assert names == rows | {f"toy/{r}" for r in rows} | {"cs2_ste_10_7b.yaml"}


@pytest.mark.parametrize("path", ROW_OVERLAYS, ids=lambda p: str(p.relative_to(RECIPES)))
def test_row_overlay_changes_only_what_it_names(path, parse):
    base = path.parent / "cs2_ste_20.yaml"
    assert recipe_configs(path) == [base, path]
    text = path.read_text()
    command = f"ep-kit fit --config {base.relative_to(REPO)} --config {path.relative_to(REPO)}"
    assert re.search(rf"^#\s+{re.escape(command)}$", text, re.M), f"{path.name}: header lacks `{command}`"
    raw = yaml.safe_load(text)
    assert "seed_everything" not in raw and "trainer" not in raw  # an overlay, not a copy
    full, row = parse([base]), parse([base, path])
    changed = differing_keys(full, row)
    assert changed, f"{path.name} changes nothing"
    names = named_keys(path)
    assert all(covered(k, names) for k in changed), sorted(k for k in changed if not covered(k, names))
    budget = re.fullmatch(r"cs2_ste_(\d+)(_\w+)?", path.stem)
    expected = int(budget[1]) / 100 if budget else ABLATION_BUDGET
    assert row["model"]["keep_ratio"] == pytest.approx(expected)
    assert row["model"]["reducer"]["class_path"] == "ep_kit.reducers.CS2"


def test_ablation_rows_swap_the_paper_component(parse):
    """What each ablation overlay resolves to, at both scales (the sibling settings kept)."""
    for scale in (RECIPES, TOY):
        base = parse([scale / "cs2_ste_20.yaml"])["model"]

        def row(name: str, scale: Path = scale) -> dict:
            return parse([scale / "cs2_ste_20.yaml", scale / f"{name}.yaml"])["model"]

        sieve = base["reducer"]["init_args"]
        assert row("ablation_causal")["reducer"]["init_args"] == {**sieve, "attention": {"class_path": "ep_kit.masks.Causal"}}
        assert row("ablation_intramodal")["reducer"]["init_args"] == {
            **sieve, "attention": {"class_path": "ep_kit.masks.IntraModal"}
        }
        assert row("ablation_no_prefusion")["reducer"]["init_args"] == {**sieve, "prefusion": False}
        assert row("ablation_gumbel")["reducer"]["init_args"] == {
            **sieve, "selector": {"class_path": "ep_kit.selectors.GumbelTopK", "init_args": {"tau": 1.0}}
        }
        per = row("ablation_per_modality")["reducer"]["init_args"]
        assert per == {**sieve, "selector": {"class_path": "ep_kit.selectors.PerModalityTopK",
                                             "init_args": {"selector": sieve["selector"]}}}
        sim = row("ablation_similarity")["reducer"]["init_args"]
        assert sim["scorer"]["class_path"] == "ep_kit.scorers.SimilarityScorer"
        assert sim["selector"] == {"class_path": "ep_kit.selectors.HardTopK"}  # no STE temperature carried over
        assert {k: v for k, v in sim.items() if k not in ("scorer", "selector")} == {
            k: v for k, v in sieve.items() if k not in ("scorer", "selector")
        }
        no_sync = row("ablation_no_syncrope")
        assert no_sync["rope"]["class_path"] == "ep_kit.rope.TMRoPE" and "sections" not in no_sync["rope"]["init_args"]
        assert no_sync["reducer"] == base["reducer"]


def test_7b_overlay_swaps_thinker_data_and_budget_only(parse):
    base, row = parse([RECIPES / "cs2_ste_20.yaml"]), parse(recipe_configs(RECIPES / "cs2_ste_10_7b.yaml"))
    assert row["model"]["thinker"]["init_args"]["path"] == "/path/to/Qwen2.5-Omni-7B"
    assert row["data"]["init_args"]["processor"] == "/path/to/Qwen2.5-Omni-7B"  # linked from the 7B thinker
    changed = differing_keys(base, row)
    assert all(covered(k, {"model.thinker", "model.keep_ratio", "data"}) for k in changed), sorted(changed)


@pytest.mark.parametrize("path", sorted(OTHER_OVERLAYS), ids=lambda p: p.name)
def test_evaluation_overlay_on_a_trained_row_keeps_the_model(path, parse):
    row, evaluated = parse(recipe_configs(OTHER_OVERLAYS[path])), parse(configs_of(path))
    assert evaluated["model"] == row["model"]  # the row's own model, rope, reducer and budget
    assert {k.split(".")[0] for k in differing_keys(row, evaluated)} == {"trainer", "data"}
    assert evaluated["data"]["init_args"]["source"]["class_path"] == "ep_kit.data.BenchmarkSuite"


BASELINES = [p for p in all_files() if baseline_base(p) is not None]


@pytest.mark.parametrize("path", BASELINES, ids=lambda p: str(p.relative_to(RECIPES)))
def test_baseline_overlay_changes_only_what_it_names_at_its_budget(path, parse):
    base = baseline_base(path)
    full, row = parse([base]), parse([base, path])
    names = named_keys(path)
    changed = differing_keys(full, row)
    assert all(covered(k, names) for k in changed), sorted(k for k in changed if not covered(k, names))
    if path.stem == "full":
        assert row == full and row["model"]["reducer"] is None
        return
    assert row["model"]["keep_ratio"] == pytest.approx(int(path.stem.rsplit("_", 1)[1]) / 100)
    assert row["model"]["reducer"]["class_path"] == yaml.safe_load(path.read_text())["model"]["reducer"]["class_path"]


PARTS = [p for p in all_files() if is_part(p)]


@pytest.mark.parametrize("part", PARTS, ids=lambda p: str(p.relative_to(RECIPES)))
def test_base_part_is_used_by_a_recipe_and_resolves_there(part, parse):
    use = part_use(part)
    assert use is not None, f"no recipe uses {part.relative_to(REPO)}"
    recipe, key, extra = use
    resolved = get(parse(configs_of(recipe), *extra), key)
    assert contains(resolved, yaml.safe_load(part.read_text())), f"{key} of {recipe.name} vs {part.name}"
