"""Training-free baselines (FastV, PyramidDrop, OmniZip, IntraModal, Random) against independent references.

References: transformers' own eager attention weights in float64 (the stock thinker's
``output_attentions`` and its attention module), hand-written loops over tokens for the unimodal
rules, the audio tower's own hidden states for OmniZip's salience, hand-computed budgets, and an
uncached greedy recompute for generation.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from _decode import append_token, row_of
from transformers import Qwen2_5OmniThinkerForConditionalGeneration

from ep_kit.budget import keep_count
from ep_kit.models import OmniThinker
from ep_kit.models import attention as attention_probe
from ep_kit.models.attention import audio_frame_salience, decoder_attention_row, pool_to_tokens
from ep_kit.reducers.attention_rank import query_index
from ep_kit.reducers.fastv import FastV
from ep_kit.reducers.intramodal import IntraModal
from ep_kit.reducers.omnizip import (
    OmniZip,
    allocate,
    density_peak_scores,
    merge_into_anchors,
    split_budget,
    window_prune_rate,
)
from ep_kit.reducers.pyramiddrop import (
    MatchFinalStage,
    MatchLayerAverage,
    PyramidDrop,
    effective_budget,
    pyramiddrop_for_budget,
)
from ep_kit.reducers.random import RandomReducer
from ep_kit.scorers import NormScorer
from ep_kit.sequence import Modality, TokenSequence

# ------------------------------------------------------------------ helpers


def _double_batch(batch: dict) -> dict:
    out = dict(batch)
    for key in ("input_features", "pixel_values_videos"):
        if key in out:
            out[key] = out[key].double()
    return out


def _model64(tiny_model, cfg, **components) -> OmniThinker:
    model = tiny_model(cfg, **components)
    model.thinker.double()
    return model.eval()


def _eager_copy(model: OmniThinker, cfg) -> Qwen2_5OmniThinkerForConditionalGeneration:
    """The same weights under transformers' eager attention (the reference that returns weights)."""
    cfg_e = type(cfg).from_dict(cfg.to_dict())
    cfg_e.vision_start_token_id = cfg.vision_start_token_id
    ref = Qwen2_5OmniThinkerForConditionalGeneration._from_config(cfg_e, attn_implementation="eager")
    ref.load_state_dict(model.thinker.state_dict())
    return ref.double().eval()


def _kept_av_sources(seq: TokenSequence, b: int) -> set[int]:
    av = seq.av_mask[b]
    return set(seq.source_index[b, av].tolist())


def _topk_sources(scores: torch.Tensor, columns: list[int], k: int) -> set[int]:
    """Top ``k`` of ``scores`` over ``columns`` by a plain Python sort (lower column wins ties)."""
    ranked = sorted(columns, key=lambda c: (-float(scores[c]), c))
    return set(ranked[:k])


def _record_in_llm(model: OmniThinker) -> list[tuple[int, TokenSequence, TokenSequence]]:
    """Wrap ``model.reducer.in_llm`` to record (layer, sequence in, sequence out) of every call."""
    calls: list[tuple[int, TokenSequence, TokenSequence]] = []
    original = model.reducer.in_llm

    def wrapped(seq, layer_idx, ctx):
        out = original(seq, layer_idx, ctx)
        calls.append((layer_idx, seq, out))
        return out

    model.reducer.in_llm = wrapped
    return calls


# ------------------------------------------------------------ attention row


def test_attention_row_matches_transformers_eager_weights(tiny_model, tiny_config, av_batch, av_specs):
    cfg = tiny_config(num_layers=2, num_heads=4, num_kv_heads=2)  # grouped-query attention
    model = _model64(tiny_model, cfg)
    ref = _eager_copy(model, cfg)
    batch = _double_batch(av_batch(cfg, av_specs, with_labels=True))
    with torch.no_grad():
        seq = model.embed(batch)
        cos_sin = model.rope_embeddings(seq)
        q = query_index(seq)
        row = decoder_attention_row(model.decoder_layers[1], seq.hidden, cos_sin, q, seq.attention_mask)
        layer = ref.model.language_model.layers[1]
        mask = model.causal.layer_kwargs(seq, "eager", seq.hidden.dtype, exclude_answer_keys=False)[
            "attention_mask"
        ]
        _, weights = layer.self_attn(
            hidden_states=layer.input_layernorm(seq.hidden), position_embeddings=cos_sin, attention_mask=mask
        )
    assert row.shape == (seq.batch_size, seq.seq_len) and row.dtype == torch.float64
    for b in range(seq.batch_size):
        # Query = last non-answer token (labels mark the answers).
        assert int(q[b]) == int((seq.attention_mask[b] & ~seq.answer_mask[b]).nonzero().max())
        expected = weights[b, :, int(q[b])].mean(0)
        # transformers' eager softmax runs in float32 even for float64 inputs
        torch.testing.assert_close(row[b], expected, rtol=1e-5, atol=1e-7)
    assert weights.shape[1] > 1  # several heads were averaged


