"""Which samples each process sees at each micro-step, and the random draws that go with them.

Both are pure functions of (seed, micro-step), never of accumulated RNG state. That is what makes
resume exact (start the stream at micro-step m and everything after is identical: diffusers' resume
replays the epoch from its start instead) and what makes N processes with batch B see exactly what
one process with batch N*B sees: each global batch is cut into contiguous per-rank slices.
"""
from __future__ import annotations

from collections.abc import Iterator

import torch

from ldm.train.data import DataError


class GlobalBatchOrder:
    """An endless stream of per-rank index batches: epoch e is a seeded permutation, cut into global
    batches of `batch_size * world_size` (the incomplete tail is dropped), rank r takes slice r."""

    def __init__(self, num_items: int, batch_size: int, world_size: int, rank: int, seed: int,
                 start_micro: int = 0) -> None:
        self.global_batch = batch_size * world_size
        if num_items < self.global_batch:
            raise DataError(f"the dataset has {num_items} usable images, fewer than one global batch "
                            f"({batch_size} per process x {world_size} processes)")
        self.num_items, self.batch_size, self.rank, self.seed = num_items, batch_size, rank, seed
        self.batches_per_epoch = num_items // self.global_batch
        self.start_micro = start_micro

    def permutation(self, epoch: int) -> torch.Tensor:
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
        return torch.randperm(self.num_items, generator=g)

    def __iter__(self) -> Iterator[list[tuple[int, int]]]:
        """Yields lists of (epoch, index) keys, the CaptionDataset's item keys."""
        micro = self.start_micro
        while True:
            epoch, k = divmod(micro, self.batches_per_epoch)
            perm = self.permutation(epoch)
            for k in range(k, self.batches_per_epoch):
                start = k * self.global_batch + self.rank * self.batch_size
                yield [(epoch, int(i)) for i in perm[start:start + self.batch_size]]
            micro = (epoch + 1) * self.batches_per_epoch


class StepDraws:
    """Random numbers for one micro-step, drawn for the whole global batch and then sliced to this
    rank, on a CPU generator so they do not depend on the device either."""

    def __init__(self, seed: int, micro: int, batch_size: int, world_size: int, rank: int) -> None:
        self.generator = torch.Generator().manual_seed((seed + 1) * 1_000_000_007 + micro)
        self.global_batch, self.lo, self.hi = batch_size * world_size, rank * batch_size, (rank + 1) * batch_size

    def randn(self, *shape: int) -> torch.Tensor:
        return torch.randn((self.global_batch, *shape), generator=self.generator)[self.lo:self.hi]

    def randint(self, high: int) -> torch.Tensor:
        return torch.randint(0, high, (self.global_batch,), generator=self.generator)[self.lo:self.hi]
