"""Random selection at the common budget: the floor every reduction method must beat.

Each sample keeps ``k = keep_count(n, r)`` of its ``n`` candidate tokens, drawn uniformly without
replacement (:class:`~ep_kit.scorers.RandomScorer` + :class:`~ep_kit.selectors.HardTopK` on the
score-and-select base); text and non-candidates are always kept, in order, with their original
positions.
"""

from __future__ import annotations

from functools import partial

from ep_kit.reducers.score_select import ScoreSelect
from ep_kit.scorers import RandomScorer
from ep_kit.selectors import HardTopK


class RandomReducer(ScoreSelect):
    """Uniform random pre-LLM selection at the common budget: the floor every method must beat.

    Args:
        seed: an int gives a private generator seeded once at construction (a run is reproducible
            on any device); None draws from torch's global generator.
    """

    stat_key = "random_k"

    def __init__(self, seed: int | None = None) -> None:
        super().__init__(scorer=partial(RandomScorer, seed=seed), selector=HardTopK())
        self.seed = seed

    def extra_repr(self) -> str:
        return f"seed={self.seed}"
