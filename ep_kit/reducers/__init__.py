"""Token reducers: the contract (``base``), the score-and-select base, CS2 and the training-free baselines.

Every reducer is exported here so that ``--model.reducer.help NAME`` and short ``class_path`` names
work for each of them.
"""

from ep_kit.reducers.base import ReducerHost, ReductionContext, TokenReducer, TokenSchedule
from ep_kit.reducers.cs2 import CS2
from ep_kit.reducers.fastv import FastV
from ep_kit.reducers.intramodal import IntraModal
from ep_kit.reducers.omnizip import OmniZip
from ep_kit.reducers.pyramiddrop import MatchFinalStage, MatchLayerAverage, PyramidDrop, StageRatioRule
from ep_kit.reducers.random import RandomReducer
from ep_kit.reducers.score_select import ScoreSelect

__all__ = [
    "CS2",
    "FastV",
    "IntraModal",
    "MatchFinalStage",
    "MatchLayerAverage",
    "OmniZip",
    "PyramidDrop",
    "RandomReducer",
    "ReducerHost",
    "ReductionContext",
    "ScoreSelect",
    "StageRatioRule",
    "TokenReducer",
    "TokenSchedule",
]