# --------------------------------------------------------------------- FastV


@pytest.mark.parametrize("ratio", [0.1, 0.35])
def test_fastv_keeps_top_attention_of_last_token_in_layer_k_minus_1(
    tiny_model, tiny_config, av_batch, mixed_specs, ratio
):
    cfg = tiny_config(num_layers=3)
    model = _model64(tiny_model, cfg, reducer=FastV(layer=2), keep_ratio=ratio)
    ref = _eager_copy(model, cfg)
    batch = _double_batch(av_batch(cfg, mixed_specs, with_labels=False))
    with torch.no_grad():
        out = model(batch)
        stock = ref(**batch, output_attentions=True)
    full = model.embed(batch)
    for b in range(3):
        cols = full.source_index[b, full.av_mask[b]].tolist()  # input columns of the A/V tokens
        last = int(batch["attention_mask"][b].nonzero().max())
        att = stock.attentions[1][b, :, last].mean(0)  # layer K-1 = 1, averaged over heads
        k = keep_count(len(cols), ratio)
        assert _kept_av_sources(out.kept, b) == _topk_sources(att, cols, k)
        assert int(out.stats["kept_candidates"][b]) == k
        assert int(out.stats["kept_text"][b]) == int(out.stats["n_text"][b])
    assert out.stats["kept_candidates"][2] == 0  # the text-only sample


def test_fastv_computes_one_row_only(tiny_model, tiny_config, av_batch, av_specs, monkeypatch):
    cfg = tiny_config(num_layers=3)
    model = tiny_model(cfg, reducer=FastV(layer=1), keep_ratio=0.2).eval()
    shapes: list[tuple[int, ...]] = []
    real_einsum = torch.einsum

    def spy(eq, *ops):
        res = real_einsum(eq, *ops)
        shapes.append(tuple(res.shape))
        return res

    monkeypatch.setattr(attention_probe.torch, "einsum", spy)
    rows: list[tuple[int, ...]] = []
    real_row = attention_probe.decoder_attention_row

    def row_spy(*args, **kwargs):
        res = real_row(*args, **kwargs)
        rows.append(tuple(res.shape))
        return res

    monkeypatch.setattr("ep_kit.models.omni.decoder_attention_row", row_spy)
    batch = av_batch(cfg, av_specs, with_labels=False)
    with torch.no_grad():
        model(batch)
    L = int(batch["attention_mask"].sum(-1).max())
    assert rows == [(2, L)]
    assert len(shapes) == 1 and shapes[0][-1] == L and L not in shapes[0][:-1]  # (B, H_kv, group, L)
    assert model.attn_implementation == "sdpa"  # the decoder itself stays on its kernel


def test_fastv_rejects_bad_layer(tiny_model, tiny_config):
    with pytest.raises(ValueError, match="layer"):
        FastV(layer=0)
    with pytest.raises(ValueError, match="decoder depth"):
        tiny_model(tiny_config(num_layers=2), reducer=FastV(layer=2))


# --------------------------------------------------------------- PyramidDrop


def test_pyramiddrop_effective_budget_formula():
    # Paper setting, hand computed: (8 + 0.5*8 + 0.25*8 + 0.125*12) / 36.
    assert effective_budget(0.5, 36, [8, 16, 24]) == pytest.approx(15.5 / 36)
    for r in (0.05, 0.1, 0.2):
        lam = pyramiddrop_for_budget(r, 36, [1, 2, 3])
        assert 0 < lam < 1
        assert effective_budget(lam, 36, [1, 2, 3]) == pytest.approx(r, abs=1e-9)
    assert pyramiddrop_for_budget(1.0, 36, [8, 16, 24]) == 1.0
    with pytest.raises(ValueError, match="first stage"):
        pyramiddrop_for_budget(0.2, 36, [8, 16, 24])  # 8/36 = 0.22 is the floor
    with pytest.raises(ValueError, match="increasing"):
        PyramidDrop(layers=[2, 1])


