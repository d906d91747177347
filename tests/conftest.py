"""Shared fixtures: a tiny random Qwen2.5-Omni thinker and synthetic interleaved audio-video batches.

Other test modules reuse these: ``tiny_config`` (a factory around
:func:`ep_kit.models.tiny.tiny_thinker_config`), ``av_batch`` (a factory around
:func:`ep_kit.models.tiny.make_av_batch`) and ``mixed_specs`` (two A/V samples of different length
plus a text-only one).
"""

from __future__ import annotations

import pytest
import torch

from ep_kit.models.tiny import SampleSpec, make_av_batch, tiny_thinker_config


@pytest.fixture
def tiny_config():
    """Factory: ``tiny_config(**overrides)`` -> a tiny thinker config (hidden 64, 2 layers by default)."""

    def build(**overrides):
        kwargs = {"hidden_size": 64, "num_layers": 2, "vision_depth": 1, "audio_layers": 1}
        kwargs.update(overrides)
        return tiny_thinker_config(**kwargs)

    return build


@pytest.fixture
def av_specs() -> list[SampleSpec]:
    """Two A/V samples of different lengths (video interleaved with its audio in 2-second chunks)."""
    return [
        SampleSpec(prompt_len=6, answer_len=3, frames=4, height=56, width=56, audio_seconds=2.0),
        SampleSpec(prompt_len=3, answer_len=4, frames=6, height=28, width=56, audio_seconds=3.0),
    ]


@pytest.fixture
def mixed_specs(av_specs) -> list[SampleSpec]:
    """The two A/V samples plus a text-only sample."""
    return [*av_specs, SampleSpec(prompt_len=5, answer_len=2, frames=0, audio_seconds=0.0)]


@pytest.fixture
def av_batch():
    """Factory: ``av_batch(config, specs=None, padding_side="right", seed=0)`` -> processor-shaped batch."""

    def build(config, specs=None, padding_side="right", seed=0, with_labels=True):
        return make_av_batch(config, specs, padding_side=padding_side, seed=seed, with_labels=with_labels)

    return build


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


def sharpen_llm(thinker, std: float = 0.2, seed: int = 0):
    """Re-draw the decoder matrices and lm_head with a large std so positions/tokens change logits visibly.

    transformers' 0.02 init makes a tiny model's attention almost uniform and its logits almost
    constant, which would let wrong positions or dropped tokens go unnoticed.
    """
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for module in (thinker.model.language_model, thinker.lm_head):
            for p in module.parameters():
                if p.ndim == 2:
                    p.copy_(torch.randn(p.shape, generator=gen) * std)
    return thinker


@pytest.fixture
def tiny_model(tiny_config):
    """Factory: ``tiny_model(config=None, **components)`` -> OmniThinker on a sharpened random thinker."""
    from ep_kit.models import OmniThinker

    def build(config=None, **components):
        config = config if config is not None else tiny_config()
        thinker = OmniThinker.from_config(config).thinker
        sharpen_llm(thinker)
        return OmniThinker(thinker, **components)

    return build


@pytest.fixture(scope="session")
def standin(tmp_path_factory):
    """The stand-in Qwen2.5-Omni checkpoint and data (``python -m ep_kit.standin``), 2 questions per benchmark."""
    from ep_kit.standin import write_standin

    return write_standin(tmp_path_factory.mktemp("standin"), questions=2)
