"""Kit weights, HF-style export and the official EchoingPixels checkpoint layout.

The official checkpoint is written here by hand with the released key names (pre-5.21 thinker
naming + ``bidir_encoder`` / ``compressor``), independently of the loader's key mapping.
"""

from __future__ import annotations

import copy
import json

import pytest
import torch
from safetensors.torch import save_file

from ep_kit.models import OmniThinker
from ep_kit.models.checkpoint import (
    KIT_WEIGHTS,
    export_hf,
    load_kit_weights,
    load_official_checkpoint,
    save_kit_weights,
)
from ep_kit.reducers import CS2


def _perturb(module: torch.nn.Module, seed: int = 1) -> None:
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.add_(torch.randn(p.shape, generator=gen) * 0.05)


def _outputs(model: OmniThinker, batch: dict):
    with torch.no_grad():
        return model.eval()(batch)


@pytest.fixture
def trained(tiny_model, tiny_config):
    """A CS2 model whose sieve and scorer differ from their initialisation (as after training)."""
    model = tiny_model(tiny_config(), reducer=CS2(num_layers=2), keep_ratio=0.3)
    _perturb(model.reducer)
    return model


def test_kit_weights_roundtrip(trained, tiny_config, av_batch, av_specs, tmp_path):
    batch = av_batch(tiny_config(), av_specs)
    save_kit_weights(trained, tmp_path)
    fresh = OmniThinker(trained.thinker, reducer=CS2(num_layers=2), keep_ratio=0.3)
    before = _outputs(fresh, batch)
    report = load_kit_weights(fresh, tmp_path)
    assert report.ok and report.config["reducer"]["num_layers"] == 2
    after, ref = _outputs(fresh, batch), _outputs(trained, batch)
    assert not torch.allclose(before.loss, ref.loss)
    torch.testing.assert_close(after.logits, ref.logits)
    with pytest.raises(ValueError, match="num_layers=2 but the model's reducer has num_layers=1"):
        load_kit_weights(OmniThinker(trained.thinker, reducer=CS2(num_layers=1)), tmp_path)
    with pytest.raises(FileNotFoundError, match="ep_kit_weights.safetensors"):
        load_kit_weights(fresh, tmp_path / "nowhere")


def test_kit_weights_with_llm(trained, tiny_config, av_batch, av_specs, tmp_path):
    batch = av_batch(tiny_config(), av_specs)
    base = copy.deepcopy(trained.thinker)  # same frozen encoders, LLM about to diverge
    _perturb(trained.decoder_layers, seed=3)
    _perturb(trained.lm_head, seed=4)
    save_kit_weights(trained, tmp_path, include_llm=True)
    other = OmniThinker(base, reducer=CS2(num_layers=2), keep_ratio=0.3)
    assert not torch.allclose(_outputs(other, batch).logits, _outputs(trained, batch).logits)
    report = load_kit_weights(other, tmp_path)
    assert report.ok
    torch.testing.assert_close(_outputs(other, batch).logits, _outputs(trained, batch).logits)


def test_export_hf_then_from_pretrained(trained, tiny_config, av_batch, av_specs, tmp_path):
    batch = av_batch(tiny_config(), av_specs)
    export_hf(trained, tmp_path)
    cfg = json.loads((tmp_path / "config.json").read_text())
    assert cfg["model_type"] == "qwen2_5_omni_thinker"
    assert cfg["text_config"]["av_refiner_layers"] == 2 and cfg["text_config"]["compression_ratio"] == 0.3
    loaded = OmniThinker.from_pretrained(tmp_path, dtype=torch.float32, reducer=CS2(num_layers=2), keep_ratio=0.3)
    torch.testing.assert_close(_outputs(loaded, batch).logits, _outputs(trained, batch).logits)
    # reducer=None given: the thinker alone loads (the recorded CS2 and its weights are left out)
    plain = OmniThinker.from_pretrained(tmp_path, dtype=torch.float32, reducer=None)
    assert plain.reducer is None


