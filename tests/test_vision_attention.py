"""The vision tower's window attention grouped by window length is transformers' stock attention.

Reference: transformers' ``Qwen2_5OmniVisionEncoder`` under ``sdpa`` (one SDPA call per window) and
``eager``; several videos of different sizes in one batch, so windows of several lengths, ragged
edge windows and non-contiguous groups occur.
"""

from __future__ import annotations

import copy

import pytest
import torch

from ep_kit.models import OmniThinker
from ep_kit.models import vision_attention as va
from ep_kit.models.tiny import SampleSpec, qwen_omni_3b_config

#: (t, h, w) patch grids: merged 5x9 (windows 4+1 by 4+4+1), 2x2 (one window), 4x8, 3x11.
GRIDS = [[2, 10, 18], [1, 4, 4], [3, 8, 16], [1, 6, 22]]


def _vision_config(tiny_config, depth: int = 3, full: tuple[int, ...] = (1,)):
    vision = tiny_config(vision_depth=depth).vision_config
    vision.fullatt_block_indexes = list(full)
    return vision


def _inputs(vision, grids, dtype):
    grid = torch.tensor(grids)
    n = int(grid.prod(-1).sum())
    dim = vision.in_channels * vision.temporal_patch_size * vision.patch_size**2
    return torch.randn(n, dim, dtype=dtype, generator=torch.Generator().manual_seed(1)), grid


def _encode(encoder, attn: str, pixels, grid):
    encoder.config._attn_implementation = attn
    with torch.no_grad():
        return va.encode_video(encoder, pixels, grid)


