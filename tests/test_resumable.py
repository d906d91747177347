"""``ep_kit.data.resumable``: the sharded, seeded epoch order and the loader that resumes mid-epoch.

Expected index lists are written out by hand where the order is the identity (``shuffle=False``),
and derived from an uninterrupted run of the same loader where it is shuffled. The Lightning loop
restoring the loader (and a killed 2-process DDP fit) is checked in ``test_reliability_training.py``.
"""

from __future__ import annotations

import math
import re
from collections import Counter
from typing import Any

import pytest
from torch.utils.data import IterableDataset
from torch.utils.data.distributed import DistributedSampler

from ep_kit.data.resumable import DistributedEpochSampler, ResumableDataLoader


def _batches(loader: ResumableDataLoader) -> list[list[int]]:
    return [b.tolist() for b in loader]


# ------------------------------------------------------------------------------- the epoch order
@pytest.mark.parametrize(
    ("n", "world", "expected"),
    [
        (9, 3, [[0, 3, 6], [1, 4, 7], [2, 5, 8]]),  # a multiple of the world size: disjoint
        (10, 3, [[0, 3, 6, 9], [1, 4, 7, 0], [2, 5, 8, 1]]),  # padded with the first 2 indices
        (2, 5, [[0], [1], [0], [1], [0]]),  # fewer samples than ranks: the order repeats
        (4, 1, [[0, 1, 2, 3]]),
    ],
)
def test_unshuffled_shards_by_hand(n, world, expected):
    for rank in range(world):
        sampler = DistributedEpochSampler(range(n), num_replicas=world, rank=rank, shuffle=False)
        assert list(sampler) == expected[rank]
        assert len(sampler) == math.ceil(n / world)
    covered = [i for shard in expected for i in shard]
    assert set(covered) == set(range(n))


@pytest.mark.parametrize(("n", "world"), [(12, 3), (12, 1), (7, 4)])
def test_shuffled_shards_are_disjoint_and_cover_the_epoch(n, world):
    for epoch in range(3):
        shards = []
        for rank in range(world):
            sampler = DistributedEpochSampler(range(n), num_replicas=world, rank=rank, seed=11)
            sampler.set_epoch(epoch)
            shards.append(list(sampler))
        padding = world * math.ceil(n / world) - n
        counts = Counter(i for shard in shards for i in shard)
        assert set(counts) == set(range(n))
        assert sum(c - 1 for c in counts.values()) == padding  # only the padding is seen twice
        if padding == 0:
            assert all(not set(a) & set(b) for k, a in enumerate(shards) for b in shards[k + 1:])


def test_order_is_a_function_of_seed_and_epoch_only():
    def order(seed: int, epoch: int, world: int = 1, rank: int = 0) -> list[int]:
        sampler = DistributedEpochSampler(range(20), num_replicas=world, rank=rank, seed=seed)
        sampler.set_epoch(epoch)
        return sampler.order()

    orders = {(seed, epoch): order(seed, epoch) for seed in (0, 1) for epoch in (0, 1, 2)}
    for (seed, epoch), perm in orders.items():
        assert sorted(perm) == list(range(20))  # a permutation
        assert perm == order(seed, epoch)  # the same in a fresh process, i.e. on resume
        assert perm == order(seed, epoch, world=4, rank=3)  # the same on every rank and world size
    assert len({tuple(p) for p in orders.values()}) == len(orders)  # every (seed, epoch) its own order
    sampler = DistributedEpochSampler(range(20), seed=0)
    sampler.set_epoch(2)
    assert list(sampler) == list(sampler) == orders[(0, 2)]  # iterating again replays the epoch
    unshuffled = DistributedEpochSampler(range(5), seed=3, shuffle=False)
    unshuffled.set_epoch(4)
    assert unshuffled.order() == [0, 1, 2, 3, 4]


def test_start_skips_the_head_of_the_shard_once():
    sampler = DistributedEpochSampler(range(10), num_replicas=2, rank=1, shuffle=False)  # shard 1, 3, 5, 7, 9
    sampler.start = 3
    assert list(sampler) == [7, 9]
    assert list(sampler) == [1, 3, 5, 7, 9]


def test_sampler_refuses_no_ranks():
    with pytest.raises(ValueError, match="num_replicas must be >= 1, got 0"):
        DistributedEpochSampler(range(4), num_replicas=0)


# ------------------------------------------------------------------------------------ the loader
def test_loader_batches_this_ranks_shard():
    loader = ResumableDataLoader(list(range(10)), batch_size=2, shuffle=False, num_replicas=2, rank=1)
    assert (loader.num_replicas, loader.rank, len(loader)) == (2, 1, 3)
    assert _batches(loader) == [[1, 3], [5, 7], [9]]
    assert isinstance(loader.sampler, DistributedSampler)  # so Lightning does not inject its own


def test_state_dict_records_the_position_and_what_it_refers_to():
    loader = ResumableDataLoader(list(range(10)), batch_size=3, shuffle=False, seed=5, num_replicas=2)
    loader.sampler.set_epoch(4)
    it = iter(loader)
    next(it)
    assert loader.state_dict() == {"epoch": 4, "consumed": 1, "epoch_batches": 2, "seed": 5,
                                   "dataset_size": 10, "batch_size": 3, "world_size": 2}


