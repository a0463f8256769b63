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
``user``/``items``, ``k`` outside 1..max_k, wrong types or ids that cannot be ids of the run,
``NaN``/``Infinity`` anywhere in the body (``finite_number``), 413 for a body over ``max_body``
bytes, 408 for a body that has not fully arrived ``body_timeout`` seconds after the headers.
Concurrent requests are micro-batched: while a forward pass runs (in a worker thread, so the
event loop keeps accepting), arriving requests queue, and the next pass scores up to
``max_batch`` of them at once (one matrix product instead of many).

:func:`run_server` loads the run once in the parent process before any worker starts (a damaged
run is one error, whatever the number of workers); a worker that cannot load it stops the whole
server instead of being respawned. Idle keep-alive connections close after ``keep_alive``
seconds; on SIGTERM the server stops accepting, lets running requests finish for up to
``grace`` seconds, answers those still running 503 and exits.
"""


import asyncio
import json
import logging
import math
import os
import signal
import sys
import tempfile
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
    "body_timeout": "RECVAE_SERVE_BODY_TIMEOUT",
    # set by run_server for its workers: the supervisor's pid and the file a worker that cannot
    # start writes its error to (the supervisor then stops instead of respawning it)
    "parent": "RECVAE_SERVE_PARENT",
    "failure_file": "RECVAE_SERVE_FAILURE_FILE",
}
MAX_K = 1000
BODY_TIMEOUT = 5.0  # seconds for a request body to arrive after its headers (--body-timeout)
KEEP_ALIVE = 5.0  # seconds an idle keep-alive connection stays open (--keep-alive)
GRACE = 10.0  # seconds running requests get to finish after SIGTERM (--grace)
#: exit status of a worker that could not load the run (uvicorn's own "startup failure" status)
STARTUP_FAILURE = 3
#: ASGI scope key holding the request body read by :class:`BodyLimit` (for the 422 handler)
BODY_KEY = "recvae.body"


def error(status: int, loc: list, msg: str, kind: str, headers: dict | None = None):
    """A JSON error response shaped like FastAPI's validation errors."""
    from fastapi.responses import JSONResponse

    return JSONResponse({"detail": [{"loc": loc, "msg": msg, "type": kind}]}, status_code=status, headers=headers)


class BodyLimit:
    """ASGI middleware guarding the edges of every HTTP request.

    * 413 for a request body over ``max_body`` bytes, checked on the Content-Length and on the
      bytes actually received (chunked uploads), before any parsing;
    * 408 (and the connection closed) for a body that has not fully arrived ``body_timeout``
      seconds after the headers, so a client announcing more bytes than it sends holds nothing;
    * 503 (connection closed) for a request the server cancels because the grace period after
      SIGTERM is over: the client gets an answer and the log no traceback.

    The body read is kept in the scope (``BODY_KEY``) for the 422 handler. ``inflight`` (a set)
    holds the tasks of the requests being answered, for the application's shutdown to let those
    cancelled at the end of the grace period send their 503.
    """

    def __init__(self, app, max_body: int, body_timeout: float = BODY_TIMEOUT, inflight: set | None = None):
        self.app = app
        self.max_body = max_body
        self.body_timeout = body_timeout
        self.inflight = set() if inflight is None else inflight

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        task = asyncio.current_task()
        self.inflight.add(task)
        try:
            await self._answer(scope, receive, send)
        finally:
            self.inflight.discard(task)

    async def _answer(self, scope, receive, send):
        started = False

        async def tracked_send(message):
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self._guarded(scope, receive, tracked_send)
        except asyncio.CancelledError:  # only the server cancels a request: shutdown past --grace
            if not started:
                await error(503, [], "the server is shutting down", "shutting_down",
                            headers={"connection": "close"})(scope, receive, send)

    async def _guarded(self, scope, receive, send):
        if scope["method"] in ("GET", "HEAD"):
            return await self.app(scope, receive, send)
        length = dict(scope["headers"]).get(b"content-length")
        if length is not None and (not length.isdigit() or int(length) > self.max_body):
            return await self._too_large(scope, receive, send)
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.body_timeout
        chunks, total, more = [], 0, True
        while more:
            try:
                message = await asyncio.wait_for(receive(), max(deadline - loop.time(), 0))
            except asyncio.TimeoutError:
                return await self._timed_out(scope, receive, send)
            if message["type"] == "http.disconnect":
                return
            chunks.append(message.get("body", b""))
            total += len(chunks[-1])
            if total > self.max_body:
                return await self._too_large(scope, receive, send)
            more = message.get("more_body", False)
        body = b"".join(chunks)
        scope[BODY_KEY] = body
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

    async def _timed_out(self, scope, receive, send):
        response = error(408, ["body"], f"request body not received within {self.body_timeout:g} s (--body-timeout)",
                         "timeout", headers={"connection": "close"})
        await response(scope, receive, send)


