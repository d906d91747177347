"""The transformers names the rest of the kit may use, re-exported from one place.

Why: a transformers upgrade that moves or renames a Qwen2.5-Omni internal should touch
``ep_kit/models/`` only. Code outside this package imports these names from here, never from
``transformers.models.*``; ``tests/test_boundary.py`` fails if it does.
"""

from __future__ import annotations

from transformers.models.qwen2_5_omni.modeling_qwen2_5_omni import Qwen2_5OmniRMSNorm, apply_rotary_pos_emb
from transformers.models.qwen2_vl.image_processing_qwen2_vl import smart_resize

__all__ = ["Qwen2_5OmniRMSNorm", "apply_rotary_pos_emb", "smart_resize"]


def rms_norm(hidden_size: int, eps: float = 1e-6) -> Qwen2_5OmniRMSNorm:
    """The thinker's own RMSNorm module (used by the scorer head so its weights load by the official name)."""
    return Qwen2_5OmniRMSNorm(hidden_size, eps=eps)
