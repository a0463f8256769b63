"""Data parallelism over ``torch.distributed`` processes (started by ``torchrun``).

Every process holds the whole model and trains on its share of each global batch; after the
backward pass the gradients are summed across processes, so every process applies the same
update. Why not ``DistributedDataParallel``: the sparse input layer and the fused output layer
(:mod:`recvae.models.sparse_layers`, :mod:`recvae.models.output_layer`) write their weight gradients straight into ``.grad``
and return none through autograd, so DDP's autograd hooks would never see the two largest
gradients. :func:`allreduce_gradients` reduces every parameter's ``.grad`` explicitly.

Which rows a process trains on: :func:`shard_bounds` (contiguous, sizes differing by at most
one). The random numbers of dropout and of the reparameterisation are drawn for the whole
global batch on every process from the same seed (see ``SparseBatch.part``), so the number
of processes does not change them.

Backend: NCCL when CUDA is available (one GPU per ``LOCAL_RANK``), gloo on CPU. Outside an
initialised process group everything here is the single-process case (rank 0 of 1).

A process started by torchrun's agent watches the agent, its parent (:func:`watch_parent`):
when the agent is gone (killed with SIGKILL, which it cannot forward), the process stops as
if the agent had forwarded SIGTERM, instead of training on and writing the run as an orphan.
"""

from __future__ import annotations

import contextlib
import datetime
import logging
import os
import signal
import threading
import time
from dataclasses import dataclass

import numpy as np
import torch
import torch.distributed as dist

from recvae.errors import InputError, ParameterError, RecvaeError
from recvae.signals import Terminated

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


def started_by_torchrun_agent() -> bool:
    """Whether torchrun's agent started this process (as its child): it sets TORCHELASTIC_RUN_ID.
    A process given RANK and WORLD_SIZE by hand (a scheduler, a shell) has some other parent."""
    return "TORCHELASTIC_RUN_ID" in os.environ


#: how often a process started by torchrun checks that the agent, its parent, is still there (s)
PARENT_POLL_S = 1.0
#: how long it then has to stop on SIGTERM (a checkpoint being written finishes first) before it
#: exits at once, e.g. when a collective waits for a peer that is gone (s)
PARENT_GRACE_S = 5.0
#: the exit status when it had to exit at once: as a shell reports SIGTERM
EXIT_PARENT_GONE = 128 + signal.SIGTERM


class AgentGone(Terminated):
    """torchrun's agent, this process's parent, is gone: stop as if it had forwarded SIGTERM."""


class _ParentWatch:
    """The parent pid noted by :func:`watch_parent`, and who acts first when it is gone."""

    def __init__(self, parent: int):
        self.parent = parent
        self.lock = threading.Lock()
        self.noted = False  # the one line is logged
        self.stopping = False  # SIGTERM sent, or AgentGone raised in the main thread

    def gone(self) -> bool:
        return os.getppid() != self.parent

    def note(self) -> None:
        with self.lock:
            if not self.noted:
                self.noted = True
                logger.error("torchrun's agent (pid %d), which started rank %s, is gone: stopping this process "
                             "(pid %d)", self.parent, os.environ.get("RANK", "?"), os.getpid())

    def claim_stop(self) -> bool:
        """True for the first caller only: it stops the process, the other leaves it alone."""
        with self.lock:
            first, self.stopping = not self.stopping, True
            return first


_parent_watch: _ParentWatch | None = None


def watch_parent(poll_s: float = PARENT_POLL_S, grace_s: float = PARENT_GRACE_S) -> None:
    """Stop this process when its parent process is gone (started once per process).

    A daemon thread notes the parent's pid now and polls :func:`os.getppid` every ``poll_s``
    seconds; when it changes (the parent died and the process was handed to init or a
    subreaper) it logs one line and sends this process SIGTERM, which the command line turns
    into the stop torchrun's forwarded SIGTERM gives (exit status 143). Should the process
    still run ``grace_s`` seconds later, it exits with :data:`EXIT_PARENT_GONE` at once.
    A collective that fails because a peer stopped this way, before this process's own poll
    saw the agent gone, raises :class:`AgentGone` (a :class:`~recvae.signals.Terminated`)
    rather than :class:`PeerError`, so every process stops the same way.
    """
    global _parent_watch
    if _parent_watch is not None:
        return
    watch = _parent_watch = _ParentWatch(os.getppid())

    def run() -> None:
        while not watch.gone():
            time.sleep(poll_s)
        watch.note()
        if watch.claim_stop():
            os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(grace_s)
        os._exit(EXIT_PARENT_GONE)

    threading.Thread(target=run, name="recvae-parent-watch", daemon=True).start()


def init_from_env() -> Group:
    """Initialise the default process group from torchrun's environment (``RANK``,
    ``WORLD_SIZE``, ``MASTER_ADDR``/``MASTER_PORT``, ``LOCAL_RANK``) when launched by torchrun
    and not yet initialised; the current group otherwise. NCCL with one GPU per local rank when
    CUDA is available, else gloo. A process started by torchrun's agent first starts
    :func:`watch_parent`, so it stops when the agent is killed, even while joining."""
    if not launched_by_torchrun() or (dist.is_available() and dist.is_initialized()):
        return current()
    if started_by_torchrun_agent():
        watch_parent()
    timeout = datetime.timedelta(seconds=float(os.environ.get("RECVAE_DIST_TIMEOUT", DEFAULT_TIMEOUT_S)))
    backend = "nccl" if use_local_gpu() else "gloo"
    try:
        dist.init_process_group(backend, timeout=timeout)
    except Exception as e:  # the store or peers unreachable: one line, not a traceback
        where = f"{os.environ.get('MASTER_ADDR')}:{os.environ.get('MASTER_PORT')}"
        raise PeerError(f"torch.distributed: cannot join the process group at {where} "
                        f"(rank {os.environ.get('RANK')} of {os.environ.get('WORLD_SIZE')}): "
                        f"{str(e).splitlines()[0] if str(e) else type(e).__name__}") from e
    group = current()
    logger.info("process group: rank %d of %d (%s)", group.rank, group.world_size, backend)
    return group


