"""The toy base cache: a base built from an older pretraining recipe is rebuilt, never silently reused."""

from __future__ import annotations

import hashlib
import json

import pytest

from ep_kit.train import sources
from ep_kit.train.sources import BASE_DONE, TinyThinker, recipe_digest

SIZES = {"hidden_size": 32, "num_layers": 1, "num_heads": 2, "num_kv_heads": 1}


def _recipe(tmp_path, lr: str, optimizer: str = "adamw") -> tuple:
    (tmp_path / "_base").mkdir(exist_ok=True)
    part = tmp_path / "_base" / "adamw.yaml"
    part.write_text(f"class_path: torch.optim.AdamW\ninit_args:\n  lr: {lr}\n")
    recipe = tmp_path / "pretrain.yaml"
    recipe.write_text(f"model:\n  optimizer: _base/{optimizer}.yaml\n")
    return recipe, part


def test_digest_covers_the_recipe_and_the_files_it_names(tmp_path):
    recipe, part = _recipe(tmp_path, "1e-3")
    expected = hashlib.sha256(recipe.read_bytes())
    expected.update(b"_base/adamw.yaml" + part.read_bytes())
    assert recipe_digest(recipe) == expected.hexdigest()
    before = recipe_digest(recipe)
    part.write_text("class_path: torch.optim.AdamW\ninit_args:\n  lr: 3e-3\n")  # only the named part changes
    assert recipe_digest(recipe) != before


def _export_base(root, recipe, digest: str | None) -> None:
    """A finished base as build_base leaves it: a saved tiny thinker and its marker."""
    TinyThinker(**SIZES).build().thinker.save_pretrained(str(root))
    marker = {"global_step": 1} if digest is None else {"global_step": 1, "recipe": str(recipe), "recipe_digest": digest}
    (root / BASE_DONE).write_text(json.dumps(marker))


@pytest.mark.parametrize("edit", [False, True])
def test_base_from_another_recipe_version_is_rebuilt(tmp_path, monkeypatch, edit):
    recipe, part = _recipe(tmp_path, "1e-3")
    root = tmp_path / "base"
    _export_base(root, recipe, recipe_digest(recipe))
    if edit:
        part.write_text("class_path: torch.optim.AdamW\ninit_args:\n  lr: 3e-3\n")
    calls = []
    monkeypatch.setattr(sources, "build_base", lambda rec, r, extra_args=(): calls.append((rec, r)))
    model = TinyThinker(**SIZES, init_from=str(root), pretrain_config=str(recipe)).build()
    assert calls == ([(recipe, root)] if edit else [])
    assert model.hidden_size == 32


def test_base_without_a_recorded_digest_is_taken_as_it_is(tmp_path, monkeypatch):
    recipe, _ = _recipe(tmp_path, "1e-3")
    root = tmp_path / "base"
    _export_base(root, recipe, None)
    monkeypatch.setattr(sources, "build_base", lambda *a, **k: pytest.fail("a hand-built base must not be rebuilt"))
    TinyThinker(**SIZES, init_from=str(root), pretrain_config=str(recipe)).build()
