"""GroupedEpochSampler: mmdet's aspect-ratio grouped batches with EpochSampler's determinism."""

from __future__ import annotations

import math
from collections import Counter

import pytest

from trainers.sampling import GroupedEpochSampler, aspect_ratio_flags


def _flags(n_wide: int, n_tall: int) -> list[int]:
    return [1] * n_wide + [0] * n_tall  # 1: wider than tall


@pytest.mark.parametrize("world_size,batch_size", [(1, 2), (2, 2), (4, 2), (2, 4)])
def test_every_batch_is_one_group_and_every_image_is_seen(world_size, batch_size):
    flags = [1, 0, 0, 1, 1, 1, 0, 1, 0, 1, 1, 0, 1]  # 8 wide, 5 tall
    samplers = [GroupedEpochSampler(flags, batch_size, seed=3, flip_prob=0.5, rank=r, world_size=world_size)
                for r in range(world_size)]
    chunk = batch_size * world_size
    expected_per_rank = (math.ceil(8 / chunk) + math.ceil(5 / chunk)) * batch_size
    seen = Counter()
    for sampler in samplers:
        sampler.set_epoch(2)
        items = list(sampler)
        assert len(items) == len(sampler) == sampler.per_rank == expected_per_rank
        for start in range(0, len(items), batch_size):
            assert len({flags[i] for i, _ in items[start:start + batch_size]}) == 1
        seen.update(i for i, _ in items)
    assert set(seen) == set(range(len(flags)))
    # Padding repeats images of the group it fills: each group's counts differ by at most one round.
    for group in (0, 1):
        counts = [seen[i] for i in range(len(flags)) if flags[i] == group]
        assert max(counts) - min(counts) <= 1


def test_order_is_a_function_of_seed_and_epoch_and_resume_continues_it():
    flags = _flags(11, 7)
    sampler = GroupedEpochSampler(flags, 2, seed=5, flip_prob=0.5)
    sampler.set_epoch(1)
    full = list(sampler)
    again = GroupedEpochSampler(flags, 2, seed=5, flip_prob=0.5)
    again.set_epoch(1)
    assert list(again) == full
    again.set_epoch(2)
    assert list(again) != full
    resumed = GroupedEpochSampler(flags, 2, seed=5, flip_prob=0.5)
    resumed.set_epoch(1, start=6)
    assert list(resumed) == full[6:] and len(resumed) == len(full) - 6
    assert any(flip for _, flip in full) and not all(flip for _, flip in full)


def test_batches_of_both_groups_are_interleaved():
    flags = _flags(40, 40)
    sampler = GroupedEpochSampler(flags, 2, seed=0, flip_prob=0.0)
    sampler.set_epoch(0)
    items = list(sampler)
    batch_groups = [flags[items[k][0]] for k in range(0, len(items), 2)]
    changes = sum(a != b for a, b in zip(batch_groups, batch_groups[1:]))
    assert changes > 5  # shuffled batches, not all wide then all tall


def test_unshuffled_order_is_grouped_in_index_order():
    sampler = GroupedEpochSampler([1, 0, 1, 0, 1], 2, seed=0, flip_prob=0.0, shuffle=False)
    assert [i for i, _ in sampler] == [1, 3, 0, 2, 4, 0]


def test_aspect_ratio_flags_from_a_repeated_voc_set(synthetic_voc):
    from trainers.data.voc import VOCDetection

    dataset = VOCDetection(synthetic_voc["root"], sets=(("2007", "trainval"),), repeat=2, train=True)
    flags = aspect_ratio_flags(dataset)
    base = [1 if a["width"] / a["height"] > 1 else 0 for a in dataset.annotations]
    assert flags == base * 2 and len(flags) == len(dataset)
