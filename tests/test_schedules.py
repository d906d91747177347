"""The learning-rate schedule (``model.lr_scheduler``): the paper's warm-up + cosine, step by step.

The reference is computed here in float64 with numpy from the definition (linear warm-up over
``ceil(warmup_ratio * N)`` steps reaching the peak at its last step, then a half cosine down to
``min_lr_ratio`` at step ``N``), independently of :mod:`ep_kit.train.schedules`.
"""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest
import torch

from ep_kit.train.module import EPKitModule
from ep_kit.train.schedules import WarmupCosine
from ep_kit.train.sources import TinyThinker


def reference_factors(steps: np.ndarray, total: int, warmup_ratio: float, min_lr_ratio: float) -> np.ndarray:
    steps = steps.astype(np.float64)
    warmup = np.ceil(np.float64(warmup_ratio) * total)
    ramp = (steps + 1.0) / max(warmup, 1.0)
    progress = np.clip((steps - warmup) / max(1.0, total - warmup), 0.0, 1.0)
    decay = min_lr_ratio + (1.0 - min_lr_ratio) * 0.5 * (1.0 + np.cos(np.pi * progress))
    return np.where(steps < warmup, ramp, decay)


def lrs_per_step(total: int, warmup_ratio: float, min_lr_ratio: float, peaks=(2e-5, 1e-3), extra: int = 3):
    """The learning rate of each parameter group at optimizer steps 0 .. total + extra - 1."""
    params = [torch.nn.Parameter(torch.zeros(2)), torch.nn.Parameter(torch.zeros(2))]
    optimizer = torch.optim.AdamW([{"params": [p], "lr": lr} for p, lr in zip(params, peaks, strict=True)])
    scheduler = WarmupCosine(optimizer, num_training_steps=total, warmup_ratio=warmup_ratio,
                             min_lr_ratio=min_lr_ratio)
    out = []
    for _ in range(total + extra):
        out.append([group["lr"] for group in optimizer.param_groups])  # the lr this step uses
        optimizer.step()
        scheduler.step()
    return np.array(out, dtype=np.float64)


@pytest.mark.parametrize(
    "total, warmup_ratio, min_lr_ratio",
    [(100, 0.05, 0.0), (37, 0.1, 0.1), (10, 0.0, 0.0), (50, 0.2, 1.0), (3, 0.05, 0.0), (1, 0.05, 0.0)],
)
def test_warmup_cosine_matches_a_float64_reference_at_every_step(total, warmup_ratio, min_lr_ratio):
    peaks = np.array([2e-5, 1e-3])
    got = lrs_per_step(total, warmup_ratio, min_lr_ratio, tuple(peaks))
    expected = reference_factors(np.arange(len(got)), total, warmup_ratio, min_lr_ratio)[:, None] * peaks
    np.testing.assert_allclose(got, expected, rtol=1e-12, atol=0.0)


def test_warmup_cosine_hand_values():
    """100 steps, 4 of warm-up (ratio 0.04), floor 10%: values worked out by hand."""
    lr = lrs_per_step(100, 0.04, 0.1, peaks=(1.0, 1.0))[:, 0]
    assert lr[0] == pytest.approx(0.25, rel=1e-15)  # (0 + 1) / 4
    assert lr[1] == pytest.approx(0.5, rel=1e-15)
    assert lr[3] == pytest.approx(1.0, rel=1e-15)  # the peak at the last warm-up step
    assert lr[4] == pytest.approx(1.0, rel=1e-15)  # cosine progress 0
    assert lr[52] == pytest.approx(0.1 + 0.9 * 0.5, rel=1e-14)  # progress 48 / 96 = 1/2
    assert lr[100] == pytest.approx(0.1, rel=1e-14)  # the floor at the end of the run ...
    assert lr[102] == pytest.approx(0.1, rel=1e-14)  # ... and beyond it


@pytest.mark.parametrize("kwargs", [{"warmup_ratio": 1.0}, {"warmup_ratio": -0.1}, {"min_lr_ratio": 1.5},
                                    {"num_training_steps": 0}])
def test_warmup_cosine_rejects_bad_settings(kwargs):
    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    with pytest.raises(ValueError, match="WarmupCosine"):
        WarmupCosine(optimizer, **{"num_training_steps": 10, **kwargs})


def test_module_builds_the_schedule_over_the_runs_steps():
    """``configure_optimizers``: the configured schedule, given the trainer's step count, stepped per step."""
    module = EPKitModule(TinyThinker(num_layers=1), optimizer=lambda p: torch.optim.AdamW(p, lr=1e-3),
                         lr_scheduler=lambda opt, num_training_steps: WarmupCosine(opt, num_training_steps, 0.1))
    module.trainer = SimpleNamespace(max_steps=40)
    config = module.configure_optimizers()
    scheduler = config["lr_scheduler"]["scheduler"]
    assert config["lr_scheduler"]["interval"] == "step"
    assert isinstance(scheduler, WarmupCosine) and scheduler.optimizer is config["optimizer"]
    assert (scheduler.num_training_steps, scheduler.warmup_ratio) == (40, 0.1)
    assert config["optimizer"].param_groups[0]["lr"] == pytest.approx(1e-3 / 4)  # step 0 of 4 warm-up steps

    default = EPKitModule(TinyThinker(num_layers=1))  # the paper's: 5% warm-up, cosine to 0
    default.trainer = SimpleNamespace(max_steps=40)
    scheduler = default.configure_optimizers()["lr_scheduler"]["scheduler"]
    assert isinstance(scheduler, WarmupCosine)
    assert (scheduler.num_training_steps, scheduler.warmup_ratio, scheduler.min_lr_ratio) == (40, 0.05, 0.0)

    constant = EPKitModule(TinyThinker(num_layers=1), lr_scheduler=None)
    constant.trainer = SimpleNamespace(max_steps=40)
    assert isinstance(constant.configure_optimizers(), torch.optim.AdamW)  # no schedule: the optimizer's lr
