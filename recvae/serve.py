"""An HTTP service answering top-K requests from a run directory (``recvae serve``; needs the
optional extra ``recvae[serve]``: FastAPI and uvicorn).

Endpoints:

* ``POST /recommend`` with ``{"items": [...], "k": 10, "exclude": [...]}`` (a new user: the model
  folds the history in) or ``{"user": "..."}`` (a user of the run: their full known history, every
  item they have at any rating excluded). Answers ``{"items": [...], "scores": [...], "source":
  "model" | "popularity", "unknown_items": [...]}`` in original ids. Item ids unknown to the run
  are dropped and listed in ``unknown_items``; when none is left the answer is the popularity
  fallback (``source: "popularity"``, scores = fraction of training users having the item).
* ``GET /health``; ``GET /model``: model class, dataset, number of items and users, metrics.

Bad requests get a 4xx with FastAPI's error body ``{"detail": [{"loc": [...], "msg": ...}]}``
naming the field: 404 unknown user, 422 for an empty ``items`` list, both or neither of
``user``/``items``, ``k`` outside 1..max_k, wrong types or ids that cannot be ids of the run, 413
for a body over ``max_body`` bytes. Concurrent requests are micro-batched: while a forward pass
runs (in a worker thread, so the event loop keeps accepting), arriving requests queue, and the
next pass scores up to ``max_batch`` of them at once (one matrix product instead of many).
"""


import asyncio
import logging
import os
from concurrent.futures import ThreadPoolExecutor
from typing import Union

import numpy as np
import scipy.sparse as sp

from recvae.optional import require
from recvae.recommend import IdError, RunRecommender

logger = logging.getLogger(__name__)

#: environment variables read by :func:`app_from_env` (how uvicorn's worker processes get the settings)
ENV = {
    "run_dir": "RECVAE_SERVE_RUN_DIR",
    "device": "RECVAE_SERVE_DEVICE",
    "max_body": "RECVAE_SERVE_MAX_BODY",
    "max_batch": "RECVAE_SERVE_MAX_BATCH",
    "threads": "RECVAE_SERVE_THREADS",
}
MAX_K = 1000


def error(status: int, loc: list, msg: str, kind: str):
    """A JSON error response shaped like FastAPI's validation errors."""
    from fastapi.responses import JSONResponse

    return JSONResponse({"detail": [{"loc": loc, "msg": msg, "type": kind}]}, status_code=status)


class BodyLimit:
    """ASGI middleware: 413 for a request body over ``max_body`` bytes, checked on the
    Content-Length and on the bytes actually received (chunked uploads), before any parsing."""

    def __init__(self, app, max_body: int):
        self.app = app
        self.max_body = max_body

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or scope["method"] in ("GET", "HEAD"):
            return await self.app(scope, receive, send)
        length = dict(scope["headers"]).get(b"content-length")
        if length is not None and (not length.isdigit() or int(length) > self.max_body):
            return await self._too_large(scope, receive, send)
        chunks, total, more = [], 0, True
        while more:
            message = await receive()
            if message["type"] == "http.disconnect":
                return
            chunks.append(message.get("body", b""))
            total += len(chunks[-1])
            if total > self.max_body:
                return await self._too_large(scope, receive, send)
            more = message.get("more_body", False)
        body = b"".join(chunks)
        replayed = False

        async def replay():
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()

        await self.app(scope, replay, send)

    async def _too_large(self, scope, receive, send):
        response = error(413, ["body"], f"request body larger than {self.max_body} bytes (--max-body)", "too_large")
        await response(scope, receive, send)


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


