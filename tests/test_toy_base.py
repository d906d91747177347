"""The shipped toy base is what the kit's own command builds: rebuilt here, its weights digest must match.

``python -m ep_kit.toy_base build`` pretrains the tiny thinker (``recipes/toy/pretrain.yaml``, seed 0,
deterministic, in a pinned numeric environment); the weights it writes must hash to the digest
recorded beside the shipped base. When they do not, something changed what pretraining computes
(model code, data generator, recipe, packages): rebuild the base with the same command and commit it.
"""

from __future__ import annotations

import pytest

from ep_kit.toy_base import build, record


@pytest.mark.slow
def test_the_build_command_rebuilds_the_shipped_base_bit_for_bit(tmp_path):
    shipped = record()
    rebuilt = build(
        tmp_path / "base",
        [
            f"--data.init_args.source.init_args.root={tmp_path / 'synthetic'}",
            f"--data.init_args.cache_dir={tmp_path / 'samples'}",
            f"--trainer.logger.init_args.save_dir={tmp_path / 'runs'}",
        ],
    )
    assert (rebuilt["global_step"], rebuilt["epochs"]) == (shipped["global_step"], shipped["epochs"])
    assert rebuilt["weights_sha256"] == shipped["weights_sha256"], (
        "the rebuilt toy base differs from the shipped one: rebuild it with `python -m ep_kit.toy_base build` "
        f"and commit it (shipped with {shipped['packages']} at {shipped['commit']}; "
        f"rebuilt with {rebuilt['packages']})"
    )
