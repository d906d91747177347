"""The Qwen2.5-Omni thinker, cut open at the token-reduction point (the one module that knows transformers).

Everything upstream of the cut runs *through* transformers: token embeddings, the audio and
vision encoders (``get_audio_features`` / ``get_video_features`` / ``get_image_features``), the
placeholder scatter (``get_placeholder_mask``) and the 3-axis TMRoPE positions of the *full*
sequence (``get_rope_index``). The merged sequence becomes a :class:`~ep_kit.sequence.TokenSequence`
and is handed to the reducer (CS2, a baseline, or none). Downstream of the cut the thinker's own
transformers decoder layers run on the kept tokens, but the loop is ours so that

* kept tokens keep their ORIGINAL positions (all axes) through the kit's rotary module, passed as
  ``position_embeddings`` -- gappy ``position_ids`` never reach the attention kernels (flash
  attention would read gaps as packed-sequence boundaries);
* in-LLM reducers (FastV, PyramidDrop) can drop tokens between layers;
* generation decodes from the KV cache of the *reduced* prefill.

With ``keep_ratio=1.0``, ``reducer=None`` and TMRoPE, :meth:`OmniThinker.forward` reproduces the stock
``Qwen2_5OmniThinkerForConditionalGeneration`` logits (tested for sdpa and eager).

One prefill path: :meth:`OmniThinker.prefill` (embed -> reduction context -> pre-LLM reduction ->
decoder with in-LLM drops, optional KV cache and timing marks) is what :meth:`~OmniThinker.forward`,
:meth:`~OmniThinker.generate`, the evaluation answers and the efficiency benchmark run. Its steps
are public for reducers' tests and notebooks: ``embed(batch)``, ``context(seq, batch)``,
``reduce_before_llm(seq, ctx)``, ``run_llm(seq, ctx, cache)``, ``run_layers(seq, start, end, cache)``.

Reducers see this class only through :class:`~ep_kit.reducers.base.ReducerHost`: ``num_layers``,
``hidden_size``, ``dtype``, ``device``, ``positions_per_second``, ``rope_embeddings(seq)``,
``copy_decoder_layers(n)``, ``run_layer_copies(layers, seq, attention)``,
``attention_row(layer, seq, query)``, ``enable_audio_salience()``, ``audio_token_salience(batch)``.

Tested transformers range: 5.24 (the layout ``thinker.model.{audio_tower, visual, language_model}``
and the ``cache=`` keyword of decoder layers).
"""

from __future__ import annotations

import contextlib
import copy
import importlib.util
import json
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn
from transformers import (
    DynamicCache,
    Qwen2_5OmniConfig,
    Qwen2_5OmniThinkerConfig,
    Qwen2_5OmniThinkerForConditionalGeneration,
)

from ep_kit.budget import check_ratio
from ep_kit.masks import AttentionMode, Causal
from ep_kit.models.attention import AudioSalienceProbe, decoder_attention_row
from ep_kit.models.checkpoint import load_extras_from_dir, saved_components
from ep_kit.models.feature_cache import EncoderFeatureCache
from ep_kit.models.vision_attention import set_grouped_vision_attention
from ep_kit.reducers.base import ReductionContext, TokenReducer
from ep_kit.rope import MultiAxisRoPE, TMRoPE
from ep_kit.sequence import Modality, TokenSequence, answer_span
from ep_kit.tokens import QWEN_OMNI_SPECIAL_TOKENS, TINY_SPECIAL_TOKENS

SUPPORTED_ATTN = ("sdpa", "eager", "flash_attention_2")


def transformer_block_classes() -> set[type[nn.Module]]:
    """The repeated blocks of a Qwen2.5-Omni thinker (decoder layers, the sieve's copies of them,
    vision and audio encoder blocks): the units distributed strategies shard and checkpoint."""
    from transformers.models.qwen2_5_omni import modeling_qwen2_5_omni as omni

    return {omni.Qwen2_5OmniDecoderLayer, omni.Qwen2_5OmniVisionBlock, omni.Qwen2_5OmniAudioEncoderLayer}
CANDIDATE_NAMES: dict[str, Modality] = {"video": Modality.VIDEO, "audio": Modality.AUDIO}
THINKER_MODEL_TYPES = ("qwen2_5_omni", "qwen2_5_omni_thinker")


@dataclass
class OmniOutput:
    """Result of :meth:`OmniThinker.forward`.

    Attributes:
        loss: mean next-token cross-entropy over the kept labels (HF shift convention), or None.
        logits: ``(B, L_kept, V)`` logits at the kept tokens, aligned with ``kept``; None when the
            forward ran with ``logits="labels"`` (lm_head on the labelled rows only).
        kept: the sequence the last decoder layer ran on (right padded, original positions,
            ``source_index`` = input column of each kept token); ``hidden`` = final-norm output.
        stats: per-sample kept counts per modality, realised keep ratio, audio share, reducer extras.
    """

    loss: Tensor | None
    logits: Tensor | None
    kept: TokenSequence
    stats: dict[str, Any] = field(default_factory=dict)


@dataclass
class Prefill:
    """Result of :meth:`OmniThinker.prefill`: everything one reduced prefill produced.

    Attributes:
        full: the merged input sequence before any reduction (embeddings, full positions).
        kept: the sequence the last decoder layer ran on, right padded, original positions,
            ``hidden`` = that layer's output (before the final norm).
        context: the reduction context (budget, candidate pool, reducer diagnostics in ``stats``).
        key_masks: ``key_masks[i]`` = ``(B, L_i)`` padding mask of the keys decoder layer ``i`` saw
            (and cached): what decoding attends to.
        marks: timing marks from ``clock()`` at start, after embedding (encoders), after the pre-LLM
            reduction (sieve) and after the decoder; empty without a clock.
        stats: :meth:`OmniThinker.budget_stats` of this prefill, computed on first access (it syncs
            with the host; generation never asks for it).
    """

    full: TokenSequence
    kept: TokenSequence
    context: ReductionContext
    key_masks: list[Tensor]
    marks: list[Any] = field(default_factory=list)
    model: OmniThinker | None = field(default=None, repr=False)

    @cached_property
    def stats(self) -> dict[str, Any]:
        if self.model is None:
            raise ValueError("Prefill.stats needs the model that ran the prefill (Prefill.model)")
        return self.model.budget_stats(self.full, self.kept, self.context)


