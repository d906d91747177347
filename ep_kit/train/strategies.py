"""Distributed strategies preset for Qwen2.5-Omni, for users without DeepSpeed.

Why a subclass and not a YAML list of classes: Lightning's ``FSDPStrategy`` takes its wrap policy as
a set of module classes, which a config file cannot name reliably, and the block classes are
transformers internals (kept under :mod:`ep_kit.models`). The paper trains with DeepSpeed ZeRO-2;
``SHARD_GRAD_OP`` is FSDP's equivalent (gradients and optimizer state sharded, parameters whole
during compute).
"""

from __future__ import annotations

from typing import Any, Literal

from lightning.pytorch.strategies import FSDPStrategy

from ep_kit.models.omni import transformer_block_classes


class OmniFSDPStrategy(FSDPStrategy):
    """FSDP with one unit per transformer block of the thinker and of the sieve.

    Args:
        sharding_strategy: ``SHARD_GRAD_OP`` (ZeRO-2-like, default), ``FULL_SHARD`` (ZeRO-3-like,
            less memory, more communication), ``NO_SHARD`` or ``HYBRID_SHARD`` (multi-node).
        state_dict_type: ``full`` (one checkpoint file, loadable by ``model.init_from``) or
            ``sharded`` (a directory per checkpoint, faster to write on many nodes).
        use_orig_params: keep the original parameters so frozen encoders and trained LLM weights
            can share an FSDP unit (needed for the paper's freezing).
        **kwargs: passed on to Lightning's ``FSDPStrategy`` (and from there to torch's FSDP).
    """

    def __init__(
        self,
        sharding_strategy: Literal["SHARD_GRAD_OP", "FULL_SHARD", "NO_SHARD", "HYBRID_SHARD"] = "SHARD_GRAD_OP",
        state_dict_type: Literal["full", "sharded"] = "full",
        use_orig_params: bool = True,
        **kwargs: Any,
    ) -> None:
        super().__init__(
            auto_wrap_policy=transformer_block_classes(),
            sharding_strategy=sharding_strategy,
            state_dict_type=state_dict_type,
            use_orig_params=use_orig_params,
            **kwargs,
        )
