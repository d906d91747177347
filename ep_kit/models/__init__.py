"""Model adapters: the Qwen2.5-Omni thinker wrapper, config factories and checkpoint I/O."""

from ep_kit.models.omni import OmniOutput, OmniThinker
from ep_kit.models.tiny import (
    SampleSpec,
    make_av_batch,
    qwen_omni_3b_config,
    qwen_omni_7b_config,
    tiny_thinker_config,
)

__all__ = [
    "OmniOutput",
    "OmniThinker",
    "SampleSpec",
    "make_av_batch",
    "qwen_omni_3b_config",
    "qwen_omni_7b_config",
    "tiny_thinker_config",
]
