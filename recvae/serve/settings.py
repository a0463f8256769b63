"""The service's settings: defaults, limits and the environment its worker processes read."""

import os

from recvae.errors import ParameterError

#: environment variables read by :func:`app_from_env` (how uvicorn's worker processes get the settings)
ENV = {
    "run_dir": "RECVAE_SERVE_RUN_DIR",
    "device": "RECVAE_SERVE_DEVICE",
    "max_body": "RECVAE_SERVE_MAX_BODY",
    "max_batch": "RECVAE_SERVE_MAX_BATCH",
    "batch_wait": "RECVAE_SERVE_BATCH_WAIT",
    "threads": "RECVAE_SERVE_THREADS",
    "body_timeout": "RECVAE_SERVE_BODY_TIMEOUT",
    "precision": "RECVAE_SERVE_PRECISION",
    "unknown_users": "RECVAE_SERVE_UNKNOWN_USERS",
    # set by run_server for its workers: the supervisor's pid and the file a worker that cannot
    # start writes its error to (the supervisor then stops instead of respawning it)
    "parent": "RECVAE_SERVE_PARENT",
    "failure_file": "RECVAE_SERVE_FAILURE_FILE",
}
MAX_K = 1000
#: seconds a micro-batch waits for as many requests as the last one had (--batch-wait, in ms)
BATCH_WAIT = 0.002
BODY_TIMEOUT = 5.0  # seconds for a request body to arrive after its headers (--body-timeout)
KEEP_ALIVE = 5.0  # seconds an idle keep-alive connection stays open (--keep-alive)
GRACE = 10.0  # seconds running requests get to finish after SIGTERM (--grace)
#: exit status of a worker that could not load the run (uvicorn's own "startup failure" status)
STARTUP_FAILURE = 3
#: ASGI scope key holding the request body read by :class:`BodyLimit` (for the 422 handler)
BODY_KEY = "recvae.body"
#: what the service answers ``{"user": ...}`` for a user not of the run (``--unknown-users``):
#: 404 naming the user (and why the run left it out), or the popularity list (``source: "popularity"``)
#: without the items the run recorded for a user it left out
UNKNOWN_USERS = ("404", "popular")


def check_unknown_users(value) -> None:
    if value not in UNKNOWN_USERS:
        raise ParameterError("unknown_users", f"expected one of {', '.join(UNKNOWN_USERS)}", given=value)


#: most worker processes started by default (each loads the model and the run's histories once)
MAX_DEFAULT_WORKERS = 8


def available_cores() -> int:
    """The CPU cores this process may run on (its affinity: a container's or ``taskset``'s limit)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def serving_layout(cores: int, cuda: bool, workers: int | None = None, threads: int | None = None) -> tuple[int, int]:
    """``(workers, torch threads per worker)`` of the service, each given value kept. By default
    one worker per core on the CPU (at most :data:`MAX_DEFAULT_WORKERS`), the fastest measured
    setting (benchmarks/results/serving.md: on 2 cores, 2 workers x 1 thread answered 1.6x the
    requests of 1 worker), and one worker on CUDA (one model in GPU memory, fed by one process).
    Threads: the cores left to each worker less one for its event loop, at least 1 (torch's
    threads spin while they wait, and would take the core the event loop needs)."""
    if workers is None:
        workers = 1 if cuda else max(1, min(cores, MAX_DEFAULT_WORKERS))
    if threads is None:
        threads = max(1, cores // workers - 1)
    return workers, threads
