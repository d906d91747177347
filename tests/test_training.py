"""Training and evaluation: metrics against hand counts, option scoring, kill-and-resume, DDP sync."""

from __future__ import annotations

import csv
import subprocess
import sys

import pytest
import torch
from _toy import REPO, TOY_ROW, toy_args
from lightning.pytorch import Trainer, seed_everything
from lightning.pytorch.callbacks import ModelCheckpoint

from ep_kit.data import AVDataModule, SyntheticSource
from ep_kit.models.tiny import SampleSpec, make_av_batch
from ep_kit.reducers import CS2
from ep_kit.rope import SyncRoPE
from ep_kit.sequence import Modality
from ep_kit.train import BudgetShare, EPKitModule, MultipleChoiceAccuracy, StopAfterSteps, TinyThinker
from ep_kit.train.module import prompt_end_index


# ---------------------------------------------------------------------------------- metrics
def test_multiple_choice_accuracy_by_hand():
    m = MultipleChoiceAccuracy()
    m.update(
        torch.tensor([0, 1, 2, 3]),
        torch.tensor([0, 1, 0, 0]),
        ["b1", "b1", "b2", "b2"],
        ["x", "y", "x", "x"],
        ["q1", "q2", "q3", "q4"],
        torch.tensor([4, 4, 2, 5]),
    )
    # a DistributedSampler pad repeats q1 (and a wrong copy must not count twice either)
    m.update(torch.tensor([0]), torch.tensor([0]), ["b1"], ["x"], ["q1"], torch.tensor([4]))
    out = m.compute()
    assert out["count"].item() == 4
    assert out["acc"].item() == pytest.approx(2 / 4)
    assert out["acc/b1"].item() == pytest.approx(1.0)
    assert out["acc/b2"].item() == pytest.approx(0.0)
    assert out["acc/b1/x"].item() == pytest.approx(1.0) and out["acc/b1/y"].item() == pytest.approx(1.0)
    assert out["acc_macro"].item() == pytest.approx(0.5)
    assert out["chance"].item() == pytest.approx((1 / 4 + 1 / 4 + 1 / 2 + 1 / 5) / 4)


def test_multiple_choice_accuracy_rejects_ragged_input():
    with pytest.raises(ValueError, match="categories"):
        MultipleChoiceAccuracy().update(torch.tensor([0, 1]), torch.tensor([0, 1]), ["b", "b"], ["x"], ["1", "2"],
                                        torch.tensor([4, 4]))


def test_budget_share_by_hand():
    m = BudgetShare()
    m.update({"n_video": torch.tensor([10, 0]), "n_audio": torch.tensor([30, 20]), "kept_video": torch.tensor([2, 0]),
              "kept_audio": torch.tensor([6, 4]), "n_candidates": torch.tensor([40, 20]),
              "kept_candidates": torch.tensor([8, 4])})
    out = m.compute()
    assert out["realised_keep_ratio"].item() == pytest.approx(12 / 60)
    assert out["audio_share"].item() == pytest.approx(10 / 12)
    assert out["video_share"].item() == pytest.approx(2 / 12)
    assert out["video_keep_ratio"].item() == pytest.approx(2 / 10)
    assert "layer_avg_keep_ratio" not in out  # no per-layer counts seen


def test_budget_share_layer_average_by_hand():
    """PyramidDrop-style counts: 40 candidates run 2 layers on 40 and 2 on 10 (mean 25); 20 run on 20, 20, 4, 4."""
    m = BudgetShare()
    m.update({"n_video": torch.tensor([10, 0]), "n_audio": torch.tensor([30, 20]), "kept_video": torch.tensor([2, 0]),
              "kept_audio": torch.tensor([8, 4]), "n_candidates": torch.tensor([40, 20]),
              "kept_candidates": torch.tensor([10, 4]), "layer_avg_kept": torch.tensor([25.0, 12.0])})
    out = m.compute()
    assert out["realised_keep_ratio"].item() == pytest.approx(14 / 60)
    assert out["layer_avg_keep_ratio"].item() == pytest.approx(37 / 60)


