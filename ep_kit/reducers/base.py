"""The contract between a token-reduction method and the Qwen2.5-Omni wrapper.

A reducer decides which audio/video tokens the language model keeps during *prefill*. Methods that
act before the LLM (CS2, random, IntraModal, OmniZip) override :meth:`TokenReducer.before_llm`;
methods that drop tokens between decoder layers (FastV, PyramidDrop) list those layers in
``drop_before_layers`` and override :meth:`TokenReducer.in_llm`. Decoding never reduces: it runs on
the KV cache of the reduced prefill.

The wrapper (``ep_kit.models.omni``) is the only code that knows transformers internals; reducers
reach the model through the :class:`ReductionContext` it hands them.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from torch import Tensor, nn

from ep_kit.sequence import TokenSequence

if TYPE_CHECKING:  # pragma: no cover
    from ep_kit.models.omni import OmniThinker


@dataclass
class ReductionContext:
    """What a reducer may use besides the sequence.

    Attributes:
        keep_ratio: the budget ``r`` in (0, 1] over the candidate pool.
        candidates: ``(B, L)`` bool candidate pool of the *current* sequence (A/V tokens by default).
        model: the wrapper, for its decoder layers, rotary embedding and attention runner.
        batch: the raw model inputs (pixel values, audio features, grids) for methods that need
            encoder-side signals (OmniZip's audio-encoder attention).
        stats: free-form per-call diagnostics a reducer may add (logged by the trainer).
    """

    keep_ratio: float
    candidates: Tensor
    model: OmniThinker
    batch: dict[str, Any] = field(default_factory=dict)
    stats: dict[str, Any] = field(default_factory=dict)


class TokenReducer(nn.Module):
    """Base class: the identity (no reduction)."""

    #: Decoder layer indices *before* which :meth:`in_llm` is called (e.g. FastV K=2 -> ``(2,)``).
    drop_before_layers: tuple[int, ...] = ()

    def attach(self, model: OmniThinker) -> None:
        """Called once by the wrapper after construction (e.g. to copy decoder layers)."""

    def before_llm(self, seq: TokenSequence, ctx: ReductionContext) -> TokenSequence:
        return seq

    def in_llm(self, seq: TokenSequence, layer_idx: int, ctx: ReductionContext) -> TokenSequence:
        return seq