def test_mid_epoch_resume_yields_exactly_the_remaining_batches_by_hand():
    loader = ResumableDataLoader(list(range(10)), batch_size=3, shuffle=False)
    it = iter(loader)
    assert [next(it).tolist() for _ in range(2)] == [[0, 1, 2], [3, 4, 5]]
    state = loader.state_dict()
    assert state["consumed"] == 2
    resumed = ResumableDataLoader(list(range(10)), batch_size=3, shuffle=False)
    resumed.load_state_dict(state)
    assert _batches(resumed) == [[6, 7, 8], [9]]
    assert _batches(resumed) == [[0, 1, 2], [3, 4, 5], [6, 7, 8], [9]]  # the next epoch starts at its head


def test_mid_epoch_resume_on_two_ranks_by_hand():
    states = []
    for rank, head in ((0, [[0, 2]]), (1, [[1, 3]])):
        loader = ResumableDataLoader(list(range(10)), batch_size=2, shuffle=False, num_replicas=2, rank=rank)
        it = iter(loader)
        assert [next(it).tolist()] == head
        states.append(loader.state_dict())
    assert states[0] == states[1]
    remaining = {0: [[4, 6], [8]], 1: [[5, 7], [9]]}
    for rank in (0, 1):
        loader = ResumableDataLoader(list(range(10)), batch_size=2, shuffle=False, num_replicas=2, rank=rank)
        loader.load_state_dict(states[0])
        assert _batches(loader) == remaining[rank]


def test_shuffled_resume_continues_the_same_epochs_order():
    full = ResumableDataLoader(list(range(11)), batch_size=4, seed=2)
    full.sampler.set_epoch(3)
    uninterrupted = _batches(full)
    loader = ResumableDataLoader(list(range(11)), batch_size=4, seed=2)
    loader.sampler.set_epoch(3)
    it = iter(loader)
    next(it)
    state = loader.state_dict()
    resumed = ResumableDataLoader(list(range(11)), batch_size=4, seed=2)
    resumed.load_state_dict(state)  # restores the epoch too
    assert resumed.sampler.epoch == 3
    assert _batches(resumed) == uninterrupted[1:]


def test_batches_read_ahead_are_not_counted_as_trained():
    loader = ResumableDataLoader(list(range(10)), batch_size=2, shuffle=False, read_ahead=1)
    it = iter(loader)
    assert loader.state_dict()["consumed"] == 0
    for _ in range(3):
        next(it)
    assert loader.state_dict()["consumed"] == 2  # the third batch may still sit in a fetcher
    list(it)
    assert loader.state_dict()["consumed"] == 5  # an exhausted epoch counts every batch


def test_a_state_without_the_size_fields_is_resumed_on_what_it_has():
    loader = ResumableDataLoader(list(range(10)), batch_size=3, shuffle=False)
    loader.load_state_dict({"epoch": 0, "consumed": 1})
    assert _batches(loader) == [[3, 4, 5], [6, 7, 8], [9]]


class _Stream(IterableDataset):
    def __iter__(self):
        yield from range(3)


def test_loader_refusals():
    with pytest.raises(ValueError, match="needs a map-style dataset with a length"):
        ResumableDataLoader(_Stream())
    for key in ("sampler", "batch_sampler"):
        with pytest.raises(ValueError, match=f"chooses its own sampler; do not pass {key}"):
            ResumableDataLoader(list(range(4)), **{key: [0, 1, 2, 3]})
    assert _batches(ResumableDataLoader(list(range(3)), shuffle=False, sampler=None)) == [[0], [1], [2]]


# ------------------------------------------------------------------ sharded, resumable sampling
def _rank_loaders(n: int, batch_size: int, world: int, seed: int = 7) -> list[ResumableDataLoader]:
    return [
        ResumableDataLoader(list(range(n)), batch_size=batch_size, seed=seed, num_replicas=world, rank=r)
        for r in range(world)
    ]


def _start_epoch(loader: ResumableDataLoader, epoch: int) -> None:
    """What Lightning's fit loop does at the start of every epoch (also after restoring the state)."""
    loader.sampler.set_epoch(epoch)


def _flat(batches: list[Any]) -> list[int]:
    return [int(i) for b in batches for i in b]


@pytest.mark.parametrize("epoch", [0, 1])
def test_two_ranks_interrupted_and_restored_train_the_epoch_exactly_once(epoch):
    n, batch_size, world, done = 14, 3, 2, 2  # 7 samples per rank: batches of 3, 3, 1
    full = []
    for loader in _rank_loaders(n, batch_size, world):
        _start_epoch(loader, epoch)
        full.append([b.tolist() for b in loader])
    assert Counter(_flat(full[0]) + _flat(full[1])) == Counter(range(n))  # the uninterrupted epoch

    before, states = [], []
    for loader in _rank_loaders(n, batch_size, world):
        _start_epoch(loader, epoch)
        it = iter(loader)
        before.append([next(it).tolist() for _ in range(done)])
        states.append(loader.state_dict())
    assert states[0] == states[1]  # rank-agnostic: every rank restores from rank 0's copy in the checkpoint

    after = []
    for loader in _rank_loaders(n, batch_size, world):
        loader.load_state_dict(states[0])
        _start_epoch(loader, epoch)
        after.append([b.tolist() for b in loader])
    trained = [i for r in range(world) for i in _flat(before[r]) + _flat(after[r])]
    assert Counter(trained) == Counter(range(n))  # each sample exactly once over both ranks
    for r in range(world):
        assert before[r] + after[r] == full[r]  # and each rank's batches are the uninterrupted ones
        assert len(after[r]) == math.ceil(math.ceil(n / world) / batch_size) - done


