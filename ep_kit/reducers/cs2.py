"""CS2, the cross-modal semantic sieve: refine, score and Top-K the audio/video tokens before the LLM.

1. A trainable copy of the first ``N`` decoder layers (layer ``i`` initialised from decoder layer
   ``i``) encodes prompt + A/V tokens with the chosen attention mode (bidirectional by default);
   answer tokens are never keys, so nothing leaks from the answer. Positions are the original
   positions of the FULL sequence through the model's rotary module (TMRoPE or Sync-RoPE).
   Without pre-fusion the encoder runs on the A/V tokens only and the text stays unrefined.
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

import copy
from collections.abc import Callable
from typing import TYPE_CHECKING

import torch
from torch import Tensor, nn

from ep_kit.masks import AttentionMode, Bidirectional
from ep_kit.reducers.base import ReductionContext, TokenReducer
from ep_kit.scorers import MLPScorer, Scorer
from ep_kit.selectors import Selector, STETopK
from ep_kit.sequence import TokenSequence

if TYPE_CHECKING:  # pragma: no cover
    from ep_kit.models.omni import OmniThinker


class CS2(TokenReducer):
    """The EchoingPixels sieve reducer.

    Args:
        num_layers: sieve depth ``N`` (paper: 4); must not exceed the decoder depth.
        attention: attention mode of the sieve (default :class:`~ep_kit.masks.Bidirectional`).
        prefusion: encode the prompt text together with the A/V tokens (paper default) or the A/V
            tokens alone (ablation "w/o pre-fusion").
        scorer: factory ``hidden_size -> Scorer`` (default :class:`~ep_kit.scorers.MLPScorer`).
        selector: the Top-K rule (default :class:`~ep_kit.selectors.STETopK`).
    """

    def __init__(
        self,
        num_layers: int = 4,
        attention: AttentionMode | None = None,
        prefusion: bool = True,
        scorer: Callable[[int], Scorer] | None = None,
        selector: Selector | None = None,
    ) -> None:
        super().__init__()
        if int(num_layers) < 1:
            raise ValueError(f"CS2 num_layers must be >= 1, got {num_layers}")
        self.num_layers = int(num_layers)
        self.attention = attention if attention is not None else Bidirectional()
        self.prefusion = bool(prefusion)
        self.scorer_factory = scorer if scorer is not None else MLPScorer
        self.selector = selector if selector is not None else STETopK()
        self.layers = nn.ModuleList()
        self.scorer: Scorer | None = None

    def extra_repr(self) -> str:
        return f"num_layers={self.num_layers}, attention={self.attention!r}, prefusion={self.prefusion}"

    @property
    def attached(self) -> bool:
        return len(self.layers) > 0 and self.scorer is not None

    def attach(self, model: OmniThinker) -> None:
        """Copy decoder layers ``0..N-1`` and build the scorer -- only the first time.

        Idempotent: once the sieve exists (copied, trained or loaded) it is never overwritten.
        """
        depth = model.num_layers
        if self.num_layers > depth:
            raise ValueError(f"CS2 num_layers={self.num_layers} exceeds the decoder depth ({depth} layers)")
        if len(self.layers) == 0:
            self.layers = nn.ModuleList(copy.deepcopy(model.decoder_layers[i]) for i in range(self.num_layers))
            self.layers.requires_grad_(True)
        elif len(self.layers) != self.num_layers:
            raise ValueError(f"CS2 holds {len(self.layers)} sieve layers but num_layers={self.num_layers}")
        if self.scorer is None:
            ref = model.decoder_layers[0].input_layernorm.weight
            self.scorer = self.scorer_factory(model.hidden_size).to(device=ref.device, dtype=ref.dtype)

    # ------------------------------------------------------------------ sieve
    def encode(self, seq: TokenSequence, model: OmniThinker) -> Tensor:
        """Run the sieve layers on ``seq`` (answer tokens excluded as keys); returns refined hidden."""
        cos_sin = model.rope_embeddings(seq)
        kwargs = self.attention.layer_kwargs(
            seq, self._attn_implementation(model), seq.hidden.dtype, exclude_answer_keys=True
        )
        hidden = seq.hidden
        for layer in self.layers:
            hidden = layer(hidden, position_embeddings=cos_sin, position_ids=None, **kwargs)
        return hidden

    def _attn_implementation(self, model: OmniThinker) -> str:
        cfg = getattr(self.layers[0].self_attn, "config", None)
        return getattr(cfg, "_attn_implementation", None) or model.attn_implementation

    def refine(self, seq: TokenSequence, model: OmniThinker) -> tuple[Tensor, Tensor]:
        """Refined hidden states (answers and media-free samples unrefined) and the mask of refined tokens."""
        has_media = seq.av_mask.any(-1, keepdim=True)
        if self.prefusion:
            refined = self.encode(seq, model)
            mask = seq.attention_mask & ~seq.answer_mask & has_media
        else:
            mask = seq.av_mask
            B, L = mask.shape
            n = int(mask.sum(-1).max())
            order = torch.sort((~mask).to(torch.int8), dim=-1, stable=True).indices[:, :n]
            valid = torch.arange(n, device=mask.device)[None, :] < mask.sum(-1, keepdim=True)
            sub = seq.gather(order, valid)
            sub_hidden = self.encode(sub, model) * valid[..., None].to(seq.hidden.dtype)
            D = seq.hidden.shape[-1]
            refined = torch.zeros_like(seq.hidden).scatter(1, order[..., None].expand(B, n, D), sub_hidden)
        hidden = torch.where(mask[..., None], refined, seq.hidden)
        return hidden, mask

    def before_llm(self, seq: TokenSequence, ctx: ReductionContext) -> TokenSequence:
        if not self.attached:
            raise RuntimeError("CS2.before_llm called before attach(model): build it through OmniThinker")
        candidates = ctx.candidates & seq.attention_mask
        if not bool(seq.av_mask.any()):  # a text-only batch passes through untouched
            ctx.stats["cs2_k"] = torch.zeros(seq.batch_size, dtype=torch.long, device=seq.hidden.device)
            return seq
        hidden, _ = self.refine(seq, ctx.model)
        refined = seq.replace(hidden=hidden)
        assert self.scorer is not None
        scores = self.scorer(refined)
        selection = self.selector(scores, candidates, ctx.keep_ratio, seq.modality)
        keep = selection.keep & candidates
        if selection.weight is not None:
            weight = torch.where(candidates, selection.weight, torch.ones_like(selection.weight))
            hidden = hidden * weight[..., None].to(hidden.dtype)
        ctx.stats["cs2_k"] = selection.k
        return seq.replace(hidden=hidden).keep(keep | ~candidates)
