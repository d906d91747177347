"""Training reliability: exact mid-epoch resume on one or many ranks, batches without A/V under DDP,
in-epoch checkpoints of the toy trainer.

* The training loader shards a ``(seed, epoch)`` permutation over ranks and keeps its position: a run
  interrupted mid-epoch and restored from rank 0's state trains every sample of the epoch exactly
  once (the loader on its own, with explicit ranks, and the refusal of a mid-epoch resume with another
  dataset size, batch size or world size: ``test_resumable.py``; here, Lightning's loop restoring it,
  and end to end a 2-process CPU DDP ``ep-kit fit`` killed mid-epoch, whose final weights equal the
  uninterrupted run's).
* A batch without audio/video tokens leaves the CS2 sieve and scorer out of the loss; training_step
  gives them zero gradients, so 2-process DDP trains instruction data with text-only rows.
* The toy trainer writes ``last.ckpt`` within an epoch (every 10 steps) and at the end of training.
"""

from __future__ import annotations

import copy
import json
import os
import subprocess
import sys
from collections import Counter
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
import pytest
import torch
from _toy import REPO, TOY_ROW, toy_args
from lightning.pytorch import LightningModule, Trainer
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.strategies import DDPStrategy, SingleDeviceStrategy
from torch.utils.data import Dataset
from torch.utils.data.distributed import DistributedSampler

from ep_kit.data import AVDataModule, InstructSource, SyntheticSource
from ep_kit.data.resumable import ResumableDataLoader
from ep_kit.data.synthetic import write_av_clip
from ep_kit.models.tiny import SampleSpec, make_av_batch
from ep_kit.reducers import CS2
from ep_kit.rope import SyncRoPE
from ep_kit.train import EPKitModule, StopAfterSteps, TinyThinker

TESTS = Path(__file__).resolve().parent
DDP = ["--trainer.devices=2", "--trainer.strategy=ddp", "--trainer.accelerator=cpu"]


# --------------------------------------------- Lightning: the loop restores the loader's position
class _Indices(Dataset):
    def __len__(self) -> int:
        return 12

    def __getitem__(self, index: int) -> torch.Tensor:
        return torch.tensor([float(index)])


class _Boring(LightningModule):
    """A linear model on the sample indices; records ``(epoch, step, indices)`` of every batch."""

    def __init__(self, batch_size: int = 4) -> None:
        super().__init__()
        self.lin = torch.nn.Linear(1, 1)
        self.batch_size = batch_size
        self.seen: list[tuple[int, int, list[int]]] = []

    def training_step(self, batch: torch.Tensor, batch_idx: int) -> torch.Tensor:
        self.seen.append((self.current_epoch, self.global_step, batch.flatten().int().tolist()))
        return (self.lin(batch) - 1.0).pow(2).mean()

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.01)

    def train_dataloader(self) -> ResumableDataLoader:
        return ResumableDataLoader(_Indices(), batch_size=self.batch_size, seed=3)


def _boring_fit(root: Path, callbacks: list, epochs: int = 2, ckpt_path: str | None = None,
                batch_size: int = 4) -> _Boring:
    torch.manual_seed(0)
    module = _Boring(batch_size)
    trainer = Trainer(max_epochs=epochs, logger=False, enable_progress_bar=False, enable_model_summary=False,
                      default_root_dir=str(root), callbacks=callbacks)
    try:
        trainer.fit(module, ckpt_path=ckpt_path)
    except RuntimeError as err:
        if "simulated kill" not in str(err):
            raise
    return module


def test_step_checkpoint_at_the_end_of_an_epoch_resumes_into_a_whole_next_epoch(tmp_path):
    """A step checkpoint that falls on an epoch's last batch: the next epoch must not come out empty."""
    full = _boring_fit(tmp_path / "full", [])
    ckpt = ModelCheckpoint(dirpath=str(tmp_path / "ck"), every_n_train_steps=3, save_top_k=0, save_last=True)
    _boring_fit(tmp_path / "first", [ckpt], epochs=1)  # 3 batches per epoch: step 3 ends epoch 0
    assert torch.load(tmp_path / "ck" / "last.ckpt", weights_only=False)["global_step"] == 3
    resumed = _boring_fit(tmp_path / "resumed", [], ckpt_path=str(tmp_path / "ck" / "last.ckpt"))
    assert resumed.seen == [s for s in full.seen if s[0] == 1]
    torch.testing.assert_close(resumed.lin.weight, full.lin.weight, rtol=0, atol=0)