def create_app(run_dir, device=None, max_body: int = 1 << 20, max_batch: int = 64, threads: int | None = None):
    """The FastAPI application serving ``run_dir`` (the model is loaded here, once).

    ``threads``: torch intra-op threads of this process (default: the CPU cores divided among
    uvicorn's workers as ``RECVAE_SERVE_THREADS`` says, else all of them).
    """
    fastapi = require("fastapi", "the HTTP service (recvae serve)")
    from contextlib import asynccontextmanager

    from pydantic import BaseModel, ConfigDict, Field, StrictInt, StrictStr

    import torch

    if threads:
        torch.set_num_threads(int(threads))
    run = RunRecommender(run_dir, device=device)
    batcher = MicroBatcher(run, max_batch)
    Id = Union[StrictInt, StrictStr]

    class RecommendRequest(BaseModel):
        model_config = ConfigDict(extra="forbid")
        user: Id | None = None
        items: list[Id] | None = None
        exclude: list[Id] = Field(default_factory=list)
        k: StrictInt = 10

    @asynccontextmanager
    async def lifespan(app):
        batcher.start()
        yield
        await batcher.stop()

    app = fastapi.FastAPI(title="recvae", lifespan=lifespan)
    app.add_middleware(BodyLimit, max_body=max_body)
    app.state.run = run
    data = run.data
    dataset = data.get("dataset") or (os.path.basename(data["path"]) if data.get("path") else None)

    @app.get("/health")
    async def health():
        return {"status": "ok"}

    @app.get("/model")
    async def model_info():
        return {
            "model": type(run.model).__name__,
            "dataset": dataset,
            "n_items": run.n_items,
            "n_users": len(run.user_ids),
            "metrics": run.metrics,
        }

    @app.post("/recommend")
    async def recommend(request: RecommendRequest):
        if (request.user is None) == (request.items is None):
            return error(422, ["body"], "give exactly one of 'user' (a user of the run) or 'items' (a new user's history)", "value_error")
        if not 1 <= request.k <= min(MAX_K, run.n_items):
            return error(422, ["body", "k"], f"k must lie in 1..{min(MAX_K, run.n_items)}, got {request.k}", "value_error")
        try:
            extra = run.item_codes(request.exclude, lambda j: f"exclude[{j}]")
        except IdError as e:
            return error(422, ["body", "exclude", e.position], str(e), "value_error")
        unknown = [request.exclude[j] for j in np.flatnonzero(extra < 0)]
        extra = extra[extra >= 0]
        if request.user is not None:
            rows, _ = run.user_rows([request.user])
            if rows[0] < 0:
                return error(404, ["body", "user"], f"unknown user {request.user!r}: not a user of the run", "not_found")
            positives = _row(run.known, int(rows[0]))
            exclude = np.concatenate([_row(run.seen, int(rows[0])), extra])
        else:
            if not request.items:
                return error(422, ["body", "items"], "empty: give at least one item id (or 'user' for a user of the run)", "value_error")
            try:
                codes = run.item_codes(request.items, lambda j: f"items[{j}]")
            except IdError as e:
                return error(422, ["body", "items", e.position], str(e), "value_error")
            unknown += [request.items[j] for j in np.flatnonzero(codes < 0)]
            positives = np.unique(codes[codes >= 0])
            exclude = extra
        ids, scores, fallback = await batcher.submit(positives, exclude, request.k)
        keep = ids >= 0
        return {
            "items": run.item_ids[ids[keep]].tolist(),
            "scores": scores[keep].astype(float).tolist(),
            "source": "popularity" if fallback else "model",
            "unknown_items": unknown,
        }

    return app


def _row(matrix: sp.csr_matrix, r: int) -> np.ndarray:
    """Column indices of row ``r`` of a CSR (a view, no scipy slicing per request)."""
    return matrix.indices[matrix.indptr[r] : matrix.indptr[r + 1]]


def app_from_env():
    """:func:`create_app` with the settings of :data:`ENV` (uvicorn's factory for its workers)."""
    run_dir = os.environ.get(ENV["run_dir"])
    if not run_dir:
        raise RuntimeError(f"{ENV['run_dir']} is not set: start the service with `recvae serve RUN_DIR`")
    get = os.environ.get
    return create_app(
        run_dir,
        device=get(ENV["device"]) or None,
        max_body=int(get(ENV["max_body"], 1 << 20)),
        max_batch=int(get(ENV["max_batch"], 64)),
        threads=int(get(ENV["threads"], 0)) or None,
    )


def run_server(run_dir, host: str = "127.0.0.1", port: int = 8000, workers: int = 1, device=None,
               max_body: int = 1 << 20, max_batch: int = 64, threads: int | None = None,
               log_level: str = "info") -> None:
    """Serve ``run_dir`` with uvicorn; each of ``workers`` processes loads the model once and
    gets ``threads`` torch threads (default ``cpu cores / workers``, at least 1)."""
    require("fastapi", "the HTTP service (recvae serve)")
    uvicorn = require("uvicorn", "the HTTP service (recvae serve)")
    os.environ.update({
        ENV["run_dir"]: str(run_dir),
        ENV["device"]: device or "",
        ENV["max_body"]: str(max_body),
        ENV["max_batch"]: str(max_batch),
        ENV["threads"]: str(threads or max(1, (os.cpu_count() or 1) // workers)),
    })
    uvicorn.run("recvae.serve:app_from_env", factory=True, host=host, port=port, workers=workers, log_level=log_level)
