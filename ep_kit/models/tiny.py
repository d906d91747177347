"""Thinker configurations built from the real transformers config classes, every size explicit.

Why every size is spelled out: the transformers defaults are the 7B's (and the vision encoder's
default ``hidden_size`` is not the one the released checkpoints use), so a config that relies on
defaults silently builds a different model. ``vision_start_token_id`` is not a declared config
field but ``get_rope_index`` reads it, so it is always set here.

* :func:`tiny_thinker_config` -- random-weight thinkers small enough for CPU tests.
* :func:`qwen_omni_3b_config` / :func:`qwen_omni_7b_config` -- the released architectures (random
  weights) for the efficiency benchmark.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal

import torch
from transformers import (
    Qwen2_5OmniAudioEncoderConfig,
    Qwen2_5OmniTextConfig,
    Qwen2_5OmniThinkerConfig,
    Qwen2_5OmniVisionEncoderConfig,
)

from ep_kit.tokens import (
    CONFIG_TOKEN_FIELDS,
    QWEN_OMNI_SPECIAL_TOKENS,
    TINY_SPECIAL_TOKENS,
    TINY_VOCAB_SIZE,
    audio_tokens_from_mel,
)

QWEN_VOCAB_3B = 151936
QWEN_VOCAB_7B = 152064


def _token_ids(vocab: Literal["tiny", "qwen"]) -> dict[str, int]:
    if vocab == "tiny":
        table = TINY_SPECIAL_TOKENS
    elif vocab == "qwen":
        table = QWEN_OMNI_SPECIAL_TOKENS
    else:
        raise ValueError(f"vocab must be 'tiny' or 'qwen', got {vocab!r}")
    return {field: table[token] for field, token in CONFIG_TOKEN_FIELDS.items()}


def _default_mrope_section(head_dim: int) -> list[int]:
    """Split ``head_dim / 2`` pairs in the released 16:24:24 proportion (t gets the remainder)."""
    if head_dim % 2:
        raise ValueError(f"head_dim must be even, got {head_dim}")
    pairs = head_dim // 2
    h = w = (pairs * 24) // 64
    return [pairs - h - w, h, w]


def build_thinker_config(
    *,
    vocab: Literal["tiny", "qwen"],
    vocab_size: int,
    hidden_size: int,
    num_layers: int,
    num_heads: int,
    num_kv_heads: int,
    head_dim: int,
    intermediate_size: int,
    mrope_section: list[int],
    vision_depth: int,
    vision_hidden_size: int,
    vision_heads: int,
    vision_intermediate_size: int,
    vision_window_size: int,
    vision_fullatt_block_indexes: list[int],
    audio_d_model: int,
    audio_layers: int,
    audio_heads: int,
    audio_ffn_dim: int,
    audio_n_window: int,
    audio_max_source_positions: int,
    rope_theta: float = 1_000_000.0,
    max_position_embeddings: int = 32768,
    rms_norm_eps: float = 1e-6,
    attn_implementation: str = "sdpa",
) -> Qwen2_5OmniThinkerConfig:
    """Assemble a thinker config from explicit sizes (no transformers defaults for any size)."""
    if sum(mrope_section) * 2 != head_dim:
        raise ValueError(f"mrope_section {mrope_section} must sum to head_dim/2 = {head_dim // 2}")
    ids = _token_ids(vocab)
    text = Qwen2_5OmniTextConfig(
        vocab_size=vocab_size,
        hidden_size=hidden_size,
        intermediate_size=intermediate_size,
        num_hidden_layers=num_layers,
        num_attention_heads=num_heads,
        num_key_value_heads=num_kv_heads,
        hidden_act="silu",
        max_position_embeddings=max_position_embeddings,
        rms_norm_eps=rms_norm_eps,
        rope_parameters={"rope_type": "default", "rope_theta": rope_theta, "mrope_section": list(mrope_section)},
        use_sliding_window=False,
        attention_dropout=0.0,
        tie_word_embeddings=False,
        pad_token_id=None,
    )
    # head_dim is not a declared field of the text config; the attention reads it with getattr.
    text.head_dim = head_dim
    vision = Qwen2_5OmniVisionEncoderConfig(
        depth=vision_depth,
        hidden_size=vision_hidden_size,
        hidden_act="silu",
        intermediate_size=vision_intermediate_size,
        num_heads=vision_heads,
        in_channels=3,
        patch_size=14,
        spatial_merge_size=2,
        temporal_patch_size=2,
        window_size=vision_window_size,
        out_hidden_size=hidden_size,
        fullatt_block_indexes=list(vision_fullatt_block_indexes),
    )
    audio = Qwen2_5OmniAudioEncoderConfig(
        num_mel_bins=128,
        encoder_layers=audio_layers,
        encoder_attention_heads=audio_heads,
        encoder_ffn_dim=audio_ffn_dim,
        d_model=audio_d_model,
        max_source_positions=audio_max_source_positions,
        n_window=audio_n_window,
        output_dim=hidden_size,
    )
    config = Qwen2_5OmniThinkerConfig(
        audio_config=audio,
        vision_config=vision,
        text_config=text,
        audio_token_index=ids["audio_token_id"],
        image_token_index=ids["image_token_id"],
        video_token_index=ids["video_token_id"],
        audio_start_token_id=ids["audio_start_token_id"],
        audio_end_token_id=ids["audio_end_token_id"],
        position_id_per_seconds=25,
        seconds_per_chunk=2,
        tie_word_embeddings=False,
    )
    # Not declared fields, but read by get_rope_index / processors: always set them.
    config.vision_start_token_id = ids["vision_start_token_id"]
    config.vision_end_token_id = ids["vision_end_token_id"]
    config._attn_implementation = attn_implementation
    return config


def tiny_thinker_config(
    vocab: Literal["tiny", "qwen"] = "tiny",
    hidden_size: int = 64,
    num_layers: int = 4,
    num_heads: int = 4,
    num_kv_heads: int = 2,
    head_dim: int | None = None,
    intermediate_size: int | None = None,
    mrope_section: list[int] | None = None,
    vision_depth: int = 2,
    vision_hidden_size: int = 32,
    vision_heads: int = 2,
    audio_layers: int = 2,
    audio_d_model: int = 32,
    audio_heads: int = 2,
    attn_implementation: str = "sdpa",
    rope_theta: float = 1_000_000.0,
) -> Qwen2_5OmniThinkerConfig:
    """A random-weight thinker for tests: real classes, real token layout, tiny sizes.

    ``head_dim`` defaults to ``hidden_size // num_heads`` (16 for the defaults) and
    ``mrope_section`` to the released 16:24:24 proportion of ``head_dim / 2`` pairs
    (``[2, 3, 3]`` for head_dim 16). ``vocab="tiny"`` uses the kit's 272-token byte vocabulary,
    ``"qwen"`` the released special-token ids (vocab 151936, large embedding tables).
    """
    head_dim = head_dim or hidden_size // num_heads
    return build_thinker_config(
        vocab=vocab,
        vocab_size=TINY_VOCAB_SIZE if vocab == "tiny" else QWEN_VOCAB_3B,
        hidden_size=hidden_size,
        num_layers=num_layers,
        num_heads=num_heads,
        num_kv_heads=num_kv_heads,
        head_dim=head_dim,
        intermediate_size=intermediate_size or 2 * hidden_size,
        mrope_section=list(mrope_section) if mrope_section is not None else _default_mrope_section(head_dim),
        vision_depth=vision_depth,
        vision_hidden_size=vision_hidden_size,
        vision_heads=vision_heads,
        vision_intermediate_size=2 * vision_hidden_size,
        vision_window_size=112,
        vision_fullatt_block_indexes=[vision_depth - 1],
        audio_d_model=audio_d_model,
        audio_layers=audio_layers,
        audio_heads=audio_heads,
        audio_ffn_dim=2 * audio_d_model,
        audio_n_window=100,
        audio_max_source_positions=1500,
        attn_implementation=attn_implementation,
        rope_theta=rope_theta,
    )


def _released(hidden: int, layers: int, heads: int, kv: int, inter: int, vocab_size: int, attn: str):
    return build_thinker_config(
        vocab="qwen",
        vocab_size=vocab_size,
        hidden_size=hidden,
        num_layers=layers,
        num_heads=heads,
        num_kv_heads=kv,
        head_dim=128,
        intermediate_size=inter,
        mrope_section=[16, 24, 24],
        vision_depth=32,
        vision_hidden_size=1280,
        vision_heads=16,
        vision_intermediate_size=3420,
        vision_window_size=112,
        vision_fullatt_block_indexes=[7, 15, 23, 31],
        audio_d_model=1280,
        audio_layers=32,
        audio_heads=20,
        audio_ffn_dim=5120,
        audio_n_window=100,
        audio_max_source_positions=1500,
        attn_implementation=attn,
    )


def qwen_omni_3b_config(attn_implementation: str = "sdpa") -> Qwen2_5OmniThinkerConfig:
    """The Qwen2.5-Omni-3B thinker architecture (36 layers, hidden 2048, 16/2 heads, head_dim 128)."""
    return _released(2048, 36, 16, 2, 11008, QWEN_VOCAB_3B, attn_implementation)


def qwen_omni_7b_config(attn_implementation: str = "sdpa") -> Qwen2_5OmniThinkerConfig:
    """The Qwen2.5-Omni-7B thinker architecture (28 layers, hidden 3584, 28/4 heads, head_dim 128)."""
    return _released(3584, 28, 28, 4, 18944, QWEN_VOCAB_7B, attn_implementation)


# --------------------------------------------------------------------------- synthetic batches
@dataclass
class SampleSpec:
    """One synthetic sample: prompt text, optional video (+ its audio, interleaved), answer text.

    ``frames`` at ``fps`` with ``height`` x ``width`` pixels (multiples of 28) give
    ``frames/2 * (height/28) * (width/28)`` video tokens; ``audio_seconds`` of 100 Hz mel frames give
    25 tokens per second. With both, the layout is the processor's ``use_audio_in_video`` one:
    ``<vision_bos><audio_bos>`` + per 2-second chunk [video tokens, audio tokens] + ``<audio_eos><vision_eos>``.
    Set ``frames=0`` and ``audio_seconds=0`` for a text-only sample.
    """

    prompt_len: int = 6
    answer_len: int = 3
    frames: int = 4
    height: int = 56
    width: int = 56
    fps: float = 2.0
    audio_seconds: float = 2.0
    suffix_len: int = 2


def _chunks(t_values: list[float], tokens_per_chunk: int) -> list[tuple[int, int]]:
    """Chunk boundaries exactly as transformers' processor/get_rope_index split them (value ranges)."""
    out, start, current = [], 0, 1
    for i, t in enumerate(t_values):
        if t >= current * tokens_per_chunk:
            out.append((start, i))
            start, current = i, current + 1
    out.append((start, len(t_values)))
    return out


