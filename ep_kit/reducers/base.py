"""The contract between a token-reduction method and the model it reduces.

A reducer decides which audio/video tokens the language model keeps during *prefill*. Methods that
act before the LLM (CS2, Random, IntraModal, OmniZip) override :meth:`TokenReducer.before_llm`;
methods that drop tokens between decoder layers (FastV, PyramidDrop) list those layers in
``drop_before_layers`` and override :meth:`TokenReducer.in_llm`. Decoding never reduces: it runs on
the KV cache of the reduced prefill.

Reducers see the model only through :class:`ReducerHost` (sizes, rotary embeddings, running layer
copies with a mask mode, one attention row of a decoder layer, encoder-side salience). The
Qwen2.5-Omni wrapper (:class:`ep_kit.models.omni.OmniThinker`) implements it; everything that
knows transformers internals stays under ``ep_kit/models/``.

Each reducer also declares its per-layer token schedule (:meth:`TokenReducer.token_schedule`), so
the FLOP model and the efficiency benchmark count exactly the method a recipe builds.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol, runtime_checkable

import torch
from torch import Tensor, nn

from ep_kit.masks import AttentionMode
from ep_kit.sequence import TokenSequence


@runtime_checkable
class ReducerHost(Protocol):
    """What a reducer may ask of the model it is attached to."""

    @property
    def num_layers(self) -> int:
        """Decoder depth."""
        ...

    @property
    def hidden_size(self) -> int: ...

    @property
    def dtype(self) -> torch.dtype:
        """Dtype of the decoder weights (new reducer modules are created in it)."""
        ...

    @property
    def device(self) -> torch.device: ...

    @property
    def positions_per_second(self) -> float:
        """Temporal rotary positions per second of media."""
        ...

    def rope_embeddings(self, seq: TokenSequence) -> tuple[Tensor, Tensor]:
        """``(cos, sin)`` of ``seq.positions`` under the model's rotary layout."""
        ...

    def copy_decoder_layers(self, count: int) -> nn.ModuleList:
        """Trainable copies of decoder layers ``0..count-1``."""
        ...

    def run_layer_copies(
        self,
        layers: nn.ModuleList,
        seq: TokenSequence,
        attention: AttentionMode,
        *,
        lengths: Sequence[int] | None = None,
        answer_free: bool = False,
    ) -> Tensor:
        """Hidden states after running ``layers`` on ``seq`` under ``attention`` (answers are never keys).

        ``lengths`` / ``answer_free``: what the caller already knows of a right-padded ``seq`` (its real
        lengths on the host; no real answer token), sparing the host reads that would find it out."""
        ...

    def attention_row(self, layer_idx: int, seq: TokenSequence, query: Tensor) -> Tensor:
        """``(B, L)`` head-averaged attention of token ``query[b]`` over the keys of decoder layer ``layer_idx``."""
        ...

    def enable_audio_salience(self) -> None:
        """Prepare :meth:`audio_token_salience` (e.g. capture encoder activations during embedding)."""
        ...

    def audio_token_salience(self, batch: Mapping[str, Any]) -> Tensor:
        """``(N_audio_tokens,)`` salience of the batch's LLM audio tokens from the audio encoder."""
        ...


@dataclass
class ReductionContext:
    """What a reducer may use besides the sequence.

    Attributes:
        keep_ratio: the budget ``r`` in (0, 1] over the candidate pool.
        candidates: ``(B, L)`` bool candidate pool of the *current* sequence (A/V tokens by default).
        model: the host model (:class:`ReducerHost`).
        batch: the raw model inputs (pixel values, audio features, grids) for methods that need
            encoder-side signals (OmniZip's audio salience).
        stats: free-form per-call diagnostics a reducer may add (logged by the trainer).
    """

    keep_ratio: float
    candidates: Tensor
    model: ReducerHost
    batch: dict[str, Any] = field(default_factory=dict)
    stats: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class TokenSchedule:
    """How many tokens a method runs where, for the FLOP model (text is added by the caller).

    Attributes:
        candidates_per_layer: A/V candidates each decoder layer processes (``len == num_layers``).
        sieve_layers: full-length bidirectional layers run before the LLM (CS2's sieve; 0 otherwise).
        scorer_on_all_tokens: a learned ``D x D`` scorer head runs on every token (CS2's MLP scorer).
    """

    candidates_per_layer: tuple[int, ...]
    sieve_layers: int = 0
    scorer_on_all_tokens: bool = False


class TokenReducer(nn.Module):
    """Base class: the identity (no reduction)."""

    #: Decoder layer indices *before* which :meth:`in_llm` is called (e.g. FastV K=2 -> ``(2,)``).
    drop_before_layers: tuple[int, ...] = ()
    #: Trainable sieve layers this reducer runs before the LLM (recorded in exported configs).
    sieve_layers: int = 0

    def attach(self, model: ReducerHost) -> None:
        """Called once by the model after construction (e.g. to copy decoder layers)."""

    def before_llm(self, seq: TokenSequence, ctx: ReductionContext) -> TokenSequence:
        return seq

    def in_llm(self, seq: TokenSequence, layer_idx: int, ctx: ReductionContext) -> TokenSequence:
        return seq

    def component_fields(self) -> dict[str, Any]:
        """What saved weights of this reducer depend on (recorded and checked by the checkpoint I/O)."""
        return {}

    def kept_candidates(self, n_video: int, n_audio: int, keep_ratio: float) -> int:
        """Candidates a pre-LLM reduction keeps from a sample with these pools (the identity: all)."""
        return n_video + n_audio

    def token_schedule(self, n_video: int, n_audio: int, num_layers: int, keep_ratio: float) -> TokenSchedule:
        """The per-layer candidate counts of one sample (pre-LLM reducers: the kept count everywhere)."""
        kept = self.kept_candidates(n_video, n_audio, keep_ratio)
        return TokenSchedule((kept,) * num_layers, self.sieve_layers)

