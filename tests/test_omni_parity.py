"""OmniThinker with every reduction switched off is the stock transformers thinker.

Reference: ``Qwen2_5OmniThinkerForConditionalGeneration.forward`` (logits, loss) and its own
``get_rope_index``, on real interleaved video+audio inputs, batched with padding on either side.
"""

from __future__ import annotations

import pytest
import torch

from ep_kit.models import OmniThinker
from ep_kit.models.tiny import SampleSpec, qwen_omni_3b_config, qwen_omni_7b_config
from ep_kit.reducers import CS2
from ep_kit.rope import SyncRoPE, TMRoPE
from ep_kit.sequence import Modality


def _stock_vs_kit(model: OmniThinker, batch: dict) -> tuple[torch.Tensor, torch.Tensor, object]:
    with torch.no_grad():
        ref = model.thinker(**batch)
        out = model(batch)
    return ref, out, out.kept


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
@pytest.mark.parametrize("padding_side", ["right", "left"])
def test_reduction_off_reproduces_stock_logits(tiny_config, tiny_model, av_batch, mixed_specs, attn, padding_side):
    cfg = tiny_config(attn_implementation=attn)
    model = tiny_model(cfg).eval()
    assert model.attn_implementation == attn
    batch = av_batch(cfg, mixed_specs, padding_side=padding_side)
    ref, out, kept = _stock_vs_kit(model, batch)
    real = batch["attention_mask"].bool()
    assert int(kept.attention_mask.sum()) == int(real.sum())  # nothing dropped
    for b in range(real.shape[0]):
        n = int(real[b].sum())
        cols = kept.source_index[b, :n]
        assert torch.equal(cols, torch.nonzero(real[b]).flatten())  # right padded, original order
        torch.testing.assert_close(out.logits[b, :n], ref.logits[b, cols], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(out.loss, ref.loss, rtol=1e-5, atol=1e-6)


def test_positions_come_from_get_rope_index_and_interleave_chunks(tiny_config, av_batch):
    cfg = tiny_config()
    model = OmniThinker.from_config(cfg).eval()
    # 8 frames at 2 fps -> 4 temporal grids at t = 0, 25, 50, 75; 3 s audio -> 75 tokens.
    spec = SampleSpec(prompt_len=4, answer_len=2, frames=8, height=56, width=56, fps=2.0, audio_seconds=3.0)
    batch = av_batch(cfg, [spec, SampleSpec(prompt_len=2, frames=4, height=28, width=28, audio_seconds=1.0)])
    pos3, _ = model.thinker.model.get_rope_index(
        batch["input_ids"], None, batch["video_grid_thw"], batch["attention_mask"], True,
        batch["feature_attention_mask"].sum(-1), batch["video_second_per_grid"],
    )
    seq = model.embed(batch)
    n = int(batch["attention_mask"][0].sum())
    assert torch.equal(seq.positions[:, 0, :n], pos3[:, 0, :n])

    # Modality runs inside the media block: [V x8][A x50][V x8][A x25] (2-second chunks).
    mod = seq.modality[0, :n].tolist()
    runs: list[tuple[int, int]] = []
    for m in mod:
        if runs and runs[-1][0] == m:
            runs[-1] = (m, runs[-1][1] + 1)
        else:
            runs.append((m, 1))
    media = [r for r in runs if r[0] in (int(Modality.VIDEO), int(Modality.AUDIO))]
    assert media == [(1, 8), (2, 50), (1, 8), (2, 25)]
    # Time axis: audio = start + index, video = start + 25 * grid; chunk j holds t in [50j, 50j + 50).
    t = seq.positions[0, 0, :n]
    av = seq.av_mask[0, :n]
    start = int(t[av].min())
    audio_t = t[seq.modality[0, :n] == int(Modality.AUDIO)] - start
    video_t = t[seq.modality[0, :n] == int(Modality.VIDEO)] - start
    assert torch.equal(audio_t, torch.arange(75))
    assert torch.equal(video_t, torch.tensor([0] * 4 + [25] * 4 + [50] * 4 + [75] * 4))
    chunk_of = (t[av] - start) // 50
    assert torch.all(chunk_of[1:] >= chunk_of[:-1])  # chunks never go back in time
    # Video h/w axes follow the 2x2 merged grid; text after media continues at max + 1.
    video = seq.modality[0, :n] == int(Modality.VIDEO)
    assert torch.equal(seq.positions[1, 0, :n][video][:4] - start, torch.tensor([0, 0, 1, 1]))
    assert torch.equal(seq.positions[2, 0, :n][video][:4] - start, torch.tensor([0, 1, 0, 1]))


def test_syncrope_with_empty_low_section_is_tmrope(tiny_config, tiny_model, av_batch, av_specs):
    cfg = tiny_config()  # head_dim 16 -> 8 pairs; TMRoPE section [2, 3, 3]
    batch = av_batch(cfg, av_specs)
    base = tiny_model(cfg).eval()
    ref, _, _ = _stock_vs_kit(base, batch)
    outs = {}
    for name, rope in {
        "tm": TMRoPE([2, 3, 3]),
        "sync0": SyncRoPE([2, 3, 3, 0]),
        "sync": SyncRoPE([1, 2, 2, 3]),
    }.items():
        model = OmniThinker(base.thinker, rope=rope).eval()
        with torch.no_grad():
            outs[name] = model(batch)
    assert outs["sync0"].kept.positions.shape[0] == 4
    assert torch.equal(outs["sync0"].kept.positions[3], outs["sync0"].kept.positions[0])
    real = outs["tm"].kept.attention_mask
    torch.testing.assert_close(outs["sync0"].logits[real], outs["tm"].logits[real], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(outs["tm"].logits[real], ref.logits[batch["attention_mask"].bool()], rtol=1e-5, atol=1e-5)
    diff = (outs["sync"].logits[real] - outs["tm"].logits[real]).abs().max()
    assert diff > 1e-2


def test_syncrope_differs_with_reduction(tiny_config, tiny_model, av_batch, av_specs):
    cfg = tiny_config()
    batch = av_batch(cfg, av_specs)
    base = tiny_model(cfg).eval()
    tm = OmniThinker(base.thinker, rope=TMRoPE([2, 3, 3]), reducer=CS2(num_layers=1), keep_ratio=0.2).eval()
    sync = OmniThinker(base.thinker, rope=SyncRoPE([1, 2, 2, 3]), reducer=CS2(num_layers=1), keep_ratio=0.2).eval()
    with torch.no_grad():
        a, b = tm(batch), sync(batch)
    # Same budget; the rotary layout changes the sieve's refinement and the LLM: different losses.
    assert torch.equal(a.kept.attention_mask.sum(-1), b.kept.attention_mask.sum(-1))
    assert abs(float(a.loss) - float(b.loss)) > 1e-4


def test_clear_errors(tiny_config, tmp_path):
    cfg = tiny_config()
    thinker = OmniThinker.from_config(cfg).thinker
    for bad in (0.0, -0.1, 1.5, float("nan")):
        with pytest.raises(ValueError, match="keep_ratio"):
            OmniThinker(thinker, keep_ratio=bad)
    with pytest.raises(ValueError, match="num_layers=3 exceeds the decoder depth \\(2 layers\\)"):
        OmniThinker(thinker, reducer=CS2(num_layers=3))
    with pytest.raises(ValueError, match="candidate_modalities"):
        OmniThinker(thinker, candidate_modalities=["text"])
    with pytest.raises(ValueError, match="head_dim"):
        OmniThinker(thinker, rope=TMRoPE([16, 24, 24]))
    with pytest.raises(FileNotFoundError, match="does not exist"):
        OmniThinker.from_pretrained(tmp_path / "missing")
    with pytest.raises(FileNotFoundError, match="no config.json"):
        OmniThinker.from_pretrained(tmp_path)
    (tmp_path / "config.json").write_text('{"model_type": "llama"}')
    with pytest.raises(ValueError, match="model_type 'llama' is not a Qwen2.5-Omni checkpoint"):
        OmniThinker.from_pretrained(tmp_path)


def test_encoders_frozen_by_default(tiny_config):
    model = OmniThinker.from_config(tiny_config())
    assert not any(p.requires_grad for p in model.thinker.model.audio_tower.parameters())
    assert not any(p.requires_grad for p in model.thinker.model.visual.parameters())
    assert all(p.requires_grad for p in model.decoder_layers.parameters())
    model.set_llm_trainable(False)
    assert not any(p.requires_grad for p in model.decoder_layers.parameters())
    assert not model.lm_head.weight.requires_grad


def test_released_architecture_configs():
    c3, c7 = qwen_omni_3b_config(), qwen_omni_7b_config()
    t3, t7 = c3.text_config, c7.text_config
    assert (t3.num_hidden_layers, t3.hidden_size, t3.num_attention_heads, t3.num_key_value_heads) == (36, 2048, 16, 2)
    assert (t3.intermediate_size, t3.vocab_size, t3.head_dim) == (11008, 151936, 128)
    assert (t7.num_hidden_layers, t7.hidden_size, t7.num_attention_heads, t7.num_key_value_heads) == (28, 3584, 28, 4)
    assert (t7.intermediate_size, t7.vocab_size) == (18944, 152064)
    for c, t in ((c3, t3), (c7, t7)):
        assert c.vision_config.out_hidden_size == t.hidden_size == c.audio_config.output_dim
        assert (c.vision_config.depth, c.vision_config.hidden_size, c.vision_config.num_heads) == (32, 1280, 16)
        assert list(c.vision_config.fullatt_block_indexes) == [7, 15, 23, 31]
        assert (c.audio_config.d_model, c.audio_config.encoder_layers, c.audio_config.encoder_attention_heads) == (1280, 32, 20)
        assert t.rope_parameters["rope_theta"] == 1e6 and t.rope_parameters["mrope_section"] == [16, 24, 24]
        assert c.vision_start_token_id == 151652 and c.video_token_id == 151656 and c.audio_token_id == 151646


def _processor_batch(specs):
    """Run the real transformers Qwen2.5-Omni processor (offline tiny tokenizer) per clip, left-pad by hand."""
    import numpy as np

    from ep_kit.data.processor import build_processor

    proc = build_processor("tiny", audio_chunk_seconds=2, min_pixels=28 * 28, max_pixels=56 * 56)
    rng = np.random.default_rng(0)
    size = {"shortest_edge": 28 * 28, "longest_edge": 56 * 56}
    outs = []
    for prefix, (frames, h, w, seconds) in specs:
        outs.append(proc(
            text=[f"{prefix}<|vision_bos|><|VIDEO|><|vision_eos|> ok?"],
            videos=[rng.integers(0, 255, size=(frames, h, w, 3), dtype=np.uint8)],
            audio=[(rng.standard_normal(int(seconds * 16000)) * 0.1).astype(np.float32)],
            return_tensors="pt",
            videos_kwargs={"fps": 2.0, "do_sample_frames": False, "size": size},
            load_audio_from_video=True, audio_from_video_indices=[0],
            audio_kwargs={"truncation": False, "sampling_rate": 16000},
        ))
    L = max(o["input_ids"].shape[1] for o in outs)
    F = max(o["input_features"].shape[2] for o in outs)
    ids = torch.zeros(len(outs), L, dtype=torch.long)
    mask = torch.zeros(len(outs), L, dtype=torch.long)
    feats = torch.zeros(len(outs), 128, F)
    fmask = torch.zeros(len(outs), F, dtype=torch.long)
    for b, o in enumerate(outs):
        n, f = o["input_ids"].shape[1], o["input_features"].shape[2]
        ids[b, L - n :], mask[b, L - n :] = o["input_ids"][0], o["attention_mask"][0]
        feats[b, :, :f], fmask[b, :f] = o["input_features"][0], o["feature_attention_mask"][0]
    return {
        "input_ids": ids, "attention_mask": mask, "input_features": feats, "feature_attention_mask": fmask,
        "pixel_values_videos": torch.cat([o["pixel_values_videos"] for o in outs]),
        "video_grid_thw": torch.cat([o["video_grid_thw"] for o in outs]),
        "video_second_per_grid": torch.cat([torch.as_tensor(o["video_second_per_grid"]) for o in outs]),
        "use_audio_in_video": True,
    }


def test_real_processor_batch_parity_and_synthetic_layout(tiny_config, tiny_model, av_batch):
    cfg = tiny_config()
    specs = [("hello ", (8, 56, 56, 3.0)), ("hi ", (4, 28, 56, 1.0))]
    batch = _processor_batch(specs)
    assert bool((batch["attention_mask"][:, 0] == 0).any())  # left padded
    model = tiny_model(cfg).eval()
    ref, out, kept = _stock_vs_kit(model, batch)
    real = batch["attention_mask"].bool()
    for b in range(2):
        n = int(real[b].sum())
        torch.testing.assert_close(out.logits[b, :n], ref.logits[b, kept.source_index[b, :n]], rtol=1e-5, atol=1e-5)
    # make_av_batch places the same placeholders in the same order as the processor.
    synth = av_batch(cfg, [
        SampleSpec(prompt_len=0, answer_len=0, suffix_len=0, frames=8, height=56, width=56, audio_seconds=3.0),
        SampleSpec(prompt_len=0, answer_len=0, suffix_len=0, frames=4, height=28, width=56, audio_seconds=1.0),
    ])
    media_ids = {cfg.video_token_id, cfg.audio_token_id, cfg.audio_start_token_id, cfg.audio_end_token_id,
                 cfg.vision_start_token_id, cfg.vision_end_token_id}
    for b in range(2):
        proc_media = [t for t in batch["input_ids"][b][real[b]].tolist() if t in media_ids]
        synth_media = [t for t in synth["input_ids"][b][synth["attention_mask"][b].bool()].tolist() if t in media_ids]
        assert proc_media == synth_media
    assert torch.equal(synth["video_grid_thw"], batch["video_grid_thw"])
    assert torch.equal(synth["feature_attention_mask"].sum(-1), batch["feature_attention_mask"].sum(-1))
    assert synth["pixel_values_videos"].shape == batch["pixel_values_videos"].shape
