"""Micro-batching: requests that arrive while a forward pass runs are scored together in the next."""

import asyncio
import collections
import logging
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import scipy.sparse as sp

from recvae.recommend import RunRecommender
from recvae.serve.settings import BATCH_WAIT

logger = logging.getLogger(__name__)


class MicroBatcher:
    """Scores queued requests together: one forward pass for up to ``max_batch`` of them.

    Requests arriving while a pass runs wait for the next one, so batches form under load and
    a lone request is scored at once. A pass costs about as much for a few users as for one (it
    reads the whole output layer), so the next batch waits up to ``batch_wait`` seconds for as
    many requests as the last one answered plus those that queued meanwhile (the answered
    clients are sending their next request now): under steady concurrency a batch holds every
    client, instead of the clients splitting into groups that take turns, each group paying a
    whole pass (8 connections once settled into two alternating batches of 4, at half the rate).
    """

    def __init__(self, run: RunRecommender, max_batch: int, batch_wait: float = BATCH_WAIT):
        self.run = run
        self.max_batch = max_batch
        self.batch_wait = batch_wait
        self.pending: collections.deque = collections.deque()
        self.arrived = asyncio.Event()
        self.expected = 1  # requests the next batch waits for: the last batch's and those queued meanwhile
        self.executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="recvae-score")
        self.task = None

    def start(self) -> None:
        self.task = asyncio.get_running_loop().create_task(self._loop())

    async def stop(self) -> None:
        if self.task is not None:
            self.task.cancel()
        self.executor.shutdown(wait=False)

    async def submit(self, positives: np.ndarray, exclude: np.ndarray, k: int):
        """``(ids, scores, fallback)`` of one user given the catalogue positions of their
        history (``positives``, sorted, unique) and of the items to exclude besides it."""
        future = asyncio.get_running_loop().create_future()
        self.pending.append((positives, exclude, k, future))
        self.arrived.set()
        return await future

    def _matrix(self, rows: list) -> sp.csr_matrix:
        indptr = np.zeros(len(rows) + 1, dtype=np.int64)
        np.cumsum([len(r) for r in rows], out=indptr[1:])
        indices = np.concatenate(rows).astype(np.int32) if indptr[-1] else np.zeros(0, dtype=np.int32)
        data = np.ones(len(indices), dtype=np.float32)
        return sp.csr_matrix((data, indices, indptr), shape=(len(rows), self.run.n_items))

    async def _wait(self, timeout: float | None) -> None:
        """Until a request arrives (or ``timeout`` seconds pass)."""
        self.arrived.clear()
        timer = None if timeout is None else asyncio.get_running_loop().call_later(timeout, self.arrived.set)
        try:
            await self.arrived.wait()
        finally:
            if timer is not None:
                timer.cancel()

    async def _next_batch(self) -> list:
        while not self.pending:
            await self._wait(None)
        want = min(self.expected, self.max_batch)
        if len(self.pending) < want and self.batch_wait > 0:
            loop = asyncio.get_running_loop()
            deadline = loop.time() + self.batch_wait
            while len(self.pending) < want and loop.time() < deadline:
                await self._wait(deadline - loop.time())
        return [self.pending.popleft() for _ in range(min(len(self.pending), self.max_batch))]

    async def _loop(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            batch = await self._next_batch()
            positives = self._matrix([b[0] for b in batch])
            exclude = self._matrix([b[1] for b in batch])
            k = max(b[2] for b in batch)
            try:
                ids, scores, fallback = await loop.run_in_executor(
                    self.executor, self.run.recommend_arrays, positives, exclude, k
                )
            except Exception as e:  # answer every waiting request; keep serving
                logger.exception("scoring failed")
                for *_, future in batch:
                    if not future.done():
                        future.set_exception(e)
                self.expected = len(batch) + len(self.pending)
                continue
            for r, (_, _, k_r, future) in enumerate(batch):
                if not future.done():  # a client that went away leaves a cancelled future
                    future.set_result((ids[r, :k_r], scores[r, :k_r], bool(fallback[r])))
            self.expected = len(batch) + len(self.pending)