# --------------------------------------------------------------------------- option scoring
def test_answer_scores_the_letters_at_the_end_of_the_prompt():
    """``answer`` must pick argmax over the option letters of the logits after the last prompt token."""
    torch.manual_seed(0)
    module = EPKitModule(TinyThinker(num_layers=2), rope=SyncRoPE([2, 2, 2, 2]), reducer=CS2(num_layers=1),
                         keep_ratio=0.3).eval()
    specs = [SampleSpec(prompt_len=6, answer_len=0), SampleSpec(prompt_len=3, answer_len=0, frames=6, width=28)]
    batch = make_av_batch(module.model.config, specs, with_labels=False)
    batch["choice_token_ids"] = torch.tensor([[65, 66, 67, 68], [65, 66, 67, 67]])
    batch["choice_mask"] = torch.tensor([[True] * 4, [True, True, True, False]])
    batch["answer_index"] = torch.tensor([1, 2])
    batch.update(question_id=["a", "b"], category=["c", "c"], benchmark=["t", "t"])
    res = module.answer(batch)
    out = module.model(batch)  # full logits of the kept sequence, computed independently
    last = out.kept.attention_mask.sum(-1) - 1
    for b in range(2):
        row = out.logits[b, last[b]]
        n = int(batch["choice_mask"][b].sum())
        expected = int(row[batch["choice_token_ids"][b, :n]].argmax())
        assert int(res["predicted"][b]) == expected
        torch.testing.assert_close(res["choice_logits"][b, :n], row[batch["choice_token_ids"][b, :n]].float())
    assert res["num_options"].tolist() == [4, 3]


def test_prompt_end_index_stops_before_a_teacher_forced_answer():
    cfg = TinyThinker(num_layers=1).config()
    batch = make_av_batch(cfg, [SampleSpec(prompt_len=4, answer_len=2), SampleSpec(prompt_len=2, answer_len=0)])
    module = EPKitModule(TinyThinker(num_layers=1))
    seq = module.model.embed(batch)
    idx = prompt_end_index(seq)
    first_answer = int(seq.answer_mask[0].nonzero()[0])
    assert int(idx[0]) == first_answer - 1
    assert int(idx[1]) == int(seq.attention_mask[1].sum()) - 1
    assert seq.modality[0, idx[0]] == int(Modality.TEXT)


# --------------------------------------------------------------------------- kill and resume
def _toy_module() -> EPKitModule:
    return EPKitModule(
        TinyThinker(num_layers=2),
        rope=SyncRoPE([2, 2, 2, 2]),
        reducer=CS2(num_layers=1),
        keep_ratio=0.2,
        optimizer=lambda p: torch.optim.AdamW(p, lr=1e-3),
        print_metrics=False,
    )


def _fit(root, dm_root, callbacks, ckpt_path=None, stop=None):
    seed_everything(0)
    # The shipped data module: its single-process training loader resumes mid-epoch by itself.
    dm = AVDataModule(SyntheticSource(root=str(dm_root / "syn"), num_train=12, num_val=4, num_test=4, seconds=2,
                                      resolution=28), batch_size=4, eval_batch_size=4, cache_dir=str(dm_root / "cache"))
    module = _toy_module()
    cbs = list(callbacks) + ([StopAfterSteps(stop)] if stop else [])
    trainer = Trainer(accelerator="cpu", devices=1, max_epochs=2, deterministic=True, logger=False,
                      enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0,
                      default_root_dir=str(root), callbacks=cbs)
    try:
        trainer.fit(module, datamodule=dm, ckpt_path=ckpt_path)
    except RuntimeError as err:
        if "simulated kill" not in str(err):
            raise
    return trainer, module


@pytest.mark.slow
def test_kill_mid_epoch_and_resume_equals_uninterrupted(tmp_path):
    data = tmp_path / "data"
    full_trainer, full = _fit(tmp_path / "a", data, [])
    ckpt = ModelCheckpoint(dirpath=str(tmp_path / "b"), every_n_train_steps=1, save_last=True, save_top_k=0)
    # 3 batches per epoch; the kill comes before the checkpoint of step 5, so the last one is step 4 (epoch 2, batch 1)
    _, killed = _fit(tmp_path / "b", data, [ckpt], stop=5)
    last = tmp_path / "b" / "last.ckpt"
    state = torch.load(last, map_location="cpu", weights_only=False)
    assert state["global_step"] == 4
    resumed_trainer, resumed = _fit(tmp_path / "c", data, [], ckpt_path=str(last))
    assert resumed_trainer.global_step == full_trainer.global_step == 6
    for (name, a), (_, b) in zip(full.state_dict().items(), resumed.state_dict().items(), strict=True):
        torch.testing.assert_close(a, b, msg=name)
    for key in ("val/acc", "val/realised_keep_ratio", "val/audio_share"):
        assert resumed_trainer.callback_metrics[key].item() == pytest.approx(full_trainer.callback_metrics[key].item())
    assert resumed_trainer.callback_metrics["train/loss"].item() == pytest.approx(
        full_trainer.callback_metrics["train/loss"].item()
    )


