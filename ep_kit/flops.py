"""FLOP and byte model of a Qwen2.5-Omni thinker prefill, computed from its config.

Why: a measured speed-up means little without the speed-up the arithmetic allows. This module
turns a ``Qwen2_5OmniThinkerConfig`` and a clip length into token counts, matmul FLOPs per stage
(vision encoder, audio encoder, sieve, decoder, lm_head) and bytes (weights, KV cache, transient
activations), so the efficiency benchmark can print each configuration's *FLOP-ideal* speed-up next
to the measured one.

Counting conventions (the same everywhere, so ratios are exact):

* FLOPs = 2 x multiply-adds of matrix products and convolutions (what
  ``torch.utils.flop_counter.FlopCounterMode`` counts). Biases, norms, activations, rotary, softmax
  and the Top-K are elementwise / O(n log n) and are left out.
* Attention = ``QK^T`` + ``PV`` = ``4 * heads * head_dim`` FLOPs per (query, key) pair. Causal
  attention counts the ``n (n + 1) / 2`` pairs an ideal kernel visits; bidirectional (the sieve, the
  encoders' windows) counts ``n^2`` per attention block.
* lm_head: ``logits="last"`` (default) = the prefill of generation (one row of logits);
  ``logits="all"`` = a training-style forward (logits at every token).

Token counts follow Qwen2.5-Omni's preprocessing (see :func:`token_counts`): one LLM video token per
28 x 28 pixels per 2 frames, 25 LLM audio tokens per second (100 mel frames/s, two stride-2
stages), and the four ``<vision_bos><audio_bos> ... <audio_eos><vision_eos>`` markers of
``use_audio_in_video`` counted as text.

Methods are reducers (:class:`ep_kit.reducers.base.TokenReducer`, e.g. the one a recipe builds:
:func:`ep_kit.recipes.method_from_recipe`); each declares its own per-layer token schedule
(:meth:`~ep_kit.reducers.base.TokenReducer.token_schedule`: A/V candidates per decoder layer,
sieve layers, scorer), so the FLOPs here are those of exactly the configuration that runs.
``reducer=None`` is the full model.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any, Literal

from ep_kit.budget import check_ratio

if TYPE_CHECKING:
    from ep_kit.reducers.base import TokenReducer, TokenSchedule

PATCH = 14
TEMPORAL_PATCH = 2
MERGE = 2
FACTOR = PATCH * MERGE  # 28 pixels per LLM token side
MEL_PER_SECOND = 100
MEL_BINS = 128
AV_MARKERS = 4  # <vision_bos><audio_bos> ... <audio_eos><vision_eos>


# ------------------------------------------------------------------------------------------ tokens
def smart_resize(height: int, width: int, max_pixels: int, min_pixels: int = 4 * FACTOR * FACTOR) -> tuple[int, int]:
    """Frame size the Qwen2-VL/2.5-Omni processors resize to: multiples of 28, area within the limits.

    Same rule as the processors: round each side to a multiple of 28; if the area exceeds
    ``max_pixels`` scale both sides down by ``sqrt(area / max_pixels)`` and floor to multiples of
    28; if below ``min_pixels`` scale up and ceil.
    """
    if height <= 0 or width <= 0:
        raise ValueError(f"frame size must be positive, got height={height} width={width}")
    if max_pixels < FACTOR * FACTOR:
        raise ValueError(f"max_pixels must be at least {FACTOR * FACTOR}, got {max_pixels}")
    h = max(FACTOR, round(height / FACTOR) * FACTOR)
    w = max(FACTOR, round(width / FACTOR) * FACTOR)
    if h * w > max_pixels:
        beta = math.sqrt(height * width / max_pixels)
        h = max(FACTOR, math.floor(height / beta / FACTOR) * FACTOR)
        w = max(FACTOR, math.floor(width / beta / FACTOR) * FACTOR)
    elif h * w < min_pixels:
        beta = math.sqrt(min_pixels / (height * width))
        h = math.ceil(height * beta / FACTOR) * FACTOR
        w = math.ceil(width * beta / FACTOR) * FACTOR
    return h, w


def audio_tokens_for_mel(mel_frames: int) -> int:
    """LLM audio tokens for ``mel_frames`` (the audio encoder's stride-2 conv, then stride-2 pooling)."""
    if mel_frames <= 0:
        return 0
    after_conv = (mel_frames - 1) // 2 + 1
    return (after_conv - 2) // 2 + 1


def token_counts(
    seconds: float,
    fps: float = 2.0,
    max_pixels: int = 105_000,
    audio_tokens_per_second: int = 25,
    prompt_tokens: int = 128,
    source_height: int = 1080,
    source_width: int = 1920,
    height: int | None = None,
    width: int | None = None,
    with_audio: bool = True,
) -> dict[str, Any]:
    """Token counts of a clip as the Qwen2.5-Omni processor builds it (``use_audio_in_video=True``).

    Frame size: ``height``/``width`` when both are given (multiples of 28), otherwise the
    processor's :func:`smart_resize` of a ``source_height x source_width`` video (default 16:9
    1080p) to at most ``max_pixels`` per frame: 1080p at 105k pixels -> 224 x 420 (94,080 pixels,
    8 x 15 = 120 tokens per 2 frames). Frames: ``round(seconds * fps)`` rounded to an even number
    (the temporal patch is 2 frames). Audio: ``4 * audio_tokens_per_second`` mel frames per second
    (25 tokens/s -> 100 mel frames/s), through the encoder's two stride-2 stages.
    ``prompt_tokens`` covers system prompt, question and chat template (default 128: the released
    system prompt is about 40 tokens, a multiple-choice question with options about 80); the four
    A/V marker tokens are added to it.

    Returns a dict with ``video``, ``audio``, ``text``, ``total`` (LLM tokens) and the geometry
    (``frames``, ``height``, ``width``, ``grid_thw``, ``patches``, ``mel_frames``).
    """
    if seconds <= 0:
        raise ValueError(f"seconds must be > 0, got {seconds}")
    if fps <= 0:
        raise ValueError(f"fps must be > 0, got {fps}")
    if prompt_tokens < 0:
        raise ValueError(f"prompt_tokens must be >= 0, got {prompt_tokens}")
    if (height is None) != (width is None):
        raise ValueError("give both height and width, or neither")
    if height is not None and width is not None:
        if height % FACTOR or width % FACTOR or height <= 0 or width <= 0:
            raise ValueError(f"height/width must be positive multiples of {FACTOR}, got {height}x{width}")
        h, w = height, width
    else:
        h, w = smart_resize(source_height, source_width, max_pixels)
    frames = max(TEMPORAL_PATCH, TEMPORAL_PATCH * round(seconds * fps / TEMPORAL_PATCH))
    grid = (frames // TEMPORAL_PATCH, h // PATCH, w // PATCH)
    video = grid[0] * (grid[1] // MERGE) * (grid[2] // MERGE)
    mel = int(round(seconds * 4 * audio_tokens_per_second)) if with_audio else 0
    audio = audio_tokens_for_mel(mel)
    text = prompt_tokens + (AV_MARKERS if with_audio else 2)
    return {
        "video": video,
        "audio": audio,
        "text": text,
        "total": video + audio + text,
        "seconds": float(seconds),
        "frames": frames,
        "height": h,
        "width": w,
        "grid_thw": grid,
        "patches": grid[0] * grid[1] * grid[2],
        "mel_frames": mel,
    }


# --------------------------------------------------------------------------------------- decoder
def _text(config: Any) -> Any:
    return getattr(config, "text_config", config)


def _head_dim(text: Any) -> int:
    return int(getattr(text, "head_dim", None) or text.hidden_size // text.num_attention_heads)


def attention_pairs(n: int, causal: bool) -> int:
    """(query, key) pairs one attention block visits: ``n (n + 1) / 2`` causal, ``n^2`` bidirectional."""
    return n * (n + 1) // 2 if causal else n * n


def decoder_layer_flops(config: Any, n_tokens: int, causal: bool = True) -> dict[str, int]:
    """FLOPs of one Qwen2 decoder layer over ``n_tokens`` (GQA projections, SDPA term, SwiGLU MLP)."""
    t = _text(config)
    D, H, KV, hd, inter = t.hidden_size, t.num_attention_heads, t.num_key_value_heads, _head_dim(t), t.intermediate_size
    n = int(n_tokens)
    proj = 2 * n * (D * H * hd + 2 * D * KV * hd + H * hd * D)
    sdpa = 4 * H * hd * attention_pairs(n, causal)
    mlp = 2 * n * 3 * D * inter
    return {"proj": proj, "sdpa": sdpa, "mlp": mlp, "total": proj + sdpa + mlp}


def lm_head_flops(config: Any, n_tokens: int, logits: Literal["last", "all"] = "last") -> int:
    """lm_head FLOPs: one row for ``"last"`` (generation prefill), every token for ``"all"``."""
    if logits not in ("last", "all"):
        raise ValueError(f"logits must be 'last' or 'all', got {logits!r}")
    t = _text(config)
    rows = (1 if n_tokens > 0 else 0) if logits == "last" else int(n_tokens)
    return 2 * rows * t.hidden_size * t.vocab_size


def llm_flops(config: Any, tokens_per_layer: Sequence[int], logits: Literal["last", "all"] = "last") -> int:
    """Causal decoder over a per-layer token schedule (``len == num_layers``) plus the lm_head."""
    t = _text(config)
    if len(tokens_per_layer) != t.num_hidden_layers:
        raise ValueError(
            f"tokens_per_layer has {len(tokens_per_layer)} entries, the decoder has {t.num_hidden_layers} layers"
        )
    layers = sum(decoder_layer_flops(config, n, causal=True)["total"] for n in tokens_per_layer)
    return layers + lm_head_flops(config, tokens_per_layer[-1], logits)


def sieve_flops(config: Any, n_tokens: int, sieve_layers: int, scorer_on_all_tokens: bool = True) -> int:
    """CS2: ``sieve_layers`` bidirectional decoder layers over the full sequence + the MLP scorer.

    The scorer (a ``D x D`` layer and a ``D x 1`` head per token) is counted when
    ``scorer_on_all_tokens`` and the sieve runs (``sieve_layers > 0``).
    """
    if sieve_layers < 0:
        raise ValueError(f"sieve_layers must be >= 0, got {sieve_layers}")
    if sieve_layers == 0:
        return 0
    D = _text(config).hidden_size
    layers = sieve_layers * decoder_layer_flops(config, n_tokens, causal=False)["total"]
    scorer = 2 * n_tokens * (D * D + D) if scorer_on_all_tokens else 0  # on every token of the refined sequence
    return layers + scorer


# -------------------------------------------------------------------------------------- encoders
def _window_lengths(grid_h: int, grid_w: int, window_merged: int) -> list[int]:
    """Patch counts of the vision encoder's attention windows over one frame grid (edge windows partial)."""
    gh, gw = grid_h // MERGE, grid_w // MERGE
    out = []
    for i in range(0, gh, window_merged):
        for j in range(0, gw, window_merged):
            hh = min(window_merged, gh - i)
            ww = min(window_merged, gw - j)
            out.append(hh * ww * MERGE * MERGE)
    return out


def vision_flops(config: Any, grid_thw: Sequence[int]) -> int:
    """Vision ViT over one video: patch conv, blocks (window / full attention), 2x2 merger MLP."""
    v = getattr(config, "vision_config", config)
    gt, gh, gw = (int(x) for x in grid_thw)
    if gt <= 0 or gh <= 0 or gw <= 0:
        return 0
    D, inter, depth = v.hidden_size, v.intermediate_size, v.depth
    P = gt * gh * gw
    patch = 2 * P * (v.in_channels * v.temporal_patch_size * v.patch_size * v.patch_size) * D
    per_block_linear = 2 * P * (4 * D * D + 3 * D * inter)
    window_merged = v.window_size // v.spatial_merge_size // v.patch_size
    window_pairs = gt * sum(n * n for n in _window_lengths(gh, gw, window_merged))
    full_pairs = gt * (gh * gw) ** 2
    full_blocks = {i for i in v.fullatt_block_indexes if 0 <= i < depth}
    attn = 4 * D * (len(full_blocks) * full_pairs + (depth - len(full_blocks)) * window_pairs)
    unit = v.spatial_merge_size**2
    merged = P // unit
    merger = 2 * merged * ((unit * D) ** 2 + unit * D * v.out_hidden_size)
    return patch + depth * per_block_linear + attn + merger


def audio_flops(config: Any, mel_frames: int) -> int:
    """Audio encoder over one clip: convs over 2*n_window-frame chunks, blocks with chunk attention, proj."""
    a = getattr(config, "audio_config", config)
    if mel_frames <= 0:
        return 0
    D, ffn, layers, chunk = a.d_model, a.encoder_ffn_dim, a.encoder_layers, 2 * a.n_window
    n_chunks = math.ceil(mel_frames / chunk)
    lengths = [chunk] * (n_chunks - 1) + [mel_frames - chunk * (n_chunks - 1)]
    padded = n_chunks * max(lengths)  # convs run on the padded chunk batch
    conv1 = 2 * padded * (a.num_mel_bins * 3) * D
    conv2 = 2 * (n_chunks * ((max(lengths) - 1) // 2 + 1)) * (D * 3) * D
    after = [(n - 1) // 2 + 1 for n in lengths]
    T = sum(after)
    linear = 2 * T * (4 * D * D + 2 * D * ffn)
    attn = 4 * D * sum(n * n for n in after)
    proj = 2 * audio_tokens_for_mel(mel_frames) * D * a.output_dim
    return conv1 + conv2 + layers * (linear + attn) + proj


def encoder_flops(config: Any, counts: dict[str, Any]) -> dict[str, int]:
    """Vision + audio encoder FLOPs of a clip described by :func:`token_counts`."""
    vision = vision_flops(config, counts["grid_thw"]) if counts.get("video", 0) else 0
    audio = audio_flops(config, counts.get("mel_frames", 0))
    return {"vision": vision, "audio": audio, "total": vision + audio}


# ------------------------------------------------------------------------------------- schedules
def schedule_of(config: Any, counts: dict[str, Any], reducer: TokenReducer | None, keep_ratio: float = 1.0) -> TokenSchedule:
    """The reducer's own token schedule for a clip of ``counts`` (None: the full model, every candidate everywhere)."""
    from ep_kit.reducers.base import TokenSchedule

    L = _text(config).num_hidden_layers
    n_video, n_audio = int(counts["video"]), int(counts["audio"])
    r = check_ratio(keep_ratio)
    if reducer is None:
        return TokenSchedule((n_video + n_audio,) * L)
    schedule = reducer.token_schedule(n_video, n_audio, L, r)
    if len(schedule.candidates_per_layer) != L:
        raise ValueError(
            f"{type(reducer).__name__}.token_schedule gave {len(schedule.candidates_per_layer)} layers, "
            f"the decoder has {L}"
        )
    return schedule


def tokens_per_layer(
    config: Any, counts: dict[str, Any], reducer: TokenReducer | None = None, keep_ratio: float = 1.0
) -> list[int]:
    """LLM tokens each decoder layer processes under ``reducer`` at ``keep_ratio``: text (always kept)
    plus the reducer's A/V candidates of that layer (:meth:`TokenReducer.token_schedule`)."""
    return _layer_tokens(counts, schedule_of(config, counts, reducer, keep_ratio))


def _layer_tokens(counts: dict[str, Any], schedule: TokenSchedule, tokens: Sequence[int] | None = None) -> list[int]:
    """LLM tokens per decoder layer: the measured ``tokens`` when given, else text + the schedule's candidates."""
    if tokens is not None:
        return list(tokens)
    text = int(counts["text"])
    return [text + int(n) for n in schedule.candidates_per_layer]


# ------------------------------------------------------------------------------------ end to end
def prefill_flops(
    config: Any,
    counts: dict[str, Any],
    reducer: TokenReducer | None = None,
    keep_ratio: float = 1.0,
    logits: Literal["last", "all"] = "last",
    tokens: Sequence[int] | None = None,
) -> dict[str, Any]:
    """FLOPs of one clip's prefill, per stage: encoders, sieve, LLM (+ lm_head), totals.

    The per-layer tokens, the sieve depth and the scorer come from ``reducer``'s token schedule
    at ``keep_ratio`` (None: the full model). ``tokens`` overrides the per-layer LLM tokens with
    measured ones (e.g. the kept counts a reducer realised). ``llm_stage`` = sieve + decoder +
    lm_head (what runs after the media embedding); ``end_to_end`` adds the encoders.
    """
    schedule = schedule_of(config, counts, reducer, keep_ratio)
    per_layer = _layer_tokens(counts, schedule, tokens)
    enc = encoder_flops(config, counts)
    n_av = int(counts["video"]) + int(counts["audio"])
    sieve = sieve_flops(config, int(counts["total"]), schedule.sieve_layers, schedule.scorer_on_all_tokens)
    llm = llm_flops(config, per_layer, logits)
    n_cand = [n - int(counts["text"]) for n in per_layer]
    return {
        "vision": enc["vision"],
        "audio": enc["audio"],
        "encoders": enc["total"],
        "sieve": sieve,
        "llm": llm,
        "llm_stage": sieve + llm,
        "end_to_end": enc["total"] + sieve + llm,
        "tokens_per_layer": per_layer,
        "effective_keep_ratio": sum(n_cand) / (len(n_cand) * n_av) if n_av else 1.0,
    }


def ideal_speedup(
    config: Any,
    counts: dict[str, Any],
    reducer: TokenReducer | None,
    keep_ratio: float,
    logits: Literal["last", "all"] = "last",
    tokens: Sequence[int] | None = None,
) -> dict[str, float]:
    """FLOP-ideal speed-up of ``reducer`` at ``keep_ratio`` over the full model, LLM stage and end to end.

    ``llm`` = full decoder FLOPs / (sieve + reduced decoder FLOPs); ``end_to_end`` adds the (unreduced)
    encoder FLOPs to both sides. Exactly 1 for ``reducer=None`` and for any in-LLM or pre-LLM
    reducer without a sieve at ``keep_ratio=1``; CS2 at ``keep_ratio=1`` pays its sieve (< 1).
    """
    full = prefill_flops(config, counts, None, 1.0, logits)
    red = prefill_flops(config, counts, reducer, keep_ratio, logits, tokens=tokens)
    return {
        "llm": full["llm_stage"] / red["llm_stage"],
        "end_to_end": full["end_to_end"] / red["end_to_end"],
        "effective_keep_ratio": red["effective_keep_ratio"],
    }


# ------------------------------------------------------------------------------------------ bytes
def param_counts(config: Any) -> dict[str, int]:
    """Parameters of the thinker's parts, from the config (biases and norms included)."""
    t, v, a = _text(config), config.vision_config, config.audio_config
    D, H, KV, hd, inter, V = (
        t.hidden_size, t.num_attention_heads, t.num_key_value_heads, _head_dim(t), t.intermediate_size, t.vocab_size,
    )
    layer = (D * H * hd + H * hd) + 2 * (D * KV * hd + KV * hd) + H * hd * D + 3 * D * inter + 2 * D
    decoder = t.num_hidden_layers * layer + D  # + final norm
    embed = V * D
    lm_head = 0 if getattr(config, "tie_word_embeddings", False) else V * D
    Dv, Iv = v.hidden_size, v.intermediate_size
    unit = v.spatial_merge_size**2
    vblock = 2 * Dv + 4 * (Dv * Dv + Dv) + 2 * (Dv * Iv + Iv) + (Iv * Dv + Dv)
    vision = (
        v.in_channels * v.temporal_patch_size * v.patch_size**2 * Dv
        + v.depth * vblock
        + Dv
        + (unit * Dv) ** 2 + unit * Dv
        + unit * Dv * v.out_hidden_size + v.out_hidden_size
    )
    Da, F = a.d_model, a.encoder_ffn_dim
    ablock = Da * Da + 3 * (Da * Da + Da) + 2 * (2 * Da) + (Da * F + F) + (F * Da + Da)
    audio = (
        a.num_mel_bins * Da * 3 + Da
        + Da * Da * 3 + Da
        + 2 * a.output_dim
        + a.encoder_layers * ablock
        + 2 * Da
        + Da * a.output_dim + a.output_dim
    )
    return {
        "decoder_layer": layer,
        "decoder": decoder,
        "embed": embed,
        "lm_head": lm_head,
        "vision": vision,
        "audio": audio,
        "total": decoder + embed + lm_head + vision + audio,
    }


def prefill_bytes(
    config: Any,
    counts: dict[str, Any],
    reducer: TokenReducer | None = None,
    keep_ratio: float = 1.0,
    bytes_per_value: int = 2,
    logits: Literal["last", "all"] = "last",
    tokens: Sequence[int] | None = None,
) -> dict[str, int]:
    """A memory estimate of one prefill under ``reducer`` at ``keep_ratio`` (None: the full model):
    resident weights + KV cache + the largest transient activation.

    * ``weights``: every thinker parameter (+ the sieve copy and its scorer, from the reducer's
      token schedule: CS2) at ``bytes_per_value``.
    * ``kv_cache``: K and V of every decoder layer for the tokens that layer kept (what generation
      holds after the prefill).
    * ``activation``: the largest live set of one layer on the widest sequence (the sieve's full
      sequence for CS2): residual + normed input + q/k/v/attention output + the three MLP
      intermediates, plus the logits (float32 upcast) -- attention kernels that never materialise
      ``L x L`` (flash / memory-efficient SDPA) are assumed.
    * ``weights_read``: bytes of decoder and lm_head weights streamed once by the prefill (a lower
      bound on traffic; the roofline floor at low token counts).
    """
    t = _text(config)
    params = param_counts(config)
    schedule = schedule_of(config, counts, reducer, keep_ratio)
    per_layer = _layer_tokens(counts, schedule, tokens)
    scorer = t.hidden_size * t.hidden_size + 3 * t.hidden_size + 1 if schedule.scorer_on_all_tokens else 0
    sieve = schedule.sieve_layers * params["decoder_layer"] + scorer
    weights = (params["total"] + sieve) * bytes_per_value
    hd = _head_dim(t)
    kv = sum(2 * n * t.num_key_value_heads * hd for n in per_layer) * bytes_per_value
    widest = int(counts["total"]) if schedule.sieve_layers else max(per_layer)
    D, H, inter = t.hidden_size, t.num_attention_heads, t.intermediate_size
    layer_live = widest * (2 * D + H * hd + 2 * t.num_key_value_heads * hd + H * hd + 3 * inter)
    rows = 1 if logits == "last" else per_layer[-1]
    logits_bytes = rows * t.vocab_size * (bytes_per_value + 4)
    activation = layer_live * bytes_per_value + logits_bytes
    read = (params["decoder"] + params["lm_head"] + sieve) * bytes_per_value
    return {
        "weights": weights,
        "kv_cache": kv,
        "activation": activation,
        "weights_read": read,
        "total": weights + kv + activation,
    }
