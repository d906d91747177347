"""``OmniThinker.save_pretrained`` / ``from_pretrained`` with recorded components, and ``ep-kit export``.

References: the model before saving (its outputs, computed before anything is written, must be
reproduced float for float), records written out by hand, ``keep_count`` for the budgets, and the
LightningModule a toy fit produced.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from _toy import TOY_ROW, toy_args

from ep_kit.masks import Causal
from ep_kit.models import OmniThinker
from ep_kit.models.components import build_components, describe
from ep_kit.recipes import method_configs, method_from_recipe
from ep_kit.reducers import CS2
from ep_kit.rope import SyncRoPE, TMRoPE
from ep_kit.scorers import MLPScorer
from ep_kit.selectors import STETopK

RECIPES = Path(__file__).resolve().parents[1] / "recipes" / "toy"


def _perturb(module: torch.nn.Module, seed: int = 1) -> None:
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.add_(torch.randn(p.shape, generator=gen) * 0.05)


def _run(model: OmniThinker, batch: dict):
    with torch.no_grad():
        return model.eval()(batch)


@pytest.fixture
def saved(tiny_model, tiny_config, av_batch, av_specs, tmp_path):
    """(model, batch, its outputs before saving, directory): a CS2 model with trained-looking sieve, saved."""
    model = tiny_model(
        tiny_config(),
        rope=SyncRoPE(sections=None),
        reducer=CS2(num_layers=2, attention=Causal(), scorer=MLPScorer, selector=STETopK(tau=0.5)),
        keep_ratio=0.3,
        candidate_modalities=["video", "audio"],
    )
    _perturb(model.reducer)
    batch = av_batch(tiny_config(), av_specs)
    before = _run(model, batch)
    model.save_pretrained(tmp_path / "model")
    return model, batch, before, tmp_path / "model"


def test_round_trip_rebuilds_components_weights_and_budget(saved):
    model, batch, before, root = saved
    record = json.loads((root / "ep_kit_config.json").read_text())["components"]
    assert record == {
        "rope": {"class_path": "ep_kit.rope.SyncRoPE", "init_args": {"sections": [2, 2, 2, 2], "head_dim": 16, "base": 1e6}},
        "reducer": {
            "class_path": "ep_kit.reducers.CS2",
            "init_args": {
                "num_layers": 2,
                "attention": {"class_path": "ep_kit.masks.Causal"},
                "prefusion": True,
                "scorer": {"class_path": "ep_kit.scorers.MLPScorer"},
                "selector": {"class_path": "ep_kit.selectors.STETopK", "init_args": {"tau": 0.5}},
            },
        },
        "keep_ratio": 0.3,
        "candidate_modalities": ["video", "audio"],
    }
    loaded = OmniThinker.from_pretrained(root, dtype=torch.float32)  # nothing but the directory
    assert isinstance(loaded.rope, SyncRoPE) and loaded.rope.sections == [2, 2, 2, 2]
    assert isinstance(loaded.reducer, CS2) and isinstance(loaded.reducer.attention, Causal)
    assert isinstance(loaded.reducer.selector, STETopK) and loaded.reducer.selector.tau == 0.5
    assert loaded.keep_ratio == 0.3 and loaded.candidate_modalities == ("video", "audio")
    after = _run(loaded, batch)
    assert torch.equal(after.kept.source_index, before.kept.source_index)
    torch.testing.assert_close(after.logits, before.logits, rtol=0, atol=0)
    for name, value in model.reducer.state_dict().items():  # the trained sieve, not a fresh copy of the decoder
        assert torch.equal(value, loaded.reducer.state_dict()[name]), name


def test_arguments_given_on_load_replace_the_record(saved):
    model, batch, _, root = saved
    cheaper = OmniThinker.from_pretrained(root, dtype=torch.float32, keep_ratio=0.1)
    assert isinstance(cheaper.reducer, CS2) and cheaper.keep_ratio == 0.1
    model.keep_ratio = 0.1  # the same model at the other budget is the reference
    ref, got = _run(model, batch), _run(cheaper, batch)
    assert torch.equal(got.kept.source_index, ref.kept.source_index)
    torch.testing.assert_close(got.logits, ref.logits, rtol=0, atol=0)
    n = ref.stats["n_candidates"]
    assert got.stats["kept_candidates"].tolist() == [max(1, -(-int(v) // 10)) for v in n]  # ceil(0.1 n)

    plain = OmniThinker.from_pretrained(root, dtype=torch.float32, reducer=None)
    assert plain.reducer is None and plain.rope.sections == [2, 2, 2, 2]
    stock = OmniThinker(model.thinker, rope=SyncRoPE([2, 2, 2, 2]), keep_ratio=0.3)
    torch.testing.assert_close(_run(plain, batch).logits, _run(stock, batch).logits, rtol=0, atol=0)


def _edit_record(root: Path, edit) -> None:
    path = root / "ep_kit_config.json"
    saved = json.loads(path.read_text())
    edit(saved)
    path.write_text(json.dumps(saved))


def test_a_record_that_cannot_be_rebuilt_is_an_error(saved):
    _, _, _, root = saved
    _edit_record(root, lambda s: s["components"]["reducer"].update(class_path="ep_kit.reducers.NoSuchReducer"))
    with pytest.raises(ValueError, match=rf"{root}.*ep_kit_config.json: cannot rebuild the model's reducer"):
        OmniThinker.from_pretrained(root)
    _edit_record(root, lambda s: s["components"]["reducer"].update(class_path="ep_kit.reducers.CS2"))
    _edit_record(root, lambda s: s["components"]["reducer"]["init_args"]["selector"]["init_args"].update(tau=-1))
    with pytest.raises(ValueError, match="cannot rebuild the model's reducer"):
        OmniThinker.from_pretrained(root)
    _edit_record(root, lambda s: s["components"].pop("rope"))
    with pytest.raises(ValueError, match=r"the component record has no \['rope'\]"):
        OmniThinker.from_pretrained(root, reducer=CS2(num_layers=2))


def test_kit_weights_without_a_record_need_their_reducer(saved):
    """A directory saved before records existed: an error saying what to pass, then it loads with it."""
    model, batch, before, root = saved
    _edit_record(root, lambda s: s.pop("components"))
    with pytest.raises(ValueError, match="records no components"):
        OmniThinker.from_pretrained(root)
    loaded = OmniThinker.from_pretrained(
        root, dtype=torch.float32, rope=SyncRoPE([2, 2, 2, 2]), keep_ratio=0.3,
        reducer=CS2(num_layers=2, attention=Causal(), selector=STETopK(tau=0.5)),
    )
    torch.testing.assert_close(_run(loaded, batch).logits, before.logits, rtol=0, atol=0)


def test_a_plain_transformers_directory_loads_as_the_stock_model(tiny_model, tiny_config, av_batch, av_specs, tmp_path):
    model = tiny_model(tiny_config())
    model.thinker.save_pretrained(tmp_path)  # transformers alone: no ep-kit files
    loaded = OmniThinker.from_pretrained(tmp_path, dtype=torch.float32)
    assert loaded.reducer is None and isinstance(loaded.rope, TMRoPE) and loaded.keep_ratio == 1.0
    batch = av_batch(tiny_config(), av_specs)
    torch.testing.assert_close(_run(loaded, batch).logits, _run(model, batch).logits, rtol=0, atol=0)


@pytest.mark.parametrize(
    "recipe", sorted(RECIPES.glob("cs2_ste_*.yaml")) + sorted(RECIPES.glob("ablation_*.yaml"))
    + sorted((RECIPES / "baselines").glob("*_20.yaml")), ids=lambda p: p.stem,
)
def test_every_recipe_method_is_recorded_and_rebuilt(recipe):
    """Each toy row's rope and reducer survive describe -> rebuild as the same classes and arguments."""
    method = method_from_recipe(method_configs(recipe))
    saved = {"rope": describe(method.rope), "reducer": describe(method.reducer), "keep_ratio": method.keep_ratio,
             "candidate_modalities": list(method.candidate_modalities)}
    rebuilt = build_components(json.loads(json.dumps(saved)), str(recipe))
    assert type(rebuilt["reducer"]) is type(method.reducer) and type(rebuilt["rope"]) is type(method.rope)
    assert describe(rebuilt["reducer"]) == saved["reducer"] and describe(rebuilt["rope"]) == saved["rope"]
    assert rebuilt["keep_ratio"] == method.keep_ratio
    if method.reducer_config is not None:  # the recipe's own class_path names the recorded class
        assert saved["reducer"]["class_path"].rsplit(".", 1)[1] == method.reducer_config["class_path"].rsplit(".", 1)[1]