def _step_ckpt_overlay(path, ckpt_dir) -> str:
    """A trainer overlay that keeps a checkpoint of every training step (``step=N.ckpt``)."""
    path.write_text(
        "trainer:\n  callbacks:\n    - class_path: lightning.pytorch.callbacks.ModelCheckpoint\n      init_args:\n"
        f"        dirpath: {ckpt_dir}\n        filename: '{{step}}'\n        every_n_train_steps: 1\n"
        "        save_top_k: -1\n"
    )
    return str(path)


@pytest.mark.slow
def test_sigkilled_cli_run_resumes_to_the_uninterrupted_result(tmp_path):
    """``ep-kit fit`` killed with SIGKILL mid-epoch, resumed with ``--ckpt_path``: same final weights and metrics."""
    import signal
    import time

    from ep_kit.cli import run

    def args(name: str) -> list[str]:
        return ["--config", str(TOY_ROW), *toy_args(tmp_path / name, num_train=16, epochs=2)[1:],
                "--model.thinker.init_args.init_from=null", "--model.print_metrics=false",
                f"--data.init_args.source.init_args.root={tmp_path / 'synthetic'}",
                f"--data.init_args.cache_dir={tmp_path / 'cache'}"]

    full = run(["fit", *args("full"), "--config", _step_ckpt_overlay(tmp_path / "a.yaml", tmp_path / "ck_full")])
    # 16 clips / batch 4 = 4 steps per epoch; step 2 is mid-epoch 1.
    killed_dir = tmp_path / "ck_killed"
    cmd = [sys.executable, "-m", "ep_kit.cli", "fit", *args("killed"),
           "--config", _step_ckpt_overlay(tmp_path / "b.yaml", killed_dir)]
    proc = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 600
    # Kill once step 3's checkpoint exists: step 2's is then complete on disk.
    while not (killed_dir / "step=3.ckpt").exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.01)
    was_running = proc.poll() is None
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=60)
    assert was_running, f"the run ended before it could be killed: {proc.stderr.read()[-2000:]}"
    assert proc.returncode == -signal.SIGKILL
    resumed = run(["fit", *args("resumed"), f"--ckpt_path={killed_dir / 'step=2.ckpt'}"])
    assert resumed.trainer.global_step == full.trainer.global_step == 8
    for (name, a), (_, b) in zip(full.model.state_dict().items(), resumed.model.state_dict().items(), strict=True):
        torch.testing.assert_close(a, b, msg=name)
    for key in ("val/acc", "val/realised_keep_ratio", "val/audio_share", "train/loss"):
        assert resumed.trainer.callback_metrics[key].item() == pytest.approx(full.trainer.callback_metrics[key].item())


# ------------------------------------------------------------------------------------- DDP
@pytest.mark.slow
def test_ddp_two_cpu_processes_sync_metrics(tmp_path):
    """2-process DDP fit: the logged val accuracy covers all questions exactly once (synced, de-duplicated)
    and equals a single-process validation of the same checkpoint."""
    args = toy_args(tmp_path, num_train=8, num_val=5)
    cmd = [sys.executable, "-m", "ep_kit.cli", "fit", "--config", str(TOY_ROW), *args,
           "--trainer.devices=2", "--trainer.strategy=ddp", "--trainer.accelerator=cpu"]
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    metrics_file = next((tmp_path / "runs").rglob("metrics.csv"))
    with metrics_file.open() as fh:
        rows = [r for r in csv.DictReader(fh) if r.get("val/acc")]
    assert rows and float(rows[-1]["val/count"]) == 5  # 5 questions over 2 ranks, padded to 6, counted once
    ddp_acc = float(rows[-1]["val/acc"])
    ckpt = next((tmp_path / "runs").rglob("last.ckpt"))
    from ep_kit.cli import run

    single = run(["validate", "--config", str(TOY_ROW), *args, f"--model.init_from={ckpt}"])
    assert single.trainer.callback_metrics["val/acc"].item() == pytest.approx(ddp_acc)
    assert single.trainer.callback_metrics["val/count"].item() == 5
