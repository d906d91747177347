"""A DataLoader that resumes mid-epoch exactly where a killed run stopped.

Why: Lightning restarts an interrupted epoch from its first batch unless the loader implements
``state_dict`` / ``load_state_dict``; the resumed run then sees other batches than the
uninterrupted one and its final metrics differ. Here the shuffle order is a pure function of
``(seed, epoch)`` and the loader records how many batches the trainer consumed, so a resumed
run replays exactly the remaining batches.

The position saved is the number of batches handed out in the current epoch, minus ``read_ahead``
batches a fetcher may hold without having trained on them. With Lightning 2.6 a checkpoint written
at the end of a training batch finds no batch read ahead (``read_ahead=0``, checked by the
kill-and-resume test).
"""

from __future__ import annotations

from collections.abc import Iterator, Sized
from typing import Any

import torch
from torch.utils.data import DataLoader, Sampler


class EpochSampler(Sampler[int]):
    """Permutation of ``range(n)`` seeded by ``(seed, epoch)`` (identity when not shuffling), from ``start``."""

    def __init__(self, n: int, seed: int = 0, shuffle: bool = True) -> None:
        self.n, self.seed, self.shuffle = int(n), int(seed), bool(shuffle)
        self.epoch = 0
        self.start = 0

    def set_epoch(self, epoch: int) -> None:
        """Called by Lightning at the start of every epoch."""
        self.epoch = int(epoch)

    def order(self) -> list[int]:
        if not self.shuffle:
            return list(range(self.n))
        gen = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch)
        return torch.randperm(self.n, generator=gen).tolist()

    def __iter__(self) -> Iterator[int]:
        start, self.start = self.start, 0
        yield from self.order()[start:]

    def __len__(self) -> int:
        return self.n


class ResumableDataLoader(DataLoader):
    """``DataLoader`` with a ``(seed, epoch)``-determined order and a resumable position.

    Args:
        dataset: a map-style dataset.
        batch_size, collate_fn, num_workers, ...: as for ``DataLoader`` (no ``sampler``/``shuffle``).
        shuffle: shuffle every epoch (deterministically).
        seed: shuffle seed.
        read_ahead: batches fetched but not yet trained on when a checkpoint is written (Lightning 2.6: 0).
    """

    def __init__(
        self,
        dataset: Any,
        batch_size: int = 1,
        shuffle: bool = True,
        seed: int = 0,
        read_ahead: int = 0,
        **kwargs: Any,
    ) -> None:
        if not isinstance(dataset, Sized):
            raise ValueError("ResumableDataLoader needs a map-style dataset with a length")
        for key in ("sampler", "batch_sampler"):
            if kwargs.get(key) is not None:
                raise ValueError(f"ResumableDataLoader chooses its own sampler; do not pass {key}")
        kwargs.pop("sampler", None)
        kwargs.pop("batch_sampler", None)
        self.epoch_sampler = EpochSampler(len(dataset), seed=seed, shuffle=shuffle)
        super().__init__(dataset, batch_size=batch_size, sampler=self.epoch_sampler, **kwargs)
        self.seed, self.read_ahead = seed, int(read_ahead)
        self._handed_out = 0
        self._resume_from = 0
        self._done = False

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
        consumed = self._handed_out if self._done else max(0, self._handed_out - self.read_ahead)
        return {"epoch": self.epoch_sampler.epoch, "consumed": consumed, "seed": self.seed}

    def load_state_dict(self, state: dict[str, int]) -> None:
        if int(state.get("seed", self.seed)) != self.seed:
            raise ValueError(f"loader state was saved with seed {state.get('seed')}, this loader has seed {self.seed}")
        self.epoch_sampler.set_epoch(int(state["epoch"]))
        self._resume_from = int(state["consumed"])
