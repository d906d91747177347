"""The FLOP/byte model against independent references.

* hand arithmetic written out here (token counts of the released preprocessing, a tiny decoder layer);
* ``torch.utils.flop_counter.FlopCounterMode`` running the REAL transformers modules with eager
  attention (every matmul, attention included, is counted by torch, not by ep-kit);
* parameter counts of the real transformers thinker and of a real CS2 sieve;
* per-layer token schedules of every reducer, written out by hand on a small clip (each method's
  FLOPs come from the schedule the reducer itself declares).
"""

from __future__ import annotations

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode
from transformers import Qwen2_5OmniThinkerForConditionalGeneration

from ep_kit import flops
from ep_kit.budget import keep_count
from ep_kit.models.tiny import qwen_omni_3b_config, tiny_thinker_config
from ep_kit.reducers import CS2
from ep_kit.reducers.fastv import FastV
from ep_kit.reducers.intramodal import IntraModal
from ep_kit.reducers.omnizip import OmniZip
from ep_kit.reducers.pyramiddrop import MatchFinalStage, MatchLayerAverage, PyramidDrop
from ep_kit.reducers.random import RandomReducer

#: A small clip for hand arithmetic on the 4-layer eager config (no media for the encoders).
SMALL = {"video": 40, "audio": 10, "text": 6, "total": 56, "grid_thw": (0, 0, 0), "mel_frames": 0}


def layer_flops(n: int, pairs: int) -> int:
    """One decoder layer of the eager config (D=64, H=4, KV=2, hd=16, I=128) over ``n`` tokens, ``pairs`` attended."""
    return 2 * n * (64 * 64 * 2 + 64 * 32 * 2) + 2 * n * 3 * 64 * 128 + 4 * 64 * pairs


HEAD_LAST = 2 * 64 * 272  # one row of logits, vocab 272


@pytest.fixture(scope="module")
def eager_config():
    cfg = tiny_thinker_config(hidden_size=64, num_layers=4, vision_depth=3, audio_layers=2, attn_implementation="eager")
    cfg.vision_config.fullatt_block_indexes = [2]
    return cfg


@pytest.fixture(scope="module")
def eager_thinker(eager_config):
    torch.manual_seed(0)
    return Qwen2_5OmniThinkerForConditionalGeneration._from_config(eager_config, attn_implementation="eager").eval()


def counted(fn) -> int:
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        fn()
    return counter.get_total_flops()


# ------------------------------------------------------------------------------------------ tokens
def test_token_counts_30s_default_clip():
    c = flops.token_counts(30)
    # 1920x1080 at <= 105,000 px: beta = sqrt(2073600/105000) = 4.444; 1080/4.444 = 243 -> 8*28 = 224,
    # 1920/4.444 = 432 -> 15*28 = 420. 60 frames -> 30 grids of (224/28)*(420/28) = 8*15 = 120 tokens.
    assert (c["height"], c["width"], c["frames"]) == (224, 420, 60)
    assert c["grid_thw"] == (30, 16, 30)
    assert c["video"] == 3600
    assert c["audio"] == 750  # 3000 mel frames -> 1500 after the stride-2 conv -> 750 after pooling
    assert c["text"] == 128 + 4
    assert c["total"] == 3600 + 750 + 132
    assert c["height"] * c["width"] <= 105_000


def test_token_counts_explicit_frame_and_audio_matches_the_encoder(eager_thinker):
    c = flops.token_counts(7, height=280, width=364, prompt_tokens=10)
    # 7 s * 2 fps = 14 frames -> 7 grids * 10 * 13 = 910 video tokens; 700 mel frames.
    assert c["video"] == 7 * 10 * 13
    _, out = eager_thinker.model.audio_tower._get_feat_extract_output_lengths(torch.tensor([700]))
    assert c["audio"] == int(out) == 175
    assert c["text"] == 14


def test_token_counts_rejects_bad_input():
    with pytest.raises(ValueError, match="seconds"):
        flops.token_counts(0)
    with pytest.raises(ValueError, match="multiples of 28"):
        flops.token_counts(2, height=30, width=56)
    with pytest.raises(ValueError, match="both height and width"):
        flops.token_counts(2, height=28)