# ------------------------------------------------------------ the data module under several ranks
def test_datamodule_shards_the_training_loader_itself_under_a_distributed_trainer(tmp_path):
    rows = [{"messages": [{"role": "user", "content": f"q{i}"}, {"role": "assistant", "content": "ok"}]}
            for i in range(5)]
    ann = tmp_path / "train.jsonl"
    ann.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    shards = []
    for rank in range(2):
        dm = AVDataModule(InstructSource(train=str(ann)), batch_size=2)
        dm.trainer = SimpleNamespace(world_size=2, global_rank=rank,
                                     distributed_sampler_kwargs={"num_replicas": 2, "rank": rank})
        loader = dm.train_dataloader()
        assert isinstance(loader, ResumableDataLoader) and isinstance(loader.sampler, DistributedSampler)
        assert (loader.num_replicas, loader.rank) == (2, rank)
        assert len(loader) == 2  # ceil(ceil(5 / 2) / 2): this rank's batches
        shards.append(list(loader.sampler))
    perm = dm.train_dataloader().sampler.order()
    assert Counter(shards[0] + shards[1]) == Counter(list(range(5)) + [perm[0]])


# ------------------------------------------------------- batches that leave trainable parts unused
def _cs2_module(freeze_encoders: bool = True) -> EPKitModule:
    torch.manual_seed(0)
    return EPKitModule(TinyThinker(num_layers=2), rope=SyncRoPE([2, 2, 2, 2]), reducer=CS2(num_layers=1),
                       keep_ratio=0.2, freeze_encoders=freeze_encoders, print_metrics=False)


def _check_zero_gradients_for_unused(module: EPKitModule, batch: dict[str, Any], unused_prefix: str) -> None:
    trainable = {n: p for n, p in module.named_parameters() if p.requires_grad}
    # The loss training_step returned before the fix (it computes logits on the labelled rows only).
    reference = module.model(batch, logits="labels").loss
    reference.backward()
    expected = {n: p.grad.clone() for n, p in trainable.items() if p.grad is not None}
    module.zero_grad(set_to_none=True)

    loss = module.training_step(batch, 0)
    assert torch.equal(loss.detach(), reference.detach())
    loss.backward()
    assert [n for n, p in trainable.items() if p.grad is None] == []
    unused = sorted(set(trainable) - set(expected))
    assert unused and all(n.startswith(unused_prefix) for n in unused)
    for name in unused:
        assert not trainable[name].grad.any(), name
    for name, grad in expected.items():
        torch.testing.assert_close(trainable[name].grad, grad, rtol=0, atol=0, msg=name)


def test_text_only_batch_gives_the_sieve_and_scorer_zero_gradients():
    module = _cs2_module()
    text = SampleSpec(prompt_len=5, answer_len=2, frames=0, audio_seconds=0.0)
    batch = make_av_batch(module.model.config, [text, text])
    _check_zero_gradients_for_unused(module, batch, "model.reducer.")


def test_video_only_batch_gives_the_idle_audio_encoder_zero_gradients():
    module = _cs2_module(freeze_encoders=False)  # pretraining-style: the encoders train too
    video = SampleSpec(prompt_len=4, answer_len=2, frames=4, height=28, width=28, audio_seconds=0.0)
    batch = make_av_batch(module.model.config, [video, video])
    _check_zero_gradients_for_unused(module, batch, "model.thinker.model.audio_tower.")


def test_zero_weight_term_only_where_gradients_are_reduced_across_replicas():
    module = _cs2_module()
    text = SampleSpec(prompt_len=5, answer_len=2, frames=0, audio_seconds=0.0)
    loss = module.model(make_av_batch(module.model.config, [text])).loss
    module._trainer = SimpleNamespace(strategy=SingleDeviceStrategy(device=torch.device("cpu")))
    assert module._with_unused_parameters(loss) is loss  # a single device steps only what has a gradient
    module._trainer = SimpleNamespace(strategy=DDPStrategy())
    assert module._with_unused_parameters(loss) is not loss
    module._trainer = None