def test_epochs_reshuffle_and_shards_follow_the_distributed_sampler_padding():
    """Padded as by ``DistributedSampler(drop_last=False)``: 7 samples on 2 ranks repeat the first."""
    n, world = 7, 2
    loaders = _rank_loaders(n, 2, world)
    orders = []
    for epoch in (0, 1):
        shards = []
        for r, loader in enumerate(loaders):
            _start_epoch(loader, epoch)
            perm = loader.sampler.order()  # the epoch's permutation, the same on every rank
            assert sorted(perm) == list(range(n)) and perm == loaders[0].sampler.order()
            # independent rule: torch's own DistributedSampler over the positions of the permutation
            positions = DistributedSampler(range(n), num_replicas=world, rank=r, shuffle=False)
            shards.append(_flat(list(loader)))
            assert shards[r] == [perm[p] for p in positions]
        assert Counter(shards[0] + shards[1]) == Counter(list(range(n)) + [perm[0]])
        orders.append(perm)
    assert orders[0] != orders[1]  # reshuffled every epoch
    # Lightning injects its own DistributedSampler only into loaders whose sampler is not one.
    assert all(isinstance(loader.sampler, DistributedSampler) for loader in loaders)


def _mid_epoch_state(n: int, batch_size: int, world: int, done: int) -> dict[str, int]:
    loader = _rank_loaders(n, batch_size, world)[0]
    it = iter(loader)
    for _ in range(done):
        next(it)
    return loader.state_dict()


def test_mismatched_mid_epoch_resume_is_refused_with_old_and_new_values():
    state = _mid_epoch_state(12, 2, 2, done=2)  # 6 samples per rank: 3 batches, 2 done
    cases = [
        ((14, 2, 2), ["dataset size 12 -> 14"]),
        ((12, 3, 2), ["batch size 2 -> 3"]),
        ((12, 2, 1), ["world size (data-parallel processes) 2 -> 1"]),
        ((10, 4, 4), ["dataset size 12 -> 10", "batch size 2 -> 4",
                      "world size (data-parallel processes) 2 -> 4"]),
    ]
    for (n, batch_size, world), changes in cases:
        loader = ResumableDataLoader(list(range(n)), batch_size=batch_size, seed=7, num_replicas=world)
        with pytest.raises(ValueError) as err:
            loader.load_state_dict(state)
        message = str(err.value)
        for change in changes:
            assert change in message
        assert "epoch 0, 2 of 3 batches per rank done" in message
        assert "Resume with the old setting" in message and "--model.init_from=CHECKPOINT" in message
    loader = ResumableDataLoader(list(range(12)), batch_size=2, seed=7, num_replicas=2, rank=0)
    with pytest.raises(ValueError) as err:
        loader.load_state_dict({**state, "seed": 3})
    assert str(err.value) == (
        "cannot resume the training data mid-epoch: seed 3 -> 7 since the checkpoint was written (epoch 0, "
        "2 of 3 batches per rank done), so the rest of that epoch cannot be replayed without repeating or "
        "skipping samples. Resume with the old setting, resume from a checkpoint written at the end of an "
        "epoch, or restart the epoch with a fresh run from these weights (--model.init_from=CHECKPOINT "
        "instead of --ckpt_path)"
    )


def test_single_process_resume_refuses_a_changed_dataset_or_batch_size():
    state = _mid_epoch_state(12, 4, 1, done=1)  # 3 batches, 1 done
    for n, batch_size, change in ((10, 4, "dataset size 12 -> 10"), (12, 3, "batch size 4 -> 3")):
        loader = ResumableDataLoader(list(range(n)), batch_size=batch_size, seed=7)
        with pytest.raises(ValueError, match=re.escape(change)):
            loader.load_state_dict(state)


def test_an_epoch_boundary_state_starts_the_next_epoch_whatever_changed():
    for done in (0, 3):  # nothing or all of the 3 batches: nothing to replay
        state = _mid_epoch_state(12, 4, 1, done=done)
        loader = ResumableDataLoader(list(range(10)), batch_size=2, seed=7, num_replicas=2, rank=1)
        loader.load_state_dict(state)
        _start_epoch(loader, 1)
        fresh = ResumableDataLoader(list(range(10)), batch_size=2, seed=7, num_replicas=2, rank=1)
        _start_epoch(fresh, 1)
        assert [b.tolist() for b in loader] == [b.tolist() for b in fresh]