def test_pyramiddrop_stages_match_eager_attention(tiny_model, tiny_config, av_batch, mixed_specs):
    cfg = tiny_config(num_layers=4)
    model = _model64(tiny_model, cfg, reducer=PyramidDrop(layers=[1, 2, 3], stage_ratio=0.5))
    ref = _eager_copy(model, cfg)
    calls = _record_in_llm(model)
    batch = _double_batch(av_batch(cfg, mixed_specs, with_labels=False))
    with torch.no_grad():
        out = model(batch)
        stock = ref(**batch, output_attentions=True)
        assert [c[0] for c in calls] == [1, 2, 3]
        full = model.embed(batch)
        # Stage 1 against the stock model's own attention weights of layer 1 on the full input.
        for b in range(3):
            cols = full.source_index[b, full.av_mask[b]].tolist()
            last = int(batch["attention_mask"][b].nonzero().max())
            att = stock.attentions[1][b, :, last].mean(0)
            assert _kept_av_sources(calls[0][2], b) == _topk_sources(
                att, cols, keep_count(len(cols), 0.5) if cols else 0
            )
        # Every stage against transformers' eager attention module of that layer on the stage input.
        for layer_idx, seq_in, seq_out in calls:
            layer = ref.model.language_model.layers[layer_idx]
            cos_sin = model.rope_embeddings(seq_in)
            mask = model.causal.layer_kwargs(seq_in, "eager", seq_in.hidden.dtype, False)["attention_mask"]
            _, w = layer.self_attn(
                hidden_states=layer.input_layernorm(seq_in.hidden),
                position_embeddings=cos_sin,
                attention_mask=mask,
            )
            for b in range(3):
                cols = seq_in.av_mask[b].nonzero().squeeze(-1).tolist()
                last = int(seq_in.attention_mask[b].nonzero().max())
                att = w[b, :, last].mean(0)
                k = keep_count(len(cols), 0.5) if cols else 0
                expect = {int(seq_in.source_index[b, c]) for c in _topk_sources(att, cols, k)}
                assert _kept_av_sources(seq_out, b) == expect
                assert len(_kept_av_sources(seq_out, b)) == k
    # Per sample: n -> ceil(n/2) -> ceil(n/4)... ; the realised layer-average budget from those counts.
    n = out.stats["n_candidates"]
    k1 = torch.ceil(n / 2)
    k2 = torch.ceil(k1 / 2)
    k3 = torch.ceil(k2 / 2)
    assert torch.equal(out.stats["kept_candidates"], k3.long())
    realised = float((n + k1 + k2 + k3).sum()) / 4 / float(n.sum())
    assert out.stats["layer_avg_keep_ratio"] == pytest.approx(realised)
    torch.testing.assert_close(out.stats["layer_avg_kept"], (n + k1 + k2 + k3).float() / 4)
    assert out.stats["pyramiddrop_effective"] == pytest.approx(effective_budget(0.5, 4, [1, 2, 3]))


def test_pyramiddrop_matched_budget_from_keep_ratio(tiny_model, tiny_config, av_batch, av_specs):
    cfg = tiny_config(num_layers=4)
    model = tiny_model(cfg, reducer=PyramidDrop(layers=[1, 2, 3], stage_ratio=MatchLayerAverage()), keep_ratio=0.4).eval()
    with torch.no_grad():
        out = model(av_batch(cfg, av_specs, with_labels=False))
    lam = out.stats["pyramiddrop_stage_ratio"]
    assert effective_budget(lam, 4, [1, 2, 3]) == pytest.approx(0.4)
    assert out.stats["layer_avg_keep_ratio"] == pytest.approx(0.4, abs=0.05)  # ceil per stage
    final = PyramidDrop(layers=[1, 2, 3], stage_ratio=MatchFinalStage())
    assert final.lam(0.125, num_layers=4) == pytest.approx(0.5)  # three stages of 1/2 keep 1/8 at the end
    with pytest.raises(ValueError, match="first stage"):
        model.reducer.lam(0.2)  # 4 layers, first stage at 1: the layer average never drops below 0.25


