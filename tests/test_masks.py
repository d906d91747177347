"""Attention modes against hand-written masks and against a float64 hand-written attention layer."""

import pytest
import torch
from torch.nn.attention.flex_attention import create_mask
from transformers.models.qwen2_5_omni.configuration_qwen2_5_omni import Qwen2_5OmniTextConfig
from transformers.models.qwen2_5_omni.modeling_qwen2_5_omni import (
    Qwen2_5OmniDecoderLayer,
    apply_rotary_pos_emb,
)

from ep_kit.masks import Bidirectional, Causal, IntraModal
from ep_kit.rope import TMRoPE
from ep_kit.sequence import Modality, TokenSequence

T, V, A, P = int(Modality.TEXT), int(Modality.VIDEO), int(Modality.AUDIO), int(Modality.PAD)


def make_seq(modality, answer=None, D=32, seed=0):
    modality = torch.tensor(modality)
    B, L = modality.shape
    real = modality != P
    answer = torch.zeros(B, L, dtype=torch.bool) if answer is None else torch.tensor(answer, dtype=torch.bool)
    g = torch.Generator().manual_seed(seed)
    pos = torch.cumsum(real.long(), -1) - 1
    pos = torch.where(real, pos, torch.zeros_like(pos))[None].expand(3, B, L).clone()
    return TokenSequence(
        hidden=torch.randn(B, L, D, generator=g),
        modality=modality,
        positions=pos,
        attention_mask=real,
        answer_mask=answer,
        input_ids=torch.zeros(B, L, dtype=torch.long),
    )


# sample 0: text, video, video, audio, answer-text; sample 1: text, audio, audio, pad, pad
SEQ = dict(modality=[[T, V, V, A, T], [T, A, A, P, P]], answer=[[0, 0, 0, 0, 1], [0, 0, 0, 0, 0]])


def M(rows):
    return torch.tensor(rows, dtype=torch.bool)


def test_bidirectional_dense_hand_written():
    seq = make_seq(**SEQ)
    d = Bidirectional().dense(seq, exclude_answer_keys=True)
    assert d.shape == (2, 1, 5, 5) and d.dtype == torch.bool
    assert torch.equal(d[0, 0], M([[1, 1, 1, 1, 0]] * 5))
    assert torch.equal(d[1, 0], M([[1, 1, 1, 0, 0]] * 5))
    d = Bidirectional().dense(seq, exclude_answer_keys=False)
    assert torch.equal(d[0, 0], M([[1, 1, 1, 1, 1]] * 5))


def test_causal_dense_hand_written():
    seq = make_seq(**SEQ)
    d = Causal().dense(seq, exclude_answer_keys=True)
    assert torch.equal(
        d[0, 0], M([[1, 0, 0, 0, 0], [1, 1, 0, 0, 0], [1, 1, 1, 0, 0], [1, 1, 1, 1, 0], [1, 1, 1, 1, 0]])
    )
    assert torch.equal(
        d[1, 0], M([[1, 0, 0, 0, 0], [1, 1, 0, 0, 0], [1, 1, 1, 0, 0], [1, 1, 1, 0, 0], [1, 1, 1, 0, 0]])
    )


def test_intra_modal_dense_hand_written_blocks():
    seq = make_seq(**SEQ)
    d = IntraModal().dense(seq, exclude_answer_keys=True)
    assert torch.equal(
        d[0, 0], M([[1, 0, 0, 0, 0], [0, 1, 1, 0, 0], [0, 1, 1, 0, 0], [0, 0, 0, 1, 0], [1, 0, 0, 0, 0]])
    )
    # padding rows have no key at all: they get their own diagonal
    assert torch.equal(
        d[1, 0], M([[1, 0, 0, 0, 0], [0, 1, 1, 0, 0], [0, 1, 1, 0, 0], [0, 0, 0, 1, 0], [0, 0, 0, 0, 1]])
    )
    d = IntraModal().dense(seq, exclude_answer_keys=False)
    assert torch.equal(d[0, 0, 0], M([1, 0, 0, 0, 1])) and torch.equal(d[0, 0, 4], M([1, 0, 0, 0, 1]))


def test_row_without_keys_gets_diagonal():
    # the only text token is the answer: with answer keys excluded it has no same-modality key
    seq = make_seq([[V, V, T]], answer=[[0, 0, 1]])
    d = IntraModal().dense(seq, exclude_answer_keys=True)
    assert torch.equal(d[0, 0], M([[1, 1, 0], [1, 1, 0], [0, 0, 1]]))
    # causal: first token is an excluded answer token
    seq = make_seq([[T, V, V]], answer=[[1, 0, 0]])
    d = Causal().dense(seq, exclude_answer_keys=True)
    assert torch.equal(d[0, 0], M([[1, 0, 0], [0, 1, 0], [0, 1, 1]]))