def _official_state(model: OmniThinker) -> dict[str, torch.Tensor]:
    """The released layout, written key by key (not through the loader's mapping)."""
    out = {}
    for k, v in model.thinker.state_dict().items():
        if k.startswith("model.language_model."):
            out["thinker.model." + k[len("model.language_model.") :]] = v
        elif k.startswith("model.audio_tower."):
            out["thinker.audio_tower." + k[len("model.audio_tower.") :]] = v
        elif k.startswith("model.visual."):
            out["thinker.visual." + k[len("model.visual.") :]] = v
        elif k == "lm_head.weight":
            out["thinker.lm_head.weight"] = v
        else:
            raise AssertionError(f"unplaced thinker key {k}")
    for i, layer in enumerate(model.reducer.layers):
        for k, v in layer.state_dict().items():
            out[f"thinker.model.bidir_encoder.layers.{i}.{k}"] = v
    for k, v in model.reducer.scorer.state_dict().items():
        out[f"thinker.model.compressor.{k}"] = v
    return {k: v.detach().clone().contiguous() for k, v in out.items()}


def _write_official(model: OmniThinker, root, ratio: float = 0.2, depth: int = 2) -> dict:
    root.mkdir(parents=True, exist_ok=True)
    state = _official_state(model)
    state["talker.model.embed_tokens.weight"] = torch.zeros(2, 2)  # full checkpoints carry a talker
    save_file(state, str(root / "model.safetensors"))
    thinker_cfg = model.config.to_dict()
    thinker_cfg["text_config"]["av_refiner_layers"] = depth
    thinker_cfg["text_config"]["compression_ratio"] = ratio
    (root / "config.json").write_text(
        json.dumps({"model_type": "qwen2_5_omni", "architectures": ["Qwen2_5OmniModel"], "thinker_config": thinker_cfg})
    )
    return state


def test_official_checkpoint_loads_exactly(trained, tiny_model, tiny_config, av_batch, av_specs, tmp_path, caplog):
    batch = av_batch(tiny_config(), av_specs)
    state = _write_official(trained, tmp_path / "official")
    target = tiny_model(tiny_config(), reducer=CS2(num_layers=2), keep_ratio=0.2)
    _perturb(target, seed=7)  # every weight differs before loading
    target.keep_ratio = 0.35  # the run's budget, not the checkpoint's compression_ratio (0.2)
    with caplog.at_level("INFO", logger="ep_kit.models.checkpoint"):
        report = load_official_checkpoint(tmp_path / "official", target)
    assert report.missing == [] and report.unexpected == []
    assert report.ignored == ["talker.model.embed_tokens.weight"]
    assert target.keep_ratio == 0.35  # the run's keep_ratio wins ...
    assert report.config["compression_ratio"] == 0.2  # ... the checkpoint's is reported
    assert "trained at compression_ratio 0.2; this run keeps keep_ratio 0.35" in caplog.text
    target.keep_ratio = 0.2
    trained.keep_ratio = 0.2
    ref = _outputs(trained, batch)
    torch.testing.assert_close(_outputs(target, batch).logits, ref.logits)

    # The same directory through from_pretrained (transformers loads the thinker, the kit the sieve).
    loaded = OmniThinker.from_pretrained(
        tmp_path / "official", dtype=torch.float32, reducer=CS2(num_layers=2), keep_ratio=0.2
    )
    torch.testing.assert_close(_outputs(loaded, batch).logits, ref.logits)

    # A state dict works too; strict mode lists what is missing / unexpected.
    broken = dict(state)
    del broken["thinker.model.compressor.score_head.2.bias"]
    broken["thinker.model.compressor.extra.weight"] = torch.zeros(1)
    with pytest.raises(ValueError, match=r"reducer\.scorer\.score_head\.2\.bias.*reducer\.scorer\.extra\.weight"):
        load_official_checkpoint(broken, target, config={"text_config": {"av_refiner_layers": 2}})
    report = load_official_checkpoint(broken, target, strict=False)
    assert report.missing == ["reducer.scorer.score_head.2.bias"]
    assert report.unexpected == ["reducer.scorer.extra.weight"]


def test_official_checkpoint_depth_mismatch(trained, tiny_model, tiny_config, tmp_path):
    _write_official(trained, tmp_path, depth=2)
    with pytest.raises(ValueError, match="av_refiner_layers=2 but the model's CS2 reducer has num_layers=1"):
        load_official_checkpoint(tmp_path, tiny_model(tiny_config(), reducer=CS2(num_layers=1)))
    with pytest.raises(ValueError, match="no CS2 reducer"):
        load_official_checkpoint(tmp_path, tiny_model(tiny_config()))
    assert not (tmp_path / KIT_WEIGHTS).exists()