# ------------------------------------------------------------------------- toy trainer checkpoints
def test_toy_trainer_checkpoints_within_the_epoch_and_at_the_end(tmp_path):
    from ep_kit.cli import run

    cli = run(["--config", str(TOY_ROW), *toy_args(tmp_path)], run_subcommand=False)
    checkpoints = [c for c in cli.trainer.callbacks if isinstance(c, ModelCheckpoint)]
    steps = [c for c in checkpoints if c._every_n_train_steps == 10]
    assert len(steps) == 1 and steps[0].save_last and not steps[0]._enable_version_counter
    assert all(c.save_last and not c._enable_version_counter for c in checkpoints)

    # The parsed callbacks themselves: 12 steps per epoch (batch 1), killed after step 15 ...
    killed = tmp_path / "killed"
    _boring_fit(killed, [*copy.deepcopy(checkpoints), StopAfterSteps(15)], batch_size=1)
    last = killed / "checkpoints" / "last.ckpt"
    assert torch.load(last, weights_only=False)["global_step"] == 10  # mid-epoch 1: at most a few steps lost
    # ... resumed, ends where the uninterrupted run ends; last.ckpt holds the final step, no last-v1.ckpt.
    full = _boring_fit(tmp_path / "full", copy.deepcopy(checkpoints), batch_size=1)
    resumed = _boring_fit(tmp_path / "resumed", copy.deepcopy(checkpoints), ckpt_path=str(last), batch_size=1)
    assert resumed.seen == [s for s in full.seen if s[1] >= 10]
    torch.testing.assert_close(resumed.lin.weight, full.lin.weight, rtol=0, atol=0)
    for root in ("full", "resumed"):
        assert sorted(p.name for p in (tmp_path / root / "checkpoints").iterdir()) == ["last.ckpt"]
        final = torch.load(tmp_path / root / "checkpoints" / "last.ckpt", weights_only=False)
        assert final["global_step"] == 24


# ----------------------------------------------------------------------- 2-process DDP, end to end
def _overlay(path: Path, callbacks: list[tuple[str, dict[str, Any]]]) -> str:
    """A config file replacing the trainer's callbacks (JSON is YAML)."""
    entries = [{"class_path": c, "init_args": a} for c, a in callbacks]
    path.write_text(json.dumps({"trainer": {"callbacks": entries}}))
    return str(path)


def _ep_kit_fit(args: list[str]) -> subprocess.CompletedProcess:
    path = os.pathsep.join(p for p in (str(TESTS), os.environ.get("PYTHONPATH")) if p)
    env = {**os.environ, "PYTHONPATH": path, "PYTHONUNBUFFERED": "1"}  # rank 1 re-runs the command too
    return subprocess.run([sys.executable, "-m", "ep_kit.cli", "fit", *args], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=900)


def _records(out_dir: Path) -> list[dict[str, Any]]:
    paths = sorted(out_dir.glob("rank*.jsonl"))
    return [json.loads(line) for path in paths for line in path.read_text().splitlines()]


def _checkpoint(dirpath: str) -> tuple[str, dict[str, Any]]:
    return ("lightning.pytorch.callbacks.ModelCheckpoint",
            {"dirpath": dirpath, "save_last": True, "save_top_k": 0, "enable_version_counter": False})


@pytest.mark.slow
def test_ddp_fit_killed_mid_epoch_resumes_every_sample_once_and_to_the_same_weights(tmp_path):
    # 16 clips, batch 2, 2 ranks: 4 steps. A constant learning rate keeps every step effective, so equal
    # final weights mean the resumed run trained the same batches in the same order.
    def args(name: str) -> list[str]:
        return ["--config", str(TOY_ROW), *toy_args(tmp_path, num_train=16, num_val=2, num_test=2, epochs=1),
                "--data.init_args.batch_size=2", "--data.init_args.eval_batch_size=2",
                "--model.print_metrics=false", "--model.lr_scheduler=null",
                f"--trainer.logger.init_args.save_dir={tmp_path / name}", *DDP]

    record = "_record.RecordSamples"
    full = _ep_kit_fit([*args("full"), "--config", _overlay(tmp_path / "full.yaml", [
        _checkpoint(str(tmp_path / "ck_full")), (record, {"out_dir": str(tmp_path / "rec_full")})])])
    assert full.returncode == 0, full.stderr[-3000:]
    # Every step checkpointed; StopAfterSteps raises after step 3 before its checkpoint (ModelCheckpoint
    # runs after the other callbacks), so last.ckpt is step 2, mid-epoch.
    killed_ck = tmp_path / "ck_killed"
    step = _checkpoint(str(killed_ck))
    step[1]["every_n_train_steps"] = 1
    killed = _ep_kit_fit([*args("killed"), "--config", _overlay(tmp_path / "killed.yaml", [
        step, ("ep_kit.train.callbacks.StopAfterSteps", {"steps": 3}),
        (record, {"out_dir": str(tmp_path / "rec_killed")})])])
    assert killed.returncode != 0 and "simulated kill" in killed.stderr, killed.stderr[-3000:]
    assert torch.load(killed_ck / "last.ckpt", map_location="cpu", weights_only=False)["global_step"] == 2
    resumed = _ep_kit_fit([*args("resumed"), f"--ckpt_path={killed_ck / 'last.ckpt'}", "--config", _overlay(
        tmp_path / "resumed.yaml", [_checkpoint(str(tmp_path / "ck_resumed")),
                                    (record, {"out_dir": str(tmp_path / "rec_resumed")})])])
    assert resumed.returncode == 0, resumed.stderr[-3000:]

    bench = SyntheticSource(root=str(tmp_path / "synthetic"), num_train=16, num_val=2, num_test=2, seconds=2,
                            resolution=28).bench
    expected = Counter(row["question_id"] for row in bench.rows("train"))
    assert len(expected) == 16 and set(expected.values()) == {1}
    uninterrupted = {(r["rank"], r["step"]): r["ids"] for r in _records(tmp_path / "rec_full")}
    assert Counter(i for ids in uninterrupted.values() for i in ids) == expected
    before = [r for r in _records(tmp_path / "rec_killed") if r["step"] <= 2]  # what last.ckpt holds
    after = _records(tmp_path / "rec_resumed")
    assert sorted({r["step"] for r in after}) == [3, 4]  # nothing before the checkpoint trained again
    assert Counter(i for r in before + after for i in r["ids"]) == expected  # every sample exactly once
    assert {(r["rank"], r["step"]): r["ids"] for r in before + after} == uninterrupted

    a = torch.load(tmp_path / "ck_full" / "last.ckpt", map_location="cpu", weights_only=False)
    b = torch.load(tmp_path / "ck_resumed" / "last.ckpt", map_location="cpu", weights_only=False)
    assert a["global_step"] == b["global_step"] == 4
    assert a["state_dict"].keys() == b["state_dict"].keys()
    for name, value in a["state_dict"].items():
        assert torch.equal(value, b["state_dict"][name]), name