# -------------------------------------------------------------------- Random


def test_random_matches_seeded_reference_and_budget(tiny_model, tiny_config, av_batch, mixed_specs):
    cfg = tiny_config()
    model = tiny_model(cfg, reducer=RandomReducer(seed=7), keep_ratio=0.2).eval()
    batch = av_batch(cfg, mixed_specs, with_labels=False)
    with torch.no_grad():
        out = model(batch)
    full = model.embed(batch)
    draws = torch.rand(full.attention_mask.shape, generator=torch.Generator().manual_seed(7))
    for b in range(3):
        cols = full.av_mask[b].nonzero().squeeze(-1).tolist()
        expect = {
            int(full.source_index[b, c]) for c in _topk_sources(draws[b], cols, keep_count(len(cols), 0.2))
        }
        assert _kept_av_sources(out.kept, b) == expect
    assert torch.equal(
        out.stats["kept_candidates"],
        torch.tensor([keep_count(int(n), 0.2) for n in out.stats["n_candidates"]]),
    )


# ---------------------------------------------------------------- IntraModal


def _cos(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double(), b.double()
    return float(a @ b / (a.norm() * b.norm()))


def _intramodal_reference(seq: TokenSequence, b: int, ratio: float) -> set[int]:
    """The unimodal rules written as loops over tokens."""
    keep: set[int] = set()
    video = [
        i for i in range(seq.seq_len) if seq.attention_mask[b, i] and seq.modality[b, i] == Modality.VIDEO
    ]
    audio = [
        i for i in range(seq.seq_len) if seq.attention_mask[b, i] and seq.modality[b, i] == Modality.AUDIO
    ]
    x = seq.hidden[b]
    times = sorted({int(seq.positions[0, b, i]) for i in video})
    where = {
        (int(seq.positions[0, b, i]), int(seq.positions[1, b, i]), int(seq.positions[2, b, i])): i
        for i in video
    }
    vscore = {}
    for i in video:
        t, h, w = (int(seq.positions[a, b, i]) for a in range(3))
        f = times.index(t)
        j = where.get((times[f - 1], h, w)) if f > 0 else None
        if j is None and f + 1 < len(times):
            j = where.get((times[f + 1], h, w))
        vscore[i] = 1 - _cos(x[i], x[j])
    ascore = {i: 1 - _cos(x[i], x[audio[1] if n == 0 else audio[n - 1]]) for n, i in enumerate(audio)}
    for pool, score in ((video, vscore), (audio, ascore)):
        if pool:
            keep |= _topk_sources(
                torch.tensor([score.get(i, 0.0) for i in range(seq.seq_len)]),
                pool,
                keep_count(len(pool), ratio),
            )
    return {int(seq.source_index[b, i]) for i in keep}


@pytest.mark.parametrize("ratio", [0.1, 0.5])
def test_intramodal_matches_loop_reference(tiny_model, tiny_config, av_batch, mixed_specs, ratio):
    cfg = tiny_config()
    model = tiny_model(cfg, reducer=IntraModal(), keep_ratio=ratio).eval()
    batch = av_batch(cfg, mixed_specs, with_labels=False)
    with torch.no_grad():
        out = model(batch)
        full = model.embed(batch)
    for b in range(3):
        assert _kept_av_sources(out.kept, b) == _intramodal_reference(full, b, ratio)
        for m, name in ((Modality.VIDEO, "video"), (Modality.AUDIO, "audio")):
            assert int(out.stats[f"kept_{name}"][b]) == keep_count(int(full.count(m)[b]), ratio)


def test_intramodal_norm_rules_and_errors(tiny_model, tiny_config, av_batch, av_specs):
    cfg = tiny_config()
    model = tiny_model(cfg, reducer=IntraModal(video=NormScorer, audio=NormScorer), keep_ratio=0.25).eval()
    batch = av_batch(cfg, av_specs, with_labels=False)
    with torch.no_grad():
        out = model(batch)
        full = model.embed(batch)
    norms = full.hidden.double().norm(dim=-1)
    for b in range(2):
        expect = set()
        for m in (Modality.VIDEO, Modality.AUDIO):
            cols = full.is_modality(m)[b].nonzero().squeeze(-1).tolist()
            expect |= {
                int(full.source_index[b, c])
                for c in _topk_sources(norms[b], cols, keep_count(len(cols), 0.25))
            }
        assert _kept_av_sources(out.kept, b) == expect
    with pytest.raises(TypeError, match="video must build a MaskedRule scorer, got Identity"):
        tiny_model(cfg, reducer=IntraModal(video=torch.nn.Identity), keep_ratio=0.25)


# ------------------------------------------------------------------ OmniZip


def test_omnizip_pure_rules_hand_computed():
    assert split_budget(10, 50, 0, 0.3, 0.6) == (10, 0)
    assert split_budget(10, 0, 40, 0.3, 0.6) == (0, 10)
    # 0.7*50 = 35 vs 0.4*100 = 40 -> 15 * 35/75 = 7 audio, 8 video.
    assert split_budget(15, 50, 100, 0.3, 0.6) == (7, 8)
    assert split_budget(2, 1000, 1, 0.3, 0.6) == (1, 1)  # each non-empty modality keeps one
    torch.testing.assert_close(
        window_prune_rate(torch.tensor([0.0, 0.5, 1.0, 0.1])), torch.tensor([0.75, 0.55, 0.35, 0.71])
    )
    assert allocate(10, [5, 5, 5], [1, 1, 1]) == [4, 3, 3]
    assert allocate(7, [2, 10, 3], [5, 1, 1]) == [2, 3, 2]
    assert sum(allocate(9, [4, 4, 1], [0.2, 0.7, 0.1])) == 9
    with pytest.raises(ValueError, match="allocate"):
        allocate(4, [1, 2], [1, 1])


def test_density_peak_matches_loop():
    x = torch.randn(9, 6, dtype=torch.float64)
    got = density_peak_scores(x, knn=3)
    n, d = x.shape
    dist = [[math.dist(x[i].tolist(), x[j].tolist()) / math.sqrt(d) for j in range(n)] for i in range(n)]
    rho = [math.exp(-sum(v**2 for v in sorted(dist[i])[1:4]) / 3) for i in range(n)]
    ref = []
    for i in range(n):
        higher = [dist[i][j] for j in range(n) if rho[j] > rho[i]]
        ref.append(rho[i] * (min(higher) if higher else max(dist[i])))
    torch.testing.assert_close(got.double(), torch.tensor(ref, dtype=torch.float64), rtol=1e-5, atol=1e-6)


def test_merge_into_anchors_loop_reference():
    x = torch.randn(7, 5, dtype=torch.float64)
    anchors = torch.tensor([False, True, False, False, True, False, False])
    got = merge_into_anchors(x, anchors, group=2)
    assignment: dict[int, list[tuple[float, int]]] = {1: [], 4: []}
    for j in (0, 2, 3, 5, 6):
        sims = {a: _cos(x[j], x[a]) for a in (1, 4)}
        best = max(sims, key=lambda a: (sims[a], -a))
        assignment[best].append((sims[best], j))
    for a, members in assignment.items():
        top = sorted(members, key=lambda m: (-m[0], m[1]))[:2]
        num = x[a].clone()
        den = 1.0
        for s, j in top:
            num += max(s, 0.0) * x[j]
            den += max(s, 0.0)
        torch.testing.assert_close(got[a], num / den)
    torch.testing.assert_close(got[~anchors], x[~anchors])


def test_omnizip_audio_salience_matches_tower_hidden_states(tiny_model, tiny_config, av_batch, av_specs):
    cfg = tiny_config(audio_layers=2)
    model = _model64(tiny_model, cfg)
    batch = _double_batch(av_batch(cfg, av_specs, with_labels=False))
    tower = model.thinker.model.audio_tower
    captured = {}

    def hook(module, args, kwargs):
        captured.update(hidden=args[0], cu=kwargs["cu_seqlens"])

    handle = tower.layers[-1].register_forward_pre_hook(hook, with_kwargs=True)
    with torch.no_grad():
        model.thinker.model.get_audio_features(batch["input_features"], batch["feature_attention_mask"])
        states = model.thinker.model.get_audio_features(
            batch["input_features"], batch["feature_attention_mask"], output_hidden_states=True
        ).hidden_states
    handle.remove()
    # transformers' recorded input of the last layer is the hook's capture
    torch.testing.assert_close(states[-2] if len(states) > 2 else states[0], captured["hidden"])
    layer = tower.layers[-1]
    with torch.no_grad():
        got = audio_frame_salience(layer, captured["hidden"], captured["cu"])
        h = layer.self_attn_layer_norm(captured["hidden"])
        H = layer.self_attn.num_heads
        ref = torch.zeros(h.shape[0], dtype=torch.float64)
        cu = captured["cu"].tolist()
        for s, e in zip(cu[:-1], cu[1:], strict=True):
            for head in range(H):
                sl = slice(head * layer.self_attn.head_dim, (head + 1) * layer.self_attn.head_dim)
                q = layer.self_attn.q_proj(h[s:e])[:, sl]
                k = layer.self_attn.k_proj(h[s:e])[:, sl]
                p = F.softmax(q @ k.T / math.sqrt(q.shape[-1]), dim=-1)
                ref[s:e] += p.sum(0) / H
    torch.testing.assert_close(got, ref)
    # Pooling: LLM audio token j = frames 2j, 2j+1 of its audio (hand-computed for 200 and 300 mel frames).
    tokens = pool_to_tokens(torch.arange(250.0), torch.tensor([200, 300]))
    assert tokens.shape == (50 + 75,)
    assert tokens[:2].tolist() == [0.5, 2.5] and tokens[50].item() == 100.5


def test_omnizip_budget_anchors_and_windows(tiny_model, tiny_config, av_batch, av_specs):
    cfg = tiny_config()
    ratio = 0.2
    model = tiny_model(cfg, reducer=OmniZip(), keep_ratio=ratio).eval()
    batch = av_batch(cfg, av_specs, with_labels=False)
    with torch.no_grad():
        out = model(batch)
        full = model.embed(batch)
    # anchors = top salience tokens, recomputed with a fresh encoder pass
    with torch.no_grad():
        salience = model.audio_token_salience(batch)
    offset = 0
    for b in range(2):
        n_a, n_v = int(full.count(Modality.AUDIO)[b]), int(full.count(Modality.VIDEO)[b])
        k = keep_count(n_a + n_v, ratio)
        k_a, k_v = split_budget(k, n_a, n_v, 0.3, 0.6)
        assert int(out.stats["kept_audio"][b]) == k_a and int(out.stats["kept_video"][b]) == k_v
        cols = full.is_modality(Modality.AUDIO)[b].nonzero().squeeze(-1).tolist()
        s = torch.zeros(full.seq_len, dtype=salience.dtype)
        s[cols] = salience[offset : offset + n_a]
        offset += n_a
        anchors = {int(full.source_index[b, c]) for c in _topk_sources(s, cols, k_a)}
        kept_audio = set(out.kept.source_index[b, out.kept.modality[b] == Modality.AUDIO].tolist())
        assert kept_audio == anchors
    assert torch.equal(
        out.stats["kept_candidates"],
        torch.tensor([keep_count(int(n), ratio) for n in out.stats["n_candidates"]]),
    )


# ------------------------------------------------------------- generation


@pytest.mark.parametrize(
    "make",
    [
        lambda: FastV(layer=1),
        lambda: PyramidDrop(layers=[1, 2], stage_ratio=0.5),
        lambda: RandomReducer(seed=3),
        lambda: IntraModal(),
        lambda: OmniZip(),
    ],
    ids=["fastv", "pyramiddrop", "random", "intramodal", "omnizip"],
)
def test_generate_with_reduced_prefill_matches_uncached_recompute(
    tiny_model, tiny_config, av_batch, mixed_specs, make
):
    """Greedy tokens of ``generate`` (reduced prefill, KV-cached decode) = recomputing everything per step.

    The reference fixes the prefill's kept set per layer (recorded from a forward) and re-runs all
    layers on prefill + generated tokens without cache, dropping the same tokens at the same layers.
    """
    cfg = tiny_config(num_layers=3)
    model = tiny_model(cfg, reducer=make(), keep_ratio=0.3).eval()
    batch = av_batch(cfg, mixed_specs, with_labels=False)
    if isinstance(model.reducer, RandomReducer):
        model.reducer.scorer._gen().manual_seed(3)
    ours = model.generate(batch, max_new_tokens=4)
    if isinstance(model.reducer, RandomReducer):
        model.reducer.scorer._gen().manual_seed(3)
    stages: dict[int, TokenSequence] = {}
    if model.reducer.drop_before_layers:
        calls = _record_in_llm(model)
    with torch.no_grad():
        full = model.embed(batch)
        pre = model.reduce_before_llm(full, model.context(full, batch))
        out = model(batch) if model.reducer.drop_before_layers else None
    if model.reducer.drop_before_layers:
        stages = {layer: seq_out for layer, _, seq_out in calls}
        assert out is not None
    bounds = sorted({0, model.num_layers, *stages})
    refs = []
    with torch.no_grad():
        for b in range(3):
            next_pos = int(full.positions[:, b, : int(full.attention_mask[b].sum())].max()) + 1
            cur, toks = row_of(pre, b), []
            for step in range(4):
                seq = cur
                for start, end in zip(bounds[:-1], bounds[1:], strict=False):
                    if start in stages:
                        allowed = set(stages[start].source_index[b, stages[start].attention_mask[b]].tolist())
                        keep = torch.tensor(
                            [[s in allowed or s >= 10_000 for s in seq.source_index[0].tolist()]]
                        )
                        seq = seq.keep(keep)
                    seq = model.run_layers(seq, start, end)
                token = model.lm_head(model.final_norm(seq.hidden[:, -1])).argmax(-1)
                toks.append(int(token))
                cur = append_token(model, cur, token, next_pos + step)
            refs.append(toks)
    assert ours.shape == (3, 4)
    assert ours.tolist() == refs


# ------------------------------------------------------------------ recipes


def test_every_baseline_recipe_builds_its_reducer_at_its_budget():
    """Each row on its evaluation base, parsed and built as ``ep-kit test`` would (ep_kit.recipes.method_from_recipe);
    tests/test_recipe_methods.py checks the classes against the YAML."""
    from pathlib import Path

    from ep_kit.recipes import method_configs, method_from_recipe

    root = Path(__file__).resolve().parents[1] / "recipes"
    files = sorted((root / "baselines").glob("*_*.yaml")) + sorted(
        (root / "toy" / "baselines").glob("*_*.yaml")
    )
    assert len(files) >= 2 * 5 * 3  # (at least) five methods at 20/10/5%, real and toy scale
    for path in files:
        method = method_from_recipe(method_configs(path))
        pct = int(path.stem.rsplit("_", 1)[1])
        assert method.keep_ratio == pytest.approx(pct / 100), path
        assert method.reducer is not None, path
        if isinstance(method.reducer, PyramidDrop):
            depth = 4 if "toy" in path.parts else 36
            lam = method.reducer.lam(method.keep_ratio, num_layers=depth)  # reachable at that depth
            assert 0 < lam < 1, path
    for full in (root / "baselines" / "full.yaml", root / "toy" / "baselines" / "full.yaml"):
        assert method_from_recipe(method_configs(full)).reducer is None


def test_main_table_relative_columns_hand_computed():
    import importlib.util
    import sys
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "benchmarks" / "main_table.py"
    spec = importlib.util.spec_from_file_location("main_table", path)
    mt = importlib.util.module_from_spec(spec)
    sys.modules["main_table"] = mt  # dataclasses look their module up
    spec.loader.exec_module(mt)
    full = mt.Cell(
        "Full", 1.0, {"test/acc/b/av1": 0.6, "test/acc/b/av2": 0.4, "test/acc/b/v": 0.8, "test/acc": 0.6}
    )
    half = mt.Cell("X", 0.1, {"test/acc/b/av1": 0.3, "test/acc/b/av2": 0.2, "test/acc/b/v": 0.8})
    missing = mt.Cell("Y", 0.05, note="not run: missing y.yaml")
    rows = mt.build_table([half, missing], full, ["b/av1", "b/av2"], ["b/v"])
    assert [r["budget"] for r in rows] == ["100%", "10%", "5%"]
    assert rows[0]["AV avg"] == "50.0" and rows[0]["Rel"] == "100.0"
    # X: AV 25 (50% of 50), video 80 (100%), Rel = mean(25, 80) / mean(50, 80) = 52.5 / 65.
    assert rows[1]["AV rel"] == "50.0" and rows[1]["Video rel"] == "100.0"
    assert rows[1]["Rel"] == f"{100 * 52.5 / 65:.1f}"
    assert rows[2]["AV avg"] == "n/a" and rows[2]["note"].startswith("not run")


def _omnizip_video_reference(
    seq: TokenSequence, b: int, k_v: int, anchors: set[int], knn: int = 5
) -> set[int]:
    """OmniZip's video rule as loops: windows of 50 positions, audio-guided shares, per-frame alternation."""
    video = [
        i for i in range(seq.seq_len) if seq.attention_mask[b, i] and seq.modality[b, i] == Modality.VIDEO
    ]
    audio = [
        i for i in range(seq.seq_len) if seq.attention_mask[b, i] and seq.modality[b, i] == Modality.AUDIO
    ]
    t = {i: int(seq.positions[0, b, i]) for i in video + audio}
    v0, a0 = min(t[i] for i in video), min(t[i] for i in audio)
    vwin = {i: (t[i] - v0) // 50 for i in video}
    awin = {i: (t[i] - a0) // 50 for i in audio}
    wins = sorted(set(vwin.values()))
    rates = []
    for w in wins:
        members = [i for i in audio if awin[i] == w]
        rates.append(sum(i in anchors for i in members) / len(members) if members else 0.0)
    sizes = [sum(vwin[i] == w for i in video) for w in wins]
    prune = [min(max(0.75 - 0.4 * r, 0.35), 0.75) for r in rates]
    counts = allocate(k_v, sizes, [(1 - p) * n for p, n in zip(prune, sizes, strict=True)])
    all_times = sorted({t[i] for i in video})
    kept: set[int] = set()
    for w, c in zip(wins, counts, strict=True):
        frames = sorted({t[i] for i in video if vwin[i] == w})
        f_tokens = [[i for i in video if t[i] == f] for f in frames]
        f_counts = allocate(c, [len(x) for x in f_tokens], [float(len(x)) for x in f_tokens])
        for j, (f, toks, fc) in enumerate(zip(frames, f_tokens, f_counts, strict=True)):
            if fc == 0:
                continue
            pos = all_times.index(f)
            if j % 2 == 1 and pos > 0:
                prev = {
                    (int(seq.positions[1, b, i]), int(seq.positions[2, b, i])): i
                    for i in video
                    if t[i] == all_times[pos - 1]
                }
                score = []
                for i in toks:
                    p = prev.get((int(seq.positions[1, b, i]), int(seq.positions[2, b, i])))
                    score.append(2.0 if p is None else 1 - _cos(seq.hidden[b, i], seq.hidden[b, p]))
                score_t = torch.tensor(score)
            else:
                score_t = density_peak_scores(seq.hidden[b, toks], knn)
            order = sorted(range(len(toks)), key=lambda n: (-float(score_t[n]), n))
            kept |= {toks[n] for n in order[:fc]}
    return {int(seq.source_index[b, i]) for i in kept}


@pytest.mark.parametrize("ratio", [0.1, 0.3])
def test_omnizip_video_selection_matches_loop_reference(tiny_model, tiny_config, av_batch, ratio):
    from ep_kit.models.tiny import SampleSpec

    specs = [
        SampleSpec(prompt_len=4, answer_len=2, frames=8, height=56, width=56, audio_seconds=4.0),
        SampleSpec(prompt_len=2, answer_len=2, frames=6, height=56, width=28, audio_seconds=3.0),
    ]
    cfg = tiny_config()
    model = tiny_model(cfg, reducer=OmniZip(), keep_ratio=ratio).eval()
    batch = av_batch(cfg, specs, with_labels=False)
    with torch.no_grad():
        out = model(batch)
        full = model.embed(batch)
    for b in range(2):
        kept_audio = set(out.kept.source_index[b, out.kept.modality[b] == Modality.AUDIO].tolist())
        src_to_col = {int(s): c for c, s in enumerate(full.source_index[b].tolist()) if s >= 0}
        anchors = {src_to_col[s] for s in kept_audio}
        k_v = int(out.stats["kept_video"][b])
        kept_video = set(out.kept.source_index[b, out.kept.modality[b] == Modality.VIDEO].tolist())
        assert kept_video == _omnizip_video_reference(full, b, k_v, anchors)
