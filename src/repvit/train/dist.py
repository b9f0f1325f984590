"""Distributed helpers: torchrun environment -> process group (NCCL on GPU, gloo on CPU)."""

from __future__ import annotations

import contextlib
import os
from datetime import timedelta
from dataclasses import dataclass
from typing import Iterator

import torch
import torch.distributed as dist

__all__ = ["DistInfo", "init_distributed", "cleanup", "all_reduce_sum", "any_rank", "average_gradients",
           "broadcast_object", "broadcast_tensors", "gather_shards", "main_rank_first"]


@dataclass
class DistInfo:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def init_distributed(device: str = "auto") -> DistInfo:
    """Initialise from torchrun's RANK/WORLD_SIZE/LOCAL_RANK; single process when they are absent."""
    want_cuda = device == "cuda" or (device == "auto" and torch.cuda.is_available())
    if device == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("run.device=cuda but no CUDA device is visible; use run.device=cpu")
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        dev = torch.device("cuda", torch.cuda.current_device()) if want_cuda else torch.device("cpu")
        return DistInfo(device=dev)
    rank, local_rank = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    if want_cuda:
        torch.cuda.set_device(local_rank)
        dev = torch.device("cuda", local_rank)
    else:
        dev = torch.device("cpu")
    if not dist.is_initialized():
        # 30 min, not NCCL's 10: the other ranks wait in a barrier while rank 0 downloads pretrained or teacher
        # weights into the shared cache (main_rank_first); a large teacher on a slow link can take that long
        # device_id binds NCCL to this rank's GPU (a barrier before any collective would otherwise guess the GPU)
        dist.init_process_group(backend="nccl" if want_cuda else "gloo", timeout=timedelta(minutes=30),
                                **({"device_id": dev} if want_cuda else {}))
    return DistInfo(rank, world, local_rank, dev)


@contextlib.contextmanager
def main_rank_first(di: DistInfo) -> Iterator[None]:
    """Run the body on the main rank first, then on the others: what it downloads (pretrained or teacher weights
    into a shared cache) is fetched once, not by every rank at the same time. The main rank reaches the barrier
    even when the body raises, so the others are released (and meet the same error themselves) instead of hanging."""
    together = di.distributed and dist.is_available() and dist.is_initialized()
    if together and not di.is_main:
        dist.barrier()
    try:
        yield
    finally:
        if together and di.is_main:
            dist.barrier()


def cleanup() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def all_reduce_sum(t: torch.Tensor) -> torch.Tensor:
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t


def any_rank(flag: bool, di: DistInfo) -> bool:
    """Whether ``flag`` holds on any rank (one all-reduce: every rank must call it at the same point), so that all
    ranks stop together instead of one raising while the others wait in the next collective."""
    if not di.distributed:
        return flag
    return all_reduce_sum(torch.tensor([float(flag)], dtype=torch.float64, device=di.device)).item() > 0


def average_gradients(params, world_size: int) -> None:
    """Average ``.grad`` over all ranks by hand (what DDP's backward hooks do), in one flat all-reduce per dtype.

    Used when a micro-batch bypassed DDP's synchronised backward because some rank had no data for it: every
    rank calls this at the same update, a rank (or parameter) without a gradient contributes zeros, and every
    parameter ends up with the same averaged gradient on every rank - except one that has no gradient on any
    rank, which keeps ``None`` (so the optimizer leaves it alone, weight decay included, as without DDP).
    """
    if not (dist.is_available() and dist.is_initialized()) or world_size <= 1:
        return
    params = [p for p in params if p.requires_grad]
    groups: dict[tuple, list] = {}
    for p in params:
        groups.setdefault((p.device, p.dtype), []).append(p)
    for ps in groups.values():
        grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in ps]
        has_grad = torch.tensor([float(p.grad is not None) for p in ps], dtype=ps[0].dtype, device=ps[0].device)
        flat = torch.cat([g.reshape(-1) for g in grads] + [has_grad])   # the flags ride along: one all-reduce
        dist.all_reduce(flat, op=dist.ReduceOp.SUM)
        used_anywhere = flat[-len(ps):] > 0
        flat = flat[:-len(ps)].div_(world_size)
        off = 0
        for p, used in zip(ps, used_anywhere.tolist()):
            n = p.numel()
            g = flat[off:off + n].view_as(p)
            off += n
            if not used:
                continue
            if p.grad is None:
                p.grad = g.clone()
            else:
                p.grad.copy_(g)


def broadcast_object(obj, src: int = 0):
    if dist.is_available() and dist.is_initialized():
        box = [obj]
        dist.broadcast_object_list(box, src=src)
        return box[0]
    return obj


def broadcast_tensors(tensors, di: DistInfo) -> None:
    """Overwrite each tensor, in place, with the main rank's (no-op in a single process)."""
    if di.distributed and dist.is_available() and dist.is_initialized():
        for t in tensors:
            dist.broadcast(t, 0)


def gather_shards(local: torch.Tensor, n: int, di: DistInfo, *, chunk_bytes: int = 64 << 20) -> torch.Tensor:
    """The ``n`` rows that the ranks computed as contiguous shards (``repvit.data.sampler.shard_range``), in order,
    on every rank (CPU). Gathered in chunks of about ``chunk_bytes`` per rank through the process group's device
    (NCCL gathers CUDA tensors only), so a large table never sits on the GPU whole."""
    if not (di.distributed and dist.is_available() and dist.is_initialized()):
        return local
    world = di.world_size
    per = -(-n // world)
    padded = torch.zeros((per, *local.shape[1:]), dtype=local.dtype)
    padded[:len(local)] = local                     # the last shards may be short or empty
    out = torch.empty((world * per, *local.shape[1:]), dtype=local.dtype)
    row_bytes = max(1, padded[:1].numel() * padded.element_size())
    step = max(1, chunk_bytes // row_bytes)
    for s in range(0, per, step):
        piece = padded[s:s + step].to(di.device)
        parts = [torch.empty_like(piece) for _ in range(world)]
        dist.all_gather(parts, piece)
        for r, part in enumerate(parts):
            out[r * per + s: r * per + s + len(part)] = part.cpu()
    return out[:n]
