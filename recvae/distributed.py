"""Data parallelism over ``torch.distributed`` processes (started by ``torchrun``).

Every process holds the whole model and trains on its share of each global batch; after the
backward pass the gradients are summed across processes, so every process applies the same
update. Why not ``DistributedDataParallel``: the sparse input layer and the fused output layer
(:mod:`recvae.models.sparse_layers`) write their weight gradients straight into ``.grad``
and return none through autograd, so DDP's autograd hooks would never see the two largest
gradients. :func:`allreduce_gradients` reduces every parameter's ``.grad`` explicitly.

Which rows a process trains on: :func:`shard_bounds` (contiguous, sizes differing by at most
one). The random numbers of dropout and of the reparameterisation are drawn for the whole
global batch on every process from the same seed (see ``SparseBatch.part``), so the number
of processes does not change them.

Backend: NCCL when CUDA is available (one GPU per ``LOCAL_RANK``), gloo on CPU. Outside an
initialised process group everything here is the single-process case (rank 0 of 1).
"""

from __future__ import annotations

import contextlib
import datetime
import logging
import os
from dataclasses import dataclass

import numpy as np
import torch
import torch.distributed as dist

logger = logging.getLogger(__name__)

#: how long a collective waits for a missing process before failing (env RECVAE_DIST_TIMEOUT, s)
DEFAULT_TIMEOUT_S = 600.0


@dataclass(frozen=True)
class Group:
    """This process's place among the training processes."""

    rank: int = 0
    world_size: int = 1

    @property
    def is_main(self) -> bool:
        """Rank 0 writes the run directory, checkpoints and prints."""
        return self.rank == 0

    @property
    def parallel(self) -> bool:
        return self.world_size > 1


def current() -> Group:
    """The default process group's rank and size; rank 0 of 1 when none is initialised."""
    if dist.is_available() and dist.is_initialized():
        return Group(dist.get_rank(), dist.get_world_size())
    return Group()


def launched_by_torchrun() -> bool:
    return "TORCHELASTIC_RUN_ID" in os.environ or ("RANK" in os.environ and "WORLD_SIZE" in os.environ)


def init_from_env() -> Group:
    """Initialise the default process group from torchrun's environment (``RANK``,
    ``WORLD_SIZE``, ``MASTER_ADDR``/``MASTER_PORT``, ``LOCAL_RANK``) when launched by torchrun
    and not yet initialised; the current group otherwise. NCCL with one GPU per local rank when
    CUDA is available, else gloo."""
    if not launched_by_torchrun() or (dist.is_available() and dist.is_initialized()):
        return current()
    timeout = datetime.timedelta(seconds=float(os.environ.get("RECVAE_DIST_TIMEOUT", DEFAULT_TIMEOUT_S)))
    if torch.cuda.is_available():
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
        backend = "nccl"
    else:
        backend = "gloo"
    try:
        dist.init_process_group(backend, timeout=timeout)
    except Exception as e:  # the store or peers unreachable: one line, not a traceback
        where = f"{os.environ.get('MASTER_ADDR')}:{os.environ.get('MASTER_PORT')}"
        raise ConnectionError(f"torch.distributed: cannot join the process group at {where} "
                              f"(rank {os.environ.get('RANK')} of {os.environ.get('WORLD_SIZE')}): "
                              f"{str(e).splitlines()[0] if str(e) else type(e).__name__}") from e
    group = current()
    logger.info("process group: rank %d of %d (%s)", group.rank, group.world_size, backend)
    return group


@contextlib.contextmanager
def process_group_from_env():
    """:func:`init_from_env` for the block, yielding the group; a group initialised here is
    destroyed at the end, one initialised by the caller is left alone."""
    started = launched_by_torchrun() and not (dist.is_available() and dist.is_initialized())
    group = init_from_env()
    try:
        yield group
    finally:
        if started and dist.is_initialized():
            dist.destroy_process_group()


def shard_bounds(n: int, rank: int, world_size: int) -> tuple[int, int]:
    """Rows ``[start, stop)`` of ``n`` that ``rank`` holds: contiguous, sizes differ by <= 1."""
    return rank * n // world_size, (rank + 1) * n // world_size


class PeerError(ConnectionError):
    """A collective failed: another process died, stopped or cannot be reached."""


@contextlib.contextmanager
def _collective(what: str):
    """Turn a backend's failure (peer closed the connection, timeout) into one line naming it."""
    try:
        yield
    except RuntimeError as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise PeerError(f"torch.distributed: {what} failed on rank {dist.get_rank()} of {dist.get_world_size()}; "
                        f"another process probably failed or stopped (see its output): {first}") from e


def check_batch_split(batch_size: int, group: Group) -> None:
    """Each process needs at least one user of every full batch."""
    if group.world_size > int(batch_size):
        raise ValueError(f"batch_size: {batch_size} users per update cannot be split over {group.world_size} "
                         f"processes; use at most {batch_size} processes or a larger --batch-size")


def _comm_device() -> torch.device:
    return torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else torch.device("cpu")


def allreduce_gradients(parameters) -> int:
    """Sum every parameter's ``.grad`` over all processes, in place; returns the bytes reduced.

    A parameter without a gradient (a process whose share of the batch is empty) contributes
    zeros. One asynchronous all-reduce per tensor, all in flight together: the backend batches
    them, and no flat copy of the ~I x H gradients is made.
    """
    grads = []
    for p in parameters:
        if p.grad is None:
            p.grad = torch.zeros_like(p)
        grads.append(p.grad)
    with _collective("the gradient all-reduce"):
        works = [dist.all_reduce(g, op=dist.ReduceOp.SUM, async_op=True) for g in grads]
        for w in works:
            w.wait()
    return sum(g.numel() * g.element_size() for g in grads)


def allreduce_sum(values) -> np.ndarray:
    """The element-wise sum over all processes of a small float array (metric sums, counts)."""
    t = torch.as_tensor(np.asarray(values, dtype=np.float64), device=_comm_device()).clone()
    with _collective("an all-reduce of loss or metric sums"):
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t.cpu().numpy()


def broadcast_int(value: int) -> int:
    """Rank 0's ``value`` on every process (``value`` itself outside a process group)."""
    if not current().parallel:
        return value
    box = [int(value)]
    with _collective("the seed broadcast"):
        dist.broadcast_object_list(box, src=0, device=_comm_device())
    return int(box[0])


def barrier() -> None:
    """Wait for every process (nothing outside a process group)."""
    if current().parallel:
        with _collective("a barrier"):
            dist.barrier()


def check_same(value, what: str) -> None:
    """ValueError naming ``what`` when the processes hold different ``value``s (e.g. the epoch
    of the checkpoint each one resumed from)."""
    if not current().parallel:
        return
    values = [None] * dist.get_world_size()
    with _collective(f"the comparison of {what}"):
        dist.all_gather_object(values, value)
    if any(v != values[0] for v in values):
        raise ValueError(f"{what}: the processes differ ({', '.join(f'rank {r}: {v}' for r, v in enumerate(values))})")
