"""A resumable, distributed, seeded sampler: epoch e's order is a permutation seeded by
(seed, e); rank r takes every world-th index; ``start`` skips what was already consumed."""

from __future__ import annotations

import torch
from torch.utils.data import Sampler


class ResumableSampler(Sampler[int]):
    def __init__(self, length: int, seed: int, rank: int = 0, world: int = 1, shuffle: bool = True):
        self.length, self.seed, self.rank, self.world, self.shuffle = length, seed, rank, world, shuffle
        self.epoch = 0
        self.start = 0  # indices of this rank already consumed in the current epoch

    def set_position(self, epoch: int, start: int) -> None:
        self.epoch, self.start = epoch, start

    def order(self) -> list[int]:
        if self.shuffle:
            g = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch)
            perm = torch.randperm(self.length, generator=g).tolist()
        else:
            perm = list(range(self.length))
        usable = self.length - self.length % self.world  # every rank gets the same count
        return perm[self.rank:usable:self.world]

    def __iter__(self):
        yield from self.order()[self.start:]

    def __len__(self) -> int:
        return self.length // self.world - self.start
