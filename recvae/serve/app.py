"""The FastAPI application of a run: its routes and what each answers."""

import asyncio
import logging
import os
import signal
import sys
from typing import Union

import numpy as np
import scipy.sparse as sp

from recvae.errors import ParameterError
from recvae.optional import require
from recvae.recommend import IdError, RunRecommender

from recvae.serve.settings import BODY_TIMEOUT, ENV, MAX_K, STARTUP_FAILURE
from recvae.serve.batching import MicroBatcher
from recvae.serve.guards import BodyLimit, error, validation_failed

logger = logging.getLogger(__name__)


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

    class SimilarRequest(BaseModel):
        model_config = ConfigDict(extra="forbid")
        item: Id
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

    @app.post("/similar")
    async def similar(request: SimilarRequest):
        if not 1 <= request.k <= min(MAX_K, run.n_items - 1):
            return error(422, ["body", "k"], f"k must lie in 1..{min(MAX_K, run.n_items - 1)}, got {request.k}", "value_error")
        try:
            table = run.similar([request.item], request.k, locate=lambda j: "item")
        except IdError as e:
            return error(422, ["body", "item"], str(e), "value_error")
        except ParameterError as e:
            if e.param == "items":
                return error(404, ["body", "item"], f"unknown item {request.item!r}: not an item of the run", "not_found")
            return error(422, ["body"], e.message, "value_error")  # a model without item vectors
        return {"items": table["similar_item"].tolist(), "scores": table["score"].astype(float).tolist()}

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
