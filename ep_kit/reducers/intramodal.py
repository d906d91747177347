"""IntraModal baseline: every modality is reduced on its own, by a unimodal redundancy rule.

This is the "reduce each stream separately" family the paper compares against: no cross-modal
signal, no training. Each candidate modality of a sample keeps ``keep_count(n_m, r)`` of its own
``n_m`` tokens (so the total can exceed ``keep_count(n_video + n_audio, r)`` by at most one token
per modality, from the per-modality ceil), ranked by one score per token computed on the merged
input embeddings (the LLM's input, before any decoder layer). The rules are scorer components
(:mod:`ep_kit.scorers`): video :class:`~ep_kit.scorers.TemporalNoveltyScorer` (default) or
:class:`~ep_kit.scorers.NormScorer`; audio :class:`~ep_kit.scorers.NeighbourNoveltyScorer` (default)
or :class:`~ep_kit.scorers.NormScorer`. Lower index wins ties; text and non-candidates are always
kept, with their original positions.
"""

from __future__ import annotations

from collections.abc import Callable
from functools import partial

from ep_kit.reducers.score_select import ScoreSelect
from ep_kit.scorers import PerModalityScorer, Scorer
from ep_kit.selectors import HardTopK, PerModalityTopK


class IntraModal(ScoreSelect):
    """Every modality reduced on its own by a unimodal redundancy rule (no cross-modal signal, no training).

    Each candidate modality keeps ``keep_count(n_m, r)`` of its own ``n_m`` tokens
    (:class:`~ep_kit.selectors.PerModalityTopK`), ranked on the merged input embeddings by ``video``
    and ``audio`` rules (:class:`~ep_kit.scorers.PerModalityScorer`).

    Args:
        video: rule for video tokens (default :class:`~ep_kit.scorers.TemporalNoveltyScorer`).
        audio: rule for audio tokens (default :class:`~ep_kit.scorers.NeighbourNoveltyScorer`).
    """

    stat_key = "intramodal_k"

    def __init__(
        self, video: Callable[[int], Scorer] | None = None, audio: Callable[[int], Scorer] | None = None
    ) -> None:
        super().__init__(
            scorer=partial(PerModalityScorer, video=video, audio=audio), selector=PerModalityTopK(HardTopK())
        )
        # The rules as given (a saved model records them: ep_kit.models.components.describe).
        self.video_factory, self.audio_factory = video, audio
