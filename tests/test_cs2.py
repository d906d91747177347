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
        assert p.grad is not None and float(p.grad.abs().sum()) > 0, name
    for p in [*model.thinker.model.audio_tower.parameters(), *model.thinker.model.visual.parameters()]:
        assert p.grad is None
    assert model.decoder_layers[0].self_attn.q_proj.weight.grad is not None


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
