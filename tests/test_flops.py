"""The FLOP/byte model against independent references.

* hand arithmetic written out here (token counts of the released preprocessing, a tiny decoder layer);
* ``torch.utils.flop_counter.FlopCounterMode`` running the REAL transformers modules with eager
  attention (every matmul, attention included, is counted by torch, not by ep-kit);
* parameter counts of the real transformers thinker and of a real CS2 sieve.
"""

from __future__ import annotations

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode
from transformers import Qwen2_5OmniThinkerForConditionalGeneration

from ep_kit import flops
from ep_kit.models.tiny import qwen_omni_3b_config, tiny_thinker_config


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
    counts = {"video": 40, "audio": 10, "text": 6, "total": 56, "grid_thw": (0, 0, 0), "mel_frames": 0}
    n = 56
    layer = 2 * n * (64 * 64 * 2 + 64 * 32 * 2) + 2 * n * 3 * 64 * 128 + 4 * 64 * (n * (n + 1) // 2)
    head_last = 2 * 64 * 272
    out = flops.prefill_flops(eager_config, counts, "full", logits="last")
    assert out["llm"] == 4 * layer + head_last
    out_all = flops.prefill_flops(eager_config, counts, "full", logits="all")
    assert out_all["llm"] == 4 * layer + n * head_last


def test_cs2_prefill_flops_by_hand(eager_config):
    counts = {"video": 40, "audio": 10, "text": 6, "total": 56, "grid_thw": (0, 0, 0), "mel_frames": 0}
    # r = 0.1 of 50 A/V tokens -> 5 kept; LLM runs on 11 tokens; the 2-layer sieve sees all 56 bidirectionally.
    def layer(n, pairs):
        return 2 * n * (64 * 64 * 2 + 64 * 32 * 2) + 2 * n * 3 * 64 * 128 + 4 * 64 * pairs

    out = flops.prefill_flops(eager_config, counts, "cs2", keep_ratio=0.1, sieve_layers=2)
    assert out["tokens_per_layer"] == [11] * 4
    assert out["llm"] == 4 * layer(11, 66) + 2 * 64 * 272
    assert out["sieve"] == 2 * layer(56, 56 * 56) + 2 * 56 * (64 * 64 + 64)
    assert out["effective_keep_ratio"] == pytest.approx(0.1)


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
    from ep_kit.reducers import CS2

    model = OmniThinker.from_config(eager_config, reducer=CS2(num_layers=2), keep_ratio=0.2)
    counts = {"video": 40, "audio": 10, "text": 6, "total": 56, "grid_thw": (0, 0, 0), "mel_frames": 0}
    est = flops.prefill_bytes(eager_config, counts, "cs2", keep_ratio=0.2, sieve_layers=2, bytes_per_value=4)
    assert est["weights"] == 4 * sum(p.numel() for p in model.parameters())
    # KV cache: 4 layers * (6 text + 10 kept A/V) tokens * K and V * 2 KV heads * 16 dims * 4 bytes.
    assert est["kv_cache"] == 4 * 16 * 2 * 2 * 16 * 4


# ------------------------------------------------------------------------------------- speed-ups
def test_ideal_speedup_is_one_without_reduction():
    cfg = qwen_omni_3b_config()
    c = flops.token_counts(30)
    assert flops.ideal_speedup(cfg, c, 1.0, method="full")["llm"] == 1.0
    assert flops.ideal_speedup(cfg, c, 1.0, method="fastv")["end_to_end"] == 1.0
    assert flops.ideal_speedup(cfg, c, 1.0, sieve_layers=0, method="cs2")["llm"] == 1.0
    assert flops.ideal_speedup(cfg, c, 1.0, method="pyramiddrop", pyramid_lambda=1.0)["llm"] == 1.0
    # With a sieve, r = 1 costs N extra bidirectional layers: slower than the full model.
    assert flops.ideal_speedup(cfg, c, 1.0, sieve_layers=4, method="cs2")["llm"] < 1.0


def test_ideal_speedup_grows_as_the_budget_shrinks():
    cfg = qwen_omni_3b_config()
    c = flops.token_counts(30)
    for method in ("cs2", "fastv"):
        s = [flops.ideal_speedup(cfg, c, r, method=method)["llm"] for r in (1.0, 0.5, 0.2, 0.1, 0.05)]
        assert all(a < b for a, b in zip(s, s[1:], strict=False)), (method, s)
        e2e = flops.ideal_speedup(cfg, c, 0.2, method=method)
        assert 1.0 < e2e["end_to_end"] < e2e["llm"]  # the encoders are not reduced


def test_cs2_ideal_speedup_tracks_sieve_depth_by_hand():
    # Linear parts only scale like tokens, so with 36 layers, a 4-layer sieve over n and the LLM over
    # r*n, the speed-up of the *linear* work is 36 / (4 + 36 r); attention only adds to the gain.
    cfg = qwen_omni_3b_config()
    c = flops.token_counts(30)
    s = flops.ideal_speedup(cfg, c, 0.2, sieve_layers=4, method="cs2")["llm"]
    kept = (c["text"] + -(-(c["video"] + c["audio"]) // 5)) / c["total"]
    assert s > 36 / (4 * 1.05 + 36 * kept) * 0.8
    assert s < 36 / 4


def test_pyramid_schedule_and_lambda():
    assert flops.pyramid_tokens(100, 8, (2, 4, 6), 0.5) == [100, 100, 50, 50, 25, 25, 13, 13]
    lam = flops.solve_pyramid_lambda(1000, 36, (4, 12, 20), 0.2)
    eff = sum(flops.pyramid_tokens(1000, 36, (4, 12, 20), lam)) / (36 * 1000)
    assert eff == pytest.approx(0.2, abs=2e-3)
    with pytest.raises(ValueError, match="stages\\[0\\]/num_layers"):
        flops.solve_pyramid_lambda(1000, 36, (8, 16, 24), 0.2)
    with pytest.raises(ValueError, match="stages"):
        flops.pyramid_tokens(10, 8, (0, 4), 0.5)
