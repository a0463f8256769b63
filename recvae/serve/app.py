"""The application of a run: its routes, what each answers, and the fast path of ``POST /recommend``."""

import asyncio
import gc
import json
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

from recvae.serve.settings import BATCH_WAIT, BODY_KEY, BODY_TIMEOUT, ENV, MAX_K, STARTUP_FAILURE, check_unknown_users
from recvae.serve.batching import MicroBatcher
from recvae.serve.guards import BodyLimit, error, validation_failed

logger = logging.getLogger(__name__)


def create_app(run_dir, device=None, max_body: int = 1 << 20, max_batch: int = 64, threads: int | None = None,
               body_timeout: float = BODY_TIMEOUT, batch_wait: float = BATCH_WAIT, precision: str = "fp32",
               unknown_users: str = "404", run: RunRecommender | None = None):
    """The ASGI application serving ``run_dir`` (the model is loaded here, once): the FastAPI
    application (``.fastapi``) behind :class:`~recvae.serve.guards.BodyLimit` and
    :class:`PlainRecommend`, which answers well-formed ``POST /recommend`` bodies without
    FastAPI's request machinery (the same answer, the same bytes).

    ``threads``: torch intra-op threads of this process (default: the CPU cores divided among
    uvicorn's workers as ``RECVAE_SERVE_THREADS`` says, else all of them). ``precision``: the
    model's scoring precision, "fp32" or "bf16" (:class:`~recvae.recommend.RunRecommender`).
    ``unknown_users``: what ``{"user": ...}`` gets for a user not of the run: "404" (refused,
    saying why the run left it out when it did) or "popular" (the popularity list, less the items
    the run recorded for a user it left out; ``source: "popularity"``). ``run``: the run already
    loaded (``device`` and ``precision`` are then the ones it was loaded with).
    """
    fastapi = require("fastapi", "the HTTP service (recvae serve)")
    require("orjson", "the HTTP service (recvae serve)")
    from contextlib import asynccontextmanager

    from fastapi.exceptions import RequestValidationError
    from fastapi.responses import Response
    from pydantic import BaseModel, ConfigDict, Field, StrictInt, StrictStr

    import torch

    check_unknown_users(unknown_users)
    if threads:
        torch.set_num_threads(int(threads))
    if run is None:
        run = RunRecommender(run_dir, device=device, precision=precision)
    batcher = MicroBatcher(run, max_batch, batch_wait)
    answer = Answers(run, batcher, unknown_users)
    Id = Union[StrictInt, StrictStr]

    class RecommendRequest(BaseModel):  # what PlainRecommend accepts as is; the rest is FastAPI's to refuse
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
        # the run's objects live as long as the process: out of the collector's sight, a full
        # collection no longer walks them (under load it paused the worker ~80 ms, the p99)
        gc.collect()
        gc.freeze()
        batcher.start()
        yield
        # uvicorn has waited --grace for running requests and cancelled those left: give them a
        # moment to answer 503 before the process ends
        if inflight:
            await asyncio.wait(list(inflight), timeout=1.0)
        await batcher.stop()

    app = fastapi.FastAPI(title="recvae", lifespan=lifespan)
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
        out = await answer.recommend(request.user, request.items, request.exclude, request.k)
        return Response(out, media_type="application/json") if isinstance(out, bytes) else out

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

    service = BodyLimit(PlainRecommend(app, answer), max_body=max_body, body_timeout=body_timeout, inflight=inflight)
    service.fastapi = app
    return service


