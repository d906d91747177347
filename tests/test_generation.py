"""Reduced prefill + KV-cached decoding.

References: transformers' own ``thinker.generate`` run one sample at a time (no reduction), and an
independent greedy loop that recomputes the whole reduced sequence without a cache at every step.
"""

from __future__ import annotations

import pytest
import torch
from _decode import append_token, row_of

from ep_kit.models import OmniThinker
from ep_kit.reducers import CS2, TokenReducer


def _single(batch: dict, b: int) -> dict:
    """Sample ``b`` of a batch alone, unpadded, with its own media tensors."""
    real = batch["attention_mask"][b].bool()
    grids = batch["video_grid_thw"]
    out = {
        "input_ids": batch["input_ids"][b : b + 1, real],
        "attention_mask": batch["attention_mask"][b : b + 1, real],
        "video_grid_thw": grids[b : b + 1],
        "video_second_per_grid": batch["video_second_per_grid"][b : b + 1],
        "pixel_values_videos": torch.split(batch["pixel_values_videos"], grids.prod(-1).tolist())[b],
        "input_features": batch["input_features"][b : b + 1],
        "feature_attention_mask": batch["feature_attention_mask"][b : b + 1],
        "use_audio_in_video": True,
    }
    return out


@pytest.mark.parametrize("padding_side", ["right", "left"])
def test_unreduced_generate_matches_transformers_generate(tiny_model, tiny_config, av_batch, av_specs, padding_side):
    cfg = tiny_config()
    model = tiny_model(cfg).eval()
    batch = av_batch(cfg, av_specs, padding_side=padding_side, with_labels=False)
    ours = model.generate(batch, max_new_tokens=6)
    for b in range(2):
        single = _single(batch, b)
        with torch.no_grad():
            ref = model.thinker.generate(**single, max_new_tokens=6, do_sample=False, eos_token_id=None, pad_token_id=0)
        assert ours[b].tolist() == ref[0, single["input_ids"].shape[1] :].tolist()


def _reference_greedy(model: OmniThinker, batch: dict, steps: int, run) -> list[list[int]]:
    """Greedy decoding that recomputes the whole (reduced) sequence from scratch at every step."""
    with torch.no_grad():
        full = model.embed(batch)
        seq = model.reduce_before_llm(full, model.context(full, batch))
        outs = []
        for b in range(full.batch_size):
            n_full = int(full.attention_mask[b].sum())
            next_pos = int(full.positions[:, b, :n_full].max()) + 1
            cur, toks = row_of(seq, b), []
            for step in range(steps):
                hidden = run(cur)
                token = model.lm_head(model.final_norm(hidden[:, -1])).argmax(-1)
                toks.append(int(token))
                cur = append_token(model, cur, token, next_pos + step)
            outs.append(toks)
    return outs


@pytest.mark.parametrize("padding_side", ["right", "left"])
def test_reduced_generate_matches_uncached_recompute(tiny_model, tiny_config, av_batch, mixed_specs, padding_side):
    cfg = tiny_config()
    model = tiny_model(cfg, reducer=CS2(num_layers=2), keep_ratio=0.3).eval()
    batch = av_batch(cfg, mixed_specs, padding_side=padding_side, with_labels=False)
    ours = model.generate(batch, max_new_tokens=6)
    kept = model(batch).kept.attention_mask.sum(-1)
    assert len(set(kept.tolist())) == 3  # three different kept lengths in one batch
    ref = _reference_greedy(model, batch, 6, lambda s: model.run_layers(s).hidden)
    assert ours.tolist() == ref


class _DropEveryOtherAV(TokenReducer):
    """Test reducer: before layer 1 drop every second A/V token (text, incl. generated, always kept)."""

    drop_before_layers = (1,)

    def in_llm(self, seq, layer_idx, ctx):
        av = seq.av_mask
        rank = torch.cumsum(av.long(), -1)
        return seq.keep(~av | (rank % 2 == 1))


def test_in_llm_drop_generate_matches_uncached_recompute(tiny_model, tiny_config, av_batch, av_specs):
    cfg = tiny_config(num_layers=3)
    model = tiny_model(cfg, reducer=_DropEveryOtherAV()).eval()
    batch = av_batch(cfg, av_specs, with_labels=False)
    ours = model.generate(batch, max_new_tokens=5)

    def run(seq):
        seq = model.run_layers(seq, 0, 1)
        seq = model.reducer.in_llm(seq, 1, None)
        return model.run_layers(seq, 1).hidden

    assert ours.tolist() == _reference_greedy(model, batch, 5, run)
    with torch.no_grad():
        out = model(batch)
    assert torch.equal(out.stats["kept_candidates"], (out.stats["n_candidates"] + 1) // 2)
    assert 0.5 < out.stats["layer_avg_keep_ratio"] < 1.0


def test_eos_stops_and_pads(tiny_model, tiny_config, av_batch, av_specs):
    cfg = tiny_config()
    model = tiny_model(cfg, reducer=CS2(num_layers=1), keep_ratio=0.2).eval()
    batch = av_batch(cfg, av_specs, with_labels=False)
    free = model.generate(batch, max_new_tokens=5)
    eos = int(free[0, 1])
    stopped = model.generate(batch, max_new_tokens=5, eos_token_id=eos, pad_token_id=271)
    row0 = stopped[0].tolist()
    assert row0[:2] == free[0, :2].tolist() and all(t == 271 for t in row0[2:])
    first_eos = [i for i, t in enumerate(free[1].tolist()) if t == eos]
    cut = first_eos[0] + 1 if first_eos else 5
    assert stopped[1, :cut].tolist() == free[1, :cut].tolist()
    with pytest.raises(ValueError, match="max_new_tokens"):
        model.generate(batch, max_new_tokens=0)
