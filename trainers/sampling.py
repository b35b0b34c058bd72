"""Deterministic, resumable sample order and augmentation decisions.

The training order of epoch ``e`` is a permutation drawn from ``seed + e`` (as
``DistributedSampler.set_epoch`` does), sharded across ranks, and every index comes
with its horizontal-flip decision drawn from the same generator. Because the
augmentation is decided here, in the main process, and not by RNGs inside DataLoader
workers, resuming mid-epoch (skipping the batches already seen) reproduces exactly the
batches, flips included, of an uninterrupted run, whatever the number of workers.
"""

from __future__ import annotations

import itertools
import math

import torch
from torch.utils.data import Dataset, Sampler

from trainers.data.transforms import hflip


class EpochSampler(Sampler):
    """Yields ``(index, flip)`` for one epoch of one rank, optionally skipping a prefix."""

    def __init__(self, dataset_size: int, *, seed: int, flip_prob: float, shuffle: bool = True,
                 rank: int = 0, world_size: int = 1):
        self.dataset_size = dataset_size
        self.seed = seed
        self.flip_prob = flip_prob
        self.shuffle = shuffle
        self.rank = rank
        self.world_size = world_size
        self.epoch = 0
        self.start = 0
        # Pad so every rank gets the same number of samples (as DistributedSampler).
        self.per_rank = math.ceil(dataset_size / world_size)

    def set_epoch(self, epoch: int, start: int = 0) -> None:
        """Select the epoch's order; ``start`` samples of this rank are skipped (resume)."""
        self.epoch = epoch
        self.start = start

    def _epoch_plan(self) -> tuple[torch.Tensor, torch.Tensor]:
        generator = torch.Generator().manual_seed(self.seed + self.epoch)
        if self.shuffle:
            order = torch.randperm(self.dataset_size, generator=generator)
        else:
            order = torch.arange(self.dataset_size)
        flips = torch.rand(self.dataset_size, generator=generator) < self.flip_prob
        total = self.per_rank * self.world_size
        if total > self.dataset_size:
            pad = total - self.dataset_size
            order = torch.cat([order, order[:pad]])
            flips = torch.cat([flips, flips[:pad]])
        return order[self.rank::self.world_size], flips[self.rank::self.world_size]

    def __iter__(self):
        order, flips = self._epoch_plan()
        yield from zip(order[self.start:].tolist(), flips[self.start:].tolist())

    def __len__(self) -> int:
        return self.per_rank - self.start


class FlipOnRequest(Dataset):
    """A view of a detection dataset indexed by ``(index, flip)`` from :class:`EpochSampler`."""

    def __init__(self, dataset: Dataset):
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, key):
        index, flip = key
        image, target = self.dataset[index]
        if flip:
            image, target = hflip(image, target)
        return image, target


def aspect_ratio_flags(dataset) -> list[int]:
    """mmdet's ``dataset.flag`` for every index of ``dataset``: 1 where the image is wider
    than tall (width / height > 1), else 0. Read from the annotations (no image is
    opened); a repeated VOC set repeats its flags, as mmdet's ``RepeatDataset``."""
    records = getattr(dataset, "annotations", None)
    if records is None:
        records = getattr(dataset, "_records", None)  # COCODetection
    if records is None or not len(records) or "width" not in records[0]:
        raise TypeError(f"{type(dataset).__name__} has no per-image width/height to group by")
    flags = [1 if record["width"] / record["height"] > 1 else 0 for record in records]
    repeat = len(dataset) // len(flags)
    return flags * repeat


