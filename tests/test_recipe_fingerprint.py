"""The behaviour fingerprint (benchmarks/recipe_fingerprint.py) that backs "behaviour unchanged" claims."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _script():
    spec = importlib.util.spec_from_file_location("recipe_fingerprint", ROOT / "benchmarks" / "recipe_fingerprint.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_compare_reports_every_difference_beyond_tolerance():
    fp = _script()
    a = {"r": {"forward": {"loss": 5.0, "kept_sha": "ab"}, "train_losses": [1.0, 2.0]}}
    same = {"r": {"forward": {"loss": 5.0 + 1e-7, "kept_sha": "ab"}, "train_losses": [1.0, 2.0]}}
    other = {"r": {"forward": {"loss": 5.1, "kept_sha": "cd"}, "train_losses": [1.0, 2.5]}}
    assert fp.compare(a, same) == []
    assert fp.compare(a, other) == [
        ".r.forward.kept_sha: 'ab' vs 'cd'",
        ".r.forward.loss: 5.0 vs 5.1",
        ".r.train_losses[1]: 2.0 vs 2.5",
    ]


def test_fingerprint_of_a_baseline_recipe_and_its_comparison(tmp_path, monkeypatch):
    fp = _script()
    monkeypatch.chdir(ROOT)  # the script works from the repository root; restored afterwards
    out = tmp_path / "fp.json"
    assert fp.main(["--only", "fastv_20", "--out", str(out)]) == 0
    record = json.loads(out.read_text())["fastv_20"]
    assert record["forward"]["realised_keep_ratio"] > 0 and len(record["forward"]["kept_sha"]) == 16
    assert 0.0 <= record["test"]["test/acc"] <= 1.0 and record["test"]["test/keep_ratio"] == 0.2
    assert fp.main(["--compare", str(out), str(out)]) == 0
    changed = tmp_path / "changed.json"
    record["forward"]["kept_sha"] = "0" * 16
    changed.write_text(json.dumps({"fastv_20": record}))
    assert fp.main(["--compare", str(out), str(changed)]) == 1
