"""The ``ep-kit`` LightningCLI: fit/validate/test/predict on a shrunken toy recipe.

Reference values are computed independently of the CLI: the kept-token budget from the sample
token counts and :func:`ep_kit.budget.keep_count`, predictions from a separately built module.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from _toy import TOY_ROW, toy_args

from ep_kit.budget import keep_count
from ep_kit.cli import fit_then_test, main, run
from ep_kit.sequence import Modality


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """One short toy fit (1 epoch on 8 clips) shared by the tests below; returns (root, ckpt, cli)."""
    root = tmp_path_factory.mktemp("cli")
    cli = run(["fit", "--config", str(TOY_ROW), *toy_args(root, epochs=1)])
    ckpt = next((root / "runs").rglob("last.ckpt"))
    return root, ckpt, cli


@pytest.mark.slow
def test_fit_logs_accuracy_budget_and_saves_config(trained):
    root, ckpt, cli = trained
    metrics = cli.trainer.callback_metrics
    for key in ("train/loss", "val/acc", "val/realised_keep_ratio", "val/audio_share", "val/video_share"):
        assert key in metrics, key
    assert metrics["val/count"].item() == 5
    assert 0.0 <= metrics["val/acc"].item() <= 1.0
    assert metrics["val/audio_share"].item() + metrics["val/video_share"].item() == pytest.approx(1.0)
    saved = list((root / "runs").rglob("config.yaml"))
    assert len(saved) == 1 and "ep_kit.reducers.CS2" in saved[0].read_text()


@pytest.mark.slow
def test_realised_budget_matches_keep_count_at_test_time(trained):
    """A budget sweep: weights from init_from, the command line's keep ratio is the one that runs."""
    root, ckpt, _ = trained
    cli = run(
        ["test", "--config", str(TOY_ROW), *toy_args(root), f"--model.init_from={ckpt}", "--model.keep_ratio=0.1"]
    )
    dm, model = cli.datamodule, cli.model
    kept = total = 0
    with torch.no_grad():
        for batch in dm.test_dataloader():
            seq = model.model.embed(batch)
            for b in range(seq.batch_size):
                n = int(seq.count(Modality.VIDEO, Modality.AUDIO)[b])
                kept += keep_count(n, 0.1)
                total += n
    metrics = cli.trainer.callback_metrics
    assert metrics["test/keep_ratio"].item() == pytest.approx(0.1)
    assert metrics["test/realised_keep_ratio"].item() == pytest.approx(kept / total, rel=1e-6)
    assert metrics["test/count"].item() == 5


@pytest.mark.slow
def test_ckpt_path_does_not_override_command_line_budget(trained):
    root, ckpt, _ = trained
    cli = run(["validate", "--config", str(TOY_ROW), *toy_args(root), f"--ckpt_path={ckpt}", "--model.keep_ratio=0.05"])
    assert cli.model.keep_ratio == pytest.approx(0.05)
    assert cli.trainer.callback_metrics["val/keep_ratio"].item() == pytest.approx(0.05)


@pytest.mark.slow
def test_resumed_fit_keeps_the_command_line_configuration(trained, tmp_path):
    """``fit --ckpt_path``: the checkpoint's saved configuration (keep ratio 0.2) does not replace the given one."""
    root, ckpt, _ = trained
    cli = run(["fit", "--config", str(TOY_ROW), *toy_args(root), f"--ckpt_path={ckpt}", "--model.keep_ratio=0.1",
               f"--trainer.logger.init_args.save_dir={tmp_path}"])
    assert cli.model.keep_ratio == pytest.approx(0.1)
    assert cli.trainer.global_step == 2  # resumed from the end of the fitted epoch: nothing left to train


@pytest.mark.slow
def test_init_from_loads_the_trained_weights(trained):
    root, ckpt, cli = trained
    fresh = run(["validate", "--config", str(TOY_ROW), *toy_args(root), f"--model.init_from={ckpt}"])
    state = torch.load(ckpt, map_location="cpu", weights_only=True)["state_dict"]
    for name, value in fresh.model.state_dict().items():
        if name.startswith("model."):
            torch.testing.assert_close(value, state[name], msg=name)


@pytest.mark.slow
def test_load_from_checkpoint_rebuilds_the_fitted_module(trained):
    """The checkpoint of ``ep-kit fit`` alone rebuilds the module: same components, weights and outputs."""
    from ep_kit.train.module import EPKitModule

    _, ckpt, cli = trained
    assert cli.trainer.global_step == 2  # 8 clips, batch 4, one epoch
    fitted = cli.model
    loaded = EPKitModule.load_from_checkpoint(ckpt)  # no other argument

    for get in (lambda m: m.model.reducer, lambda m: m.model.reducer.attention, lambda m: m.model.reducer.scorer,
                lambda m: m.model.reducer.selector, lambda m: m.model.rope, lambda m: m.source,
                lambda m: m.lr_scheduler_factory(torch.optim.SGD([torch.nn.Parameter(torch.ones(1))], lr=1.0),
                                                 num_training_steps=10)):
        assert type(get(loaded)) is type(get(fitted))
    assert loaded.keep_ratio == fitted.keep_ratio == pytest.approx(0.2)
    assert dict(loaded.hparams) == dict(fitted.hparams)  # so a checkpoint of the rebuilt module rebuilds too
    assert loaded.model.reducer.num_layers == fitted.model.reducer.num_layers == 2
    a, b = fitted.state_dict(), loaded.state_dict()
    assert a.keys() == b.keys()
    for name, value in a.items():
        assert torch.equal(value, b[name]), name

    batch = next(iter(cli.datamodule.val_dataloader()))
    outputs = []
    for module in (fitted, loaded):
        module.eval()
        torch.manual_seed(0)
        with torch.no_grad():
            outputs.append((module(batch), module.answer(batch)))
    (out_a, ans_a), (out_b, ans_b) = outputs
    torch.testing.assert_close(out_a.logits, out_b.logits, rtol=0, atol=0)
    torch.testing.assert_close(ans_a["choice_logits"], ans_b["choice_logits"], rtol=0, atol=0)
    assert torch.equal(out_a.kept.source_index, out_b.kept.source_index)