@pytest.mark.parametrize("mode", [Bidirectional(), Causal(), IntraModal()])
@pytest.mark.parametrize("exclude", [True, False])
def test_mask_mod_equals_dense(mode, exclude):
    seq = make_seq(**SEQ)
    mod = mode.mask_mod(seq, exclude_answer_keys=exclude)
    flex = create_mask(mod, 2, 1, 5, 5, device="cpu")
    assert torch.equal(flex, mode.dense(seq, exclude_answer_keys=exclude))


def test_sdpa_forms_are_the_cheapest():
    full = make_seq([[T, V, A, A], [T, T, V, V]])
    kw = Bidirectional().layer_kwargs(full, "sdpa", torch.float32, exclude_answer_keys=True)
    assert kw == {"attention_mask": None, "is_causal": False}
    kw = Causal().layer_kwargs(full, "sdpa", torch.float32, exclude_answer_keys=False)
    assert kw == {"attention_mask": None, "is_causal": True}
    seq = make_seq(**SEQ)
    kw = Bidirectional().layer_kwargs(seq, "sdpa", torch.float32, exclude_answer_keys=True)
    assert kw["is_causal"] is False and kw["attention_mask"].shape == (2, 1, 1, 5)
    assert torch.equal(kw["attention_mask"][:, 0, 0], M([[1, 1, 1, 1, 0], [1, 1, 1, 0, 0]]))
    kw = Causal().layer_kwargs(seq, "sdpa", torch.float32, exclude_answer_keys=False)
    assert kw == {"attention_mask": None, "is_causal": True}  # right padding only: exact on real rows
    kw = Causal().layer_kwargs(seq, "sdpa", torch.float32, exclude_answer_keys=True)
    assert kw["attention_mask"].shape == (2, 1, 5, 5) and kw["is_causal"] is False
    kw = IntraModal().layer_kwargs(seq, "sdpa", torch.float32, exclude_answer_keys=False)
    assert torch.equal(kw["attention_mask"], IntraModal().dense(seq, False))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_eager_mask_is_additive_float(dtype):
    seq = make_seq(**SEQ)
    for mode in (Bidirectional(), Causal(), IntraModal()):
        kw = mode.layer_kwargs(seq, "eager", dtype, exclude_answer_keys=True)
        m = kw["attention_mask"]
        assert m.dtype == dtype
        dense = mode.dense(seq, True)
        expect = torch.where(dense, 0.0, torch.finfo(dtype).min).to(dtype)
        assert torch.equal(m.expand_as(expect), expect)
    # causal on an unpadded batch still needs an explicit mask: eager ignores is_causal
    full = make_seq([[T, V, A]])
    m = Causal().layer_kwargs(full, "eager", torch.float32, exclude_answer_keys=False)["attention_mask"]
    assert m.shape == (1, 1, 3, 3) and m[0, 0, 0, 1] == torch.finfo(torch.float32).min and m[0, 0, 1, 0] == 0


def test_flash_kwargs_and_errors():
    seq = make_seq(**SEQ)
    kw = Bidirectional().layer_kwargs(seq, "flash_attention_2", torch.bfloat16, exclude_answer_keys=False)
    assert kw["is_causal"] is False and kw["attention_mask"].shape == (2, 5)
    assert kw["attention_mask"].tolist() == [[1, 1, 1, 1, 1], [1, 1, 1, 0, 0]]
    kw = Causal().layer_kwargs(
        make_seq([[T, V]]), "flash_attention_2", torch.bfloat16, exclude_answer_keys=False
    )
    assert kw == {"attention_mask": None, "is_causal": True}
    with pytest.raises(ValueError, match="IntraModal.*flash_attention_2"):
        IntraModal().layer_kwargs(seq, "flash_attention_2", torch.bfloat16, exclude_answer_keys=False)
    with pytest.raises(ValueError, match="exclude_answer_keys=True"):
        Bidirectional().layer_kwargs(seq, "flash_attention_2", torch.bfloat16, exclude_answer_keys=True)
    with pytest.raises(ValueError, match="'flex_attention' is not supported"):
        Bidirectional().layer_kwargs(seq, "flex_attention", torch.float32, exclude_answer_keys=False)


# ------------------------------------------------- a real transformers decoder layer, float64 reference
def tiny_layer(impl):
    config = Qwen2_5OmniTextConfig(
        hidden_size=32,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=8,
        intermediate_size=48,
        num_hidden_layers=1,
        rope_parameters={"rope_type": "default", "rope_theta": 1e6, "mrope_section": [1, 2, 1]},
    )
    config._attn_implementation = impl
    torch.manual_seed(0)
    return Qwen2_5OmniDecoderLayer(config, 0).eval()