def use_local_gpu() -> bool:
    """With CUDA: make GPU ``LOCAL_RANK`` (torchrun's number of this process on its machine) the
    current device, so that ``"cuda"`` means one GPU per process; returns whether CUDA is there.
    A ``LOCAL_RANK`` beyond the machine's GPUs is a :class:`RecvaeError` saying so."""
    if not torch.cuda.is_available():
        return False
    local, count = int(os.environ.get("LOCAL_RANK", 0)), torch.cuda.device_count()
    if local >= count:
        raise RecvaeError(f"torchrun's process {local} on this machine (LOCAL_RANK) has no GPU of its own: the "
                          f"machine has {count}; start at most {count} process(es) per machine (--nproc-per-node)")
    torch.cuda.set_device(local)
    return True


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


class PeerError(RecvaeError, ConnectionError):
    """A collective failed: another process died, stopped or cannot be reached."""


@contextlib.contextmanager
def _collective(what: str):
    """Turn a backend's failure (peer closed the connection, timeout) into one line naming it."""
    try:
        yield
    except RuntimeError as e:
        watch = _parent_watch
        if watch is not None and watch.gone():  # the peer stopped because the agent is gone: so do we
            watch.note()
            if watch.claim_stop():
                raise AgentGone() from e
            time.sleep(PARENT_GRACE_S)  # the watch's SIGTERM is on its way: its Terminated ends the sleep
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise PeerError(f"torch.distributed: {what} failed on rank {dist.get_rank()} of {dist.get_world_size()}; "
                        f"another process probably failed or stopped (see its output): {first}") from e


def check_batch_split(batch_size: int, group: Group) -> None:
    """Each process needs at least one user of every full batch."""
    if group.world_size > int(batch_size):
        raise ParameterError("batch_size", f"{batch_size} users per update cannot be split over {group.world_size} "
                                           f"processes; use at most {batch_size} processes or larger batches")


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


def broadcast_array(array: np.ndarray | None, shape: tuple, dtype) -> np.ndarray:
    """Rank 0's ``array`` on every process (the others pass None and the ``shape`` and ``dtype``
    it has): what rank 0 alone computed, the same bits everywhere. Outside a process group: ``array``."""
    if not current().parallel:
        return array
    t = (torch.from_numpy(np.ascontiguousarray(array)) if dist.get_rank() == 0
         else torch.empty(tuple(shape), dtype=torch.from_numpy(np.empty(0, dtype)).dtype)).to(_comm_device())
    with _collective("the broadcast of an array"):
        dist.broadcast(t, src=0)
    return t.cpu().numpy()


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
        raise InputError(what, f"the processes differ ({', '.join(f'rank {r}: {v}' for r, v in enumerate(values))})")


_REDUCE_OPS = {"sum": "SUM", "max": "MAX"}


def allreduce_(tensor: torch.Tensor, op: str = "sum", what: str = "an all-reduce") -> torch.Tensor:
    """``tensor`` reduced over all processes in place (``op``: ``sum`` or ``max``); returned.
    Nothing happens outside a process group. ``what`` names the collective in an error."""
    if current().parallel:
        with _collective(what):
            dist.all_reduce(tensor, op=getattr(dist.ReduceOp, _REDUCE_OPS[op]))
    return tensor


def gather_rows(tensor: torch.Tensor, n: int, dst: int | None = None) -> torch.Tensor | None:
    """The (n, ...) tensor whose rows :func:`shard_bounds` ``(n, r, world)`` process r holds as
    ``tensor``: on every process (``dst`` None), or on process ``dst`` alone (None elsewhere).

    Each process's rows go straight into their place in the result (a broadcast, or a send to
    ``dst``, per process): no padding and no list of parts, so a process needs the result's
    memory and nothing more, whichever sizes (differing by one) the shares have. Outside a
    process group: ``tensor`` itself."""
    group = current()
    if not group.parallel:
        return tensor
    dev = _comm_device()
    mine = tensor.detach().to(dev).contiguous()
    full = None
    if dst is None or group.rank == dst:
        full = torch.empty((n, *tensor.shape[1:]), dtype=tensor.dtype, device=dev)
    with _collective("the gather of item-parallel rows"):
        for r in range(group.world_size):
            lo, hi = shard_bounds(n, r, group.world_size)
            if dst is None:
                if r == group.rank:
                    full[lo:hi].copy_(mine)
                dist.broadcast(full[lo:hi], src=r)
            elif group.rank == dst:
                if r == dst:
                    full[lo:hi].copy_(mine)
                else:
                    dist.recv(full[lo:hi], src=r)
            elif r == group.rank:
                dist.send(mine, dst=dst)
    return None if full is None else full.to(tensor.device)


def all_gather_tensor(tensor: torch.Tensor, what: str = "an all-gather") -> list[torch.Tensor]:
    """Every process's ``tensor`` (equal shapes everywhere), in rank order; ``[tensor]`` outside a group."""
    group = current()
    if not group.parallel:
        return [tensor]
    dev = _comm_device()
    mine = tensor.to(dev).contiguous()
    parts = [torch.empty_like(mine) for _ in range(group.world_size)]
    with _collective(what):
        dist.all_gather(parts, mine)
    return [p.to(tensor.device) for p in parts]