# --------------------------------------------------------------------------------------- hand FLOPs
def test_decoder_layer_flops_by_hand(eager_config):
    # D=64, H=4, KV=2, hd=16, I=128, n=10 tokens.
    proj = 2 * 10 * (64 * 64 + 64 * 32 + 64 * 32 + 64 * 64)  # q, k, v (2 KV heads * 16), o
    mlp = 2 * 10 * (64 * 128 * 3)
    causal = 4 * 4 * 16 * (10 * 11 // 2)
    bidir = 4 * 4 * 16 * 100
    assert flops.decoder_layer_flops(eager_config, 10, causal=True) == {
        "proj": proj, "sdpa": causal, "mlp": mlp, "total": proj + mlp + causal,
    }
    assert flops.decoder_layer_flops(eager_config, 10, causal=False)["total"] == proj + mlp + bidir


def test_full_prefill_flops_by_hand(eager_config):
    n = 56
    layer = layer_flops(n, n * (n + 1) // 2)
    out = flops.prefill_flops(eager_config, SMALL, None, logits="last")
    assert out["llm"] == 4 * layer + HEAD_LAST
    assert out["tokens_per_layer"] == [56] * 4 and out["sieve"] == 0
    out_all = flops.prefill_flops(eager_config, SMALL, None, logits="all")
    assert out_all["llm"] == 4 * layer + n * HEAD_LAST


def test_cs2_prefill_flops_by_hand(eager_config):
    # r = 0.1 of 50 A/V tokens -> 5 kept; LLM runs on 11 tokens; the 2-layer sieve sees all 56 bidirectionally.
    out = flops.prefill_flops(eager_config, SMALL, CS2(num_layers=2), keep_ratio=0.1)
    assert out["tokens_per_layer"] == [11] * 4
    assert out["llm"] == 4 * layer_flops(11, 66) + HEAD_LAST
    assert out["sieve"] == 2 * layer_flops(56, 56 * 56) + 2 * 56 * (64 * 64 + 64)
    assert out["effective_keep_ratio"] == pytest.approx(0.1)


def test_fastv_prefill_flops_by_hand(eager_config):
    # K = 2: layers 0-1 on all 56 tokens, layers 2-3 on 6 text + ceil(0.1 * 50) = 5 -> 11.
    out = flops.prefill_flops(eager_config, SMALL, FastV(layer=2), keep_ratio=0.1)
    assert out["tokens_per_layer"] == [56, 56, 11, 11]
    assert out["llm"] == 2 * layer_flops(56, 56 * 57 // 2) + 2 * layer_flops(11, 66) + HEAD_LAST
    assert out["sieve"] == 0
    assert out["effective_keep_ratio"] == pytest.approx((50 + 50 + 5 + 5) / 200)


def test_pre_llm_baselines_prefill_flops_by_hand(eager_config):
    # 41 video + 11 audio: one joint Top-K keeps ceil(0.1 * 52) = ceil(5.2) = 6; per modality
    # (IntraModal) ceil(4.1) + ceil(1.1) = 5 + 2 = 7. No sieve, the whole decoder on the kept tokens.
    counts = {"video": 41, "audio": 11, "text": 6, "total": 58, "grid_thw": (0, 0, 0), "mel_frames": 0}
    for reducer, kept in ((OmniZip(), 6), (RandomReducer(seed=0), 6), (IntraModal(), 7)):
        out = flops.prefill_flops(eager_config, counts, reducer, keep_ratio=0.1)
        n = 6 + kept
        assert out["tokens_per_layer"] == [n] * 4, type(reducer).__name__
        assert out["llm"] == 4 * layer_flops(n, n * (n + 1) // 2) + HEAD_LAST
        assert out["sieve"] == 0
        assert out["effective_keep_ratio"] == pytest.approx(kept / 52)


def test_pyramiddrop_prefill_flops_by_hand(eager_config):
    # Stages before layers 1, 2, 3 of 4 at r = 0.5, lambda matched to the layer average:
    # (1 + l + l^2 + l^3) / 4 = 0.5 -> l^3 + l^2 + l = 1 -> l = 0.543689...
    # 50 -> ceil(27.18) = 28 -> ceil(15.22) = 16 -> ceil(8.70) = 9 A/V candidates.
    reducer = PyramidDrop(layers=[1, 2, 3], stage_ratio=MatchLayerAverage())
    lam = reducer.lam(0.5, num_layers=4)
    assert lam**3 + lam**2 + lam == pytest.approx(1.0)
    out = flops.prefill_flops(eager_config, SMALL, reducer, keep_ratio=0.5)
    assert out["tokens_per_layer"] == [56, 34, 22, 15]
    assert out["llm"] == sum(layer_flops(n, n * (n + 1) // 2) for n in (56, 34, 22, 15)) + HEAD_LAST
    assert out["effective_keep_ratio"] == pytest.approx((50 + 28 + 16 + 9) / 200)
    # The toy rule: the last stage keeps r, lambda = r^(1/3) = 0.5 at r = 1/8: 50 -> 25 -> 13 -> 7.
    toy = PyramidDrop(layers=[1, 2, 3], stage_ratio=MatchFinalStage())
    assert flops.tokens_per_layer(eager_config, SMALL, toy, 0.125) == [56, 31, 19, 13]
    # A fixed stage ratio ignores the budget.
    fixed = PyramidDrop(layers=[1, 3], stage_ratio=0.5)
    assert flops.tokens_per_layer(eager_config, SMALL, fixed, 0.9) == [56, 31, 31, 19]


# ----------------------------------------------------------- against torch's FLOP counter (real modules)
def test_sieve_layer_flops_match_flop_counter_on_real_decoder_layer(eager_config, eager_thinker):
    layer = eager_thinker.model.language_model.layers[0]
    B, n = 2, 10
    x = torch.randn(B, n, 64)
    cos, sin = torch.randn(B, n, 16), torch.randn(B, n, 16)
    got = counted(lambda: layer(x, position_embeddings=(cos, sin), attention_mask=None, is_causal=False, position_ids=None))
    assert got == B * flops.decoder_layer_flops(eager_config, n, causal=False)["total"]


def test_vision_flops_match_flop_counter(eager_config, eager_thinker):
    # 84x140 frames -> 6x10 patches, 3x5 merged; 4x4-merged windows -> one 3x4 and one partial 3x1 window.
    grid = torch.tensor([[2, 6, 10]])
    pixels = torch.randn(2 * 6 * 10, 3 * 2 * 14 * 14)
    got = counted(lambda: eager_thinker.model.visual(pixels, grid_thw=grid))
    assert got == flops.vision_flops(eager_config, (2, 6, 10))


def test_audio_flops_match_flop_counter(eager_config, eager_thinker):
    # 250 mel frames -> chunks of 200 and 50 frames (n_window=100), a padded conv batch of 2 x 200.
    feats = torch.randn(128, 250)
    got = counted(lambda: eager_thinker.model.audio_tower(feats, feature_lens=torch.tensor([250])))
    assert got == flops.audio_flops(eager_config, 250)


def test_param_counts_match_the_real_thinker(eager_config, eager_thinker):
    pc = flops.param_counts(eager_config)
    assert pc["total"] == sum(p.numel() for p in eager_thinker.parameters())
    assert pc["vision"] == sum(p.numel() for p in eager_thinker.model.visual.parameters())
    assert pc["audio"] == sum(p.numel() for p in eager_thinker.model.audio_tower.parameters())
    assert pc["decoder_layer"] == sum(p.numel() for p in eager_thinker.model.language_model.layers[0].parameters())


def test_prefill_bytes_weights_include_the_real_sieve(eager_config):
    from ep_kit.models import OmniThinker

    model = OmniThinker.from_config(eager_config, reducer=CS2(num_layers=2), keep_ratio=0.2)
    est = flops.prefill_bytes(eager_config, SMALL, model.reducer, keep_ratio=0.2, bytes_per_value=4)
    assert est["weights"] == 4 * sum(p.numel() for p in model.parameters())
    # KV cache: 4 layers * (6 text + 10 kept A/V) tokens * K and V * 2 KV heads * 16 dims * 4 bytes.
    assert est["kv_cache"] == 4 * 16 * 2 * 2 * 16 * 4
    # Without a sieve the weights are the thinker's alone and the widest activation is the LLM's.
    plain = flops.prefill_bytes(eager_config, SMALL, FastV(layer=2), keep_ratio=0.2, bytes_per_value=4)
    assert plain["weights"] == 4 * flops.param_counts(eager_config)["total"]
    assert plain["kv_cache"] == (2 * 56 + 2 * 16) * 2 * 2 * 16 * 4


# ------------------------------------------------------------------------------------- speed-ups
def test_ideal_speedup_is_one_without_reduction():
    cfg = qwen_omni_3b_config()
    c = flops.token_counts(30)
    assert flops.ideal_speedup(cfg, c, None, 1.0)["llm"] == 1.0
    assert flops.ideal_speedup(cfg, c, FastV(layer=2), 1.0)["end_to_end"] == 1.0
    for reducer in (RandomReducer(), IntraModal(), OmniZip(), PyramidDrop(stage_ratio=1.0)):
        assert flops.ideal_speedup(cfg, c, reducer, 1.0)["llm"] == 1.0, type(reducer).__name__
    # With a sieve, r = 1 costs N extra bidirectional layers: slower than the full model.
    assert flops.ideal_speedup(cfg, c, CS2(num_layers=4), 1.0)["llm"] < 1.0


def test_ideal_speedup_grows_as_the_budget_shrinks():
    cfg = qwen_omni_3b_config()
    c = flops.token_counts(30)
    reducers = (
        CS2(num_layers=4), FastV(layer=2), OmniZip(), IntraModal(), RandomReducer(),
        PyramidDrop(layers=[1, 8, 16], stage_ratio=MatchLayerAverage()),
    )
    for reducer in reducers:
        s = [flops.ideal_speedup(cfg, c, reducer, r)["llm"] for r in (1.0, 0.5, 0.2, 0.1, 0.05)]
        assert all(a < b for a, b in zip(s, s[1:], strict=False)), (type(reducer).__name__, s)
        e2e = flops.ideal_speedup(cfg, c, reducer, 0.2)
        assert 1.0 < e2e["end_to_end"] < e2e["llm"]  # the encoders are not reduced


def test_cs2_ideal_speedup_tracks_sieve_depth_by_hand():
    # Linear parts only scale like tokens, so with 36 layers, a 4-layer sieve over n and the LLM over
    # r*n, the speed-up of the *linear* work is 36 / (4 + 36 r); attention only adds to the gain.
    cfg = qwen_omni_3b_config()
    c = flops.token_counts(30)
    s = flops.ideal_speedup(cfg, c, CS2(num_layers=4), 0.2)["llm"]
    kept = (c["text"] + -(-(c["video"] + c["audio"]) // 5)) / c["total"]
    assert s > 36 / (4 * 1.05 + 36 * kept) * 0.8
    assert s < 36 / 4


def test_pyramiddrop_schedule_is_the_reducers_own():
    """One rule for lambda: the FLOP model counts the schedule PyramidDrop itself runs (no second solver)."""
    cfg = qwen_omni_3b_config()
    c = flops.token_counts(30)
    n = c["video"] + c["audio"]
    reducer = PyramidDrop(layers=[1, 8, 16], stage_ratio=MatchLayerAverage())
    for r in (0.2, 0.1, 0.05):
        out = flops.prefill_flops(cfg, c, reducer, r)
        lam = reducer.lam(r, num_layers=36)
        current, expected = n, []
        for i in range(36):
            if i in (1, 8, 16):
                current = keep_count(current, lam)
            expected.append(c["text"] + current)
        assert out["tokens_per_layer"] == expected
        assert out["effective_keep_ratio"] == pytest.approx(r, abs=2e-3)  # ceil per stage, else exact
    with pytest.raises(ValueError, match="cannot reach budget"):
        flops.tokens_per_layer(cfg, c, PyramidDrop(layers=[8, 16, 24], stage_ratio=MatchLayerAverage()), 0.2)


def test_schedule_length_must_match_the_decoder(eager_config):
    with pytest.raises(ValueError, match="smaller than the decoder depth"):
        flops.tokens_per_layer(eager_config, SMALL, PyramidDrop(layers=[8, 16, 24]), 0.5)
