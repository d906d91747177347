"""CS2 inside the real thinker: positions, budgets, what is kept, what is refined, where gradients go.

References: transformers' ``get_rope_index`` on the raw batch (positions), ``keep_count`` of the
hand-counted candidate pool (budgets), the input token ids (what is kept), the stock thinker run on
a sample alone (text-only pass-through).
"""

from __future__ import annotations

import math

import pytest
import torch

from ep_kit.masks import Bidirectional, Causal, IntraModal
from ep_kit.models import OmniThinker
from ep_kit.reducers import CS2
from ep_kit.scorers import NeighbourNoveltyScorer, RandomScorer, SimilarityScorer
from ep_kit.selectors import GumbelTopK, HardTopK, PerModalityTopK, STETopK
from ep_kit.sequence import Modality


def _rope_index(model: OmniThinker, batch: dict) -> torch.Tensor:
    pos, _ = model.thinker.model.get_rope_index(
        batch["input_ids"], None, batch["video_grid_thw"], batch["attention_mask"], True,
        batch["feature_attention_mask"].sum(-1), batch["video_second_per_grid"],
    )
    return pos


@pytest.mark.parametrize("ratio", [0.5, 0.2])
@pytest.mark.parametrize("padding_side", ["right", "left"])
def test_kept_tokens_positions_budget_and_text(tiny_model, tiny_config, av_batch, mixed_specs, ratio, padding_side):
    cfg = tiny_config()
    model = tiny_model(cfg, reducer=CS2(num_layers=2), keep_ratio=ratio).eval()
    batch = av_batch(cfg, mixed_specs, padding_side=padding_side)
    with torch.no_grad():
        out = model(batch)
    kept = out.kept
    ref_pos = _rope_index(model, batch)
    ids = batch["input_ids"]
    real = batch["attention_mask"].bool()
    video_id, audio_id = cfg.video_token_id, cfg.audio_token_id
    for b in range(ids.shape[0]):
        n = int(kept.attention_mask[b].sum())
        src = kept.source_index[b, :n]
        assert torch.all(src[1:] > src[:-1])  # original order
        assert torch.equal(kept.positions[:, b, :n], ref_pos[:, b, src])  # original positions, every axis
        assert torch.equal(kept.input_ids[b, :n], ids[b, src])
        row = ids[b][real[b]]
        is_av = (row == video_id) | (row == audio_id)
        n_av = int(is_av.sum())
        k = 0 if n_av == 0 else min(n_av, max(1, math.ceil(ratio * n_av - 1e-9)))
        kept_ids = kept.input_ids[b, :n]
        assert int(((kept_ids == video_id) | (kept_ids == audio_id)).sum()) == k
        # every non-A/V token (prompt, markers, answer) is kept
        assert int(((kept_ids != video_id) & (kept_ids != audio_id)).sum()) == int((~is_av).sum())
        assert int(kept.answer_mask[b].sum()) == int((batch["labels"][b] != -100).sum())
    assert torch.equal(out.stats["kept_candidates"], kept.count(Modality.VIDEO, Modality.AUDIO))
    assert out.logits.shape[:2] == kept.attention_mask.shape


def test_gradients_reach_scorer_and_sieve_not_encoders(tiny_model, tiny_config, av_batch, av_specs):
    cfg = tiny_config()
    model = tiny_model(cfg, reducer=CS2(num_layers=2), keep_ratio=0.2).train()
    out = model(av_batch(cfg, av_specs))
    out.loss.backward()
    red = model.reducer
    for name, p in [*red.scorer.named_parameters(), *red.layers.named_parameters()]:
        assert p.grad is not None, name
        if name == "score_head.2.bias":
            # The STE weights are a softmax over each sample's candidates, unchanged by adding one
            # constant to every score: this bias's gradient is 0 up to rounding.
            assert float(p.grad.abs().sum()) < 1e-6, name
        else:
            assert float(p.grad.abs().sum()) > 0, name
    for p in [*model.thinker.model.audio_tower.parameters(), *model.thinker.model.visual.parameters()]:
        assert p.grad is None
    assert model.decoder_layers[0].self_attn.q_proj.weight.grad is not None


