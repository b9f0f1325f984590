"""Global-batch sampler: repeated augmentation, DDP sharding, gradient accumulation and resume in one place.

Each epoch draws a seeded permutation, repeats every index ``repeats`` times (repeated augmentation,
DeiT), keeps about ``len(dataset)`` samples of it (as the official RA sampler does, so an epoch costs
the same as without repetition) and cuts it into global batches. A global batch is split into
``world_size * accum_steps`` chunks with a stride, so the copies of one image land in different
chunks. Process ``rank`` takes chunk ``m * world_size + rank`` for micro-step ``m``.

Because the chunk layout depends only on the global batch and the number of chunks, one process
accumulating 2 micro-steps sees exactly the micro-batches that 2 DDP processes see in one step - the
basis of "one GPU emulates the 2048 batch". ``start`` skips micro-batches already consumed (resume).
"""

from __future__ import annotations

from typing import Iterator

import torch
from torch.utils.data import Sampler

__all__ = ["GlobalBatchSampler", "shard_range"]


class GlobalBatchSampler(Sampler[list[int]]):
    def __init__(self, num_samples: int, global_batch: int, *, world_size: int = 1, rank: int = 0,
                 accum_steps: int = 1, repeats: int = 1, shuffle: bool = True, seed: int = 0,
                 max_steps: int | None = None) -> None:
        chunks = world_size * accum_steps
        if global_batch % chunks:
            raise ValueError(f"global batch {global_batch} must split evenly into {chunks} micro-batches")
        if num_samples < global_batch:
            raise ValueError(f"the training set has {num_samples} samples, fewer than one global batch "
                             f"({global_batch}); lower run.global_batch / run.batch_size")
        self.n, self.global_batch = num_samples, global_batch
        self.world_size, self.rank, self.accum_steps = world_size, rank, accum_steps
        self.repeats, self.shuffle, self.seed = max(1, int(repeats)), shuffle, seed
        self.epoch, self.start = 0, 0
        self.steps = num_samples // global_batch   # optimizer steps per epoch (drop_last)
        if max_steps:
            self.steps = min(self.steps, max_steps)

    @property
    def micro_batch(self) -> int:
        return self.global_batch // (self.world_size * self.accum_steps)

    def set_epoch(self, epoch: int, start: int = 0) -> None:
        """Select the epoch's permutation; ``start`` = micro-batches of this rank already done."""
        self.epoch, self.start = epoch, start

    def _global_order(self) -> torch.Tensor:
        g = torch.Generator().manual_seed(self.seed * 100003 + self.epoch)
        idx = torch.randperm(self.n, generator=g) if self.shuffle else torch.arange(self.n)
        if self.repeats > 1:
            idx = idx.repeat_interleave(self.repeats)
        return idx[: self.steps * self.global_batch]

    def __iter__(self) -> Iterator[list[int]]:
        order = self._global_order().view(self.steps, self.global_batch)
        chunks = self.world_size * self.accum_steps
        for i in range(self.start, len(self)):
            step, m = divmod(i, self.accum_steps)
            c = m * self.world_size + self.rank
            yield order[step, c::chunks].tolist()

    def __len__(self) -> int:
        return self.steps * self.accum_steps


def shard_range(n: int, world_size: int, rank: int) -> range:
    """Contiguous, unpadded shard of ``range(n)`` for evaluation (counts are summed across ranks)."""
    per = -(-n // world_size)
    return range(min(n, rank * per), min(n, (rank + 1) * per))
