"""Token reducers: the contract (``base``) and the EchoingPixels sieve (``cs2``)."""

from ep_kit.reducers.base import ReductionContext, TokenReducer
from ep_kit.reducers.cs2 import CS2

__all__ = ["CS2", "ReductionContext", "TokenReducer"]