@pytest.mark.slow
def test_export_of_a_fit_checkpoint_loads_as_the_trained_model(tmp_path):
    """``ep-kit export CKPT DIR`` on a toy fit's last.ckpt: from_pretrained(DIR) answers as the fitted module."""
    from ep_kit.cli import main, run

    cli = run(["fit", "--config", str(TOY_ROW), *toy_args(tmp_path, epochs=1)])
    ckpt = next((tmp_path / "runs").rglob("last.ckpt"))
    out = tmp_path / "exported"
    main(["export", str(ckpt), str(out)])
    record = json.loads((out / "ep_kit_config.json").read_text())["components"]
    assert record["keep_ratio"] == 0.2 and record["rope"]["init_args"]["sections"] == [2, 2, 2, 2]
    assert record["reducer"]["class_path"] == "ep_kit.reducers.CS2" and record["reducer"]["init_args"]["num_layers"] == 2

    loaded = OmniThinker.from_pretrained(out, dtype=torch.float32)
    fitted = cli.model.model
    batch = next(iter(cli.datamodule.val_dataloader()))
    ref, got = _run(fitted, batch), _run(loaded, batch)
    assert torch.equal(got.kept.source_index, ref.kept.source_index)
    torch.testing.assert_close(got.logits, ref.logits, rtol=0, atol=0)

    # The README's `ep-kit answer ... --weights CKPT`: the same checkpoint answers one clip.
    from test_answer import _clip

    from ep_kit.budget import keep_count

    answered = tmp_path / "answer"
    main(["answer", "--video", str(_clip(tmp_path / "clip.mp4")), "--question", "Which colour flashes?",
          "--options", "red", "green", "blue", "yellow", "--config", str(TOY_ROW), "--weights", str(ckpt),
          "--keep_ratio", "0.2", "--output_dir", str(answered)])
    counts = json.loads((answered / "kept.json").read_text())["counts"]
    total = counts["video"]["total"] + counts["audio"]["total"]
    assert counts["video"]["kept"] + counts["audio"]["kept"] == keep_count(total, 0.2)

    with pytest.raises(FileExistsError, match="not empty"):
        main(["export", str(ckpt), str(out)])
    with pytest.raises(ValueError, match="not a Lightning checkpoint"):
        main(["export", str(out / "config.json"), str(tmp_path / "other")])
