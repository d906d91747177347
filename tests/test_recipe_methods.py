"""``ep_kit.recipes.method_from_recipe``: the method a recipe runs, parsed by the kit's own CLI parser.

Expected values are read from the YAML files themselves (class path, budget, PyramidDrop's stage
ratio rule), so the test follows the recipes; what it checks is that the parser merges base and
overlay as ``ep-kit`` does and builds exactly that reducer, without building model, data or trainer
(the real recipes hold ``/path/to`` placeholders).
"""

from __future__ import annotations

import functools
from pathlib import Path

import pytest
import yaml

from ep_kit import flops
from ep_kit.models.tiny import qwen_omni_3b_config, tiny_thinker_config
from ep_kit.recipes import evaluation_base, method_configs, method_from_recipe
from ep_kit.reducers import CS2
from ep_kit.reducers.pyramiddrop import PyramidDrop
from ep_kit.rope import SyncRoPE

RECIPES = Path(__file__).resolve().parents[1] / "recipes"
BASELINES = sorted((RECIPES / "baselines").glob("*_*.yaml")) + sorted((RECIPES / "toy" / "baselines").glob("*_*.yaml"))


@functools.cache
def built(recipe: Path):
    """``method_from_recipe`` of a row recipe on its base (cached: a parse takes about a second)."""
    return method_from_recipe(method_configs(recipe))


def _class_name(class_path: str) -> str:
    return class_path.rsplit(".", 1)[-1]


def test_every_baseline_has_three_budgets_at_both_scales():
    keys = {
        scale: {p.stem.rsplit("_", 1)[0] for p in BASELINES if (p.parent.parent.name == "toy") == (scale == "toy")}
        for scale in ("real", "toy")
    }
    assert keys["real"] == keys["toy"] >= {"fastv", "pyramiddrop", "omnizip", "intramodal", "random"}
    assert len(BASELINES) == 2 * 3 * len(keys["real"])  # each method at 20/10/5 %, nothing else
    for key in keys["real"]:
        for folder in (RECIPES / "baselines", RECIPES / "toy" / "baselines"):
            assert all((folder / f"{key}_{pct}.yaml").is_file() for pct in (20, 10, 5)), (folder, key)
    assert evaluation_base(RECIPES / "baselines" / "fastv_20.yaml") == RECIPES / "eval_3b.yaml"
    assert evaluation_base(RECIPES / "toy" / "baselines" / "fastv_20.yaml") == RECIPES / "toy" / "baselines" / "base.yaml"
    assert method_configs(RECIPES / "cs2_ste_5.yaml") == [RECIPES / "cs2_ste_20.yaml", RECIPES / "cs2_ste_5.yaml"]


@pytest.mark.parametrize("recipe", BASELINES, ids=lambda p: f"{p.parent.parent.name}/{p.stem}")
def test_baseline_recipe_builds_the_reducer_its_yaml_names(recipe):
    raw = yaml.safe_load(recipe.read_text())["model"]
    method = built(recipe)
    assert method.name == recipe.stem
    assert method.configs == (evaluation_base(recipe), recipe)
    assert method.keep_ratio == pytest.approx(raw["keep_ratio"])
    assert method.keep_ratio == pytest.approx(int(recipe.stem.rsplit("_", 1)[1]) / 100)
    assert type(method.reducer).__name__ == _class_name(raw["reducer"]["class_path"])
    assert method.reducer_config["class_path"] == raw["reducer"]["class_path"]
    if isinstance(method.reducer, PyramidDrop):
        rule = raw["reducer"]["init_args"]["stage_ratio"]["class_path"]
        assert type(method.reducer.stage_ratio).__name__ == _class_name(rule)
        assert list(method.reducer.layers) == raw["reducer"]["init_args"]["layers"]
    # Every row has a FLOP row, from the schedule its reducer declares, at its scale's depth.
    config = tiny_thinker_config(num_layers=4) if "toy" in recipe.parts else qwen_omni_3b_config()
    speedup = flops.ideal_speedup(config, flops.token_counts(30), method.reducer, method.keep_ratio)
    assert speedup["llm"] > 1.0 and 0.0 < speedup["effective_keep_ratio"] < 1.0


@pytest.mark.parametrize("scale", ["", "toy"])
def test_full_recipe_has_no_reducer(scale):
    method = built(RECIPES / scale / "baselines" / "full.yaml")
    assert method.reducer is None and method.reducer_config is None and method.keep_ratio == 1.0


def test_echoingpixels_recipe_is_cs2_with_syncrope():
    method = method_from_recipe([RECIPES / "cs2_ste_20.yaml"])
    assert isinstance(method.reducer, CS2) and method.reducer.num_layers == 4
    assert isinstance(method.rope, SyncRoPE)
    assert method.keep_ratio == pytest.approx(0.2)
    assert method.candidate_modalities == ("video", "audio")


def test_budget_overlay_keeps_the_base_method():
    method = method_from_recipe(method_configs(RECIPES / "cs2_ste_5.yaml"))
    assert method.name == "cs2_ste_5" and method.keep_ratio == pytest.approx(0.05)
    assert isinstance(method.reducer, CS2) and method.reducer.num_layers == 4


def test_clear_errors_name_the_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.yaml"):
        method_from_recipe([tmp_path / "nope.yaml"])
    no_reducer = tmp_path / "paths.yaml"
    no_reducer.write_text("model:\n  keep_ratio: 0.5\n")
    with pytest.raises(ValueError, match="paths.yaml: no model.reducer"):
        method_from_recipe([no_reducer])
    bad = tmp_path / "bad.yaml"
    bad.write_text("model:\n  reducer:\n    class_path: ep_kit.reducers.fastv.FastV\n    init_args: {layer: 2, nope: 1}\n")
    with pytest.raises(ValueError, match="bad.yaml"):
        method_from_recipe([RECIPES / "eval_3b.yaml", bad])