def test_grouped_equals_stock_sdpa_and_eager_in_float64(tiny_config):
    vision = _vision_config(tiny_config)
    encoder = va.random_vision_encoder(vision, dtype=torch.float64)
    pixels, grid = _inputs(vision, GRIDS, torch.float64)
    groups = va.window_groups(va.window_bounds(vision, grid)[0])
    assert len(groups) >= 4 and any(g.index is not None for g in groups)  # ragged and scattered windows
    stock = _encode(encoder, "sdpa", pixels, grid)
    eager = _encode(encoder, "eager", pixels, grid)
    grouped = _encode(encoder, va.GROUPED_VISION_ATTENTION, pixels, grid)
    assert grouped.shape == (int(grid.prod(-1).sum()) // 4, vision.out_hidden_size)
    torch.testing.assert_close(grouped, stock, rtol=0, atol=1e-12)
    # transformers' eager attention takes its softmax in float32, hence the float32-level tolerance.
    torch.testing.assert_close(grouped, eager, rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(stock, eager, rtol=1e-5, atol=1e-7)


def test_grouped_equals_stock_in_float32_and_per_video(tiny_config):
    """Batching videos together changes nothing either: each video alone gives its rows of the batch."""
    vision = _vision_config(tiny_config)
    encoder = va.random_vision_encoder(vision)
    pixels, grid = _inputs(vision, GRIDS, torch.float32)
    stock = _encode(encoder, "sdpa", pixels, grid)
    grouped = _encode(encoder, va.GROUPED_VISION_ATTENTION, pixels, grid)
    torch.testing.assert_close(grouped, stock, rtol=1e-6, atol=1e-6)
    rows = torch.split(grouped, (grid.prod(-1) // 4).tolist())
    patches = torch.split(pixels, grid.prod(-1).tolist())
    for g, x, ref in zip(grid, patches, rows, strict=True):
        torch.testing.assert_close(_encode(encoder, va.GROUPED_VISION_ATTENTION, x, g[None]), ref, rtol=1e-6, atol=1e-6)


def test_gradients_match_stock(tiny_config):
    vision = _vision_config(tiny_config)
    encoder = va.random_vision_encoder(vision, dtype=torch.float64)
    pixels, grid = _inputs(vision, GRIDS, torch.float64)
    grads = {}
    for attn in ("sdpa", va.GROUPED_VISION_ATTENTION):
        encoder.config._attn_implementation = attn
        encoder.zero_grad()
        x = pixels.clone().requires_grad_(True)
        (va.encode_video(encoder, x, grid) ** 2).sum().backward()
        grads[attn] = [x.grad] + [p.grad.clone() for p in encoder.parameters()]
    for a, b in zip(*grads.values(), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)


def test_call_count(tiny_config, monkeypatch):
    vision = _vision_config(tiny_config, depth=4, full=(1, 3))
    encoder = va.random_vision_encoder(vision)
    pixels, grid = _inputs(vision, GRIDS, torch.float32)
    calls = []
    sdpa = torch.nn.functional.scaled_dot_product_attention

    def counting(*args, **kwargs):
        calls.append(args[0].shape[0])
        return sdpa(*args, **kwargs)

    monkeypatch.setattr(torch.nn.functional, "scaled_dot_product_attention", counting)
    counts = {}
    for attn, grouped in (("sdpa", False), (va.GROUPED_VISION_ATTENTION, True)):
        calls.clear()
        _encode(encoder, attn, pixels, grid)
        counts[attn] = len(calls)
        assert counts[attn] == va.attention_calls(vision, GRIDS, grouped=grouped)
    # Stock: 2 window layers x 22 windows (2 x 6, 1, 3 x 2, 3) + 2 full layers x 7 temporal grids.
    # Grouped: 2 window layers x 5 window lengths (64, 16, 4, 48, 36) + 2 full layers x 4 frame sizes.
    assert counts["sdpa"] == 2 * (2 * 6 + 1 + 3 * 2 + 3) + 2 * 7
    assert counts[va.GROUPED_VISION_ATTENTION] == 2 * 5 + 2 * 4


def test_thirty_second_clip_count():
    """2 fps, 224 x 420 frames (the processor's size for 16:9 video): 30 grids of 2x4 windows (4x4 and 4x3)."""
    vision = qwen_omni_3b_config().vision_config
    assert va.attention_calls(vision, [(30, 16, 30)]) == 28 * 30 * 8 + 4 * 30 == 6840
    assert va.attention_calls(vision, [(30, 16, 30)], grouped=True) == 28 * 2 + 4 == 60


def test_window_groups():
    groups = va.window_groups(torch.tensor([0, 4, 8, 10, 14, 16]))
    assert [(g.length, g.count) for g in groups] == [(4, 3), (2, 2)]
    assert groups[0].index.tolist() == [0, 1, 2, 3, 4, 5, 6, 7, 10, 11, 12, 13]
    assert groups[1].index.tolist() == [8, 9, 14, 15]
    (run,) = va.window_groups([0, 3, 6, 9])
    assert (run.length, run.count, run.start, run.index) == (3, 3, 0, None)
    assert va.window_groups([0, 2, 2, 5]) == va.window_groups([0, 2, 5])  # empty windows are skipped
    q = torch.randn(1, 2, 8, 4)
    with pytest.raises(ValueError, match="cover 6 tokens"):
        va.grouped_varlen_attention(None, q, q, q, cu_seq_lens_q=torch.tensor([0, 3, 6]))
    with pytest.raises(ValueError, match="no mask"):
        va.grouped_varlen_attention(None, q, q, q, attention_mask=torch.ones(1, 1, 8, 8))


def test_thinker_logits_equal_stock_thinker(tiny_config, av_batch):
    """OmniThinker (grouped vision attention) vs an independent copy of the stock sdpa thinker."""
    cfg = tiny_config(vision_depth=2)
    stock = OmniThinker.from_config(cfg, grouped_vision_attention=False).thinker.eval()
    model = OmniThinker(copy.deepcopy(stock)).eval()
    assert va.vision_attention(model.thinker) == va.GROUPED_VISION_ATTENTION
    assert va.vision_attention(stock) == "sdpa"
    specs = [
        SampleSpec(prompt_len=5, frames=4, height=140, width=252, audio_seconds=2.0),
        SampleSpec(prompt_len=3, frames=2, height=112, width=84, audio_seconds=1.0),
    ]
    batch = av_batch(cfg, specs)
    with torch.no_grad():
        ref = stock(**batch)
        out = model(batch)
    real = batch["attention_mask"].bool()
    for b in range(real.shape[0]):
        n = int(real[b].sum())
        torch.testing.assert_close(out.logits[b, :n], ref.logits[b, out.kept.source_index[b, :n]], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(out.loss, ref.loss, rtol=1e-5, atol=1e-6)


def test_switch_leaves_eager_and_flash_alone(tiny_config):
    eager = OmniThinker.from_config(tiny_config(attn_implementation="eager"))
    assert va.vision_attention(eager.thinker) == "eager"
    model = OmniThinker.from_config(tiny_config())
    assert va.vision_attention(model.thinker) == va.GROUPED_VISION_ATTENTION
    assert model.config.vision_config._attn_implementation == va.GROUPED_VISION_ATTENTION
    assert model.config.text_config._attn_implementation == model.config.audio_config._attn_implementation == "sdpa"
    assert not va.set_grouped_vision_attention(model.thinker, False)
    assert va.vision_attention(model.thinker) == "sdpa"
    model.config.vision_config._attn_implementation = "flash_attention_2"  # the varlen flash kernel stays
    assert not va.set_grouped_vision_attention(model.thinker, True)
    assert va.vision_attention(model.thinker) == "flash_attention_2"
    assert "_attn_implementation" not in str(model.config.to_dict()["vision_config"])  # never saved
