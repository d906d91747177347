"""Bad checkpoints given to the CLI: one clear error naming the flag and the file, not a KeyError."""

from __future__ import annotations

import pytest
import torch
from _toy import TOY_ROW, toy_args

from ep_kit.cli import run


@pytest.fixture
def bad_files(tmp_path):
    text = tmp_path / "notes.ckpt"
    text.write_text("not a checkpoint")
    plain = tmp_path / "plain.ckpt"
    torch.save({"weight": torch.zeros(2)}, plain)  # a bare state dict, not Lightning's format
    return {"text": text, "plain": plain}


@pytest.mark.parametrize("kind", ["text", "plain"])
def test_ckpt_path_that_is_not_a_lightning_checkpoint(bad_files, kind, tmp_path):
    with pytest.raises(ValueError, match=r"--ckpt_path: .*is not a Lightning checkpoint"):
        run(["fit", "--config", str(TOY_ROW), *toy_args(tmp_path), f"--ckpt_path={bad_files[kind]}"])


@pytest.mark.parametrize("kind", ["text", "plain"])
def test_init_from_that_is_not_a_lightning_checkpoint(bad_files, kind, tmp_path):
    with pytest.raises(ValueError, match=r"model.init_from: .*is not a Lightning checkpoint"):
        run(["--config", str(TOY_ROW), *toy_args(tmp_path), f"--model.init_from={bad_files[kind]}"],
            run_subcommand=False)


def test_missing_ckpt_path_is_named(tmp_path):
    with pytest.raises(FileNotFoundError, match="--ckpt_path: .*missing.ckpt does not exist"):
        run(["fit", "--config", str(TOY_ROW), *toy_args(tmp_path), f"--ckpt_path={tmp_path / 'missing.ckpt'}"])