def make_av_batch(
    config: Qwen2_5OmniThinkerConfig,
    samples: Sequence[SampleSpec] | None = None,
    padding_side: Literal["left", "right"] = "right",
    seed: int = 0,
    with_labels: bool = True,
) -> dict[str, Any]:
    """A processor-shaped batch (same keys, dtypes, token layout) with random pixels and mel features.

    The placeholder layout follows the Qwen2.5-Omni processor with ``use_audio_in_video=True``
    (chunked interleaving by 2-second windows at 25 positions per second), so transformers'
    ``get_rope_index`` assigns real TMRoPE positions. Text tokens are random byte ids (< 256);
    ``labels`` are -100 except on the answer tokens. Default: two A/V samples of different length.
    """
    if samples is None:
        samples = [SampleSpec(), SampleSpec(prompt_len=3, frames=6, height=28, width=56, audio_seconds=3.0)]
    gen = torch.Generator().manual_seed(seed)
    ids = {field: getattr(config, field, None) for field in CONFIG_TOKEN_FIELDS}
    ids["vision_start_token_id"] = config.vision_start_token_id
    ids["vision_end_token_id"] = getattr(config, "vision_end_token_id", None)
    if ids["vision_end_token_id"] is None:
        raise ValueError("config.vision_end_token_id must be set to build an A/V batch")
    per_second = int(config.position_id_per_seconds)
    per_chunk = int(per_second * config.seconds_per_chunk)
    patch, tps, merge = 14, 2, 2

    def text(n: int) -> list[int]:
        return torch.randint(0, 256, (n,), generator=gen).tolist()

    rows, label_rows, pixels, grids, spg, feats, feat_lens = [], [], [], [], [], [], []
    for s in samples:
        has_video, has_audio = s.frames > 0, s.audio_seconds > 0
        if has_video and (s.frames % tps or s.height % (patch * merge) or s.width % (patch * merge)):
            raise ValueError(f"frames must be even and height/width multiples of 28, got {s}")
        row = text(s.prompt_len)
        if has_video or has_audio:
            mel = int(round(s.audio_seconds * 100)) if has_audio else 0
            n_audio = audio_tokens_from_mel(mel) if has_audio else 0
            if has_video:
                gt, gh, gw = s.frames // tps, s.height // patch, s.width // patch
                per_grid = (gh // merge) * (gw // merge)
                second_per_grid = tps / s.fps
                t_video = [g * second_per_grid * per_second for g in range(gt) for _ in range(per_grid)]
                pixels.append(torch.randn(gt * gh * gw, 3 * tps * patch * patch, generator=gen))
                grids.append([gt, gh, gw])
                spg.append(second_per_grid)
            if has_audio:
                feats.append(torch.randn(128, mel, generator=gen))
                feat_lens.append(mel)
            if has_video and has_audio:
                v_chunks, a_chunks = _chunks(t_video, per_chunk), _chunks(list(range(n_audio)), per_chunk)
                row += [ids["vision_start_token_id"], ids["audio_start_token_id"]]
                for j in range(max(len(v_chunks), len(a_chunks))):
                    if j < len(v_chunks):
                        row += [ids["video_token_id"]] * (v_chunks[j][1] - v_chunks[j][0])
                    if j < len(a_chunks):
                        row += [ids["audio_token_id"]] * (a_chunks[j][1] - a_chunks[j][0])
                row += [ids["audio_end_token_id"], ids["vision_end_token_id"]]
            elif has_video:
                row += [ids["vision_start_token_id"]] + [ids["video_token_id"]] * len(t_video)
                row += [ids["vision_end_token_id"]]
            else:
                row += [ids["audio_start_token_id"]] + [ids["audio_token_id"]] * n_audio + [ids["audio_end_token_id"]]
        row += text(s.suffix_len)
        answer = text(s.answer_len)
        label_rows.append([-100] * len(row) + answer)
        rows.append(row + answer)

    L = max(len(r) for r in rows)
    pad = config.text_config.pad_token_id if config.text_config.pad_token_id is not None else 0
    input_ids = torch.full((len(rows), L), pad, dtype=torch.long)
    attention_mask = torch.zeros((len(rows), L), dtype=torch.long)
    labels = torch.full((len(rows), L), -100, dtype=torch.long)
    for b, (row, lab) in enumerate(zip(rows, label_rows, strict=True)):
        sl = slice(0, len(row)) if padding_side == "right" else slice(L - len(row), L)
        input_ids[b, sl] = torch.tensor(row)
        attention_mask[b, sl] = 1
        labels[b, sl] = torch.tensor(lab)
    batch: dict[str, Any] = {"input_ids": input_ids, "attention_mask": attention_mask, "use_audio_in_video": True}
    if pixels:
        batch["pixel_values_videos"] = torch.cat(pixels)
        batch["video_grid_thw"] = torch.tensor(grids, dtype=torch.long)
        batch["video_second_per_grid"] = torch.tensor(spg, dtype=torch.float)
    if feats:
        max_len = max(feat_lens)
        batch["input_features"] = torch.stack([torch.nn.functional.pad(f, (0, max_len - f.shape[1])) for f in feats])
        fam = torch.zeros(len(feats), max_len, dtype=torch.long)
        for i, n in enumerate(feat_lens):
            fam[i, :n] = 1
        batch["feature_attention_mask"] = fam
    if with_labels:
        batch["labels"] = labels
    return batch
