"""BlockLoader: disjoint covering shards, aligned labels, exact resume across epochs."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch

from ava.data import BlockLoader


class FakeBlocks:
    """Block i is [i*100, i*100+1, ...]: its content names it."""

    def __init__(self, n: int, seq_len: int = 4) -> None:
        self.n, self.seq_len = n, seq_len

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int) -> np.ndarray:
        return np.arange(i * 100, i * 100 + self.seq_len + 1)


def block_ids(batch) -> list:
    return (batch["input_ids"][:, 0] // 100).tolist()


def epoch_ids(loader: BlockLoader) -> list:
    return [i for _ in range(loader.batches_per_epoch) for i in block_ids(next(loader))]


def test_batch_shapes_and_alignment():
    loader = BlockLoader(FakeBlocks(10), micro_batch_size=3, seed=0)
    batch = next(loader)
    assert batch["input_ids"].shape == batch["labels"].shape == (3, 4)
    assert batch["input_ids"].dtype == batch["labels"].dtype == torch.int64
    assert (batch["labels"][:, :-1] == batch["input_ids"][:, 1:]).all()
    assert (batch["labels"] == batch["input_ids"] + 1).all()


@pytest.mark.parametrize("n", [40, 43])
def test_two_ranks_are_disjoint_and_cover_the_epoch(n):
    loaders = [BlockLoader(FakeBlocks(n), micro_batch_size=4, rank=r, world_size=2, seed=3)
               for r in range(2)]
    assert [lo.batches_per_epoch for lo in loaders] == [n // 2 // 4] * 2
    for epoch in range(2):
        seen = [epoch_ids(lo) for lo in loaders]
        assert not set(seen[0]) & set(seen[1])
        assert len(seen[0]) == len(seen[1]) == len(set(seen[0]))
        order = np.random.default_rng([3, epoch]).permutation(n)
        served = set(order[: 2 * loaders[0].batches_per_epoch * 4].tolist())
        assert set(seen[0]) | set(seen[1]) == served
        if n == 40:  # divisible: the epoch is covered entirely
            assert served == set(range(n))
    assert [lo.epoch for lo in loaders] == [1, 1]


def test_epochs_are_reshuffled_and_seeded():
    a = BlockLoader(FakeBlocks(32), micro_batch_size=4, seed=1)
    b = BlockLoader(FakeBlocks(32), micro_batch_size=4, seed=1)
    c = BlockLoader(FakeBlocks(32), micro_batch_size=4, seed=2)
    first, second = epoch_ids(a), epoch_ids(a)
    assert sorted(first) == sorted(second) == list(range(32)) and first != second
    assert epoch_ids(b) == first and epoch_ids(c) != first


@pytest.mark.parametrize("k", [0, 3, 7, 8, 13])
def test_resume_at_batch_k_continues_exactly(k):
    # 7 batches per epoch on rank 1 of 2: k=7, 8 and 13 resume at or after an epoch boundary
    def make():
        return BlockLoader(FakeBlocks(61), micro_batch_size=4, rank=1, world_size=2, seed=5)

    original = make()
    assert original.batches_per_epoch == 7
    for _ in range(k):
        next(original)
    state = original.state_dict()
    assert state["epoch"] == max(k - 1, 0) // 7
    expected = [block_ids(b) for b in itertools.islice(original, 20)]
    resumed = make()
    resumed.load_state_dict(state)
    assert [block_ids(b) for b in itertools.islice(resumed, 20)] == expected
    assert resumed.state_dict() == original.state_dict()


def test_state_from_another_geometry_is_refused_unless_not_strict():
    loader = BlockLoader(FakeBlocks(64), micro_batch_size=4, rank=0, world_size=2, seed=5)
    for _ in range(4):
        next(loader)
    other = BlockLoader(FakeBlocks(64), micro_batch_size=4, rank=0, world_size=4, seed=5)
    with pytest.raises(ValueError, match=r"world_size=2 \(now 4\)"):
        other.load_state_dict(loader.state_dict())
    other.load_state_dict(loader.state_dict(), strict=False)
    assert (other.epoch, other.position) == (0, 2)  # 4 batches x 2 ranks = 2 batches x 4 ranks
    with pytest.raises(ValueError, match="num_blocks=64"):
        BlockLoader(FakeBlocks(65), micro_batch_size=4, seed=5).load_state_dict(loader.state_dict())


def test_too_few_blocks_is_a_clear_error():
    loader = BlockLoader(FakeBlocks(5), micro_batch_size=4, world_size=2)
    assert loader.batches_per_epoch == 0
    with pytest.raises(ValueError, match="5 blocks cannot fill one global batch"):
        next(loader)


LAYOUTS = [(2, 4, 1), (1, 8, 1), (1, 4, 2), (4, 1, 2), (8, 1, 1)]  # (world, micro, accum): global batch 8


def step_samples(world: int, micro: int, accum: int, steps: int, start: int = 0, states=None):
    """The set of blocks each global step consumes, over all ranks; optionally resuming every rank
    from `states` (saved by another layout) with strict=False."""
    loaders = [BlockLoader(FakeBlocks(101), micro_batch_size=micro, rank=r, world_size=world, seed=5, accum=accum)
               for r in range(world)]
    if states is not None:
        for loader in loaders:
            loader.load_state_dict(states[0], strict=False)
    out = []
    for _ in range(steps):
        blocks = set()
        for loader in loaders:
            for _ in range(accum):
                blocks.update((next(loader)["input_ids"][:, 0] // 100).tolist())
        out.append(frozenset(blocks))
    return out, [loader.state_dict() for loader in loaders]


def test_every_layout_of_one_global_batch_consumes_the_same_samples_per_step():
    reference, _ = step_samples(*LAYOUTS[0], steps=30)  # 12 steps per epoch: into the third epoch
    assert all(len(s) == 8 for s in reference)
    for layout in LAYOUTS[1:]:
        assert step_samples(*layout, steps=30)[0] == reference, layout


def test_resuming_on_another_layout_continues_with_the_same_samples():
    reference, _ = step_samples(*LAYOUTS[0], steps=20)
    for saved, resumed in ((LAYOUTS[0], LAYOUTS[1]), (LAYOUTS[2], LAYOUTS[3]), (LAYOUTS[1], LAYOUTS[4])):
        first, states = step_samples(*saved, steps=7)
        rest, _ = step_samples(*resumed, steps=13, states=states)
        assert first + rest == reference, (saved, resumed)
