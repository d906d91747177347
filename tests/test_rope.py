"""TMRoPE / Sync-RoPE against transformers' Qwen2.5-Omni rotary embedding (the independent reference)."""

import pytest
import torch
from transformers.models.qwen2_5_omni.configuration_qwen2_5_omni import Qwen2_5OmniTextConfig
from transformers.models.qwen2_5_omni.modeling_qwen2_5_omni import (
    Qwen2_5OmniRotaryEmbedding,
    apply_rotary_pos_emb,
)

from ep_kit.rope import MultiAxisRoPE, SyncRoPE, TMRoPE, apply_rotary


def hf_rotary(mrope_section, head_dim=128, base=1e6):
    config = Qwen2_5OmniTextConfig(
        hidden_size=head_dim * 2,
        num_attention_heads=2,
        num_key_value_heads=1,
        head_dim=head_dim,
        rope_parameters={"rope_type": "default", "rope_theta": base, "mrope_section": list(mrope_section)},
    )
    return Qwen2_5OmniRotaryEmbedding(config)


def random_positions(B=3, L=37, seed=0, high=200_000):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, high, (3, B, L), generator=g)


@pytest.mark.parametrize(
    "section,head_dim,dtype",
    [([16, 24, 24], 128, torch.float32), ([16, 24, 24], 128, torch.bfloat16), ([1, 2, 1], 8, torch.float32)],
)
def test_tmrope_matches_transformers(section, head_dim, dtype):
    pos = random_positions()
    ref = hf_rotary(section, head_dim)
    ref_cos, ref_sin = ref(torch.zeros(1, dtype=dtype), pos)
    rope = TMRoPE(section).bind(head_dim, 1e6)
    cos, sin = rope(pos, dtype)
    assert cos.shape == (3, 37, head_dim) and cos.dtype == dtype
    torch.testing.assert_close(cos, ref_cos, rtol=0, atol=0)
    torch.testing.assert_close(sin, ref_sin, rtol=0, atol=0)

    g = torch.Generator().manual_seed(1)
    q = torch.randn(3, 4, 37, head_dim, generator=g).to(dtype)
    k = torch.randn(3, 2, 37, head_dim, generator=g).to(dtype)
    ref_q, ref_k = apply_rotary_pos_emb(q, k, ref_cos, ref_sin)
    q2, k2 = rope.rotate(q, k, pos)
    torch.testing.assert_close(q2, ref_q, rtol=0, atol=0)
    torch.testing.assert_close(k2, ref_k, rtol=0, atol=0)
    q3, k3 = apply_rotary(q, k, cos, sin)
    torch.testing.assert_close(q3, ref_q, rtol=0, atol=0)


def test_axis_of_pair_layouts():
    tm = TMRoPE()
    assert tm.axis_of_pair.tolist() == [0] * 16 + [1] * 24 + [2] * 24
    sync = SyncRoPE()
    assert sync.axis_of_pair.tolist() == [0] * 18 + [1] * 18 + [2] * 18 + [3] * 10
    assert tm.num_axes == 3 and sync.num_axes == 4
    assert sync.temporal_pairs.tolist() == list(range(18)) + list(range(54, 64))


def test_rotation_matches_hand_written_float64():
    """Pair j of the rotated query is the 2D rotation of (q_j, q_{j+d/2}) by pos[axis_j] * base^(-2j/d)."""
    head_dim, base = 8, 100.0
    rope = SyncRoPE([1, 1, 1, 1], head_dim=head_dim, base=base)
    pos = torch.tensor([[[3, 7]], [[1, 2]], [[5, 0]]])  # (3, B=1, L=2); t_low is derived from t
    q = torch.randn(1, 1, 2, head_dim, dtype=torch.float64)
    cos, sin = rope(pos, torch.float64)
    q_rot, _ = apply_rotary(q, q, cos, sin)
    axis_pos = [pos[0], pos[1], pos[2], pos[0]]
    for j in range(4):
        theta = base ** (-2 * j / head_dim)
        for i in range(2):
            a = float(axis_pos[j][0, i]) * theta
            x, y = q[0, 0, i, j].item(), q[0, 0, i, j + 4].item()
            c, s = (
                torch.cos(torch.tensor(a, dtype=torch.float64)),
                torch.sin(torch.tensor(a, dtype=torch.float64)),
            )
            assert q_rot[0, 0, i, j].item() == pytest.approx(float(x * c - y * s), abs=1e-5)
            assert q_rot[0, 0, i, j + 4].item() == pytest.approx(float(x * s + y * c), abs=1e-5)


def test_syncrope_with_empty_t_low_equals_tmrope():
    pos = random_positions(seed=3)
    tm = TMRoPE([16, 24, 24], head_dim=128, base=1e6)
    sync = SyncRoPE([16, 24, 24, 0], head_dim=128, base=1e6)
    for p in (pos, sync.expand_positions(pos)):
        for a, b in zip(tm(pos), sync(p), strict=True):
            torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_syncrope_default_differs_from_tmrope():
    pos = random_positions(seed=4)
    tm_cos, _ = TMRoPE().bind(128, 1e6)(pos)
    sync_cos, _ = SyncRoPE().bind(128, 1e6)(pos)
    assert not torch.allclose(tm_cos, sync_cos)
    # Pairs 0-15 rotate by t in both layouts: identical there.
    torch.testing.assert_close(tm_cos[..., :16], sync_cos[..., :16], rtol=0, atol=0)