class Answers:
    """What the routes answer once a request has its fields (typed as the request models say)."""

    def __init__(self, run: RunRecommender, batcher: MicroBatcher, unknown_users: str = "404"):
        self.run = run
        self.batcher = batcher
        self.max_k = min(MAX_K, run.n_items)
        self.popular_for_unknown = unknown_users == "popular"

    async def recommend(self, user, items, exclude, k):
        """``POST /recommend``: the answer's JSON (bytes), or the error response."""
        run = self.run
        if (user is None) == (items is None):
            return error(422, ["body"], "give exactly one of 'user' (a user of the run) or 'items' (a new user's history)", "value_error")
        if not 1 <= k <= self.max_k:
            return error(422, ["body", "k"], f"k must lie in 1..{self.max_k}, got {k}", "value_error")
        unknown = []
        extra = _NONE
        if exclude:
            try:
                extra = run.item_codes(exclude, lambda j: f"exclude[{j}]")
            except IdError as e:
                return error(422, ["body", "exclude", e.position], str(e), "value_error")
            unknown = [exclude[j] for j in np.flatnonzero(extra < 0)]
            extra = extra[extra >= 0]
        if user is not None:
            rows, _ = run.user_rows([user])
            if rows[0] < 0 and not self.popular_for_unknown:
                why = run.why_dropped([user])[0]  # a user of the source that the run left out says why
                return error(404, ["body", "user"], f"unknown user {user!r}: not a user of the run"
                             + (f"; {why}" if why else ""), "not_found")
            if rows[0] < 0:  # the popularity list, less what the run recorded of a user it left out
                positives = _NONE
                dropped = int(run.dropped_rows([user])[0])
                seen = _row(run.dropped_seen.matrix, dropped) if dropped >= 0 else _NONE
            else:
                positives = _row(run.known, int(rows[0]))
                seen = _row(run.seen, int(rows[0]))
            exclude_codes = np.concatenate([seen, extra]) if len(extra) else seen
        else:
            if not items:
                return error(422, ["body", "items"], "empty: give at least one item id (or 'user' for a user of the run)", "value_error")
            try:
                codes = run.item_codes(items, lambda j: f"items[{j}]")
            except IdError as e:
                return error(422, ["body", "items", e.position], str(e), "value_error")
            unknown += [items[j] for j in np.flatnonzero(codes < 0)]
            positives = np.unique(codes[codes >= 0])
            exclude_codes = extra
        ids, scores, fallback = await self.batcher.submit(positives, exclude_codes, k)
        keep = ids >= 0
        return _dumps({
            "items": run.item_ids[ids[keep]].tolist(),
            "scores": scores[keep].astype(float).tolist(),
            "source": "popularity" if fallback else "model",
            "unknown_items": unknown,
        })


def _dumps(answer: dict) -> bytes:
    """The answer's JSON: orjson, or, for what it cannot write (an unknown id beyond 64 bits,
    echoed in ``unknown_items``), the standard library as FastAPI's JSONResponse writes it."""
    import orjson

    try:
        return orjson.dumps(answer)
    except orjson.JSONEncodeError:
        return json.dumps(answer, ensure_ascii=False, allow_nan=False, separators=(",", ":")).encode()


_NONE = np.zeros(0, dtype=np.int64)
_ID = (int, str)  # the types orjson gives that RecommendRequest's ids accept (bool is not int here)
_FIELDS = frozenset(("user", "items", "exclude", "k"))
_JSON = b"application/json"


def plain_fields(body: bytes):
    """``(user, items, exclude, k)`` of a JSON body that ``RecommendRequest`` accepts exactly as it
    is, else None (FastAPI then validates it and says what is wrong). JSON only: orjson refuses
    ``NaN``, ``Infinity`` and numbers beyond a float, and reads integers beyond 64 bits as floats,
    which no field takes here."""
    import orjson

    try:
        value = orjson.loads(body)
    except orjson.JSONDecodeError:
        return None
    if type(value) is not dict or not value.keys() <= _FIELDS:
        return None
    user, items = value.get("user"), value.get("items")
    exclude, k = value.get("exclude", []), value.get("k", 10)
    if type(k) is not int or type(exclude) is not list or not all(type(v) in _ID for v in exclude):
        return None
    if not (user is None or type(user) in _ID):
        return None
    if not (items is None or (type(items) is list and all(type(v) in _ID for v in items))):
        return None
    return user, items, exclude, k


def _json_content(headers) -> bool:
    """Whether the first Content-Type header is ``application/json`` (parameters allowed)."""
    for name, value in headers:
        if name == b"content-type":
            kind = value.split(b";", 1)[0].strip().lower()
            return kind == _JSON
    return False


class PlainRecommend:
    """ASGI layer answering ``POST /recommend`` with a JSON body that ``RecommendRequest``
    accepts as it is (the common case) straight from :class:`Answers`: one orjson parse and a
    check of the types, without FastAPI's request, dependency and validation machinery. Any other
    request, and any body it does not accept as it is, goes to FastAPI unchanged, which answers
    or refuses it as before (the body read by :class:`~recvae.serve.guards.BodyLimit`)."""

    def __init__(self, app, answer: Answers):
        self.app = app
        self.answer = answer

    async def __call__(self, scope, receive, send):
        if scope["type"] == "http" and scope["path"] == "/recommend" and scope["method"] == "POST" \
                and _json_content(scope["headers"]):
            fields = plain_fields(scope.get(BODY_KEY, b""))
            if fields is not None:
                out = await self.answer.recommend(*fields)
                if not isinstance(out, bytes):
                    return await out(scope, receive, send)
                await send({"type": "http.response.start", "status": 200,
                            "headers": [(b"content-length", b"%d" % len(out)), (b"content-type", _JSON)]})
                await send({"type": "http.response.body", "body": out})
                return
        await self.app(scope, receive, send)


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
            unknown_users=get(ENV["unknown_users"]) or "404",
            body_timeout=float(get(ENV["body_timeout"], BODY_TIMEOUT)),
            batch_wait=float(get(ENV["batch_wait"], BATCH_WAIT)),
            precision=get(ENV["precision"]) or "fp32",
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