def reference_layer(layer, x, cos, sin, allowed):
    """Float64 decoder layer with attention written out by hand: softmax over the allowed keys only."""
    ref = Qwen2_5OmniDecoderLayer(layer.self_attn.config, 0).double().eval()
    ref.load_state_dict(layer.state_dict())
    x = x.double()
    attn = ref.self_attn
    B, L, _ = x.shape
    h = ref.input_layernorm(x)
    q = attn.q_proj(h).view(B, L, 4, 8).transpose(1, 2)
    k = attn.k_proj(h).view(B, L, 2, 8).transpose(1, 2)
    v = attn.v_proj(h).view(B, L, 2, 8).transpose(1, 2)
    q, k = apply_rotary_pos_emb(q, k, cos.double(), sin.double())
    k = k.repeat_interleave(2, dim=1)
    v = v.repeat_interleave(2, dim=1)
    scores = (q @ k.transpose(-1, -2)) / (8**0.5)
    scores = scores.masked_fill(~allowed, float("-inf"))
    out = (scores.softmax(-1) @ v).transpose(1, 2).reshape(B, L, 32)
    x = x + attn.o_proj(out)
    return x + ref.mlp(ref.post_attention_layernorm(x))


@pytest.mark.parametrize("impl", ["sdpa", "eager"])
@pytest.mark.parametrize("mode", [Bidirectional(), Causal(), IntraModal()])
@pytest.mark.parametrize("exclude", [True, False])
@pytest.mark.parametrize("padded", [True, False])
def test_decoder_layer_with_layer_kwargs_matches_float64(impl, mode, exclude, padded):
    if padded:
        modality = [[T, V, V, A, A, V, T, T], [T, A, V, A, T, P, P, P], [V, V, T, T, P, P, P, P]]
        answer = [[0, 0, 0, 0, 0, 0, 1, 1], [0, 0, 0, 0, 1, 0, 0, 0], [0, 0, 0, 1, 0, 0, 0, 0]]
    else:
        modality = [[T, V, V, A, A, V, T, T], [T, A, V, A, T, V, A, T]]
        answer = [[0, 0, 0, 0, 0, 0, 1, 1], [0] * 8]
    seq = make_seq(modality, answer, D=32, seed=1)
    layer = tiny_layer(impl)
    cos, sin = TMRoPE([1, 2, 1]).bind(8, 1e6)(seq.positions, torch.float32)
    kw = mode.layer_kwargs(seq, impl, torch.float32, exclude_answer_keys=exclude)
    with torch.no_grad():
        out = layer(seq.hidden, position_embeddings=(cos, sin), **kw)
        ref = reference_layer(layer, seq.hidden, cos, sin, mode.dense(seq, exclude_answer_keys=exclude))
    real = seq.attention_mask
    assert torch.isfinite(out).all()
    torch.testing.assert_close(out[real].double(), ref[real], rtol=1e-5, atol=1e-5)
    # the reference is not trivially equal for every mask: a different mode gives a different answer
    other = Causal() if not isinstance(mode, Causal) else Bidirectional()
    alt = reference_layer(layer, seq.hidden, cos, sin, other.dense(seq, exclude_answer_keys=exclude))
    assert not torch.allclose(alt[real], ref[real], atol=1e-4)


@pytest.mark.filterwarnings("ignore:flex_attention called without torch.compile")
def test_mask_mod_runs_in_flex_attention():
    """The mask_mod drives torch's flex attention to the same output as SDPA with the dense mask."""
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention

    seq = make_seq(
        [[T, V, V, A, T, P, P, P], [T, A, A, V, V, V, T, T]], answer=[[0, 0, 0, 0, 1, 0, 0, 0], [0] * 8]
    )
    g = torch.Generator().manual_seed(2)
    q, k, v = (torch.randn(2, 2, 8, 16, generator=g) for _ in range(3))
    for mode in (Bidirectional(), Causal(), IntraModal()):
        block_mask = create_block_mask(
            mode.mask_mod(seq, exclude_answer_keys=True), 2, None, 8, 8, device="cpu"
        )
        out = flex_attention(q, k, v, block_mask=block_mask)
        ref = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=mode.dense(seq, True))
        torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("seed", range(5))
def test_mask_mod_equals_dense_random_batches(seed):
    g = torch.Generator().manual_seed(seed)
    B, L = 3, 9
    modality = torch.randint(0, 3, (B, L), generator=g)
    lengths = torch.randint(1, L + 1, (B,), generator=g)
    real = torch.arange(L)[None] < lengths[:, None]
    modality = torch.where(real, modality, torch.full_like(modality, P))
    answer = (torch.rand(B, L, generator=g) < 0.3) & real & (modality == T)
    seq = make_seq(modality.tolist(), answer.tolist())
    for mode in (Bidirectional(), Causal(), IntraModal()):
        for exclude in (True, False):
            dense = mode.dense(seq, exclude_answer_keys=exclude)
            assert dense.any(-1).all()  # no empty row anywhere
            flex = create_mask(mode.mask_mod(seq, exclude_answer_keys=exclude), B, 1, L, L, device="cpu")
            assert torch.equal(flex, dense)
