"""The toy base: shipped with the kit, loaded as it is, never built (nor trained) by building a thinker."""

from __future__ import annotations

import json
import subprocess

import pytest

from ep_kit.toy_base import BUILD_COMMAND, record, weights_digest
from ep_kit.train.sources import BASE_DONE, SHIPPED, SHIPPED_BASE, TinyThinker, base_dir, is_base_dir

SIZES = {"hidden_size": 32, "num_layers": 1, "num_heads": 2, "num_kv_heads": 1}


@pytest.fixture(autouse=True)
def _never_spawn(monkeypatch):
    """Building a thinker must not start a process (the old code pretrained a missing base in a child)."""
    monkeypatch.setattr(subprocess, "run", lambda *a, **k: pytest.fail("building a thinker started a process"))
    monkeypatch.setattr(subprocess, "Popen", lambda *a, **k: pytest.fail("building a thinker started a process"))


def _export_base(root) -> None:
    """A finished base as an export leaves it: a saved tiny thinker and its marker."""
    TinyThinker(**SIZES).build().thinker.save_pretrained(str(root))
    (root / BASE_DONE).write_text(json.dumps({"global_step": 1}))


def test_a_base_directory_is_loaded_as_it_is(tmp_path):
    root = tmp_path / "base"
    _export_base(root)
    model = TinyThinker(**SIZES, init_from=str(root)).build()
    assert model.hidden_size == 32


@pytest.mark.parametrize("state", ["missing", "half_written"])
def test_a_missing_base_is_an_error_naming_the_command_that_builds_it(tmp_path, state):
    root = tmp_path / "base"
    if state == "half_written":  # weights and config, but no marker: an export killed half-way
        _export_base(root)
        (root / BASE_DONE).unlink()
    with pytest.raises(FileNotFoundError, match=f"{BUILD_COMMAND} {root}"):
        TinyThinker(**SIZES, init_from=str(root)).build()


def test_a_base_of_other_sizes_is_refused(tmp_path):
    root = tmp_path / "base"
    _export_base(root)
    with pytest.raises(ValueError, match="hidden_size: recipe 64 vs base 32"):
        TinyThinker(init_from=str(root)).build()


def test_the_shipped_base_is_in_the_package_small_and_matches_its_record():
    assert base_dir(SHIPPED) == SHIPPED_BASE and is_base_dir(SHIPPED_BASE)
    size = sum(f.stat().st_size for f in SHIPPED_BASE.iterdir())
    assert size < 2_000_000, size
    info = record()
    assert info["weights_sha256"] == weights_digest(SHIPPED_BASE)
    assert info["command"].startswith(BUILD_COMMAND) and info["global_step"] > 0


def test_toy_recipes_start_from_the_shipped_base(tmp_path):
    """``init_from: shipped`` (the toy recipes' thinker) loads the shipped weights, found from any directory."""
    TinyThinker(init_from=SHIPPED).build().thinker.save_pretrained(str(tmp_path))
    assert weights_digest(tmp_path) == record()["weights_sha256"]
