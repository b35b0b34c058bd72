"""Deterministic, resumable sample order and augmentation decisions.

The training order of epoch ``e`` is a permutation drawn from ``seed + e`` (as
``DistributedSampler.set_epoch`` does), sharded across ranks, and every index comes
with its horizontal-flip decision drawn from the same generator. Because the
augmentation is decided here, in the main process, and not by RNGs inside DataLoader
workers, resuming mid-epoch (skipping the batches already seen) reproduces exactly the
batches, flips included, of an uninterrupted run, whatever the number of workers.
"""

from __future__ import annotations

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
