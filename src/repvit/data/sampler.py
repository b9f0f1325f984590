"""Global-batch sampler: repeated augmentation, DDP sharding, gradient accumulation and resume in one place.

Each epoch draws a seeded permutation, repeats every index ``repeats`` times (repeated augmentation,
DeiT), keeps about ``len(dataset)`` samples of it (as the official RA sampler does, so an epoch costs
the same as without repetition) and cuts it into global batches. A global batch is split into
``world_size * accum_steps`` chunks with a stride, so the copies of one image land in different
chunks. Process ``rank`` takes chunk ``m * world_size + rank`` for micro-step ``m``.

Because the chunk layout depends only on the global batch and the number of chunks, one process
accumulating 2 micro-steps sees exactly the micro-batches that 2 DDP processes see in one step - the
basis of "one GPU emulates the 2048 batch". ``start`` skips micro-batches already consumed (resume).

With ``sample_seeds=True`` every item is ``(index, seed)``: a seed drawn per position of the epoch's global
order, for the dataset to seed that sample's augmentation with (:func:`seed_sample`). Augmentations then
depend only on (run seed, epoch, position) - not on the number of loader workers, the world size, the
accumulation steps, or where a killed run resumed (a worker's own random stream would depend on all four).
"""

from __future__ import annotations

import contextlib
import random
from typing import Iterator

import numpy as np
import torch
from torch.utils.data import Sampler

__all__ = ["GlobalBatchSampler", "preserved_rng", "seed_sample", "shard_range"]


class GlobalBatchSampler(Sampler[list[int]]):
    def __init__(self, num_samples: int, global_batch: int, *, world_size: int = 1, rank: int = 0,
                 accum_steps: int = 1, repeats: int = 1, shuffle: bool = True, seed: int = 0,
                 max_steps: int | None = None, sample_seeds: bool = False) -> None:
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
        self.sample_seeds = sample_seeds
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

    def _position_seeds(self) -> torch.Tensor:
        # a generator of its own (not the permutation's) so the seeds do not shift when shuffle is off
        g = torch.Generator().manual_seed((self.seed * 100003 + self.epoch) * 2 + 1)
        return torch.randint(0, 2**62, (self.steps, self.global_batch), generator=g)

    def __iter__(self) -> Iterator[list]:
        order = self._global_order().view(self.steps, self.global_batch)
        seeds = self._position_seeds() if self.sample_seeds else None
        chunks = self.world_size * self.accum_steps
        for i in range(self.start, len(self)):
            step, m = divmod(i, self.accum_steps)
            c = m * self.world_size + self.rank
            if seeds is None:
                yield order[step, c::chunks].tolist()
            else:
                yield list(zip(order[step, c::chunks].tolist(), seeds[step, c::chunks].tolist()))

    def __len__(self) -> int:
        return self.steps * self.accum_steps


def seed_sample(seed: int) -> None:
    """Seed Python's, NumPy's and torch's CPU random streams (what timm/torchvision transforms draw from) for one
    sample. Wrap a batch of such calls in :func:`preserved_rng` where the streams serve other draws too."""
    random.seed(seed)
    np.random.seed((seed >> 30) & 0xFFFFFFFF)     # other bits than torch's: the two MT19937 streams must differ
    torch.default_generator.manual_seed(seed)   # CPU only: torch.manual_seed would initialise CUDA in a worker


@contextlib.contextmanager
def preserved_rng() -> Iterator[None]:
    """Restore the three global random streams on exit. In the main process (``num_workers=0``) they also drive
    mixup and drop-path, whose stream a checkpoint saves and per-sample seeding must not reset. Saving NumPy's
    state costs ~0.1 ms, so callers do it once per batch, not per sample."""
    py, npy, pt = random.getstate(), np.random.get_state(), torch.get_rng_state()
    try:
        yield
    finally:
        random.setstate(py)
        np.random.set_state(npy)
        torch.set_rng_state(pt)


def shard_range(n: int, world_size: int, rank: int) -> range:
    """Contiguous, unpadded shard of ``range(n)`` for evaluation (counts are summed across ranks)."""
    per = -(-n // world_size)
    return range(min(n, rank * per), min(n, (rank + 1) * per))
