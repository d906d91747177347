"""The on-disk cache of frozen encoder outputs (ep_kit.models.feature_cache).

Equality with the uncached run: a cache filled from a batch and read back for the SAME batch gives
bit-identical embeddings (the features were computed on exactly the batch the uncached run
encodes). Read into a different batch composition, a sample's features equal the uncached run's up
to float rounding only (``allclose``): the encoders compute each sample on its own
(``test_encoders_are_per_sample``), but a matmul over another number of rows may round differently.
"""

from __future__ import annotations

import copy
import threading
from pathlib import Path

import pytest
import torch

from ep_kit.models import OmniThinker
from ep_kit.models.feature_cache import EncoderFeatureCache, split_pixels
from ep_kit.models.tiny import SampleSpec


@pytest.fixture
def specs() -> list[SampleSpec]:
    """Three A/V samples (one video + one audio each), of different sizes."""
    return [
        SampleSpec(prompt_len=6, answer_len=3, frames=4, height=56, width=56, audio_seconds=2.0),
        SampleSpec(prompt_len=3, answer_len=4, frames=6, height=28, width=56, audio_seconds=3.0),
        SampleSpec(prompt_len=4, answer_len=2, frames=2, height=28, width=28, audio_seconds=1.5),
    ]


def subset(batch: dict, idx: list[int]) -> dict:
    """The batch of samples ``idx`` (each sample holds exactly one video and one audio row)."""
    out = {k: batch[k][idx] for k in ("input_ids", "attention_mask", "labels")}
    parts = split_pixels(batch["pixel_values_videos"], batch["video_grid_thw"])
    out["pixel_values_videos"] = torch.cat([parts[i] for i in idx])
    for key in ("video_grid_thw", "video_second_per_grid", "input_features", "feature_attention_mask"):
        out[key] = batch[key][idx]
    out["use_audio_in_video"] = True
    return out


class Calls:
    """Counts forward calls of the audio and vision towers (and the items each call got)."""

    def __init__(self, model: OmniThinker) -> None:
        inner = model.thinker.model
        self.audio: list[int] = []
        self.vision: list[int] = []
        inner.audio_tower.register_forward_hook(
            lambda m, args, kwargs, out: self.audio.append(int(kwargs["feature_lens"].shape[0])), with_kwargs=True
        )
        inner.visual.register_forward_hook(
            lambda m, args, kwargs, out: self.vision.append(int(kwargs["grid_thw"].shape[0])), with_kwargs=True
        )


@pytest.fixture
def model(tiny_model):
    return tiny_model()


@pytest.fixture
def batch(tiny_config, av_batch, specs):
    return av_batch(tiny_config(), specs)


def cached(model: OmniThinker, root: Path) -> OmniThinker:
    """The same thinker (shared weights) with a feature cache at ``root``."""
    return OmniThinker(model.thinker, reducer=None, feature_cache=EncoderFeatureCache(str(root)))


@torch.no_grad()
def test_encoders_are_per_sample(model, batch):
    """Each sample's encoder output does not depend on the other samples of its batch (float rounding aside)."""
    inner = model.thinker.model
    audio = inner.get_audio_features(batch["input_features"], batch["feature_attention_mask"], return_dict=True)
    lens = batch["feature_attention_mask"].sum(-1)
    alone = [
        inner.get_audio_features(
            batch["input_features"][i : i + 1, :, : int(n)], torch.ones(1, int(n), dtype=torch.long), return_dict=True
        ).last_hidden_state
        for i, n in enumerate(lens)
    ]
    torch.testing.assert_close(audio.last_hidden_state, torch.cat(alone), rtol=1e-5, atol=1e-5)
    grid = batch["video_grid_thw"]
    video = torch.cat(inner.get_video_features(batch["pixel_values_videos"], grid, return_dict=True).pooler_output)
    parts = split_pixels(batch["pixel_values_videos"], grid)
    alone = [torch.cat(inner.get_video_features(p, grid[i : i + 1], return_dict=True).pooler_output)
             for i, p in enumerate(parts)]
    torch.testing.assert_close(video, torch.cat(alone), rtol=1e-5, atol=1e-5)


