"""ep-kit: joint audio-visual token reduction (EchoingPixels: CS2 + Sync-RoPE) for Qwen2.5-Omni."""

from ep_kit.budget import check_ratio, keep_count, keep_counts
from ep_kit.sequence import Modality, TokenSequence

__all__ = ["Modality", "TokenSequence", "check_ratio", "keep_count", "keep_counts"]
__version__ = "0.1.0"