class _NonFinite:
    """Stands for a JSON number that is not finite (``NaN``, ``Infinity``, ``1e999``) while
    looking for it in a body: its text as written."""

    def __init__(self, text: str):
        self.text = text


def _parse_float(text: str):
    value = float(text)
    return value if math.isfinite(value) else _NonFinite(text)


def first_non_finite(body) -> tuple[list, str] | None:
    """``(path, text)`` of the first non-finite number in the JSON ``body`` (bytes), in document
    order, or None (none, or not JSON). Python's JSON parser accepts ``NaN``, ``Infinity`` and
    overflowing numbers, which JSON itself does not have."""
    try:
        value = json.loads(body, parse_constant=_NonFinite, parse_float=_parse_float)
    except (TypeError, ValueError, RecursionError):
        return None
    stack = [([], value)]
    while stack:
        path, v = stack.pop()
        if isinstance(v, _NonFinite):
            return path, v.text
        children = v.items() if isinstance(v, dict) else enumerate(v) if isinstance(v, list) else ()
        stack.extend((path + [key], child) for key, child in reversed(list(children)))
    return None


def _has_non_finite(value) -> bool:
    if isinstance(value, float):
        return not math.isfinite(value)
    if isinstance(value, dict):
        return any(_has_non_finite(v) for v in value.values())
    if isinstance(value, (list, tuple)):
        return any(_has_non_finite(v) for v in value)
    return False


def _finite(value):
    """``value`` with non-finite floats replaced by their JSON-ish text (so it can be encoded)."""
    if isinstance(value, float) and not math.isfinite(value):
        return "NaN" if math.isnan(value) else ("Infinity" if value > 0 else "-Infinity")
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite(v) for v in value]
    return value


async def validation_failed(request, exc):
    """FastAPI's 422 for a body that fails validation, unchanged, except where the body holds a
    non-finite number (``NaN``, ``Infinity``): the one error naming where the first one is
    (FastAPI's own answer would fail to encode, a 500 with a traceback)."""
    from fastapi.encoders import jsonable_encoder
    from fastapi.exception_handlers import request_validation_exception_handler
    from fastapi.responses import JSONResponse

    errors = exc.errors()
    if not _has_non_finite(errors):
        return await request_validation_exception_handler(request, exc)
    found = first_non_finite(request.scope.get(BODY_KEY))
    if found is None:  # not expected: every non-finite input comes from the body
        return JSONResponse({"detail": _finite(jsonable_encoder(errors))}, status_code=422)
    path, text = found
    why = "JSON has no NaN or Infinity" if text.lstrip("-") in ("NaN", "Infinity") else "beyond the range of a float"
    return error(422, ["body", *path], f"Input should be a finite number, got {text} ({why})", "finite_number")


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


