"""The real-scale path end to end on the stand-in: every shipped real recipe fits and tests on CPU.

The stand-in (``python -m ep_kit.standin``) is a tiny Qwen2.5-Omni checkpoint and data in the real
on-disk layouts. Each recipe runs as a user runs it: the files on disk, parsed by the CLI itself, plus
only the stand-in's path overlays and the CPU overlay (accelerator, devices, strategy, precision,
dtype, loader workers) and ``max_steps``. Training rows fit, then test their trained weights on every
benchmark through ``recipes/eval_benchmarks.yaml``; evaluation recipes and baseline overlays test.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from _toy import REPO
from safetensors import safe_open
from transformers import AutoConfig, Qwen2_5OmniProcessor

from ep_kit.cli import nested_nulls, run
from ep_kit.data.benchmarks import BENCHMARK_GROUPS, read_benchmark
from ep_kit.recipes import config_args
from ep_kit.standin import Standin, benchmark_entries

RECIPES = REPO / "recipes"
#: recipes that evaluate only (``ep-kit test``); every other top-level recipe trains (budget and
#: ablation overlays on ``cs2_ste_20.yaml``, which they run on: :func:`ep_kit.recipes.config_args`).
EVAL_ONLY = {"eval_3b", "eval_7b"}
#: overlays (not complete configs): tested through the recipes that use them.
OVERLAYS = {"eval_benchmarks"}
TRAIN = sorted(p for p in RECIPES.glob("*.yaml") if p.stem not in EVAL_ONLY | OVERLAYS)
BASELINES = sorted((RECIPES / "baselines").glob("*.yaml"))
BENCHMARKS = {"worldsense", "daily_omni", "videomme", "videomme_noaudio", "mlvu"}


def overlays(s: Standin, stage: str, run_dir: Path, cache: Path) -> list[str]:
    """The stand-in's path overlay for ``stage`` (train/eval), the CPU overlay, and where outputs go."""
    paths = s.paths_train if stage == "train" else s.paths_eval
    return [
        "--config", str(paths), "--config", str(s.cpu),
        f"--trainer.logger.init_args.save_dir={run_dir}", f"--data.init_args.cache_dir={cache}",
    ]


def test_standin_is_in_the_released_layout(standin):
    """transformers itself reads the directory: config, processor, tokenizer ids, key names."""
    config = AutoConfig.from_pretrained(standin.model, local_files_only=True)
    assert config.model_type == "qwen2_5_omni"
    assert {"thinker_config", "talker_config", "token2wav_config"} <= set(json.loads((standin.model / "config.json").read_text()))
    assert config.thinker_config.text_config.num_hidden_layers == 36  # the 3B depth
    processor = Qwen2_5OmniProcessor.from_pretrained(standin.model, local_files_only=True)
    assert processor.tokenizer.convert_tokens_to_ids("<|VIDEO|>") == 151656  # the released id
    assert processor.tokenizer.convert_tokens_to_ids("<|AUDIO|>") == 151646
    index = json.loads((standin.model / "model.safetensors.index.json").read_text())["weight_map"]
    assert len(set(index.values())) > 1  # sharded
    assert "thinker.model.layers.0.self_attn.q_proj.weight" in index
    assert "thinker.lm_head.weight" in index and any(k.startswith("talker.") for k in index)
    assert any(k.startswith("token2wav.") for k in index)
    shard = standin.model / index["thinker.model.embed_tokens.weight"]
    with safe_open(str(shard), framework="pt") as f:
        emb = f.get_tensor("thinker.model.embed_tokens.weight")
    assert tuple(emb.shape) == (151936, 64) and emb.dtype == torch.bfloat16
    thinker = AutoConfig.from_pretrained(standin.thinker, local_files_only=True)
    assert thinker.model_type == "qwen2_5_omni_thinker"


def test_standin_benchmarks_read_in_their_official_formats(standin):
    """Each benchmark's reader finds every question and its video; answers follow the recorded events."""
    d = standin.data
    for entry in benchmark_entries(d):
        a = entry["init_args"]
        samples = read_benchmark(a["name"], a["annotation"], a["media_root"], check_files=True)
        assert len(samples) == 2, a["name"]
        assert all(s.answer_letter in s.letters for s in samples)
    rows = [json.loads(line) for line in (d / "av_instruct/train.jsonl").read_text().splitlines()]
    assert len(rows) == 8 and all((d / "av_instruct/media" / r["videos"][0]).is_file() for r in rows)


def test_null_on_the_command_line_means_none():
    assert nested_nulls(["fit", "--data.init_args.source.init_args.val=null"]) == [
        "fit", '--data.init_args.source={"init_args": {"val": null}}'
    ]
    assert nested_nulls(["--data.init_args.source.init_args.val", "null", "--x=1"]) == [
        '--data.init_args.source={"init_args": {"val": null}}', "--x=1"
    ]
    # One level deep jsonargparse already handles: left as it is.
    assert nested_nulls(["--model.init_from=null"]) == ["--model.init_from=null"]