@torch.no_grad()
def test_equal_to_no_cache_and_hit_skips_encoders(model, batch, tmp_path):
    """First run fills (encoders run once), second reads (encoders never run); both bit-identical to no cache."""
    reference = model.embed(batch).hidden
    m = cached(model, tmp_path)
    calls = Calls(m)
    first = m.embed(batch).hidden
    assert calls.audio == [3] and calls.vision == [3]
    assert m.feature_cache.stats["misses"] == 6 and m.feature_cache.stats["writes"] == 6
    second = m.embed(batch).hidden
    assert calls.audio == [3] and calls.vision == [3]  # no new encoder call
    assert m.feature_cache.stats["hits"] == 6
    assert torch.equal(first, reference) and torch.equal(second, reference)
    assert len(list(tmp_path.rglob("*.safetensors"))) == 6
    assert not list(tmp_path.rglob("*.tmp"))


@torch.no_grad()
def test_per_sample_reuse_across_batch_compositions(model, batch, tmp_path):
    """Samples cached from one batch are reused in another; only the new sample is encoded, once."""
    other = subset(batch, [2, 1, 0])  # new sample first, the cached ones in another order
    reference = model.embed(other).hidden
    m = cached(model, tmp_path)
    m.embed(subset(batch, [0, 1]))
    calls = Calls(m)
    got = m.embed(other).hidden
    assert calls.audio == [1] and calls.vision == [1]  # one encoder call each, on the missing sample only
    assert m.feature_cache.stats["hits"] == 4
    torch.testing.assert_close(got, reference, rtol=1e-5, atol=1e-5)
    m.embed(subset(batch, [2]))
    assert calls.audio == [1] and calls.vision == [1]  # now every sample is cached


@torch.no_grad()
def test_forward_equal_with_and_without_cache(tiny_model, batch, tmp_path):
    """The full forward (logits and loss) of a CS2-free model is unchanged by the cache."""
    model = tiny_model(keep_ratio=0.5)
    reference = model(batch)
    m = OmniThinker(model.thinker, keep_ratio=0.5, feature_cache=EncoderFeatureCache(str(tmp_path)))
    for _ in range(2):
        out = m(batch)
        assert torch.equal(out.logits, reference.logits) and torch.equal(out.loss, reference.loss)