def create_app(run_dir, device=None, max_body: int = 1 << 20, max_batch: int = 64, threads: int | None = None,
               body_timeout: float = BODY_TIMEOUT):
    """The FastAPI application serving ``run_dir`` (the model is loaded here, once).

    ``threads``: torch intra-op threads of this process (default: the CPU cores divided among
    uvicorn's workers as ``RECVAE_SERVE_THREADS`` says, else all of them).
    """
    fastapi = require("fastapi", "the HTTP service (recvae serve)")
    from contextlib import asynccontextmanager

    from fastapi.exceptions import RequestValidationError
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

    inflight: set = set()  # tasks of the requests being answered (BodyLimit)

    @asynccontextmanager
    async def lifespan(app):
        batcher.start()
        yield
        # uvicorn has waited --grace for running requests and cancelled those left: give them a
        # moment to answer 503 before the process ends
        if inflight:
            await asyncio.wait(list(inflight), timeout=1.0)
        await batcher.stop()

    app = fastapi.FastAPI(title="recvae", lifespan=lifespan)
    app.add_middleware(BodyLimit, max_body=max_body, body_timeout=body_timeout, inflight=inflight)
    app.add_exception_handler(RequestValidationError, validation_failed)
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
    """:func:`create_app` with the settings of :data:`ENV` (uvicorn's factory for its workers).

    A worker that cannot load the run writes the error for :func:`run_server`, asks the
    supervisor to stop (SIGTERM) and exits with :data:`STARTUP_FAILURE`, so that it is not
    respawned for ever."""
    run_dir = os.environ.get(ENV["run_dir"])
    if not run_dir:
        raise RuntimeError(f"{ENV['run_dir']} is not set: start the service with `recvae serve RUN_DIR`")
    get = os.environ.get
    try:
        return create_app(
            run_dir,
            device=get(ENV["device"]) or None,
            max_body=int(get(ENV["max_body"], 1 << 20)),
            max_batch=int(get(ENV["max_batch"], 64)),
            threads=int(get(ENV["threads"], 0)) or None,
            body_timeout=float(get(ENV["body_timeout"], BODY_TIMEOUT)),
        )
    except Exception as e:
        parent, failure_file = get(ENV["parent"]), get(ENV["failure_file"])
        if not (parent and failure_file and os.getppid() == int(parent)):
            raise  # not a worker of run_server's supervisor
        try:
            with open(failure_file, "a") as f:
                f.write(f"{e}\n")
        except OSError:
            logger.error("a worker could not start: %s", e)
        os.kill(int(parent), signal.SIGTERM)
        sys.exit(STARTUP_FAILURE)


class WorkerStartupError(RuntimeError):
    """A worker process could not load the run (after the parent could)."""


def run_server(run_dir, host: str = "127.0.0.1", port: int = 8000, workers: int = 1, device=None,
               max_body: int = 1 << 20, max_batch: int = 64, threads: int | None = None,
               log_level: str = "info", body_timeout: float = BODY_TIMEOUT, keep_alive: float = KEEP_ALIVE,
               grace: float = GRACE) -> None:
    """Serve ``run_dir`` with uvicorn; each of ``workers`` processes loads the model once and
    gets ``threads`` torch threads (default ``cpu cores / workers``, at least 1).

    The run is loaded here first, before any worker starts: a damaged run raises the loader's
    error (naming the file) and nothing is served. With one worker that load is the one
    served; with more, the parent checks the run on the CPU and each worker loads its own.
    Timeouts: ``body_timeout`` for a request body to arrive, ``keep_alive`` for an idle
    connection, ``grace`` for running requests to finish after SIGTERM."""
    require("fastapi", "the HTTP service (recvae serve)")
    uvicorn = require("uvicorn", "the HTTP service (recvae serve)")
    threads = threads or max(1, (os.cpu_count() or 1) // workers)
    options = {"host": host, "port": port, "log_level": log_level, "timeout_keep_alive": keep_alive,
               "timeout_graceful_shutdown": grace}
    if workers == 1:
        app = create_app(run_dir, device=device, max_body=max_body, max_batch=max_batch, threads=threads,
                         body_timeout=body_timeout)
        uvicorn.run(app, **options)
        return
    check_run(run_dir, device)
    fd, failure_file = tempfile.mkstemp(prefix="recvae-serve-", suffix=".err")
    os.close(fd)
    os.environ.update({
        ENV["run_dir"]: str(run_dir),
        ENV["device"]: device or "",
        ENV["max_body"]: str(max_body),
        ENV["max_batch"]: str(max_batch),
        ENV["threads"]: str(threads),
        ENV["body_timeout"]: repr(float(body_timeout)),
        ENV["parent"]: str(os.getpid()),
        ENV["failure_file"]: failure_file,
    })
    try:
        uvicorn.run("recvae.serve:app_from_env", factory=True, workers=workers, **options)
        with open(failure_file) as f:
            failures = f.read().splitlines()
    finally:
        os.unlink(failure_file)
    if failures:
        raise WorkerStartupError(f"a worker could not load the run, server stopped: {failures[0]}")


def check_run(run_dir, device=None) -> None:
    """Load the run once (on the CPU: the parent of the workers keeps no GPU memory) and check
    ``device``: raises what a worker would, before any worker starts."""
    import gc

    from recvae.models.device import resolve_device

    if device:
        resolve_device(device)
    RunRecommender(run_dir, device="cpu")
    gc.collect()