def test_syncrope_fourth_axis_is_t():
    pos = random_positions(seed=5)
    sync = SyncRoPE().bind(128, 1e6)
    pos4 = sync.expand_positions(pos)
    assert pos4.shape == (4, 3, 37)
    assert torch.equal(pos4[3], pos[0]) and torch.equal(pos4[:3], pos)
    assert torch.equal(sync.expand_positions(pos4), pos4)
    for a, b in zip(sync(pos), sync(pos4), strict=True):
        assert torch.equal(a, b)
    # A real 4th axis that differs from t is honoured (only the t_low pairs change).
    other = pos4.clone()
    other[3] += 1000
    cos_a, _ = sync(pos4)
    cos_b, _ = sync(other)
    assert torch.equal(cos_a[..., :54], cos_b[..., :54]) and not torch.equal(
        cos_a[..., 54:64], cos_b[..., 54:64]
    )


def test_text_positions_2d_mean_all_axes_equal():
    rope = TMRoPE(head_dim=128, base=1e6)
    pos2 = torch.arange(10)[None].expand(2, 10)
    for a, b in zip(rope(pos2), rope(pos2[None].expand(3, -1, -1)), strict=True):
        assert torch.equal(a, b)


def test_bind_and_validation_errors():
    with pytest.raises(ValueError, match=r"sum to 64 pairs, but head_dim 64"):
        TMRoPE().bind(64, 1e6)
    with pytest.raises(ValueError, match=r"\[18, 18, 18, 11\]"):
        SyncRoPE([18, 18, 18, 11], head_dim=128)
    with pytest.raises(ValueError, match=r"head_dim=128 differs from the model's head_dim=64"):
        TMRoPE(head_dim=128).bind(64, 1e6)
    with pytest.raises(ValueError, match=r"base=10000.0 differs from the model's rope_theta=1000000.0"):
        TMRoPE(base=1e4).bind(128, 1e6)
    with pytest.raises(ValueError, match=r"head_dim must be a positive even int, got 127"):
        TMRoPE(head_dim=127)
    with pytest.raises(ValueError, match=r"non-negative ints, got \[16, -1, 24\]"):
        TMRoPE([16, -1, 24])
    with pytest.raises(ValueError, match=r"mrope_section needs 3 entries"):
        TMRoPE([16, 24, 24, 0])
    with pytest.raises(ValueError, match=r"sections needs 4 entries"):
        SyncRoPE([16, 24, 24])
    with pytest.raises(RuntimeError, match="bind"):
        TMRoPE()(random_positions())
    with pytest.raises(ValueError, match=r"positions must have shape \(3 or 4, B, L\), got \(5, 3, 37\)"):
        TMRoPE(head_dim=128, base=1e6)(torch.zeros(5, 3, 37, dtype=torch.long))
    rope = MultiAxisRoPE([2, 2], [0, 1], head_dim=8, base=1e4)
    assert rope.is_bound and rope.axis_of_pair.tolist() == [0, 0, 1, 1]
    # bind with the same values is fine and idempotent
    assert TMRoPE(head_dim=128, base=1e6).bind(128, 1e6).is_bound


def test_rope_works_as_decoder_layer_position_embeddings():
    """cos/sin feed a real transformers decoder layer exactly like the model's own rotary embedding."""
    from transformers.models.qwen2_5_omni.modeling_qwen2_5_omni import Qwen2_5OmniDecoderLayer

    config = Qwen2_5OmniTextConfig(
        hidden_size=32,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=8,
        intermediate_size=64,
        num_hidden_layers=1,
        rope_parameters={"rope_type": "default", "rope_theta": 1e6, "mrope_section": [1, 2, 1]},
    )
    config._attn_implementation = "sdpa"
    torch.manual_seed(0)
    layer = Qwen2_5OmniDecoderLayer(config, 0).eval()
    x = torch.randn(2, 9, 32)
    pos = random_positions(B=2, L=9, high=500)
    ref = layer(x, position_embeddings=Qwen2_5OmniRotaryEmbedding(config)(x, pos))
    out = layer(x, position_embeddings=TMRoPE([1, 2, 1]).bind(8, 1e6)(pos, x.dtype))
    torch.testing.assert_close(out, ref, rtol=0, atol=0)


def test_sync_rope_without_sections_takes_the_papers_split_of_the_model_head_dim():
    """``SyncRoPE(sections=None)``: [18, 18, 18, 10] at head_dim 128, the toy recipes' [2, 2, 2, 2] at 16."""
    from ep_kit.rope import sync_sections

    assert SyncRoPE(sections=None).bind(128, 1e6).sections == [18, 18, 18, 10]
    bound = SyncRoPE(sections=None).bind(16, 1e6)
    assert bound.sections == [2, 2, 2, 2] and bound.axis_of_pair.tolist() == [0, 0, 1, 1, 2, 2, 3, 3]
    pos = torch.arange(5)[None, None].expand(3, 1, 5)
    for a, b in zip(bound(pos), SyncRoPE([2, 2, 2, 2]).bind(16, 1e6)(pos), strict=True):
        assert torch.equal(a, b)
    assert sync_sections(64) == [9, 9, 9, 5]
    with pytest.raises(ValueError, match="too small"):
        sync_sections(4)
