"""CS2, the cross-modal semantic sieve: refine, score and Top-K the audio/video tokens before the LLM.

1. A trainable copy of the first ``N`` decoder layers (layer ``i`` initialised from decoder layer
   ``i``) encodes prompt + A/V tokens with the chosen attention mode (bidirectional by default);
   answer tokens are never keys, so nothing leaks from the answer. Positions are the original
   positions of the FULL sequence through the model's rotary module (TMRoPE or Sync-RoPE).
   Without pre-fusion the encoder runs on the A/V tokens only and the text stays unrefined.
   Only the tokens it refines go through it (no answer, padding or media-free sample rows).
2. The scorer gives one score per token; the selector keeps ``k = keep_count(n_candidates, r)``
   candidates per sample (candidates = the model's candidate modalities).
3. The refined states of prompt and A/V tokens replace their embeddings; answer tokens enter
   unrefined; candidates are multiplied by the straight-through weights (value 1) so the LM loss
   reaches the scorer; text, answers and non-candidates are always kept, in order, with their
   original positions.

Differences from the official code, on purpose: samples without A/V tokens pass through untouched
whatever they are batched with; the layer copy happens once (re-attaching never overwrites trained
or loaded sieve weights); candidates restricted to video count ``k`` over video tokens only.
At ``keep_ratio=1.0`` the sieve still refines the prompt and A/V states (the method is on); use
``reducer=None`` for the stock model.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from ep_kit.masks import AttentionMode, Bidirectional
from ep_kit.reducers.base import ReducerHost, ReductionContext, TokenSchedule
from ep_kit.reducers.score_select import ScoreSelect
from ep_kit.scorers import MLPScorer, Scorer
from ep_kit.selectors import Selector, STETopK
from ep_kit.sequence import TokenSequence


class CS2(ScoreSelect):
    """The EchoingPixels sieve reducer: a sieve, then score-and-select on its refined states.

    Args:
        num_layers: sieve depth ``N`` (paper: 4); must not exceed the decoder depth.
        attention: attention mode of the sieve (default :class:`~ep_kit.masks.Bidirectional`).
        prefusion: encode the prompt text together with the A/V tokens (paper default) or the A/V
            tokens alone (ablation "w/o pre-fusion").
        scorer: factory ``hidden_size -> Scorer`` (default :class:`~ep_kit.scorers.MLPScorer`).
        selector: the Top-K rule (default :class:`~ep_kit.selectors.STETopK`).
    """

    stat_key = "cs2_k"

    def __init__(
        self,
        num_layers: int = 4,
        attention: AttentionMode | None = None,
        prefusion: bool = True,
        scorer: Callable[[int], Scorer] | None = None,
        selector: Selector | None = None,
    ) -> None:
        super().__init__(scorer=scorer if scorer is not None else MLPScorer, selector=selector if selector is not None else STETopK())
        if int(num_layers) < 1:
            raise ValueError(f"CS2 num_layers must be >= 1, got {num_layers}")
        self.num_layers = int(num_layers)
        self.sieve_layers = self.num_layers
        self.attention = attention if attention is not None else Bidirectional()
        self.prefusion = bool(prefusion)
        self.layers = nn.ModuleList()

    def extra_repr(self) -> str:
        return f"num_layers={self.num_layers}, attention={self.attention!r}, prefusion={self.prefusion}"

    def component_fields(self) -> dict[str, Any]:
        """Sieve depth, pre-fusion, attention mode and scorer class: what the sieve weights depend on."""
        scorer = self.scorer if self.scorer is not None else self.scorer_factory
        name = scorer.__name__ if isinstance(scorer, type) else type(scorer).__name__
        return {
            "num_layers": self.num_layers,
            "prefusion": self.prefusion,
            "attention": type(self.attention).__name__,
            "scorer": name,
        }

    @property
    def attached(self) -> bool:
        return len(self.layers) > 0 and self.scorer is not None

    def attach(self, model: ReducerHost) -> None:
        """Copy decoder layers ``0..N-1`` and build the scorer -- only the first time.

        Idempotent: once the sieve exists (copied, trained or loaded) it is never overwritten.
        """
        depth = model.num_layers
        if self.num_layers > depth:
            raise ValueError(f"CS2 num_layers={self.num_layers} exceeds the decoder depth ({depth} layers)")
        if len(self.layers) == 0:
            self.layers = model.copy_decoder_layers(self.num_layers)
        elif len(self.layers) != self.num_layers:
            raise ValueError(f"CS2 holds {len(self.layers)} sieve layers but num_layers={self.num_layers}")
        super().attach(model)

    # ------------------------------------------------------------------ sieve
    def encode(
        self, seq: TokenSequence, model: ReducerHost, lengths: Sequence[int] | None = None, answer_free: bool = False
    ) -> Tensor:
        """Run the sieve layers on ``seq`` (answer tokens excluded as keys); returns refined hidden.

        ``lengths`` / ``answer_free``: see :meth:`ReducerHost.run_layer_copies`."""
        return model.run_layer_copies(self.layers, seq, self.attention, lengths=lengths, answer_free=answer_free)

    def refine(self, seq: TokenSequence, model: ReducerHost) -> tuple[Tensor, Tensor]:
        """Refined hidden states (answers and media-free samples unrefined) and the mask of refined tokens.

        The sieve runs on the refined tokens alone (with pre-fusion the prompt and A/V tokens of the
        samples with media; without it the A/V tokens), in order with their positions and modality:
        marked as the only real tokens when they come first in every sample (answers last), else
        gathered into a new right-padded batch. That is exact: the tokens left out are never keys (answers, padding) or belong to
        samples the sieve does not touch, and their sieve outputs would be discarded, so every
        attention mode sees the same keys for the same queries. It saves their rows in every sieve
        layer, and with no answer key left to exclude the attention needs no mask (bidirectional) or
        only the causal flag (causal).
        """
        if self.prefusion:
            mask = seq.attention_mask & ~seq.answer_mask & seq.av_mask.any(-1, keepdim=True)
        else:
            mask = seq.av_mask
        counts = mask.sum(-1)
        prefix = torch.arange(mask.shape[-1], device=mask.device)[None, :] < counts[:, None]
        # The one host read of the sieve: per-sample counts (the sieve's groups) and the layout flags.
        *lengths, partial, scattered = torch.cat(
            [counts, (mask != seq.attention_mask).any()[None].long(), (mask != prefix).any()[None].long()]
        ).tolist()
        n = max(lengths)
        if n == 0:  # no sample has media: nothing is refined
            return seq.hidden, mask
        # The refined tokens are never answers (answers are outside ``mask``), so every real token is a key.
        if not partial:  # every real token is refined: run the sieve on the sequence as it is
            refined = self.encode(seq, model, lengths=None if scattered else lengths, answer_free=True)
        elif not scattered:  # each sample's refined tokens come first (answers last): the rest is padding
            refined = self.encode(seq.replace(attention_mask=mask, answer_mask=torch.zeros_like(mask)), model,
                                  lengths=lengths, answer_free=True)
        else:
            B, _, D = seq.hidden.shape
            order = torch.sort((~mask).to(torch.int8), dim=-1, stable=True).indices[:, :n]
            valid = torch.arange(n, device=mask.device)[None, :] < counts[:, None]
            sub_hidden = self.encode(seq.gather(order, valid), model, lengths=lengths, answer_free=True)
            refined = torch.zeros_like(seq.hidden).scatter(1, order[..., None].expand(B, n, D), sub_hidden)
        hidden = torch.where(mask[..., None], refined, seq.hidden)
        return hidden, mask

    def states(self, seq: TokenSequence, ctx: ReductionContext) -> TokenSequence:
        """The sieve's refined states: the scorer reads them and the kept tokens carry them."""
        if not self.attached:
            raise RuntimeError("CS2.before_llm called before attach(model): build it through OmniThinker")
        hidden, _ = self.refine(seq, ctx.model)
        return seq.replace(hidden=hidden)

    def token_schedule(self, n_video: int, n_audio: int, num_layers: int, keep_ratio: float) -> TokenSchedule:
        kept = self.kept_candidates(n_video, n_audio, keep_ratio)
        return TokenSchedule((kept,) * num_layers, sieve_layers=self.num_layers, scorer_on_all_tokens=True)
