"""Special-token ids: the real Qwen2.5-Omni checkpoints', and the kit's tiny byte-level vocabulary.

The tiny vocabulary is 256 byte symbols followed by the special tokens below, padded to
``TINY_VOCAB_SIZE``. The tiny thinker config (``ep_kit.models.tiny``) and the offline tokenizer
(``ep_kit.data.tokenizer``) both read this table, so ids can never drift apart.
"""

from __future__ import annotations

#: token string -> id in the released Qwen2.5-Omni checkpoints.
QWEN_OMNI_SPECIAL_TOKENS: dict[str, int] = {
    "<|endoftext|>": 151643,
    "<|im_start|>": 151644,
    "<|im_end|>": 151645,
    "<|AUDIO|>": 151646,
    "<|audio_bos|>": 151647,
    "<|audio_eos|>": 151648,
    "<|vision_bos|>": 151652,
    "<|vision_eos|>": 151653,
    "<|IMAGE|>": 151655,
    "<|VIDEO|>": 151656,
}

#: token string -> id in the kit's tiny byte-level vocabulary (tests, synthetic benchmark).
TINY_SPECIAL_TOKENS: dict[str, int] = {name: 256 + i for i, name in enumerate(QWEN_OMNI_SPECIAL_TOKENS)}
TINY_VOCAB_SIZE = 272

#: config field -> token string, for building a thinker config from either table.
CONFIG_TOKEN_FIELDS: dict[str, str] = {
    "audio_token_id": "<|AUDIO|>",
    "image_token_id": "<|IMAGE|>",
    "video_token_id": "<|VIDEO|>",
    "audio_start_token_id": "<|audio_bos|>",
    "audio_end_token_id": "<|audio_eos|>",
    "vision_start_token_id": "<|vision_bos|>",
    "vision_end_token_id": "<|vision_eos|>",
}


def audio_tokens_from_mel(mel_frames: int) -> int:
    """LLM audio tokens for ``mel_frames`` Whisper feature frames: the audio encoder's two stride-2 stages.

    The arithmetic of transformers' ``_get_feat_extract_output_lengths``, kept here so the data
    package (token budgets) and the model factories (synthetic batches) share it without importing
    each other.
    """
    after_cnn = (mel_frames - 1) // 2 + 1
    return (after_cnn - 2) // 2 + 1
