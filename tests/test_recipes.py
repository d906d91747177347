"""Every shipped recipe (real and toy scale) parses, carries the paper's settings and instantiates.

Budget and ablation rows are overlays on the scale's ``cs2_ste_20.yaml`` and run on it
(:func:`ep_kit.recipes.config_args`); ``test_recipe_files.py`` parses every YAML file under ``recipes/``.
Real-scale recipes point at the stand-in checkpoint (``ep_kit.standin``: the released layout and
head_dim 128, so the 64-pair Sync-RoPE layout binds); ``test_real_scale.py`` runs them end to end.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from _toy import REPO, toy_args

from ep_kit.cli import EPKitCLI, run
from ep_kit.data import AVDataModule
from ep_kit.masks import Bidirectional, Causal, IntraModal
from ep_kit.recipes import config_args
from ep_kit.reducers import CS2
from ep_kit.rope import SyncRoPE, TMRoPE
from ep_kit.scorers import MLPScorer, SimilarityScorer
from ep_kit.selectors import GumbelTopK, HardTopK, PerModalityTopK, STETopK
from ep_kit.train.module import EPKitModule

RECIPES = REPO / "recipes"
ROWS = [
    "cs2_ste_20",
    "cs2_ste_10",
    "cs2_ste_5",
    "ablation_causal",
    "ablation_intramodal",
    "ablation_no_prefusion",
    "ablation_per_modality",
    "ablation_similarity",
    "ablation_gumbel",
    "ablation_no_syncrope",
]
REAL = [RECIPES / f"{r}.yaml" for r in ROWS] + [RECIPES / "cs2_ste_10_7b.yaml"]
TOY = [RECIPES / "toy" / f"{r}.yaml" for r in ROWS] + [RECIPES / "toy" / "pretrain.yaml"]
#: row -> (attention mode, prefusion, scorer class, selector class, rope class, keep ratio)
EXPECTED = {
    "cs2_ste_20": (Bidirectional, True, MLPScorer, STETopK, SyncRoPE, 0.2),
    "cs2_ste_10": (Bidirectional, True, MLPScorer, STETopK, SyncRoPE, 0.1),
    "cs2_ste_5": (Bidirectional, True, MLPScorer, STETopK, SyncRoPE, 0.05),
    "cs2_ste_10_7b": (Bidirectional, True, MLPScorer, STETopK, SyncRoPE, 0.1),
    "ablation_causal": (Causal, True, MLPScorer, STETopK, SyncRoPE, 0.2),
    "ablation_intramodal": (IntraModal, True, MLPScorer, STETopK, SyncRoPE, 0.2),
    "ablation_no_prefusion": (Bidirectional, False, MLPScorer, STETopK, SyncRoPE, 0.2),
    "ablation_per_modality": (Bidirectional, True, MLPScorer, PerModalityTopK, SyncRoPE, 0.2),
    "ablation_similarity": (Bidirectional, True, SimilarityScorer, HardTopK, SyncRoPE, 0.2),
    "ablation_gumbel": (Bidirectional, True, MLPScorer, GumbelTopK, SyncRoPE, 0.2),
    "ablation_no_syncrope": (Bidirectional, True, MLPScorer, STETopK, TMRoPE, 0.2),
}


class ParseOnlyCLI(EPKitCLI):
    """Parse (links, nested files, types) without building anything."""

    def instantiate_classes(self) -> None:
        self.config_init = self.config


def parse(path: Path, *extra: str):
    """The parsed config of ``path`` as it runs: an overlay on its base, a whole recipe alone."""
    return ParseOnlyCLI(
        EPKitModule, AVDataModule, subclass_mode_data=True, auto_configure_optimizers=False, run=False,
        args=[*config_args(path), *extra],
    ).config


def test_every_row_has_a_real_and_a_toy_recipe():
    evaluation = ["eval_3b", "eval_7b", "eval_benchmarks"]
    assert sorted(p.stem for p in RECIPES.glob("*.yaml")) == sorted([*ROWS, "cs2_ste_10_7b", *evaluation])
    assert sorted(p.stem for p in (RECIPES / "toy").glob("*.yaml")) == sorted([*ROWS, "pretrain"])


@pytest.mark.parametrize("path", REAL, ids=lambda p: p.stem)
def test_real_recipe_has_the_paper_settings(path):
    cfg = parse(path)
    t = cfg.trainer
    assert (t.strategy, t.precision, t.devices, t.max_epochs) == ("deepspeed_stage_2", "bf16-mixed", 4, 1)
    m = cfg.model
    assert m.optimizer.class_path == "torch.optim.AdamW" and m.optimizer.init_args.lr == pytest.approx(2e-5)
    assert m.lr_scheduler.class_path == "ep_kit.train.schedules.WarmupCosine"
    assert (m.lr_scheduler.init_args.warmup_ratio, m.lr_scheduler.init_args.min_lr_ratio) == (0.05, 0.0)
    assert (m.train_llm, m.freeze_encoders) == (True, True)
    assert m.reducer.init_args.num_layers == 4
    d = cfg.data.init_args
    assert (d.batch_size, d.max_frames, d.use_audio_in_video) == (2, 120, True)
    assert 100_000 <= d.max_pixels <= 110_000
    assert m.thinker.init_args.path.startswith("/path/to/Qwen2.5-Omni-" + ("7B" if "7b" in path.stem else "3B"))


@pytest.mark.parametrize("path", REAL, ids=lambda p: p.stem)
def test_real_recipe_instantiates_on_a_standin_checkpoint(path, standin, tmp_path):
    # Every placeholder path must be set before anything is built (ep_kit.cli.unset_paths): the stand-in's
    # paths file sets the training data of these training rows.
    paths = ["--config", str(standin.paths_train)]
    cli = run(
        [
            *config_args(path),
            *paths,
            f"--model.thinker.init_args.path={standin.model}",
            "--model.thinker.init_args.dtype=float32",
            "--trainer.accelerator=cpu",
            "--trainer.devices=1",
            "--trainer.strategy=auto",
            "--trainer.precision=32-true",
            f"--trainer.logger.init_args.save_dir={tmp_path}",
        ],
        run_subcommand=False,
    )
    check_components(cli.model, EXPECTED[path.stem])
    assert cli.datamodule.processor_source == str(standin.model)  # linked from model.thinker
    assert cli.datamodule.tokenizer.convert_tokens_to_ids("<|VIDEO|>") == cli.model.model.config.video_token_id


@pytest.mark.parametrize("path", TOY, ids=lambda p: p.stem)
def test_toy_recipe_instantiates(path, tmp_path):
    cli = run([*config_args(path), *toy_args(tmp_path)], run_subcommand=False)
    assert cli.datamodule.processor_source == "tiny"
    if path.stem == "pretrain":
        assert cli.model.model.reducer is None and cli.model.hparams.export_thinker
        # the base trains the LLM on frozen random encoders (see the recipe's header)
        thinker = cli.model.model.thinker
        assert not any(p.requires_grad for p in thinker.model.visual.parameters())
        assert all(p.requires_grad for p in thinker.model.language_model.parameters())
        return
    check_components(cli.model, EXPECTED[path.stem])
    assert cli.model.model.reducer.num_layers == 2


def check_components(module: EPKitModule, expected) -> None:
    attention, prefusion, scorer, selector, rope, ratio = expected
    red = module.model.reducer
    assert isinstance(red, CS2)
    assert type(red.attention) is attention and red.prefusion is prefusion
    assert type(red.scorer) is scorer and type(red.selector) is selector
    assert type(module.model.rope) is rope
    assert module.keep_ratio == pytest.approx(ratio)
    assert not any(p.requires_grad for p in module.model.thinker.model.audio_tower.parameters())
    assert all(p.requires_grad for p in red.layers.parameters())


def launch_command(script: Path, paths: Path) -> list[str]:
    """The ``ep-kit fit ...`` arguments of a launch script, with its shell variables filled in."""
    import shlex

    text = script.read_text().replace("\\\n", " ")
    line = next(x for x in text.splitlines() if " fit --config " in x)
    args = shlex.split(line.split(" fit ", 1)[1])
    values = {"${PATHS}": str(paths), "${MODEL}": "/data/Qwen2.5-Omni-3B"}
    for key, value in values.items():
        args = [a.replace(key, value) for a in args]
    return args


@pytest.mark.parametrize("script", sorted((RECIPES / "launch").iterdir()), ids=lambda p: p.name)
def test_multinode_launch_commands_parse(script, tmp_path):
    """SLURM and torchrun scripts: their ep-kit command parses with 2 nodes x 4 GPUs, the paper's strategy."""
    paths = tmp_path / "paths_train.yaml"
    paths.write_text("data:\n  init_args:\n    source:\n      init_args:\n        train: /data/train.jsonl\n")
    args = launch_command(script, paths)
    assert args[:2] == ["--config", "recipes/cs2_ste_20.yaml"]
    cfg = parse(REPO / args[1], *args[2:])
    t = cfg.trainer
    assert (t.num_nodes, int(t.devices), t.strategy) == (2, 4, "deepspeed_stage_2")
    assert cfg.data.init_args.source.init_args.train == "/data/train.jsonl"


def test_fsdp_trainer_base_parses_and_wraps_every_transformer_block():
    from lightning.pytorch.strategies import FSDPStrategy

    from ep_kit.models.omni import transformer_block_classes
    from ep_kit.train.strategies import OmniFSDPStrategy

    cfg = parse(RECIPES / "cs2_ste_20.yaml", "--trainer", str(RECIPES / "_base" / "trainer_4gpu_fsdp.yaml"))
    s = cfg.trainer.strategy
    assert s.class_path == "ep_kit.train.strategies.OmniFSDPStrategy"
    strategy = OmniFSDPStrategy(**s.init_args.as_dict())
    assert isinstance(strategy, FSDPStrategy)
    policy = strategy.kwargs["auto_wrap_policy"]
    names = {c.__name__ for c in policy._module_classes}
    assert names == {c.__name__ for c in transformer_block_classes()} >= {"Qwen2_5OmniDecoderLayer"}
    assert strategy.kwargs["use_orig_params"] is True
