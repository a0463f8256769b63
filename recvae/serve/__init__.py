"""An HTTP service answering top-K requests from a run directory (``recvae serve``; needs the
optional extra ``recvae[serve]``: FastAPI, uvicorn with uvloop and httptools, orjson).

Endpoints:

* ``POST /recommend`` with ``{"items": [...], "k": 10, "exclude": [...]}`` (a new user: the model
  folds the history in) or ``{"user": "..."}`` (a user of the run: their full known history, every
  item they have at any rating excluded). Answers ``{"items": [...], "scores": [...], "source":
  "model" | "popularity", "unknown_items": [...]}`` in original ids. Item ids unknown to the run
  are dropped and listed in ``unknown_items``; when none is left the answer is the popularity
  fallback (``source: "popularity"``, scores = fraction of training users having the item). A
  ``user`` not of the run is a 404 naming it (and why the run left it out, when it did); with
  ``unknown_users="popular"`` (``--unknown-users popular``) it gets the popularity fallback,
  less the items the run recorded for a user of the source it left out (``dropped_seen.npz``).
* ``GET /health``; ``GET /model``: model class, dataset, number of items and users, metrics.

Bad requests get a 4xx with FastAPI's error body ``{"detail": [{"loc": [...], "msg": ...}]}``
naming the field: 404 unknown user (by default), 422 for an empty ``items`` list, both or neither of
``user``/``items``, ``k`` outside 1..max_k, wrong types or ids that cannot be ids of the run,
``NaN``/``Infinity`` anywhere in the body (``finite_number``), 413 for a body over ``max_body``
bytes, 408 for a body that has not fully arrived ``body_timeout`` seconds after the headers.
Concurrent requests are micro-batched: while a forward pass runs (in a worker thread, so the
event loop keeps accepting), arriving requests queue, and the next pass scores up to
``max_batch`` of them at once (one matrix product instead of many); a pass waits up to
``batch_wait`` seconds for as many requests as the last one had. A ``POST /recommend`` with a
plain JSON body is parsed once (orjson) and checked by hand; FastAPI validates every other body
and says what is wrong with it.

:func:`run_server` loads the run once in the parent process before any worker starts (a damaged
run is one error, whatever the number of workers); a worker that cannot load it stops the whole
server instead of being respawned. Idle keep-alive connections close after ``keep_alive``
seconds; on SIGTERM the server stops accepting, lets running requests finish for up to
``grace`` seconds, answers those still running 503 and exits.
"""

from recvae.serve.app import app_from_env, create_app
from recvae.serve.server import WorkerStartupError, check_run, run_server
from recvae.serve.settings import (BATCH_WAIT, BODY_TIMEOUT, ENV, GRACE, KEEP_ALIVE, MAX_K, UNKNOWN_USERS,
                                   serving_layout)

__all__ = ["create_app", "app_from_env", "run_server", "check_run", "WorkerStartupError", "ENV", "MAX_K",
           "BODY_TIMEOUT", "KEEP_ALIVE", "GRACE", "BATCH_WAIT", "UNKNOWN_USERS", "serving_layout"]
