"""Training and evaluation: the LightningModule, its metrics, thinker sources and callbacks."""

from ep_kit.train.callbacks import AnswerWriter, StopAfterSteps
from ep_kit.train.metrics import BudgetShare, MultipleChoiceAccuracy, QuestionOutcome, QuestionOutcomes
from ep_kit.train.module import EPKitModule
from ep_kit.train.sources import PretrainedThinker, ThinkerSource, TinyThinker

__all__ = [
    "AnswerWriter",
    "BudgetShare",
    "EPKitModule",
    "MultipleChoiceAccuracy",
    "PretrainedThinker",
    "QuestionOutcome",
    "QuestionOutcomes",
    "StopAfterSteps",
    "ThinkerSource",
    "TinyThinker",
]
