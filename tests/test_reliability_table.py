"""``benchmarks/reliability.py --quick`` runs every fast case and records what each did."""

from __future__ import annotations

import importlib.util
import sys

import pytest
from _toy import REPO


@pytest.mark.slow
def test_reliability_table_quick(tmp_path):
    spec = importlib.util.spec_from_file_location("reliability", REPO / "benchmarks" / "reliability.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules["reliability"] = module
    spec.loader.exec_module(module)
    md = module.main(["--quick", "--out", str(tmp_path)])
    rows = [line for line in md.read_text().splitlines() if line.startswith("| ") and "---" not in line][1:]
    fast = [c for c in module.CASES if not c.slow]
    assert len(rows) == len(fast)
    # Every fault ends in a named error, a warning, a counted skip or a passing check -- never a raw crash
    # (a bare KeyError / IndexError / UnicodeDecodeError would show its type here).
    for line in rows:
        observed = line.rsplit("|", 2)[-2]
        assert any(k in observed for k in ("ValueError", "FileNotFoundError", "MissingExtraError", "warns",
                                           "skipped", "checked by")), line
        assert "KeyError" not in observed and "UnicodeDecodeError" not in observed
