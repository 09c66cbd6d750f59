"""torchrun's process group for the three stages: join it, run set-up on rank 0, meet at the end.

Embedding and prediction are communication-free: each rank works on its own cases, and the
group (gloo, also for CUDA ranks) only carries barriers, the set-up outcome and the summaries.
Training all-reduces gradients, so its CUDA ranks use nccl.
"""
from __future__ import annotations

import contextlib
import os
from datetime import timedelta
from typing import Any, Callable, Iterator, TypeVar

import torch
import torch.distributed as dist

from desam_pipeline.utilities.errors import DesamError

T = TypeVar("T")
# Ranks wait for the slowest shard at the final barrier; torchrun stops them all if one dies.
SHARD_TIMEOUT = timedelta(days=1)


def launched_by_torchrun() -> bool:
    """True when torchrun started this process as one of several ranks."""
    return int(os.environ.get("WORLD_SIZE", 1)) > 1


@contextlib.contextmanager
def process_group(backend: str = "gloo", timeout: timedelta | None = SHARD_TIMEOUT) -> Iterator[bool]:
    """torchrun's process group for the block (True inside) when there are several ranks, else False.

    A group that is already joined is used as it is and left open.
    """
    if not launched_by_torchrun():
        yield False
        return
    if dist.is_initialized():
        yield True
        return
    dist.init_process_group(backend, **({"timeout": timeout} if timeout is not None else {}))
    try:
        yield True
    finally:
        dist.destroy_process_group()


def in_group() -> bool:
    return dist.is_available() and dist.is_initialized()


def rank() -> int:
    return dist.get_rank() if in_group() else 0


def on_rank_zero(work: Callable[[], T]) -> T:
    """Run `work` on rank 0 while the other ranks wait; all get its result or raise its DesamError.

    Without a group, `work` simply runs here.
    """
    if not in_group():
        return work()
    outcome: list[Any] = [None]
    if dist.get_rank() == 0:
        try:
            outcome[0] = (True, work())
        except DesamError as error:
            outcome[0] = (False, str(error))
    dist.broadcast_object_list(outcome, src=0)
    done, value = outcome[0]
    if not done:
        raise DesamError(value if dist.get_rank() == 0 else f"rank 0 stopped: {value}")
    return value


def gather(value: T) -> list[T]:
    """Every rank's `value` in rank order, on every rank (just [value] without a group)."""
    if not in_group():
        return [value]
    gathered: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, value)
    return gathered


def barrier() -> None:
    if in_group():
        dist.barrier()


def all_reduce(sums: dict[str, float], op: str = "sum", device: torch.device | str = "cpu") -> dict[str, float]:
    """The sums (or with op "max" the maxima) of every rank's values, key by key; the values alone outside a group.

    nccl reduces on the rank's `device`, gloo on the CPU."""
    if not in_group():
        return sums
    keys = sorted(sums)
    values = torch.tensor([float(sums[k]) for k in keys], dtype=torch.float64,
                          device=device if dist.get_backend() == "nccl" else "cpu")
    dist.all_reduce(values, op=dist.ReduceOp.SUM if op == "sum" else dist.ReduceOp.MAX)
    return dict(zip(keys, values.tolist()))