def _load_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise ValueError(f"{path} is not valid JSON: {err}") from err


def read_thinker_config(path: str | Path) -> Qwen2_5OmniThinkerConfig:
    """Thinker config of a local checkpoint directory (full Qwen2.5-Omni or thinker-only).

    Raises ``FileNotFoundError`` for a missing directory or ``config.json`` and ``ValueError`` for a
    config whose ``model_type`` is not a Qwen2.5-Omni one, naming the file.
    """
    root = Path(path)
    if not root.exists():
        raise FileNotFoundError(f"checkpoint directory {root} does not exist")
    if not root.is_dir():
        raise FileNotFoundError(f"checkpoint path {root} is not a directory")
    cfg_file = root / "config.json"
    if not cfg_file.is_file():
        raise FileNotFoundError(f"{root} is not a Qwen2.5-Omni checkpoint: no config.json in it")
    model_type = _load_json(cfg_file).get("model_type")
    if model_type == "qwen2_5_omni":
        config = Qwen2_5OmniConfig.from_pretrained(root).thinker_config
    elif model_type == "qwen2_5_omni_thinker":
        config = Qwen2_5OmniThinkerConfig.from_pretrained(root)
    else:
        raise ValueError(
            f"{cfg_file}: model_type {model_type!r} is not a Qwen2.5-Omni checkpoint "
            f"(expected one of {THINKER_MODEL_TYPES})"
        )
    ensure_vision_start_token(config)
    return config


def ensure_vision_start_token(config: Qwen2_5OmniThinkerConfig) -> None:
    """Set ``vision_start_token_id`` when a config lacks it (``get_rope_index`` needs it on any video)."""
    if getattr(config, "vision_start_token_id", None) is not None:
        return
    for table in (QWEN_OMNI_SPECIAL_TOKENS, TINY_SPECIAL_TOKENS):
        if config.video_token_id == table["<|VIDEO|>"]:
            config.vision_start_token_id = table["<|vision_bos|>"]
            return
    raise ValueError(
        "thinker config has no vision_start_token_id and its video_token_id "
        f"{config.video_token_id} matches no known vocabulary: set config.vision_start_token_id"
    )


def random_thinker(
    config: Qwen2_5OmniThinkerConfig,
    dtype: torch.dtype | None = None,
    device: torch.device | str | None = None,
) -> Qwen2_5OmniThinkerForConditionalGeneration:
    """The real transformers thinker with random weights, created directly on ``device`` in ``dtype``.

    No float32 CPU copy is made first (a 7B thinker in bf16 goes straight to the GPU). The attention
    backend is the config's (``sdpa`` when unset).
    """
    attn = getattr(config, "_attn_implementation", None) or "sdpa"
    previous = torch.get_default_dtype()
    if dtype is not None:
        torch.set_default_dtype(dtype)
    try:
        with torch.device(device) if device is not None else contextlib.nullcontext():
            return Qwen2_5OmniThinkerForConditionalGeneration._from_config(
                config, attn_implementation=attn, **({"dtype": dtype} if dtype is not None else {})
            )
    finally:
        torch.set_default_dtype(previous)


