"""An offline Qwen2 tokenizer over the kit's tiny byte-level vocabulary.

Why it exists: tests and the synthetic benchmark must run the real transformers
``Qwen2_5OmniProcessor`` end to end without downloading a checkpoint. The processor only needs a
``Qwen2Tokenizer`` that knows the media special tokens (``image_token``, ``video_token``, ...) and a
chat template with the same layout as Qwen2.5-Omni's. A byte-level vocabulary (256 byte symbols,
no merges) keeps the embedding table tiny (``ep_kit.tokens.TINY_VOCAB_SIZE``) while still encoding
any text, so the tiny thinker and this tokenizer share one id table that can never drift.
"""

from __future__ import annotations

from pathlib import Path

from transformers import Qwen2Tokenizer

from ep_kit.tokens import TINY_SPECIAL_TOKENS

#: Attribute names the Qwen2.5-Omni processor reads from its tokenizer -> token string.
MEDIA_TOKEN_ATTRIBUTES: dict[str, str] = {
    "image_token": "<|IMAGE|>",
    "audio_token": "<|AUDIO|>",
    "video_token": "<|VIDEO|>",
    "vision_bos_token": "<|vision_bos|>",
    "vision_eos_token": "<|vision_eos|>",
    "audio_bos_token": "<|audio_bos|>",
    "audio_eos_token": "<|audio_eos|>",
}

DEFAULT_SYSTEM_PROMPT = "You are a helpful assistant."

# Same rendering as the Qwen2.5-Omni template: a default system turn when the conversation has none,
# ``<|im_start|>role\n ... <|im_end|>\n`` turns, media parts rendered as bos/placeholder/eos triples.
# (Hand-written for this kit; media numbering options of the original are not needed.)
CHAT_TEMPLATE = (
    "{%- for message in messages -%}"
    "{%- if loop.first and message['role'] != 'system' -%}"
    "{{ '<|im_start|>system\\n" + DEFAULT_SYSTEM_PROMPT + "<|im_end|>\\n' }}"
    "{%- endif -%}"
    "{{ '<|im_start|>' + message['role'] + '\\n' }}"
    "{%- if message['content'] is string -%}"
    "{{ message['content'] }}"
    "{%- else -%}"
    "{%- for part in message['content'] -%}"
    "{%- if part['type'] == 'video' -%}{{ '<|vision_bos|><|VIDEO|><|vision_eos|>' }}"
    "{%- elif part['type'] == 'image' -%}{{ '<|vision_bos|><|IMAGE|><|vision_eos|>' }}"
    "{%- elif part['type'] == 'audio' -%}{{ '<|audio_bos|><|AUDIO|><|audio_eos|>' }}"
    "{%- elif part['type'] == 'text' -%}{{ part['text'] }}"
    "{%- endif -%}"
    "{%- endfor -%}"
    "{%- endif -%}"
    "{{ '<|im_end|>\\n' }}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{ '<|im_start|>assistant\\n' }}{%- endif -%}"
)


def byte_symbols() -> list[str]:
    """The 256 printable symbols byte-level BPE uses for bytes 0..255 (index = byte value).

    Printable Latin-1 bytes stand for themselves; the others are shifted to code points from 256 on,
    in byte order -- the mapping the ``tokenizers`` ByteLevel pre-tokenizer applies.
    """
    printable = set(range(ord("!"), ord("~") + 1)) | set(range(0xA1, 0xAD)) | set(range(0xAE, 0x100))
    symbols, shifted = [], 0
    for b in range(256):
        if b in printable:
            symbols.append(chr(b))
        else:
            symbols.append(chr(256 + shifted))
            shifted += 1
    return symbols


def build_byte_tokenizer(special_tokens: dict[str, int], save_dir: str | Path | None = None) -> Qwen2Tokenizer:
    """A ``Qwen2Tokenizer`` over 256 byte symbols (byte ``b`` -> id ``b``) plus ``special_tokens`` at their ids.

    ``eos`` is ``<|im_end|>`` and ``pad`` is ``<|endoftext|>`` as in the released checkpoints. With
    the released table (:data:`ep_kit.tokens.QWEN_OMNI_SPECIAL_TOKENS`) the special ids are the real
    ones, so a stand-in checkpoint's embedding rows line up with a real model's. When ``save_dir``
    is given the tokenizer is also saved there (``from_pretrained`` round-trips it).
    """
    vocab = {symbol: i for i, symbol in enumerate(byte_symbols())}
    for token, idx in special_tokens.items():
        if idx < 256:
            raise ValueError(f"special token {token} has id {idx} inside the byte range")
        vocab[token] = idx
    tokenizer = Qwen2Tokenizer(
        vocab=vocab,
        merges=[],
        unk_token=None,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        extra_special_tokens=list(special_tokens),
        chat_template=CHAT_TEMPLATE,
        **MEDIA_TOKEN_ATTRIBUTES,
    )
    for token, idx in special_tokens.items():
        got = tokenizer.convert_tokens_to_ids(token)
        if got != idx:  # would mean transformers re-numbered an added token: never silently
            raise RuntimeError(f"byte tokenizer put {token} at id {got}, expected {idx}")
    if save_dir is not None:
        tokenizer.save_pretrained(str(save_dir))
    return tokenizer


def build_tiny_tokenizer(save_dir: str | Path | None = None) -> Qwen2Tokenizer:
    """The kit's tiny vocabulary: bytes, then the special tokens at ``TINY_SPECIAL_TOKENS`` ids."""
    return build_byte_tokenizer(TINY_SPECIAL_TOKENS, save_dir)
