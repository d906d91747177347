"""A training DataLoader that resumes mid-epoch exactly where a killed run stopped, on one or many ranks.

Why: Lightning restarts an interrupted epoch from its first batch unless the loader implements
``state_dict`` / ``load_state_dict``; the resumed run then sees other batches than the
uninterrupted one and its final metrics differ. Under a distributed strategy (DDP, DeepSpeed,
FSDP) Lightning also swaps in its own ``DistributedSampler``, which cannot resume either: a run
resumed from a mid-epoch checkpoint re-trains the batches before the checkpoint and never trains
the rest of the epoch.

Here the shuffle order is a pure function of ``(seed, epoch)`` and each rank takes its shard of
it (:class:`DistributedEpochSampler`, a ``DistributedSampler`` so Lightning keeps it instead of
injecting its own); the loader records how many batches the trainer consumed, so a resumed run
replays exactly the remaining batches of every rank. The state is the same on every rank (rank 0
writes the checkpoint and every rank restores from it): epoch, batches consumed per rank, seed,
and the dataset size, batch size and number of data-parallel ranks the position refers to. A
mid-epoch resume with another dataset size, batch size or world size would repeat or skip samples,
so it is refused with what changed and what to do.

Padding rule: the same as ``DistributedSampler(drop_last=False)``. The permutation is extended by
its own first indices up to a multiple of the number of ranks, so every rank gets
``ceil(n / world_size)`` samples: no sample is ever dropped, and when ``n`` is not a multiple of
the world size the first ``world_size - n % world_size`` samples of the permutation are trained
twice per epoch (as with Lightning's default sampler). Rank ``r`` takes positions
``r, r + world_size, ...`` of the padded permutation; with one rank the order is the permutation.

The position saved is the number of batches handed out in the current epoch, minus ``read_ahead``
batches a fetcher may hold without having trained on them. With Lightning 2.6 a checkpoint written
at the end of a training batch finds no batch read ahead (``read_ahead=0``: the training loader
has a length, so the fetcher does not prefetch; checked by the kill-and-resume tests).
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sized
from typing import Any

import torch
from torch.utils.data import DataLoader
from torch.utils.data.distributed import DistributedSampler


class DistributedEpochSampler(DistributedSampler):
    """Rank ``rank``'s shard of a ``(seed, epoch)``-seeded permutation of the dataset, from ``start``.

    A ``DistributedSampler`` subclass, so Lightning's sampler injection leaves it in place (its
    check is ``isinstance(loader.sampler, DistributedSampler)``) and no trainer flag is needed.
    ``num_replicas`` and ``rank`` are explicit (no process group is queried), so the sharding can be
    built and tested in one process. Padding follows ``DistributedSampler(drop_last=False)``.
    """

    def __init__(self, dataset: Sized, num_replicas: int = 1, rank: int = 0, seed: int = 0,
                 shuffle: bool = True) -> None:
        if int(num_replicas) < 1:
            raise ValueError(f"num_replicas must be >= 1, got {num_replicas}")
        super().__init__(dataset, num_replicas=int(num_replicas), rank=int(rank), shuffle=bool(shuffle),
                         seed=int(seed), drop_last=False)
        self.n = len(dataset)
        self.start = 0

    def order(self) -> list[int]:
        """The epoch's permutation of ``range(n)`` (identity when not shuffling), before sharding."""
        if not self.shuffle:
            return list(range(self.n))
        gen = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch)
        return torch.randperm(self.n, generator=gen).tolist()

    def shard(self) -> list[int]:
        """This rank's indices of the epoch, padded like ``DistributedSampler(drop_last=False)``."""
        indices = self.order()
        pad = self.total_size - len(indices)
        if pad > 0 and indices:
            indices += (indices * math.ceil(pad / len(indices)))[:pad]
        return indices[self.rank : self.total_size : self.num_replicas]

    def __iter__(self) -> Iterator[int]:
        start, self.start = self.start, 0
        yield from self.shard()[start:]

    def __len__(self) -> int:
        return self.num_samples