class OmniThinker(nn.Module):
    """Qwen2.5-Omni thinker + rotary module + token reducer.

    Args:
        thinker: a real ``Qwen2_5OmniThinkerForConditionalGeneration`` (random or pretrained).
        rope: the rotary layout used by the sieve and the main decoder. None = TMRoPE with the
            config's ``mrope_section`` (the stock model). It is bound to the model's head_dim and
            rope_theta here (``ValueError`` if its sections do not fit).
        reducer: the token-reduction method, or None (no reduction). ``reducer.attach(self)`` is
            called here. Note: a CS2 reducer at ``keep_ratio=1.0`` still runs its sieve (it
            rewrites prompt and A/V states); only ``reducer=None`` gives the stock model.
        keep_ratio: the budget ``r`` in (0, 1] over the candidate pool of each sample.
        candidate_modalities: which modalities form the pool (``"video"`` covers images too).
        freeze_encoders: audio and vision encoders get ``requires_grad=False`` (paper setting).
        train_llm: whether the decoder, embeddings and lm_head are trainable.
        feature_cache: on-disk cache of the frozen encoders' outputs (per sample; see
            :mod:`ep_kit.models.feature_cache`), or None. Needs ``freeze_encoders=True``
            (``ValueError`` otherwise); skipped for audio while OmniZip's salience probe is on.
        grouped_vision_attention: when the vision tower runs ``sdpa``, run its window attention as one
            SDPA call per window length instead of one per window (same outputs; see
            :mod:`ep_kit.models.vision_attention`). Set on the thinker's vision config, so it also
            applies to ``thinker`` used directly. ``eager`` and ``flash_attention_2`` are left as they
            are; False switches a grouped thinker back to stock ``sdpa``.
    """

    def __init__(
        self,
        thinker: Qwen2_5OmniThinkerForConditionalGeneration,
        rope: MultiAxisRoPE | None = None,
        reducer: TokenReducer | None = None,
        keep_ratio: float = 1.0,
        candidate_modalities: Sequence[str] = ("video", "audio"),
        freeze_encoders: bool = True,
        train_llm: bool = True,
        feature_cache: EncoderFeatureCache | None = None,
        grouped_vision_attention: bool = True,
    ) -> None:
        super().__init__()
        if feature_cache is not None and not freeze_encoders:
            raise ValueError(
                "feature_cache needs frozen encoders (freeze_encoders=True): trainable encoders change their "
                "outputs every step, so cached features would be stale"
            )
        if not isinstance(thinker, Qwen2_5OmniThinkerForConditionalGeneration):
            raise TypeError(
                f"thinker must be a Qwen2_5OmniThinkerForConditionalGeneration, got {type(thinker).__name__}"
            )
        self.thinker = thinker
        ensure_vision_start_token(thinker.config)
        text = self.text_config
        rope_params = dict(text.rope_parameters or {})
        if rope_params.get("rope_type", "default") != "default":
            raise ValueError(
                f"text_config.rope_parameters.rope_type={rope_params.get('rope_type')!r}: only 'default' rotary "
                "frequencies are supported by the kit's rotary module"
            )
        if rope is None:
            rope = TMRoPE(mrope_section=list(rope_params.get("mrope_section", [16, 24, 24])))
        self.rope = rope.bind(self.head_dim, float(rope_params["rope_theta"]))
        if self.attn_implementation not in SUPPORTED_ATTN:
            raise ValueError(
                f"attn_implementation {self.attn_implementation!r} is not supported; use one of {SUPPORTED_ATTN}"
            )
        set_grouped_vision_attention(thinker, grouped_vision_attention)
        self.keep_ratio = check_ratio(keep_ratio, "keep_ratio")
        names = list(candidate_modalities)
        bad = [n for n in names if n not in CANDIDATE_NAMES]
        if not names or bad:
            raise ValueError(
                f"candidate_modalities must be a non-empty subset of {sorted(CANDIDATE_NAMES)}, got {names!r}"
            )
        self.candidate_modalities = tuple(dict.fromkeys(names))
        self.causal = Causal()
        self._audio_probe: AudioSalienceProbe | None = None
        self.feature_cache = feature_cache
        self.set_encoders_trainable(not freeze_encoders)
        self.set_llm_trainable(train_llm)
        self.reducer = reducer
        if reducer is not None:
            reducer.attach(self)

    # ----------------------------------------------------------------- building
    @classmethod
    def from_config(
        cls,
        config: Qwen2_5OmniThinkerConfig,
        dtype: torch.dtype | None = None,
        device: torch.device | str | None = None,
        **components: Any,
    ) -> OmniThinker:
        """Random-weight thinker from a config (tests, synthetic and efficiency benchmarks).

        ``dtype``/``device``: see :func:`random_thinker`; ``components`` go to ``__init__``.
        """
        return cls(random_thinker(config, dtype=dtype, device=device), **components)

    @classmethod
    def from_pretrained(
        cls,
        path: str | Path,
        dtype: torch.dtype | str = "auto",
        attn_implementation: str = "sdpa",
        **components: Any,
    ) -> OmniThinker:
        """Load the thinker from a local Qwen2.5-Omni directory (full model or thinker-only).

        ``attn_implementation="flash_attention_2"`` needs the ``flash_attn`` package. Talker and
        token2wav weights of a full checkpoint are ignored. A directory written by
        :meth:`save_pretrained` (or ``ep-kit export``) records its components: the rope, reducer,
        keep ratio and candidate modalities are rebuilt from it and its reducer weights loaded;
        ``components`` given here replace the recorded ones (e.g. ``keep_ratio=0.1`` for another
        budget, ``reducer=None`` for the thinker alone). A record that cannot be rebuilt is a
        ``ValueError`` naming the file and the component; kit weights without a record (saved
        before records existed) need their ``reducer`` given. A plain transformers directory
        loads as the stock model (TMRoPE, no reducer) unless ``components`` say otherwise, with
        official EchoingPixels sieve/scorer weights loaded when a CS2 reducer is given. A directory
        without ``*.safetensors`` weights (e.g. only ``pytorch_model.bin``) raises
        ``FileNotFoundError`` naming it.
        """
        if attn_implementation not in SUPPORTED_ATTN:
            raise ValueError(f"attn_implementation must be one of {SUPPORTED_ATTN}, got {attn_implementation!r}")
        if attn_implementation == "flash_attention_2" and importlib.util.find_spec("flash_attn") is None:
            raise ImportError("attn_implementation='flash_attention_2' needs the flash_attn package (pip install ep-kit[flash])")
        config = read_thinker_config(path)
        components = {**saved_components(Path(path), components), **components}
        # Checked before transformers runs: it would load a pickle-only directory in full and only then
        # fail in the kit's extras loader, which reads safetensors headers, with no word of the .bin.
        weights = [f for f in Path(path).glob("*.safetensors") if f.name != "ep_kit_weights.safetensors"]
        pickles = sorted(f.name for f in Path(path).glob("*.bin"))
        if not weights and pickles:
            raise FileNotFoundError(
                f"{path} holds only PyTorch pickle weights ({', '.join(pickles)}), no *.safetensors: ep-kit "
                "loads model weights from safetensors only (safe to open, and the kit reads their headers to "
                "find sieve/scorer weights); convert it once with transformers: from_pretrained(dir), then "
                "save_pretrained(new_dir) writes model.safetensors"
            )
        if not weights:
            raise FileNotFoundError(f"{path} holds no model weights (*.safetensors): is the download complete?")
        thinker = Qwen2_5OmniThinkerForConditionalGeneration.from_pretrained(
            str(path), config=config, dtype=dtype, attn_implementation=attn_implementation
        )
        model = cls(thinker, **components)
        load_extras_from_dir(model, Path(path))
        return model

    def save_pretrained(self, directory: str | Path) -> Path:
        """Write a directory :meth:`from_pretrained` rebuilds this model from, with no other argument.

        The thinker through transformers' ``save_pretrained`` (``config.json`` + ``model.safetensors``,
        so transformers itself loads it as a stock thinker), the reducer's weights in
        ``ep_kit_weights.safetensors``, and ``ep_kit_config.json`` recording the rope, the reducer
        (attention mode, scorer, selector...) as ``class_path`` / ``init_args``, the keep ratio and
        the candidate modalities. Returns the directory.
        """
        from ep_kit.models.checkpoint import export_hf

        return export_hf(self, directory)

    # --------------------------------------------------------------- trainables
    def set_encoders_trainable(self, trainable: bool) -> None:
        """Freeze (default) or unfreeze the audio and vision encoders."""
        for module in (self.thinker.model.audio_tower, self.thinker.model.visual):
            module.requires_grad_(trainable)

    def set_llm_trainable(self, trainable: bool) -> None:
        """Make the decoder (embeddings, layers, norm) and lm_head trainable or frozen."""
        self.thinker.model.language_model.requires_grad_(trainable)
        self.thinker.lm_head.requires_grad_(trainable)

    def gradient_checkpointing_enable(self, use_reentrant: bool = False) -> None:
        """Activation checkpointing for the encoders, the decoder layers AND the reducer's layer copies.

        transformers' own switch only reaches modules under the thinker; the sieve's copies (and any
        other transformers layer a reducer holds) get the same checkpointing function here.
        """
        from transformers.modeling_layers import GradientCheckpointingLayer

        kwargs = {"use_reentrant": use_reentrant}
        if hasattr(self.thinker, "activation_checkpointing_enable"):  # transformers >= 5.24 renamed the switch
            self.thinker.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
        else:
            self.thinker.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
        func = next(
            (
                m._gradient_checkpointing_func
                for m in self.thinker.modules()
                if isinstance(m, GradientCheckpointingLayer) and m.gradient_checkpointing
            ),
            None,
        )
        if func is None:
            return
        for module in self.modules():
            if isinstance(module, GradientCheckpointingLayer):
                module.gradient_checkpointing = True
                module._gradient_checkpointing_func = func

    # -------------------------------------------------------------- properties
    @property
    def config(self) -> Qwen2_5OmniThinkerConfig:
        return self.thinker.config

    @property
    def text_config(self):
        return self.thinker.config.text_config

    @property
    def decoder_layers(self) -> nn.ModuleList:
        """The thinker's transformers ``Qwen2_5OmniDecoderLayer`` list (the main LLM)."""
        return self.thinker.model.language_model.layers

    @property
    def embed_tokens(self) -> nn.Embedding:
        return self.thinker.model.language_model.embed_tokens

    @property
    def final_norm(self) -> nn.Module:
        return self.thinker.model.language_model.norm

    @property
    def lm_head(self) -> nn.Linear:
        return self.thinker.lm_head

    @property
    def hidden_size(self) -> int:
        return int(self.text_config.hidden_size)

    @property
    def num_layers(self) -> int:
        return len(self.decoder_layers)

    @property
    def head_dim(self) -> int:
        text = self.text_config
        return int(getattr(text, "head_dim", None) or text.hidden_size // text.num_attention_heads)

    @property
    def attn_implementation(self) -> str:
        """The attention backend of the decoder layers ("sdpa", "eager" or "flash_attention_2")."""
        return self.text_config._attn_implementation or "sdpa"

    @property
    def pad_token_id(self) -> int:
        pad = self.text_config.pad_token_id
        return int(pad) if pad is not None else 0

    # ------------------------------------------------------------ reducer host
    # The narrow interface reducers use (ep_kit.reducers.base.ReducerHost): sizes, rotary embeddings,
    # running layer copies with a mask mode, one attention row of a decoder layer, encoder-side
    # salience. Nothing else of transformers is visible to them.
    @property
    def dtype(self) -> torch.dtype:
        """Dtype of the decoder weights (what new reducer modules are created in)."""
        return self.decoder_layers[0].input_layernorm.weight.dtype

    @property
    def device(self) -> torch.device:
        return self.decoder_layers[0].input_layernorm.weight.device

    @property
    def positions_per_second(self) -> float:
        """Temporal rotary positions per second of media (``position_id_per_seconds``, 25 in the release)."""
        return float(getattr(self.config, "position_id_per_seconds", 25))

    def copy_decoder_layers(self, count: int) -> nn.ModuleList:
        """Trainable deep copies of decoder layers ``0..count-1`` (CS2's sieve is initialised from them)."""
        if not 0 < count <= self.num_layers:
            raise ValueError(f"cannot copy {count} layers of a {self.num_layers}-layer decoder")
        layers = nn.ModuleList(copy.deepcopy(self.decoder_layers[i]) for i in range(count))
        return layers.requires_grad_(True)

    def run_layer_copies(
        self,
        layers: nn.ModuleList,
        seq: TokenSequence,
        attention: AttentionMode,
        *,
        lengths: Sequence[int] | None = None,
        answer_free: bool = False,
    ) -> Tensor:
        """Run ``layers`` (copies made by :meth:`copy_decoder_layers`) on ``seq`` under ``attention``.

        Answer tokens are never keys (nothing leaks from the answer); positions are ``seq.positions``
        through the model's rotary module. Returns the last layer's hidden states on the real tokens;
        padding rows are zero.

        Padding is never computed: a padded batch runs one group of equal-length samples at a time,
        each trimmed to its length (:meth:`_equal_length_groups`), so no padding row goes through the
        layers and the attention needs no padding mask. The real rows are those of one padded run
        (padding keys are masked there), up to float rounding.

        ``lengths`` (the samples' real lengths of a right-padded ``seq``, already on the host) and
        ``answer_free`` (no real token is an answer) are what a caller that built ``seq`` knows; they
        spare the host reads that would find them out, so the run costs no sync of its own.
        """
        groups = self._equal_length_groups(seq.attention_mask, lengths)
        if groups is None:
            return self._run_copies(layers, seq, attention)
        L = seq.hidden.shape[1]
        if len(groups) == 1 and groups[0][0] == L:  # no padding at all: one run, as it is
            return self._run_copies(layers, seq, attention, every_key=answer_free)
        hidden = torch.zeros_like(seq.hidden)
        for n, rows in groups:
            if n > 0:
                pick = self._batch_index(rows, seq.hidden.device)
                hidden[pick, :n] = self._run_copies(layers, self._sample_rows(seq, pick, n), attention, every_key=answer_free)
        return hidden

    def _run_copies(
        self, layers: nn.ModuleList, seq: TokenSequence, attention: AttentionMode, every_key: bool = False
    ) -> Tensor:
        """One run of ``layers`` over the whole of ``seq`` (padding rows included, masked as keys)."""
        cfg = getattr(layers[0].self_attn, "config", None) if len(layers) else None
        impl = getattr(cfg, "_attn_implementation", None) or self.attn_implementation
        cos_sin = self.rope_embeddings(seq)
        kwargs = attention.layer_kwargs(seq, impl, seq.hidden.dtype, exclude_answer_keys=True, every_key=every_key)
        hidden = seq.hidden
        for layer in layers:
            hidden = layer(hidden, position_embeddings=cos_sin, position_ids=None, **kwargs)
        return hidden

    @staticmethod
    def _equal_length_groups(
        attention_mask: Tensor, lengths: Sequence[int] | None = None
    ) -> list[tuple[int, list[int]]] | None:
        """``[(length, sample indices), ...]`` of a right-padded batch, or None when it is not right padded
        (the one masked run is then exact as it is).

        One host read of the per-sample lengths, none when the caller gives them (``lengths``).
        """
        if lengths is None:
            B, L = attention_mask.shape
            counts = attention_mask.sum(-1)
            right = torch.arange(L, device=attention_mask.device)[None, :] < counts[:, None]
            *lengths, misplaced = torch.cat([counts, (right != attention_mask).any()[None].long()]).tolist()
            if misplaced:
                return None
        groups: dict[int, list[int]] = {}
        for b, n in enumerate(lengths):
            groups.setdefault(int(n), []).append(b)
        return sorted(groups.items(), key=lambda g: g[1][0])

    @staticmethod
    def _batch_index(rows: list[int], device: torch.device) -> slice | Tensor:
        """Batch index of ``rows``: a slice when they are contiguous (views), else an index tensor."""
        if rows == list(range(rows[0], rows[-1] + 1)):
            return slice(rows[0], rows[-1] + 1)
        return torch.tensor(rows, device=device)

    @staticmethod
    def _sample_rows(seq: TokenSequence, pick: slice | Tensor, n: int) -> TokenSequence:
        """Samples ``pick`` (see :meth:`_batch_index`) of ``seq``, first ``n`` tokens."""

        def take(x: Tensor | None) -> Tensor | None:
            return None if x is None else x[pick, :n]

        return TokenSequence(
            hidden=seq.hidden[pick, :n],
            modality=take(seq.modality),
            positions=seq.positions[:, pick, :n],
            attention_mask=take(seq.attention_mask),
            answer_mask=take(seq.answer_mask),
            input_ids=take(seq.input_ids),
            labels=take(seq.labels),
            source_index=take(seq.source_index),
        )

    def attention_row(self, layer_idx: int, seq: TokenSequence, query: Tensor) -> Tensor:
        """``(B, L)`` head-averaged attention ``query`` pays every key in decoder layer ``layer_idx``.

        ``seq`` holds that layer's INPUT hidden states; see :func:`ep_kit.models.attention.decoder_attention_row`.
        """
        if not 0 <= layer_idx < self.num_layers:
            raise ValueError(f"layer {layer_idx} is outside the decoder's {self.num_layers} layers")
        return decoder_attention_row(
            self.decoder_layers[layer_idx], seq.hidden, self.rope_embeddings(seq), query, seq.attention_mask
        )

    def enable_audio_salience(self) -> None:
        """Start capturing the audio tower's last-layer input during :meth:`embed` (for OmniZip)."""
        if self._audio_probe is None:
            self._audio_probe = AudioSalienceProbe(self.thinker.model.audio_tower)

    def audio_token_salience(self, batch: Mapping[str, Any]) -> Tensor:
        """``(N_audio_tokens,)`` attention each LLM audio token receives in the audio tower's last layer."""
        feats, fmask = batch.get("input_features"), batch.get("feature_attention_mask")
        if feats is None or fmask is None:
            raise ValueError(
                "audio-token salience (OmniZip) needs batch['input_features'] and batch['feature_attention_mask']"
            )
        self.enable_audio_salience()
        assert self._audio_probe is not None
        return self._audio_probe.token_salience(self.thinker.model.get_audio_features, feats, fmask)

    # -------------------------------------------------------------------- embed
    def embed(self, batch: Mapping[str, Any]) -> TokenSequence:
        """Merged input sequence, before any reduction.

        ``batch`` holds the Qwen2.5-Omni processor outputs (``input_ids``, ``attention_mask``,
        ``pixel_values_videos``/``video_grid_thw``/``video_second_per_grid``, ``input_features``/
        ``feature_attention_mask``, ``pixel_values``/``image_grid_thw``, ``use_audio_in_video``)
        plus optional ``labels`` (-100 = ignore) and ``answer_mask`` (default: the first labelled token
        and everything after it, :func:`ep_kit.sequence.answer_span`).
        Encoders and scatter run through transformers, positions through its ``get_rope_index`` on
        the full sequence. Left- or right-padded input is returned right padded;
        ``source_index`` is the input column of every token.
        """
        input_ids: Tensor = batch["input_ids"]
        if input_ids.ndim != 2:
            raise ValueError(f"batch['input_ids'] must be (B, L), got shape {tuple(input_ids.shape)}")
        attention_mask = batch.get("attention_mask")
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        if tuple(attention_mask.shape) != tuple(input_ids.shape):
            raise ValueError(
                f"batch['attention_mask'] shape {tuple(attention_mask.shape)} differs from input_ids "
                f"{tuple(input_ids.shape)}"
            )
        model = self.thinker.model
        embeds = model.get_input_embeddings()(input_ids)
        embeds = self._scatter_media(batch, input_ids, embeds)

        feature_mask = batch.get("feature_attention_mask")
        audio_seqlens = feature_mask.sum(-1) if feature_mask is not None else None
        pos3, _ = model.get_rope_index(
            input_ids,
            batch.get("image_grid_thw"),
            batch.get("video_grid_thw"),
            attention_mask.long(),
            bool(batch.get("use_audio_in_video", False)),
            audio_seqlens,
            batch.get("video_second_per_grid"),
        )
        real = attention_mask.bool()
        modality = self.modality_of(input_ids, real)
        labels = batch.get("labels")
        answer = batch.get("answer_mask")
        if answer is None:
            answer = answer_span(labels) if labels is not None else torch.zeros_like(real)
        answer = answer.bool() & real

        # Normalise to right padding: real tokens first, in order (stable sort).
        B, L = input_ids.shape
        lengths = real.sum(-1)
        new_len = int(lengths.max().item()) if B else 0
        order = torch.sort((~real).to(torch.int8), dim=-1, stable=True).indices[:, :new_len]
        valid = torch.arange(new_len, device=real.device)[None, :] < lengths[:, None]

        def take(x: Tensor, fill: int) -> Tensor:
            if x.ndim == 3:
                g = torch.gather(x, -1, order[None].expand(x.shape[0], B, new_len))
                return torch.where(valid[None], g, torch.full_like(g, fill))
            g = torch.gather(x, 1, order)
            return torch.where(valid, g, torch.full_like(g, fill))

        D = embeds.shape[-1]
        hidden = torch.gather(embeds, 1, order[..., None].expand(B, new_len, D)) * valid[..., None].to(embeds.dtype)
        positions = self.rope.expand_positions(take(pos3.to(input_ids.device).long(), 0))
        return TokenSequence(
            hidden=hidden,
            modality=take(modality, int(Modality.PAD)),
            positions=positions,
            attention_mask=valid,
            answer_mask=take(answer.long(), 0).bool(),
            input_ids=take(input_ids, self.pad_token_id),
            labels=None if labels is None else take(labels.long(), -100),
            source_index=torch.where(valid, order, torch.full_like(order, -1)),
        )

    def _scatter_media(self, batch: Mapping[str, Any], input_ids: Tensor, embeds: Tensor) -> Tensor:
        """Run the encoders and scatter their features at the placeholders, as the stock thinker does."""
        model = self.thinker.model
        features = batch.get("input_features")
        if features is not None:
            feature_mask = batch.get("feature_attention_mask")
            if feature_mask is None:
                raise ValueError("batch has input_features but no feature_attention_mask")
            audio = self._audio_features(features, feature_mask)
            _, _, audio_mask = model.get_placeholder_mask(input_ids, inputs_embeds=embeds)
            n_slots = int(audio_mask[..., 0].sum())
            if n_slots != audio.shape[0]:
                raise ValueError(
                    f"batch['input_ids'] has {n_slots} audio placeholder tokens but the audio encoder returned "
                    f"{audio.shape[0]} features (check feature_attention_mask)"
                )
            embeds = embeds.masked_scatter(audio_mask, audio.to(embeds.device, embeds.dtype))
        for kind, pix_key, grid_key, getter in (
            ("image", "pixel_values", "image_grid_thw", model.get_image_features),
            ("video", "pixel_values_videos", "video_grid_thw", model.get_video_features),
        ):
            pixels = batch.get(pix_key)
            if pixels is None:
                continue
            grid = batch.get(grid_key)
            if grid is None:
                raise ValueError(f"batch has {pix_key} but no {grid_key}")
            feats = self._vision_features(kind, pixels, grid, getter)
            feats = feats.to(embeds.device, embeds.dtype)
            kwargs = {f"{kind}_features": feats}
            masks = model.get_placeholder_mask(input_ids, inputs_embeds=embeds, **kwargs)
            mask = masks[0] if kind == "image" else masks[1]
            embeds = embeds.masked_scatter(mask, feats)
        return embeds

    def _audio_features(self, features: Tensor, feature_mask: Tensor) -> Tensor:
        """Audio tower output of the batch, through :attr:`feature_cache` when it can stand in.

        Not while OmniZip's salience probe is on: it reads the tower's last layer as it runs.
        """
        model = self.thinker.model
        if self.feature_cache is not None and self._audio_probe is None:
            cached = self.feature_cache.audio_features(model, features, feature_mask)
            if cached is not None:
                return cached
        return model.get_audio_features(features, feature_mask, return_dict=True).last_hidden_state

    def _vision_features(self, kind: str, pixels: Tensor, grid: Tensor, getter: Callable[..., Any]) -> Tensor:
        """Vision tower output (all items concatenated), through :attr:`feature_cache` when it can stand in."""
        if self.feature_cache is not None:
            cached = self.feature_cache.vision_features(self.thinker.model, kind, pixels, grid, getter)
            if cached is not None:
                return cached
        return torch.cat(getter(pixels, grid, return_dict=True).pooler_output, dim=0)

    def modality_of(self, input_ids: Tensor, attention_mask: Tensor) -> Tensor:
        """``(B, L)`` modality ids: image/video placeholders -> VIDEO, audio -> AUDIO, padding -> PAD."""
        cfg = self.config
        # torch.where, not boolean-mask assignment: that runs nonzero, a host sync on a GPU.
        visual = (input_ids == cfg.video_token_id) | (input_ids == cfg.image_token_id)
        modality = torch.where(visual, int(Modality.VIDEO), int(Modality.TEXT))
        modality = torch.where(input_ids == cfg.audio_token_id, int(Modality.AUDIO), modality)
        return torch.where(attention_mask.bool(), modality, int(Modality.PAD)).to(input_ids.dtype)

    def candidate_mask(self, seq: TokenSequence) -> Tensor:
        """``(B, L)`` bool: real tokens of the configured candidate modalities."""
        return seq.is_modality(*(CANDIDATE_NAMES[n] for n in self.candidate_modalities))

    # --------------------------------------------------------------- decoder run
    def rope_embeddings(self, seq: TokenSequence) -> tuple[Tensor, Tensor]:
        """``(cos, sin)`` of ``seq.positions`` under the kit's rotary layout, in the hidden dtype."""
        return self.rope(seq.positions, dtype=seq.hidden.dtype)

    def causal_kwargs(self, seq: TokenSequence) -> dict:
        """Causal attention kwargs (``attention_mask``, ``is_causal``) for the decoder layers on ``seq``."""
        return self.causal.layer_kwargs(seq, self.attn_implementation, seq.hidden.dtype, exclude_answer_keys=False)

    def run_layers(
        self,
        seq: TokenSequence,
        start: int = 0,
        end: int | None = None,
        cache: DynamicCache | None = None,
    ) -> TokenSequence:
        """Run decoder layers ``[start, end)`` causally on ``seq`` (no reduction); returns ``seq`` with new hidden.

        Positions come from ``seq.positions`` through the kit's rotary module; ``position_ids`` are
        never passed to the attention kernels. With ``cache``, keys/values are appended to it.
        """
        end = self.num_layers if end is None else end
        if not 0 <= start <= end <= self.num_layers:
            raise ValueError(f"layer range [{start}, {end}) is outside the decoder's {self.num_layers} layers")
        cos_sin = self.rope_embeddings(seq)
        kwargs = self.causal_kwargs(seq)
        hidden = seq.hidden
        for layer in self.decoder_layers[start:end]:
            hidden = layer(
                hidden,
                position_embeddings=cos_sin,
                position_ids=None,
                cache=cache,
                use_cache=cache is not None,
                **kwargs,
            )
        return seq.replace(hidden=hidden)

    def context(self, seq: TokenSequence, batch: Mapping[str, Any] | None = None) -> ReductionContext:
        """A fresh :class:`ReductionContext` for ``seq`` (budget, candidate pool, this model, raw batch)."""
        return ReductionContext(
            keep_ratio=self.keep_ratio, candidates=self.candidate_mask(seq), model=self, batch=dict(batch or {})
        )

    def reduce_before_llm(self, seq: TokenSequence, ctx: ReductionContext) -> TokenSequence:
        """Apply the reducer's pre-LLM stage (CS2, random, OmniZip...); identity without reducer."""
        if self.reducer is None:
            return seq
        out = self.reducer.before_llm(seq, ctx)
        ctx.candidates = self.candidate_mask(out)
        return out

    def run_llm(
        self, seq: TokenSequence, ctx: ReductionContext, cache: DynamicCache | None = None
    ) -> tuple[TokenSequence, list[Tensor]]:
        """The main decoder with in-LLM drops; returns (sequence with pre-norm hidden, key mask per layer).

        ``key_masks[i]`` is the ``(B, L_i)`` padding mask of the keys layer ``i`` saw (and cached).
        """
        drops = set(self.reducer.drop_before_layers) if self.reducer is not None else set()
        bounds = sorted({0, self.num_layers, *(d for d in drops if 0 < d < self.num_layers)})
        key_masks: list[Tensor] = []
        ctx.stats.setdefault("llm_candidates_per_layer", [])
        for start, end in zip(bounds[:-1], bounds[1:], strict=False):
            if start in drops:
                ctx.candidates = self.candidate_mask(seq)
                seq = self.reducer.in_llm(seq, start, ctx)
                ctx.candidates = self.candidate_mask(seq)
            seq = self.run_layers(seq, start, end, cache=cache)
            key_masks.extend([seq.attention_mask] * (end - start))
            ctx.stats["llm_candidates_per_layer"].extend([self.candidate_mask(seq).sum(-1)] * (end - start))
        return seq, key_masks

    # ------------------------------------------------------------------ prefill
    def prefill(
        self,
        batch: Mapping[str, Any],
        cache: DynamicCache | None = None,
        clock: Callable[[], Any] | None = None,
    ) -> Prefill:
        """Embed, reduce before the LLM, run the decoder with in-LLM drops: the one prefill path.

        :meth:`forward`, :meth:`generate`, evaluation answers and the efficiency benchmark all run
        this. With ``cache`` the decoder's keys/values are stored for decoding. ``clock`` (e.g.
        ``time.perf_counter`` or a CUDA event factory) is called at the stage boundaries; its values
        are :attr:`Prefill.marks`.
        """
        marks = [clock()] if clock is not None else []
        full = self.embed(batch)
        if clock is not None:
            marks.append(clock())
        ctx = self.context(full, batch)
        seq = self.reduce_before_llm(full, ctx)
        if clock is not None:
            marks.append(clock())
        seq, key_masks = self.run_llm(seq, ctx, cache=cache)
        if clock is not None:
            marks.append(clock())
        return Prefill(full, seq, ctx, key_masks, marks, model=self)

    def head(self, hidden: Tensor) -> Tensor:
        """Logits of decoder outputs: final norm, then lm_head (on whatever rows are given)."""
        return self.lm_head(self.final_norm(hidden))

    # ------------------------------------------------------------------ forward
    def forward(self, batch: Mapping[str, Any], logits: str = "all") -> OmniOutput:
        """Reduced prefill, lm_head on the kept tokens, loss on the gathered labels.

        ``logits="all"``: the lm_head runs on every kept token (``OmniOutput.logits`` is
        ``(B, L_kept, V)``), the stock model's output. ``logits="labels"``: it runs only on the rows
        whose next token carries a label (training: the answer tokens), ``OmniOutput.logits`` is
        None and the loss is the same mean cross-entropy. On a 30 s clip of the 3B model that is a
        few rows instead of ~10k: the lm_head is 151,936 wide, so the full logits cost ~2.8 TFLOP and
        ~2.5 GiB of float32 per step that no label reads.
        """
        if logits not in ("all", "labels"):
            raise ValueError(f"logits must be 'all' or 'labels', got {logits!r}")
        p = self.prefill(batch)
        seq = p.kept
        if logits == "labels":
            if seq.labels is None:
                raise ValueError("forward(logits='labels') needs batch['labels']")
            return OmniOutput(loss=self.label_loss(seq), logits=None, kept=seq, stats=p.stats)
        hidden = self.final_norm(seq.hidden)
        out = self.lm_head(hidden)
        loss = None
        if seq.labels is not None:
            loss = self.thinker.loss_function(logits=out, labels=seq.labels, vocab_size=self.text_config.vocab_size)
        return OmniOutput(loss=loss, logits=out, kept=seq.replace(hidden=hidden), stats=p.stats)

    def label_loss(self, seq: TokenSequence) -> Tensor:
        """Mean next-token cross-entropy over ``seq.labels`` with the lm_head run on the labelled rows only.

        Row ``t`` predicts label ``t + 1`` (the HF shift), so the rows are those whose successor has a
        label; transformers' own causal-LM loss is applied to them (equal to the loss over all logits).
        """
        labels = seq.labels
        shifted = torch.nn.functional.pad(labels[:, 1:], (0, 1), value=-100)
        rows = shifted != -100
        picked = self.head(seq.hidden[rows])
        return self.thinker.loss_function(
            logits=picked[None], labels=None, shift_labels=shifted[rows][None], vocab_size=self.text_config.vocab_size
        )

    def budget_stats(self, full: TokenSequence, kept: TokenSequence, ctx: ReductionContext) -> dict[str, Any]:
        """Per-sample kept counts per modality, realised keep ratio and audio share of the kept A/V tokens."""
        n_cand = self.candidate_mask(full).sum(-1)
        k_cand = self.candidate_mask(kept).sum(-1)
        kept_audio = kept.count(Modality.AUDIO)
        kept_av = kept.count(Modality.VIDEO, Modality.AUDIO)
        stats: dict[str, Any] = {
            "n_video": full.count(Modality.VIDEO),
            "n_audio": full.count(Modality.AUDIO),
            "n_text": full.count(Modality.TEXT),
            "kept_video": kept.count(Modality.VIDEO),
            "kept_audio": kept_audio,
            "kept_text": kept.count(Modality.TEXT),
            "kept_candidates": k_cand,
            "n_candidates": n_cand,
            "realised_keep_ratio": float(k_cand.sum()) / max(1, int(n_cand.sum())),
            "audio_share": float(kept_audio.sum()) / max(1, int(kept_av.sum())),
        }
        per_layer = ctx.stats.get("llm_candidates_per_layer") or []
        if per_layer:
            # Candidates each decoder layer ran on, averaged over layers (PyramidDrop's effective budget).
            stats["layer_avg_kept"] = torch.stack(per_layer).float().mean(0)
            stats["layer_avg_keep_ratio"] = float(stats["layer_avg_kept"].sum()) / max(1, int(n_cand.sum()))
        for key, value in ctx.stats.items():
            if key != "llm_candidates_per_layer":
                stats.setdefault(key, value)
        return stats

    # ---------------------------------------------------------------- generate
    def _decode_mask(self, key_mask: Tensor, dtype: torch.dtype) -> dict:
        """Attention kwargs for one new query over cached keys ``key_mask`` (``(B, Lk)`` bool)."""
        impl = self.attn_implementation
        if impl == "sdpa":
            return {"attention_mask": key_mask[:, None, None, :], "is_causal": False}
        if impl == "eager":
            additive = torch.zeros(key_mask.shape, dtype=dtype, device=key_mask.device)
            additive = additive.masked_fill(~key_mask, torch.finfo(dtype).min)
            return {"attention_mask": additive[:, None, None, :], "is_causal": False}
        mask = None if bool(key_mask.all()) else key_mask.to(torch.int32)
        return {"attention_mask": mask, "is_causal": False}

    @torch.no_grad()
    def generate(
        self,
        batch: Mapping[str, Any],
        max_new_tokens: int,
        eos_token_id: int | Sequence[int] | None = None,
        do_sample: bool = False,
        temperature: float = 1.0,
        pad_token_id: int | None = None,
    ) -> Tensor:
        """Reduced prefill, then KV-cached decoding; returns ``(B, T_new)`` new token ids.

        The next position of every sample is its maximum position over all axes of the FULL
        (unreduced) sequence + 1, then +1 per step on every axis (get_rope_index's text rule, so
        decoding positions do not depend on what was dropped). Decode attention covers the kept
        prefill keys (padding excluded) and the generated keys. Samples that produced an EOS are
        padded with ``pad_token_id`` (default: the config's pad id, else the first EOS id).
        """
        if max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
        if do_sample and temperature <= 0:
            raise ValueError(f"temperature must be > 0 when sampling, got {temperature}")
        eos = self._eos_ids(eos_token_id)
        if pad_token_id is None:
            pad = self.text_config.pad_token_id
            pad_token_id = int(pad) if pad is not None else (eos[0] if eos else 0)

        cache = DynamicCache(config=self.text_config)
        p = self.prefill(batch, cache=cache)
        full, seq, key_masks = p.full, p.kept, p.key_masks
        next_pos = full.positions.masked_fill(~full.attention_mask[None], 0).amax(dim=(0, 2)) + 1
        B = seq.batch_size
        rows = torch.arange(B, device=seq.hidden.device)
        logits = self.head(seq.hidden[rows, seq.lengths - 1])

        eos_t = torch.tensor(eos, dtype=torch.long, device=logits.device)
        finished = torch.zeros(B, dtype=torch.bool, device=logits.device)
        out: list[Tensor] = []
        for step in range(max_new_tokens):
            token = self._pick(logits, do_sample, temperature)
            token = torch.where(finished, torch.full_like(token, pad_token_id), token)
            out.append(token)
            if eos:
                finished |= torch.isin(token, eos_t)
            if step == max_new_tokens - 1 or bool(finished.all()):
                break
            hidden = self.embed_tokens(token)[:, None, :]
            pos = (next_pos + step)[None, :, None].expand(self.rope.num_axes, B, 1)
            cos_sin = self.rope(pos, dtype=hidden.dtype)
            new_keys = torch.ones(B, step + 1, dtype=torch.bool, device=hidden.device)
            for i, layer in enumerate(self.decoder_layers):
                kwargs = self._decode_mask(torch.cat([key_masks[i], new_keys], dim=-1), hidden.dtype)
                hidden = layer(
                    hidden, position_embeddings=cos_sin, position_ids=None, cache=cache, use_cache=True, **kwargs
                )
            logits = self.head(hidden[:, -1])
        return torch.stack(out, dim=1)

    def _eos_ids(self, eos_token_id: int | Sequence[int] | None) -> list[int]:
        if eos_token_id is None:
            eos_token_id = self.text_config.eos_token_id
        if eos_token_id is None and self.thinker.generation_config is not None:
            eos_token_id = self.thinker.generation_config.eos_token_id
        if eos_token_id is None:
            return []
        if isinstance(eos_token_id, int):
            return [eos_token_id]
        return [int(e) for e in eos_token_id]

    @staticmethod
    def _pick(logits: Tensor, do_sample: bool, temperature: float) -> Tensor:
        if not do_sample:
            return logits.argmax(-1)
        probs = torch.softmax(logits.float() / temperature, dim=-1)
        return torch.multinomial(probs, 1).squeeze(-1)
