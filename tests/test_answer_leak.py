"""Nothing from the first answer token to the end of a training sample is a key of the sieve.

Two training samples share the clip and the question and differ only in the answer's content and
length. With the answer (and everything after it, e.g. the template's newline after ``<|im_end|>``)
excluded as keys, the bidirectional sieve sees the same keys at the same positions for both, so the
scores of the A/V candidates and the selection must be identical. Before the fix the newline after
the answer stayed a key, at a position that moves with the answer's length.
"""

from __future__ import annotations

import numpy as np
import torch

from ep_kit.data.collate import collate_av
from ep_kit.data.media import VideoClip
from ep_kit.data.processor import AVInputBuilder, build_processor
from ep_kit.data.tokenizer import build_tiny_tokenizer
from ep_kit.reducers import CS2
from ep_kit.tokens import TINY_SPECIAL_TOKENS


def _sample(builder: AVInputBuilder, clip: VideoClip, answer: str) -> dict:
    messages = [
        {"role": "user", "content": [{"type": "video"}, {"type": "text", "text": "Which colour?"}]},
        {"role": "assistant", "content": answer},
    ]
    return builder.encode(messages, [clip])


def test_answer_length_and_content_do_not_change_scores_or_selection(tiny_model, tiny_config):
    tok = build_tiny_tokenizer()
    builder = AVInputBuilder(build_processor(tok, min_pixels=28 * 28, max_pixels=56 * 56))
    g = torch.Generator().manual_seed(0)
    frames = torch.randint(0, 256, (4, 3, 56, 56), generator=g, dtype=torch.uint8)
    audio = (0.1 * np.random.default_rng(0).standard_normal(32000)).astype(np.float32)
    clip = VideoClip(frames=frames, fps=2.0, path="clip", audio=audio)
    short, long = _sample(builder, clip, "A"), _sample(builder, clip, "C. a much longer answer than the other one")
    assert short["input_ids"][-1] == ord("\n")  # the template's newline follows <|im_end|>
    model = tiny_model(tiny_config(), reducer=CS2(num_layers=2), keep_ratio=0.2).eval()
    pad = TINY_SPECIAL_TOKENS["<|endoftext|>"]
    outs = []
    for sample in (short, long):
        batch = collate_av([sample], pad_token_id=pad)
        with torch.no_grad():
            full = model.embed(batch)
            hidden, _ = model.reducer.refine(full, model)
            scores = model.reducer.scorer(full.replace(hidden=hidden))
            kept = model(batch).kept
        prompt = int(full.answer_mask[0].nonzero()[0])  # the answer starts here in both samples
        n = int(kept.attention_mask[0].sum())
        kept_prompt = [int(i) for i in kept.source_index[0, :n] if int(i) < prompt]
        outs.append((prompt, scores[0, :prompt], hidden[0, :prompt], kept_prompt))
    (p1, s1, h1, k1), (p2, s2, h2, k2) = outs
    assert p1 == p2
    torch.testing.assert_close(s1, s2, rtol=0, atol=1e-6)
    torch.testing.assert_close(h1, h2, rtol=0, atol=1e-4)  # equal keys; lengths differ (kernel blocking)
    assert k1 == k2