def test_label_rows_loss_equals_float64_cross_entropy_over_all_logits(tiny_model, tiny_config, av_batch, mixed_specs):
    """``logits="labels"`` (training) must give the loss and gradients of the full-logits loss.

    Reference: float64 cross-entropy written out by hand over every kept row's logits with the HF
    shift (row t predicts label t+1), on a padded batch with a text-only sample and CS2 dropping tokens.
    """
    cfg = tiny_config()
    model = tiny_model(cfg, reducer=CS2(num_layers=2), keep_ratio=0.3).train().double()
    batch = av_batch(cfg, mixed_specs)
    batch = {k: v.double() if torch.is_tensor(v) and v.is_floating_point() else v for k, v in batch.items()}
    full = model(batch, logits="all")
    labels = full.kept.labels
    target = torch.nn.functional.pad(labels[:, 1:], (0, 1), value=-100)
    rows = target != -100
    assert 0 < int(rows.sum()) < int(full.kept.attention_mask.sum())  # only a few rows carry a label
    logp = torch.log_softmax(full.logits[rows], dim=-1)
    ref = -logp.gather(1, target[rows][:, None]).mean()
    ref.backward()
    ref_grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad()
    out = model(batch, logits="labels")
    assert out.logits is None
    # transformers' loss upcasts logits to float32 (both modes do), hence float32 tolerances
    torch.testing.assert_close(out.loss.double(), ref, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(out.loss, full.loss, rtol=1e-6, atol=1e-6)
    out.loss.backward()
    grads = {n: p.grad for n, p in model.named_parameters() if p.grad is not None}
    assert grads.keys() == ref_grads.keys()
    for name, g in grads.items():
        torch.testing.assert_close(g, ref_grads[name], rtol=1e-5, atol=1e-7, msg=name)
    with pytest.raises(ValueError, match="labels"):
        model({k: v for k, v in batch.items() if k != "labels"}, logits="labels")
    with pytest.raises(ValueError, match="logits"):
        model(batch, logits="some")


def test_text_only_sample_passes_through_unchanged(tiny_model, tiny_config, av_batch, mixed_specs):
    cfg = tiny_config()
    model = tiny_model(cfg, reducer=CS2(num_layers=2), keep_ratio=0.2).eval()
    batch = av_batch(cfg, mixed_specs)
    with torch.no_grad():
        out = model(batch)
        text = {k: v[2:3] for k, v in batch.items() if k in ("input_ids", "attention_mask", "labels")}
        ref = model.thinker(**text).logits[0]
    n = int(text["attention_mask"].sum())
    assert int(out.stats["cs2_k"][2]) == 0
    torch.testing.assert_close(out.logits[2, :n], ref[:n], rtol=1e-5, atol=1e-5)
    # A batch with no media at all also passes.
    with torch.no_grad():
        alone = model(text)
    torch.testing.assert_close(alone.logits[0, :n], ref[:n], rtol=1e-5, atol=1e-5)


def _pre_llm(model: OmniThinker, batch: dict):
    full = model.embed(batch)
    seq = model.reduce_before_llm(full, model.context(full, batch))
    return full, seq


def _hidden_at(full, seq, b):
    """Map kept tokens of sample b back to their rows in ``full`` (both indexed by input column)."""
    n = int(seq.attention_mask[b].sum())
    col_to_row = {int(c): i for i, c in enumerate(full.source_index[b].tolist()) if c >= 0}
    rows = torch.tensor([col_to_row[int(c)] for c in seq.source_index[b, :n]])
    return full.hidden[b, rows], seq.hidden[b, :n], full.modality[b, rows], full.answer_mask[b, rows]


@pytest.mark.parametrize("prefusion", [True, False])
def test_refinement_prefusion_and_answers(tiny_model, tiny_config, av_batch, av_specs, prefusion):
    cfg = tiny_config()
    model = tiny_model(cfg, reducer=CS2(num_layers=2, prefusion=prefusion), keep_ratio=0.5).eval()
    batch = av_batch(cfg, av_specs)
    with torch.no_grad():
        full, seq = _pre_llm(model, batch)
    for b in range(2):
        before, after, mod, answer = _hidden_at(full, seq, b)
        same = torch.isclose(before, after, atol=1e-6).all(-1)
        text = mod == int(Modality.TEXT)
        assert torch.all(same[answer])  # answers enter unrefined
        assert not torch.any(same[~text])  # A/V tokens are refined
        prompt = text & ~answer
        if prefusion:
            assert not torch.any(same[prompt])
        else:
            assert torch.all(same[prompt])


def test_answer_tokens_are_never_sieve_keys(tiny_model, tiny_config, av_batch, av_specs):
    cfg = tiny_config()
    model = tiny_model(cfg, reducer=CS2(num_layers=2), keep_ratio=0.3).eval()
    batch = av_batch(cfg, av_specs)
    other = {k: (v.clone() if torch.is_tensor(v) else v) for k, v in batch.items()}
    answer = other["labels"] != -100
    other["input_ids"][answer] = (other["input_ids"][answer] + 17) % 256
    with torch.no_grad():
        _, a = _pre_llm(model, batch)
        _, b = _pre_llm(model, other)
    assert torch.equal(a.source_index, b.source_index)  # same selection
    not_answer = a.attention_mask & ~a.answer_mask
    torch.testing.assert_close(a.hidden[not_answer], b.hidden[not_answer], rtol=1e-5, atol=1e-5)


def test_video_only_candidates_count_k_over_video(tiny_model, tiny_config, av_batch, av_specs):
    cfg = tiny_config()
    model = tiny_model(cfg, reducer=CS2(num_layers=1), keep_ratio=0.9, candidate_modalities=["video"]).eval()
    with torch.no_grad():
        out = model(av_batch(cfg, av_specs))
    n_video = out.stats["n_video"]
    expected = torch.tensor([min(int(n), max(1, math.ceil(0.9 * int(n) - 1e-9))) for n in n_video])
    assert torch.equal(out.stats["kept_video"], expected)
    assert torch.equal(out.stats["kept_audio"], out.stats["n_audio"])  # audio is not a candidate


@pytest.mark.parametrize("mode", [Bidirectional(), Causal(), IntraModal()])
def test_sieve_attention_mode_decides_which_tokens_one_token_reaches(tiny_model, tiny_config, av_batch, av_specs, mode):
    """Perturb one video token of sample 0 and see which refined states move: by the mode's rule, all
    real tokens (bidirectional), the tokens from it on (causal), the video tokens (intra-modal); never
    the other sample."""
    cfg = tiny_config()
    model = tiny_model(cfg, reducer=CS2(num_layers=2, attention=mode), keep_ratio=0.5).eval()
    with torch.no_grad():
        full = model.embed(av_batch(cfg, av_specs))
        video = (full.modality[0] == int(Modality.VIDEO)).nonzero().flatten().tolist()
        j = video[1]  # text and a video token before it; video, audio and text after it
        hidden = full.hidden.clone()
        hidden[0, j] += torch.randn(hidden.shape[-1])
        base = model.reducer.encode(full, model)
        moved = (model.reducer.encode(full.replace(hidden=hidden), model) - base).abs().amax(-1) > 1e-5
    real = full.attention_mask
    i = torch.arange(full.seq_len)
    expected = {
        "Bidirectional": real[0],
        "Causal": real[0] & (i >= j),
        "IntraModal": real[0] & (full.modality[0] == int(Modality.VIDEO)),
    }[type(mode).__name__]
    assert torch.equal(moved[0] & real[0], expected)
    assert not moved[1][real[1]].any()


def test_ratio_one_keeps_everything_but_still_sieves(tiny_model, tiny_config, av_batch, av_specs):
    cfg = tiny_config()
    model = tiny_model(cfg, reducer=CS2(num_layers=2), keep_ratio=1.0).eval()
    batch = av_batch(cfg, av_specs)
    with torch.no_grad():
        out = model(batch)
        stock = model.thinker(**batch).logits
    assert int(out.kept.attention_mask.sum()) == int(batch["attention_mask"].sum())
    assert out.stats["realised_keep_ratio"] == 1.0
    assert not torch.allclose(out.logits[out.kept.attention_mask], stock[batch["attention_mask"].bool()], atol=1e-3)


def test_attach_is_idempotent_and_never_overwrites(tiny_model, tiny_config):
    model = tiny_model(tiny_config(), reducer=CS2(num_layers=2))
    red = model.reducer
    # the copy starts equal to decoder layer i and is a separate tensor
    torch.testing.assert_close(red.layers[1].mlp.up_proj.weight, model.decoder_layers[1].mlp.up_proj.weight)
    assert red.layers[1].mlp.up_proj.weight.data_ptr() != model.decoder_layers[1].mlp.up_proj.weight.data_ptr()
    trained = {k: torch.randn_like(v) for k, v in red.state_dict().items()}
    red.load_state_dict(trained)
    red.attach(model)
    OmniThinker(model.thinker, reducer=red)  # re-wrapping a trained reducer
    for k, v in red.state_dict().items():
        assert torch.equal(v, trained[k]), k


def test_cs2_errors(tiny_model, tiny_config):
    with pytest.raises(ValueError, match="num_layers must be >= 1"):
        CS2(num_layers=0)
    with pytest.raises(RuntimeError, match="attach"):
        model = tiny_model(tiny_config())
        seq = model.embed({"input_ids": torch.tensor([[1, 2, 3]])})
        CS2().before_llm(seq, model.context(seq))


@pytest.mark.parametrize(
    "scorer, selector",
    [
        (SimilarityScorer, HardTopK()),
        (NeighbourNoveltyScorer, HardTopK()),
        (lambda d: RandomScorer(d, seed=3), HardTopK()),
        (None, GumbelTopK()),
        (None, PerModalityTopK(STETopK())),
    ],
)
def test_scorer_and_selector_variants(tiny_model, tiny_config, av_batch, mixed_specs, scorer, selector):
    cfg = tiny_config()
    model = tiny_model(cfg, reducer=CS2(num_layers=1, scorer=scorer, selector=selector), keep_ratio=0.2).train()
    out = model(av_batch(cfg, mixed_specs))
    out.loss.backward()
    st = out.stats
    if isinstance(selector, PerModalityTopK):
        for kept, n in ((st["kept_video"], st["n_video"]), (st["kept_audio"], st["n_audio"])):
            assert kept.tolist() == [0 if m == 0 else max(1, math.ceil(0.2 * m - 1e-9)) for m in n.tolist()]
    else:
        n = st["n_candidates"].tolist()
        assert st["kept_candidates"].tolist() == [0 if m == 0 else max(1, math.ceil(0.2 * m - 1e-9)) for m in n]
    assert torch.equal(st["kept_text"], st["n_text"])


def test_gradient_checkpointing_gives_same_loss_and_grads(tiny_model, tiny_config, av_batch, av_specs):
    cfg = tiny_config()
    batch = av_batch(cfg, av_specs)
    model = tiny_model(cfg, reducer=CS2(num_layers=2), keep_ratio=0.3).train()
    plain = model(batch)
    plain.loss.backward()
    grads = {n: p.grad.clone() for n, p in model.reducer.named_parameters()}
    model.zero_grad(set_to_none=True)
    model.gradient_checkpointing_enable()
    assert all(layer.gradient_checkpointing for layer in model.reducer.layers)
    again = model(batch)
    again.loss.backward()
    torch.testing.assert_close(again.loss, plain.loss)
    for n, p in model.reducer.named_parameters():
        torch.testing.assert_close(p.grad, grads[n], rtol=1e-4, atol=1e-6)


# ------------------------------------------------------ the sieve runs only the rows that matter
def _dense_reference(model: OmniThinker, seq, rows_refined, keys_allowed=None):
    """Float64 reference of the unoptimised sieve: the SAME layers over the WHOLE padded sequence
    (padding and answer rows included) with an explicit dense ``(B, 1, L, L)`` mask.

    ``keys_allowed`` (``(B, L)``) restricts keys further (no pre-fusion: A/V keys only); rows left
    without a key get their diagonal so the kernel never sees an all-masked row. Returns the
    reference hidden states and the parameters of the float64 layer copies.
    """
    import copy

    red = model.reducer
    layers = copy.deepcopy(red.layers).double()
    allowed = red.attention.dense(seq, exclude_answer_keys=True)
    if keys_allowed is not None:
        allowed = allowed & keys_allowed[:, None, None, :] & rows_refined[:, None, :, None]
        eye = torch.eye(seq.seq_len, dtype=torch.bool)[None, None]
        allowed = allowed | (eye & ~allowed.any(-1, keepdim=True))
    additive = torch.zeros(allowed.shape, dtype=torch.float64).masked_fill(~allowed, float("-inf"))  # sdpa and eager
    cos, sin = model.rope(seq.positions, dtype=torch.float64)
    hidden = seq.hidden.double()
    for layer in layers:
        hidden = layer(hidden, attention_mask=additive, position_embeddings=(cos, sin), position_ids=None)
    return torch.where(rows_refined[..., None], hidden, seq.hidden.double()), layers


def _refined_rows(seq, prefusion: bool) -> torch.Tensor:
    if prefusion:
        return seq.attention_mask & ~seq.answer_mask & seq.av_mask.any(-1, keepdim=True)
    return seq.av_mask


@pytest.mark.parametrize("prefusion", [True, False])
@pytest.mark.parametrize("mode", [Bidirectional(), Causal(), IntraModal()])
@pytest.mark.parametrize("layout", ["padded_answers", "text_only_sample", "mid_answer", "single_no_answer"])
def test_sieve_on_refined_rows_equals_float64_dense_reference(
    tiny_model, tiny_config, av_batch, av_specs, mixed_specs, prefusion, mode, layout
):
    """The sieve runs on the refined tokens only, one unpadded group of samples at a time; the result
    must be the unoptimised sieve's: every token (answers, padding, media-free samples) through the
    same layers with the dense mask, in float64, then answers/padding/text-only rows left as they were."""
    cfg = tiny_config()
    model = tiny_model(cfg, reducer=CS2(num_layers=2, attention=mode, prefusion=prefusion), keep_ratio=0.3).eval()
    specs = {"padded_answers": av_specs, "text_only_sample": mixed_specs, "mid_answer": av_specs,
             "single_no_answer": av_specs[:1]}[layout]
    with torch.no_grad():
        full = model.embed(av_batch(cfg, specs, with_labels=layout != "single_no_answer"))
    if layout == "mid_answer":  # an explicit answer mask that is not a trailing span (an answer inside the prompt)
        answer = full.answer_mask.clone()
        answer[0, 2:4] = True
        full = full.replace(answer_mask=answer)
    rows = _refined_rows(full, prefusion)
    with torch.no_grad():
        hidden, mask = model.reducer.refine(full, model)
        ref, _ = _dense_reference(model, full, rows, keys_allowed=None if prefusion else full.av_mask)
    assert torch.equal(mask, rows)
    torch.testing.assert_close(hidden.double(), ref, rtol=1e-5, atol=1e-4)
    assert torch.equal(hidden[~rows], full.hidden[~rows])  # answers, padding, unrefined text: untouched
    # the reference is not trivially equal: with answer tokens as keys it differs on the refined rows
    # (causal: only when an answer token precedes refined tokens)
    if bool(full.answer_mask.any()) and prefusion and (not isinstance(mode, Causal) or layout == "mid_answer"):
        leaky = full.replace(answer_mask=torch.zeros_like(full.answer_mask))
        with torch.no_grad():
            alt, _ = _dense_reference(model, leaky, rows)
        assert float((alt[rows] - ref[rows]).abs().max()) > 1e-2


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_encode_on_a_padded_batch_equals_float64_dense_reference(tiny_model, tiny_config, av_batch, mixed_specs, attn):
    """``encode`` (the layers on a sequence as given) runs one unpadded group per sample length: its real
    rows, answer rows included as queries, equal one padded float64 run with the dense mask; padding is zero."""
    cfg = tiny_config(attn_implementation=attn)
    model = tiny_model(cfg, reducer=CS2(num_layers=2), keep_ratio=0.3).eval()
    specs = [mixed_specs[0], mixed_specs[2], mixed_specs[1], mixed_specs[0]]  # lengths a, c, b, a: 3 groups
    with torch.no_grad():
        full = model.embed(av_batch(cfg, specs))
        lengths = full.lengths.tolist()
        assert lengths[0] == lengths[3] and len(set(lengths)) == 3 and max(lengths) != lengths[0]
        out = model.reducer.encode(full, model)
        ref, _ = _dense_reference(model, full, full.attention_mask)
    real = full.attention_mask
    torch.testing.assert_close(out[real].double(), ref[real], rtol=1e-5, atol=1e-4)
    assert torch.equal(out[~real], torch.zeros_like(out[~real]))


def test_sieve_gradients_equal_float64_dense_reference(tiny_model, tiny_config, av_batch, av_specs):
    """Training: the gradient reaching the sieve layers through the refined states is the dense run's."""
    cfg = tiny_config()
    model = tiny_model(cfg, reducer=CS2(num_layers=2), keep_ratio=0.3).train()
    with torch.no_grad():
        full = model.embed(av_batch(cfg, av_specs))
    rows = _refined_rows(full, True)
    weight = torch.randn(full.hidden.shape, generator=torch.Generator().manual_seed(5))
    hidden, _ = model.reducer.refine(full, model)
    (hidden * weight).sum().backward()
    ref, ref_layers = _dense_reference(model, full, rows)
    (ref * weight.double()).sum().backward()
    for (name, p), q in zip(model.reducer.layers.named_parameters(), ref_layers.parameters(), strict=True):
        scale = float(q.grad.abs().max())  # gradients reach ~500 here: float32 agrees to ~1e-6 of that
        assert scale > 0, name
        torch.testing.assert_close(p.grad.double(), q.grad, rtol=0, atol=2e-5 * scale, msg=name)
