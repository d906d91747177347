"""Model adapters: the Qwen2.5-Omni thinker wrapper, config factories and checkpoint I/O.

The only package that touches transformers internals. Its names are imported lazily (PEP 562), so
that leaf modules such as :mod:`ep_kit.models.hf` can be imported by the components (rotary, media,
scorers) without loading the wrapper, which itself imports those components.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "OmniOutput": "ep_kit.models.omni",
    "OmniThinker": "ep_kit.models.omni",
    "Prefill": "ep_kit.models.omni",
    "SampleSpec": "ep_kit.models.tiny",
    "make_av_batch": "ep_kit.models.tiny",
    "qwen_omni_3b_config": "ep_kit.models.tiny",
    "qwen_omni_7b_config": "ep_kit.models.tiny",
    "tiny_thinker_config": "ep_kit.models.tiny",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module 'ep_kit.models' has no attribute {name!r}")
    return getattr(importlib.import_module(_EXPORTS[name]), name)


def __dir__() -> list[str]:
    return __all__