@pytest.mark.slow
def test_recipe_without_validation_trains_without_validation(standin, tmp_path):
    cli = run([
        "fit", "--config", str(RECIPES / "cs2_ste_20.yaml"), *overlays(standin, "train", tmp_path, tmp_path / "c"),
        "--data.init_args.source.init_args.val=null", "--trainer.max_steps=1",
    ])
    assert cli.datamodule.source.paths["val"] is None
    assert cli.trainer.global_step == 1
    assert not any(k.startswith("val/") for k in cli.trainer.callback_metrics)


def check_test_metrics(metrics: dict[str, float]) -> None:
    """Accuracy per benchmark, per category and per main-table group, on every question."""
    assert {k.split("/")[2] for k in metrics if k.startswith("test/acc/")} == BENCHMARKS
    assert metrics["test/count"] == 2 * len(BENCHMARKS)
    for group, members in BENCHMARK_GROUPS.items():
        mean = sum(metrics[f"test/acc/{b}"] for b in members) / len(members)
        assert metrics[f"test/acc_group/{group}"] == pytest.approx(mean)
    assert any(k.count("/") == 3 and k.startswith("test/acc/daily_omni/") for k in metrics)


def callback_metrics(cli) -> dict[str, float]:
    return {k: float(v) for k, v in cli.trainer.callback_metrics.items() if k.startswith("test/")}


@pytest.mark.slow
@pytest.mark.parametrize("recipe", TRAIN, ids=lambda p: p.stem)
def test_training_recipe_fits_then_tests_on_every_benchmark(recipe, standin, tmp_path):
    cache = tmp_path.parent / "sample-cache"  # shared by the recipes: same samples
    fit = run(["fit", *config_args(recipe), *overlays(standin, "train", tmp_path / "fit", cache),
               "--trainer.max_steps=2"])
    assert fit.trainer.global_step == 2
    ckpt = Path(fit.trainer.checkpoint_callback.dirpath) / "last.ckpt"
    assert ckpt.is_file()
    test = run(["test", *config_args(recipe), "--config", str(RECIPES / "eval_benchmarks.yaml"),
                *overlays(standin, "eval", tmp_path / "test", cache), f"--model.init_from={ckpt}"])
    metrics = callback_metrics(test)
    check_test_metrics(metrics)
    assert metrics["test/keep_ratio"] == pytest.approx(fit.model.keep_ratio)
    # The trained weights are the ones evaluated (not the pretrained stand-in's).
    trained = fit.model.model.state_dict()
    tested = test.model.model.state_dict()
    name = next(k for k in trained if k.endswith("lm_head.weight"))
    assert torch.equal(trained[name], tested[name])


@pytest.mark.slow
@pytest.mark.parametrize("recipe", sorted(EVAL_ONLY), ids=str)
def test_evaluation_recipe_reports_every_benchmark_and_group(recipe, standin, tmp_path):
    cli = run(["test", "--config", str(RECIPES / f"{recipe}.yaml"),
               *overlays(standin, "eval", tmp_path, tmp_path.parent / "sample-cache")])
    metrics = callback_metrics(cli)
    check_test_metrics(metrics)
    assert metrics["test/realised_keep_ratio"] == 1.0 and cli.model.model.reducer is None
    # The context length is linked from the checkpoint's config (32768 for Qwen2.5-Omni); the budget is the recipe's.
    assert cli.datamodule.max_position_embeddings == 32768 and cli.datamodule.max_tokens == 32768


@pytest.mark.slow
@pytest.mark.parametrize("overlay", BASELINES, ids=lambda p: p.stem)
def test_baseline_overlay_runs_on_the_evaluation_base(overlay, standin, tmp_path):
    cli = run(["test", "--config", str(RECIPES / "eval_3b.yaml"), "--config", str(overlay),
               *overlays(standin, "eval", tmp_path, tmp_path.parent / "sample-cache")])
    metrics = callback_metrics(cli)
    check_test_metrics(metrics)
    ratio = cli.model.keep_ratio
    if ratio < 1.0:  # the budget is met on the A/V tokens the last decoder layers see
        assert metrics["test/realised_keep_ratio"] <= ratio + 0.05


def test_kit_loads_the_full_and_the_thinker_only_directory_alike(standin):
    """The kit's own loading of both stand-in layouts gives the same thinker (same logits)."""
    from ep_kit.models import OmniThinker, make_av_batch

    full = OmniThinker.from_pretrained(standin.model, dtype=torch.float32)
    alone = OmniThinker.from_pretrained(standin.thinker, dtype=torch.float32)
    batch = make_av_batch(full.config, seed=0)
    with torch.no_grad():
        a, b = full(batch).logits, alone(batch).logits
    assert a.shape[-1] == 151936
    torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_deepspeed_recipe_without_deepspeed_names_the_extra(standin, monkeypatch, tmp_path):
    """The paper's ZeRO-2 trainer on a machine without DeepSpeed: one clear error with the pip command."""
    import importlib.util

    from ep_kit.cli import MissingExtraError

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "deepspeed" else real(name, *a))
    with pytest.raises(MissingExtraError, match=r'pip install "ep-kit\[deepspeed\]".*trainer_4gpu_fsdp'):
        run(["fit", "--config", str(RECIPES / "cs2_ste_20.yaml"), "--config", str(standin.paths_train),
             f"--trainer.logger.init_args.save_dir={tmp_path}"])