class ResumableDataLoader(DataLoader):
    """``DataLoader`` with a ``(seed, epoch)``-determined order, sharded over ranks, and a resumable position.

    Args:
        dataset: a map-style dataset.
        batch_size, collate_fn, num_workers, ...: as for ``DataLoader`` (no ``sampler``/``shuffle``).
        shuffle: shuffle every epoch (deterministically).
        seed: shuffle seed.
        read_ahead: batches fetched but not yet trained on when a checkpoint is written (Lightning 2.6: 0).
        num_replicas: data-parallel ranks the epoch is sharded over (1: a single process).
        rank: this process's data-parallel rank.
    """

    def __init__(
        self,
        dataset: Any,
        batch_size: int = 1,
        shuffle: bool = True,
        seed: int = 0,
        read_ahead: int = 0,
        num_replicas: int = 1,
        rank: int = 0,
        **kwargs: Any,
    ) -> None:
        if not isinstance(dataset, Sized):
            raise ValueError("ResumableDataLoader needs a map-style dataset with a length")
        for key in ("sampler", "batch_sampler"):
            if kwargs.get(key) is not None:
                raise ValueError(f"ResumableDataLoader chooses its own sampler; do not pass {key}")
        kwargs.pop("sampler", None)
        kwargs.pop("batch_sampler", None)
        self.epoch_sampler = DistributedEpochSampler(dataset, num_replicas, rank, seed=seed, shuffle=shuffle)
        super().__init__(dataset, batch_size=batch_size, sampler=self.epoch_sampler, **kwargs)
        self.seed, self.read_ahead = seed, int(read_ahead)
        self._handed_out = 0
        self._resume_from = 0
        self._done = False

    @property
    def num_replicas(self) -> int:
        """Data-parallel ranks the epoch is sharded over (``len(self)`` counts this rank's batches)."""
        return self.epoch_sampler.num_replicas

    @property
    def rank(self) -> int:
        return self.epoch_sampler.rank

    def __iter__(self):
        skip, self._resume_from = self._resume_from, 0
        assert self.batch_size is not None
        self.epoch_sampler.start = skip * self.batch_size
        self._handed_out, self._done = skip, False
        for batch in super().__iter__():
            self._handed_out += 1
            yield batch
        self._done = True

    def state_dict(self) -> dict[str, int]:
        """The position, identical on every rank (rank 0's copy is the one a checkpoint keeps)."""
        consumed = self._handed_out if self._done else max(0, self._handed_out - self.read_ahead)
        return {
            "epoch": self.epoch_sampler.epoch,
            "consumed": consumed,
            "epoch_batches": len(self),
            "seed": self.seed,
            "dataset_size": self.epoch_sampler.n,
            "batch_size": int(self.batch_size or 1),
            "world_size": self.num_replicas,
        }

    def load_state_dict(self, state: dict[str, int]) -> None:
        """Resume at the saved position; refuse a mid-epoch resume whose data, batch or world size changed.

        A state saved at an epoch boundary (nothing or everything of its epoch consumed) leaves nothing
        to replay: the next epoch starts from its first batch whatever changed. A state from a loader
        that predates the size fields is checked on what it has.
        """
        consumed = int(state["consumed"])
        epoch_batches = int(state.get("epoch_batches", len(self)))
        self.epoch_sampler.set_epoch(int(state["epoch"]))
        if consumed <= 0 or consumed >= epoch_batches:
            self._resume_from = 0  # an epoch boundary: Lightning starts the next epoch from its first batch
            return
        checks = (
            ("seed", "seed", self.seed),
            ("dataset size", "dataset_size", self.epoch_sampler.n),
            ("batch size", "batch_size", int(self.batch_size or 1)),
            ("world size (data-parallel processes)", "world_size", self.num_replicas),
        )
        changed = [
            f"{name} {int(state[key])} -> {value}"
            for name, key, value in checks
            if key in state and int(state[key]) != value
        ]
        if changed:
            raise ValueError(
                f"cannot resume the training data mid-epoch: {', '.join(changed)} since the checkpoint "
                f"was written (epoch {int(state['epoch'])}, {consumed} of {epoch_batches} batches per rank "
                "done), so the rest of that epoch cannot be replayed without repeating or skipping samples. "
                "Resume with the old setting, resume from a checkpoint written at the end of an epoch, or "
                "restart the epoch with a fresh run from these weights (--model.init_from=CHECKPOINT instead "
                "of --ckpt_path)"
            )
        self._resume_from = consumed