class GroupedEpochSampler(EpochSampler):
    """:class:`EpochSampler` whose batches each hold images of one aspect-ratio group:
    mmdet 2.x ``DistributedGroupSampler`` (``GroupSampler`` for one rank).

    Per epoch, from a generator seeded ``seed + epoch``: each group's indices are
    permuted and padded (by repeating them) to a multiple of ``batch_size × world_size``;
    the groups are concatenated, cut into batches of ``batch_size`` and the batches
    permuted; rank ``r`` takes the ``r``-th contiguous slice of ``per_rank`` samples. The
    flips are drawn after the order from the same generator. The data loader must use
    the same ``batch_size`` (and resume at a multiple of it, as the engine does) for its
    batches to be the sampler's.
    """

    def __init__(self, group_flags, batch_size: int, *, seed: int, flip_prob: float, shuffle: bool = True,
                 rank: int = 0, world_size: int = 1):
        super().__init__(len(group_flags), seed=seed, flip_prob=flip_prob, shuffle=shuffle, rank=rank,
                         world_size=world_size)
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.batch_size = batch_size
        flags = torch.as_tensor(list(group_flags), dtype=torch.long)
        self.groups = [torch.where(flags == g)[0] for g in torch.unique(flags).tolist()]
        chunk = batch_size * world_size
        self.per_rank = sum(math.ceil(len(g) / chunk) for g in self.groups) * batch_size

    def _epoch_plan(self) -> tuple[torch.Tensor, torch.Tensor]:
        generator = torch.Generator().manual_seed(self.seed + self.epoch)
        chunk = self.batch_size * self.world_size
        padded = []
        for members in self.groups:
            if self.shuffle:
                members = members[torch.randperm(len(members), generator=generator)]
            target = math.ceil(len(members) / chunk) * chunk
            padded.append(members.repeat(math.ceil(target / len(members)))[:target])
        order = torch.cat(padded)
        if self.shuffle:
            batches = order.view(-1, self.batch_size)
            order = batches[torch.randperm(len(batches), generator=generator)].reshape(-1)
        flips = torch.rand(len(order), generator=generator) < self.flip_prob
        begin = self.rank * self.per_rank
        return order[begin:begin + self.per_rank], flips[begin:begin + self.per_rank]


class RankBatchSampler(Sampler):
    """The batches one process trains on per step: those of ``emulate`` DDP ranks.

    A process that is real rank ``rank`` of ``world_size`` and emulates ``emulate``
    workers plays the virtual ranks ``rank · emulate + k`` (k = 0 … emulate − 1) of
    ``world_size · emulate``: each virtual rank draws its shard exactly as
    :class:`EpochSampler` (hence ``DistributedSampler``) does for that many real
    ranks, and each step yields the concatenation of the virtual ranks' next batches
    of ``batch_size`` (the last one of an epoch may be shorter, by the same amount for
    every rank, since the shards are padded to equal length). With ``emulate = 1`` the
    batches are those of ``DataLoader(batch_size=…, sampler=EpochSampler(…))``.
    :meth:`micro_batches` cuts a collated step back into the virtual ranks' batches.

    Self-contained: it composes per-rank samplers. ``make_sampler(rank, world_size)``
    builds another one per virtual rank (any :class:`EpochSampler`-like object:
    ``set_epoch(epoch, start)``, ``per_rank``, iterating ``(index, flip)``; e.g. an
    aspect-ratio group sampler); the default is :class:`EpochSampler`.
    """

    def __init__(self, dataset_size: int, *, seed: int, flip_prob: float, batch_size: int,
                 emulate: int = 1, rank: int = 0, world_size: int = 1, shuffle: bool = True,
                 make_sampler=None):
        if emulate < 1 or batch_size < 1:
            raise ValueError(f"emulate ({emulate}) and batch_size ({batch_size}) must be >= 1")
        self.batch_size = batch_size
        self.emulate = emulate
        if make_sampler is None:
            def make_sampler(virtual_rank: int, virtual_world: int) -> EpochSampler:
                return EpochSampler(dataset_size, seed=seed, flip_prob=flip_prob, shuffle=shuffle,
                                    rank=virtual_rank, world_size=virtual_world)
        self.ranks = [make_sampler(rank * emulate + k, world_size * emulate) for k in range(emulate)]
        self.per_rank = self.ranks[0].per_rank  # samples per virtual rank and epoch

    def set_epoch(self, epoch: int, start: int = 0) -> None:
        """Select the epoch; ``start`` samples of every virtual rank are skipped (resume)."""
        for sampler in self.ranks:
            sampler.set_epoch(epoch, start)

    def __iter__(self):
        streams = [iter(sampler) for sampler in self.ranks]
        while True:
            batches = [list(itertools.islice(stream, self.batch_size)) for stream in streams]
            if not batches[0]:
                return
            yield [key for batch in batches for key in batch]

    def __len__(self) -> int:
        return math.ceil(len(self.ranks[0]) / self.batch_size)

    def micro_batches(self, images, targets) -> list[tuple]:
        """A collated step ``(images, targets)`` as one ``(images, targets)`` per virtual rank."""
        count = len(images)
        if count % self.emulate:
            raise RuntimeError(f"a step of {count} images cannot be split among {self.emulate} emulated workers")
        size = count // self.emulate
        return [(images[k * size:(k + 1) * size], targets[k * size:(k + 1) * size]) for k in range(self.emulate)]
