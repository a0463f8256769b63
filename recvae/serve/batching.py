"""Micro-batching: requests that arrive while a forward pass runs are scored together in the next."""

import asyncio
import logging
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import scipy.sparse as sp

from recvae.recommend import RunRecommender


logger = logging.getLogger(__name__)


class MicroBatcher:
    """Scores queued requests together: one forward pass for up to ``max_batch`` of them.

    Requests arriving while a pass runs wait for the next one, so batches form under load
    and a lone request is scored at once (no waiting window).
    """

    def __init__(self, run: RunRecommender, max_batch: int):
        self.run = run
        self.max_batch = max_batch
        self.queue: asyncio.Queue = asyncio.Queue()
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
        await self.queue.put((positives, exclude, k, future))
        return await future

    def _matrix(self, rows: list) -> sp.csr_matrix:
        indptr = np.zeros(len(rows) + 1, dtype=np.int64)
        np.cumsum([len(r) for r in rows], out=indptr[1:])
        indices = np.concatenate(rows).astype(np.int32) if indptr[-1] else np.zeros(0, dtype=np.int32)
        data = np.ones(len(indices), dtype=np.float32)
        return sp.csr_matrix((data, indices, indptr), shape=(len(rows), self.run.n_items))

    async def _loop(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            batch = [await self.queue.get()]
            while len(batch) < self.max_batch and not self.queue.empty():
                batch.append(self.queue.get_nowait())
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
                continue
            for r, (_, _, k_r, future) in enumerate(batch):
                if not future.done():  # a client that went away leaves a cancelled future
                    future.set_result((ids[r, :k_r], scores[r, :k_r], bool(fallback[r])))