@pytest.mark.slow
def test_predict_writes_one_answer_per_question(trained, tmp_path):
    root, ckpt, _ = trained
    out = tmp_path / "answers.jsonl"
    cli = run(
        [
            "predict",
            "--config",
            str(TOY_ROW),
            *toy_args(root),
            f"--model.init_from={ckpt}",
            f"--answers.output_path={out}",
        ]
    )
    assert not (Path(cli.trainer.log_dir) / "predictions.jsonl").exists()  # one writer, configured above
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    rows_by_id = {r["question_id"]: r for r in rows}
    samples = {s.question_id: s for s in cli.datamodule.source.bench.samples("test")}
    assert set(rows_by_id) == set(samples)
    for qid, row in rows_by_id.items():
        sample = samples[qid]
        assert row["question"] == sample.question and row["options"] == sample.options
        assert row["target"] == sample.answer_letter
        assert row["answer"] in "ABCD"
        assert row["answer_text"] == sample.options["ABCD".index(row["answer"])]
        assert row["correct"] == (row["answer"] == row["target"])
        n_av = row["n_video"] + row["n_audio"]
        assert row["kept_video"] + row["kept_audio"] == keep_count(n_av, 0.2)


def test_main_returns_none_for_the_console_script(tmp_path, capsys, monkeypatch):
    with pytest.raises(SystemExit) as exc:
        main(["fit", "--config", str(TOY_ROW), "--print_config"])
    assert exc.value.code == 0
    assert "class_path: ep_kit.reducers.CS2" in capsys.readouterr().out
    # the console script runs `sys.exit(main())`: any returned object (the CLI) would exit with status 1
    monkeypatch.setattr("ep_kit.cli.run", lambda args: object())
    assert main(["fit"]) is None


def test_print_config_round_trips(tmp_path, capsys):
    with pytest.raises(SystemExit):
        run(["fit", "--config", str(TOY_ROW), "--print_config"])
    first = capsys.readouterr().out
    dumped = tmp_path / "dumped.yaml"
    dumped.write_text(first)
    with pytest.raises(SystemExit):
        run(["fit", "--config", str(dumped), "--print_config"])
    assert capsys.readouterr().out == first


def test_processor_is_linked_from_the_thinker(tmp_path, capsys):
    with pytest.raises(SystemExit):
        run(
            [
                "fit",
                "--config",
                str(TOY_ROW),
                "--model.thinker=ep_kit.train.sources.PretrainedThinker",
                f"--model.thinker.init_args.path={tmp_path}",
                "--print_config",
            ]
        )
    # link targets are not printed; the value is checked through the compute function
    from ep_kit.cli import processor_for

    assert processor_for({"class_path": "ep_kit.train.sources.PretrainedThinker", "init_args": {"path": "/m"}}) == "/m"
    assert processor_for({"class_path": "ep_kit.train.sources.TinyThinker", "init_args": {}}) == "tiny"
    assert "processor:" not in capsys.readouterr().out.split("data:")[1].split("source:")[0]


def test_bad_budget_is_a_clear_error(tmp_path):
    with pytest.raises(ValueError, match="keep_ratio"):
        run(["validate", "--config", str(TOY_ROW), *toy_args(tmp_path), "--model.keep_ratio=1.5"])


def test_missing_base_says_how_to_build_it(tmp_path):
    missing = tmp_path / "no_base"
    with pytest.raises(FileNotFoundError, match="python -m ep_kit.toy_base build"):
        run(
            [
                "validate",
                "--config",
                str(TOY_ROW),
                *toy_args(tmp_path)[1:],
                f"--model.thinker.init_args.init_from={missing}",
            ]
        )


@pytest.mark.slow
def test_fit_then_test_equals_a_separate_test_run_of_the_last_checkpoint(tmp_path):
    """The benchmarks' one training path tests the weights fit ended with, under the fit's own config."""
    metrics = fit_then_test(["--config", str(TOY_ROW), *toy_args(tmp_path, epochs=1)])
    ckpt = next((tmp_path / "runs").rglob("last.ckpt"))
    reference = run(["test", "--config", str(TOY_ROW), *toy_args(tmp_path), f"--model.init_from={ckpt}"])
    expected = reference.trainer.callback_metrics
    assert metrics["test/count"] == 5
    for key in ("test/acc", "test/realised_keep_ratio", "test/audio_share"):
        assert metrics[key] == pytest.approx(expected[key].item(), abs=1e-6), key