@pytest.mark.slow
def test_ddp_fit_on_instruction_data_with_text_only_rows(tmp_path):
    sr = 16000
    frames = np.zeros((4, 56, 56, 3), dtype=np.uint8)
    frames[2:] = (200, 30, 30)
    t = np.arange(sr) / sr
    write_av_clip(tmp_path / "clip.mp4", frames, 4.0, (0.4 * np.sin(2 * np.pi * 500 * t)).astype(np.float32))
    text = {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "ok"}]}
    av = {"messages": [{"role": "user", "content": "<video>What colour?"},
                       {"role": "assistant", "content": "Red."}], "videos": ["clip.mp4"]}
    (tmp_path / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for _ in range(4) for r in (text, av)))
    data = {"data": {"init_args": {
        "source": {"class_path": "ep_kit.data.InstructSource",
                   "init_args": {"train": str(tmp_path / "train.jsonl")}},
        "batch_size": 1, "min_pixels": 28 * 28, "max_pixels": 56 * 56, "audio_chunk_seconds": 2,
        "cache_dir": str(tmp_path / "cache")}}}
    (tmp_path / "data.yaml").write_text(json.dumps(data))
    recorder = _overlay(tmp_path / "cb.yaml", [("_record.RecordSamples", {"out_dir": str(tmp_path / "rec")})])
    result = _ep_kit_fit([
        "--config", str(TOY_ROW), "--config", str(tmp_path / "data.yaml"), "--config", recorder,
        "--model.thinker.init_args.init_from=null", "--model.print_metrics=false", "--trainer.max_epochs=1",
        "--trainer.enable_progress_bar=false", f"--trainer.logger.init_args.save_dir={tmp_path / 'runs'}",
        *DDP])
    assert result.returncode == 0, result.stderr[-3000:]
    records = _records(tmp_path / "rec")
    assert sorted((r["rank"], r["step"]) for r in records) == [(r, s) for r in (0, 1) for s in (1, 2, 3, 4)]
    media = [r["media"] for r in records]
    assert media.count(False) == media.count(True) == 4  # text-only batches did train, beside A/V ones


def test_schedule_counts_the_steps_of_a_sharded_loader(tmp_path):
    """The LR schedule's length under 2 ranks: 16 samples / batch 4 = 4 batches = 2 steps per rank per epoch."""
    from types import SimpleNamespace

    from _toy import TOY_ROW, toy_args

    from ep_kit.cli import run

    cli = run(["--config", str(TOY_ROW), *toy_args(tmp_path, num_train=16, epochs=3)], run_subcommand=False)
    fake = SimpleNamespace(
        max_steps=-1, limit_train_batches=1.0, world_size=2, accumulate_grad_batches=1, max_epochs=3,
        datamodule=cli.datamodule, distributed_sampler_kwargs={"num_replicas": 2, "rank": 0},
    )
    cli.datamodule.trainer = fake
    cli.model._trainer = fake
    assert len(cli.datamodule.train_dataloader()) == 2  # this rank's batches
    assert cli.model._total_steps() == 2 * 3