def test_keys_change_with_inputs_and_weights(model, batch, tmp_path):
    """A different input (content, processor output shape/dtype, grid) or different weights gives a new key."""
    cache = EncoderFeatureCache(str(tmp_path))
    visual = model.thinker.model.visual
    digest = cache.encoder_digest(visual)
    numerics = cache._numerics(torch.device("cpu"))
    pixels = split_pixels(batch["pixel_values_videos"], batch["video_grid_thw"])[0]
    grid = batch["video_grid_thw"][0]

    def key(item, g=grid, d=digest, kind="video"):
        return cache.sample_key(kind, d, numerics, item, g)

    base = key(pixels)
    assert key(pixels.clone()) == base  # content-addressed: the same bytes, the same key
    changed = pixels.clone()
    changed[0, 0] += 1e-3
    assert key(changed) != base  # media content
    assert key(pixels.half()) != base  # processor output dtype
    assert key(pixels.reshape(-1, pixels.shape[-1] // 2)) != base  # processor output layout
    t, h, w = grid.tolist()
    assert key(pixels, g=torch.tensor([t, h // 2, w * 2])) != base  # same patches, other grid (resize settings)
    assert key(pixels, kind="image") != base
    audio = batch["input_features"][0]
    assert cache.sample_key("audio", digest, numerics, audio) != cache.sample_key(
        "audio", digest, numerics, audio[:, :-1]
    )  # audio length (e.g. the processor's sampling / max length)

    assert cache.encoder_digest(visual) == digest  # memoised, stable
    with torch.no_grad():
        visual.blocks[0].mlp.down_proj.weight[0, 0] += 1.0  # in place: version counter bumps
    assert cache.encoder_digest(visual) != digest
    assert cache.encoder_digest(model.thinker.model.audio_tower) not in (digest, None)
    other = copy.deepcopy(visual)
    assert cache.encoder_digest(other) == cache.encoder_digest(visual)  # weights, not identity
    other.config.window_size = visual.config.window_size * 2  # an output-changing setting, same weights
    cache._digests.clear()
    assert cache.encoder_digest(other) != cache.encoder_digest(visual)


def test_keys_follow_processor_settings(model, tmp_path):
    """The key is of the processor OUTPUT: other resize / mel settings on the same media give other keys."""
    import numpy as np
    from transformers import Qwen2VLVideoProcessor, WhisperFeatureExtractor

    cache = EncoderFeatureCache(str(tmp_path))
    inner = model.thinker.model
    numerics = cache._numerics(torch.device("cpu"))
    video = torch.randint(0, 256, (4, 3, 56, 84), generator=torch.Generator().manual_seed(0), dtype=torch.uint8)

    def video_key(longest_edge: int) -> str:
        proc = Qwen2VLVideoProcessor(size={"shortest_edge": 28 * 28, "longest_edge": longest_edge})
        out = proc(videos=[video.numpy()], do_sample_frames=False, cap_pixels_per_frame=False, return_tensors="pt")
        digest = cache.encoder_digest(inner.visual)
        return cache.sample_key("video", digest, numerics, out["pixel_values_videos"], out["video_grid_thw"][0])

    assert video_key(56 * 84) == video_key(56 * 84)  # deterministic processing: reusable
    assert video_key(56 * 84) != video_key(28 * 56)

    wave = (0.1 * np.random.default_rng(0).standard_normal(16000)).astype(np.float32)

    def audio_key(hop: int) -> str:
        fe = WhisperFeatureExtractor(feature_size=128, hop_length=hop, chunk_length=30, return_attention_mask=True)
        out = fe(wave, sampling_rate=16000, truncation=False, padding=False, return_tensors="pt")
        digest = cache.encoder_digest(inner.audio_tower)
        return cache.sample_key("audio", digest, numerics, out["input_features"][0])

    assert audio_key(160) == audio_key(160)
    assert audio_key(160) != audio_key(200)


@torch.no_grad()
def test_new_weights_invalidate(model, batch, tmp_path):
    """Loading other encoder weights makes the cache miss (and the new features are the new weights')."""
    m = cached(model, tmp_path)
    m.embed(batch)
    state = {k: v + 0.01 for k, v in model.thinker.model.audio_tower.state_dict().items()}
    model.thinker.model.audio_tower.load_state_dict(state)
    calls = Calls(m)
    got = m.embed(batch).hidden
    assert calls.audio == [3] and calls.vision == []  # audio re-encoded, vision still cached
    assert torch.equal(got, model.embed(batch).hidden)


@torch.no_grad()
def test_corrupt_file_is_a_miss_and_rewritten(model, batch, tmp_path):
    """A truncated or foreign file is treated as a miss (never a crash or a wrong answer) and rewritten."""
    reference = model.embed(batch).hidden
    m = cached(model, tmp_path)
    m.embed(batch)
    files = sorted(tmp_path.rglob("*.safetensors"))
    data = files[0].read_bytes()
    files[0].write_bytes(data[: len(data) // 2])  # truncated
    files[1].write_bytes(b"not a safetensors file")
    files[2].write_bytes(files[3].read_bytes())  # a whole file, of another sample
    calls = Calls(m)
    got = m.embed(batch).hidden
    assert m.feature_cache.stats["corrupt"] == 3
    assert sum(calls.audio) + sum(calls.vision) == 3  # exactly the three bad entries were encoded again
    assert torch.equal(got, reference)
    again = m.embed(batch).hidden  # rewritten: everything hits now
    assert m.feature_cache.stats["corrupt"] == 3 and sum(calls.audio) + sum(calls.vision) == 3
    assert torch.allclose(again, reference, rtol=1e-5, atol=1e-5)


def test_trainable_encoders_rejected_or_bypassed(model, batch, tmp_path):
    """A cache with trainable encoders is an error at construction, and bypassed if unfrozen later."""
    with pytest.raises(ValueError, match="freeze_encoders"):
        OmniThinker(model.thinker, freeze_encoders=False, feature_cache=EncoderFeatureCache(str(tmp_path)))
    m = cached(model, tmp_path)
    with torch.no_grad():
        m.embed(batch)
    m.set_encoders_trainable(True)
    calls = Calls(m)
    hidden = m.embed(batch).hidden  # grad enabled + trainable encoders: the encoders must run
    assert calls.audio == [3] and calls.vision == [3] and hidden.requires_grad
    with torch.no_grad():
        m.embed(batch)  # no graph to build: cached features stand in
    assert calls.audio == [3] and calls.vision == [3]


@torch.no_grad()
def test_audio_salience_probe_bypasses_audio(model, batch, tmp_path):
    """With OmniZip's probe on, the audio tower always runs (the probe reads it); vision stays cached."""
    m = cached(model, tmp_path)
    m.embed(batch)
    m.enable_audio_salience()
    calls = Calls(m)
    m.embed(batch)
    assert calls.audio == [3] and calls.vision == []
    assert m._audio_probe.captured is not None


def test_concurrent_writers_and_pickling(model, batch, tmp_path):
    """Writers racing on one key leave one whole file and no temporaries; the cache pickles without its memo."""
    cache = EncoderFeatureCache(str(tmp_path))
    features = torch.randn(7, 5)
    threads = [threading.Thread(target=cache.store, args=("audio", "ab" * 32, features)) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert torch.equal(cache.load("audio", "ab" * 32, rows=7), features)
    assert cache.load("audio", "ab" * 32, rows=6) is None  # wrong shape for what is asked: a miss
    assert [p.name for p in tmp_path.rglob("*") if p.is_file()] == [f"{'ab' * 32}.safetensors"]
    cache.encoder_digest(model.thinker.model.visual)
    clone = copy.deepcopy(cache)
    assert clone.root == cache.root and len(clone._digests) == 0


def test_module_builds_cache_not_saved(tmp_path):
    """EPKitModule passes the cache to the thinker; it is no hyper-parameter; trainable encoders are refused."""
    from ep_kit.train.module import EPKitModule
    from ep_kit.train.sources import TinyThinker

    source = TinyThinker(hidden_size=32, num_layers=1, num_heads=2, num_kv_heads=1)
    module = EPKitModule(source, feature_cache=EncoderFeatureCache(str(tmp_path)))
    assert module.model.feature_cache.root == tmp_path
    assert "feature_cache" not in module.hparams
    with pytest.raises(ValueError, match="freeze_encoders"):
        EPKitModule(source, freeze_encoders=False, feature_cache=EncoderFeatureCache(str(tmp_path)))


def test_yaml_and_cli_build_it(tmp_path):
    """``--model.feature_cache`` on the command line (or in YAML) parses into the cache's class_path form."""
    from ep_kit.cli import parse

    root = Path(__file__).resolve().parents[1]
    cli = parse([
        "--config", str(root / "recipes/toy/cs2_ste_20.yaml"), "--seed_everything=false",
        "--model.feature_cache=ep_kit.models.feature_cache.EncoderFeatureCache",
        f"--model.feature_cache.root={tmp_path}",
    ])
    cfg = cli.config["model"]["feature_cache"]
    assert cfg["class_path"] == "ep_kit.models.feature_cache.EncoderFeatureCache"
    assert cfg["init_args"]["root"] == str(tmp_path)


def test_split_audio_matches_the_towers_selection():
    """Per-row frames equal what get_audio_features selects, for prefix masks (fast path) and any other mask."""
    from ep_kit.models.feature_cache import split_audio

    features = torch.randn(3, 8, 10)
    mask = torch.zeros(3, 10, dtype=torch.long)
    mask[0, :10], mask[1, :4], mask[2, :7] = 1, 1, 1
    for m in (mask, mask.flip(-1)):  # prefix masks, then left-padded ones
        rows = split_audio(features, m)
        selected = features.permute(0, 2, 1)[m.bool()].permute(1, 0)  # transformers' selection
        assert torch.equal(torch.cat(rows, dim=-1), selected)
        assert [r.shape[-1] for r in rows] == m.sum(-1).tolist()
