"""The module Lightning trains is in train mode, so transformers' activation checkpointing really runs.

``from_pretrained`` hands the thinker back in eval mode and Lightning keeps every submodule's mode, so
without an explicit ``train()`` the LLM was trained in eval mode ("Found 130 module(s) in eval mode")
and transformers skipped checkpointing, which it applies only when ``gradient_checkpointing and
training`` (transformers.modeling_layers.GradientCheckpointingLayer).
"""

from __future__ import annotations

from transformers.modeling_layers import GradientCheckpointingLayer

from ep_kit.reducers import CS2
from ep_kit.rope import SyncRoPE
from ep_kit.train import EPKitModule, TinyThinker


def test_module_from_the_shipped_base_starts_in_train_mode_with_checkpointing_active():
    module = EPKitModule(TinyThinker(init_from="shipped"), rope=SyncRoPE([2, 2, 2, 2]), reducer=CS2(num_layers=2),
                         gradient_checkpointing=True)
    assert [name for name, m in module.named_modules() if not m.training] == []
    layers = [m for m in module.modules() if isinstance(m, GradientCheckpointingLayer)]
    assert len(layers) >= 4 + 2  # the toy base's decoder layers and the sieve's two copies, at least
    assert all(layer.gradient_checkpointing and layer.training for layer in layers)
    module.eval()  # what Lightning's evaluation loops do; train() restores it for the next epoch
    assert not any(m.training for m in module.modules())
