"""Starting the service: the run checked once in the parent, uvicorn's workers, their timeouts and shutdown."""

import errno
import gc
import logging
import os
import socket
import tempfile
import time
import urllib.error
import urllib.request

from recvae import signals
from recvae.errors import ParameterError, RecvaeError
from recvae.optional import require
from recvae.recommend import RunRecommender

from recvae.serve.app import create_app
from recvae.serve.settings import (BATCH_WAIT, BODY_TIMEOUT, ENV, GRACE, KEEP_ALIVE, available_cores,
                                   check_unknown_users, serving_layout)

logger = logging.getLogger(__name__)


class WorkerStartupError(RecvaeError, RuntimeError):
    """A worker process could not load the run (after the parent could)."""


def run_server(run_dir, host: str = "127.0.0.1", port: int = 8000, workers: int | None = None, device=None,
               max_body: int = 1 << 20, max_batch: int = 64, threads: int | None = None,
               log_level: str = "info", body_timeout: float = BODY_TIMEOUT, keep_alive: float = KEEP_ALIVE,
               grace: float = GRACE, batch_wait: float = BATCH_WAIT, precision: str = "fp32",
               unknown_users: str = "404") -> None:
    """Serve ``run_dir`` with uvicorn; each of ``workers`` processes loads the model (and the
    run's histories) once, so memory grows with them, and gets ``threads`` torch threads.
    Defaults (:func:`~recvae.serve.settings.serving_layout`): one worker per CPU core available
    to this process (at most 8) with one torch thread each, and one worker when the model is on
    CUDA; threads: the cores left to each worker less one for its event loop, at least 1.

    The run is loaded here first, before any worker starts: a damaged run raises the loader's
    error (naming the file) and nothing is served. With one worker that load is the one
    served; with more, the parent checks the run on the CPU and each worker loads its own.
    ``unknown_users``: "404" (a user not of the run is refused) or "popular" (it gets the
    popularity list, less the items the run recorded for a user it left out).
    ``precision``: the model's scoring precision ("bf16": 1.3-1.4x the requests per CPU
    second on an AVX-512 BF16 CPU; see :meth:`~recvae.models.base.Recommender.set_scoring_precision`).
    Timeouts: ``body_timeout`` for a request body to arrive, ``keep_alive`` for an idle
    connection, ``grace`` for running requests to finish after SIGTERM."""
    require("fastapi", "the HTTP service (recvae serve)")
    require("orjson", "the HTTP service (recvae serve)")
    uvicorn = require("uvicorn", "the HTTP service (recvae serve)")
    check_port(host, port)
    check_unknown_users(unknown_users)
    options = {"host": host, "port": port, "log_level": log_level, "timeout_keep_alive": keep_alive,
               "timeout_graceful_shutdown": grace}
    run = None
    if workers in (None, 1):  # the run loaded where one worker would serve it: its device decides
        run = RunRecommender(run_dir, device=device, precision=precision)
    workers, threads = serving_layout(available_cores(), run is not None and on_cuda(run.model), workers, threads)
    if workers == 1:
        logger.info("serving with 1 worker x %d torch thread(s)", threads)
        app = create_app(run_dir, max_body=max_body, max_batch=max_batch, threads=threads, body_timeout=body_timeout,
                         batch_wait=batch_wait, unknown_users=unknown_users, run=run)
        with signals.noted():  # the stop line and 130 / 143, as every command's
            uvicorn.run(app, **options)
        return
    if run is None:
        check_run(run_dir, device, precision)
    else:  # loaded on the CPU (not CUDA: one worker there) as check_run would: the workers load their own
        del run
        gc.collect()
    logger.info("serving with %d workers x %d torch thread(s), each loading the model", workers, threads)
    fd, failure_file = tempfile.mkstemp(prefix="recvae-serve-", suffix=".err")
    os.close(fd)
    os.environ.update({
        ENV["run_dir"]: str(run_dir),
        ENV["device"]: device or "",
        ENV["max_body"]: str(max_body),
        ENV["max_batch"]: str(max_batch),
        ENV["batch_wait"]: repr(float(batch_wait)),
        ENV["threads"]: str(threads),
        ENV["body_timeout"]: repr(float(body_timeout)),
        ENV["precision"]: precision,
        ENV["unknown_users"]: unknown_users,
        ENV["parent"]: str(os.getpid()),
        ENV["failure_file"]: failure_file,
    })
    try:
        with signals.noted():  # a worker that fails SIGTERMs this process: its error comes first
            uvicorn.run("recvae.serve:app_from_env", factory=True, workers=workers, **options)
            with open(failure_file) as f:
                failures = f.read().splitlines()
            if failures:
                raise WorkerStartupError(f"a worker could not load the run, server stopped: {failures[0]}")
    finally:
        os.unlink(failure_file)


def check_port(host: str, port: int) -> None:
    """Bind ``host:port`` as uvicorn will (``SO_REUSEADDR``) and let it go: a port in use or
    not ours to take is one ``ParameterError`` on ``port``, before the run loads and before
    uvicorn's own log line and exit status 3."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
        except OSError as e:
            if e.errno == errno.EADDRINUSE:
                raise ParameterError("port", f"already in use on {host} (another server listens there; "
                                     "stop it or choose another port)", given=port) from e
            if e.errno == errno.EACCES:
                raise ParameterError("port", f"not allowed on {host} (ports below 1024 need privileges; "
                                     "choose a higher one)", given=port) from e
            raise ParameterError("host", f"cannot listen there: {e.strerror or e}", given=host) from e


def on_cuda(model) -> bool:
    """Whether ``model`` computes on a CUDA device (the numpy baselines have none)."""
    device = getattr(model, "device_", None)
    return device is not None and device.type == "cuda"


def check_run(run_dir, device=None, precision: str = "fp32") -> None:
    """Load the run once (on the CPU: the parent of the workers keeps no GPU memory) and check
    ``device``: raises what a worker would, before any worker starts."""
    from recvae.models.device import resolve_device

    if device:
        resolve_device(device)
    RunRecommender(run_dir, device="cpu", precision=precision)
    gc.collect()


def wait_until_ready(base: str, process=None, timeout: float = 90.0, output=None, any_status: bool = False) -> None:
    """Poll ``base + "/health"`` until the service answers 200 (with ``any_status``, any HTTP
    answer: a server without that path): for whatever starts ``recvae serve`` in another
    process (tests, benchmarks, the README's examples). ``process`` (a ``subprocess.Popen``),
    if given, is watched: ``RuntimeError`` with ``output()`` (the tail of its log) as soon as
    it exits; ``TimeoutError`` with the same after ``timeout`` seconds. The caller stops the
    process either way."""
    def log() -> str:
        return f": {output()}" if output is not None else ""

    deadline = time.monotonic() + timeout
    while True:
        if process is not None and process.poll() is not None:
            raise RuntimeError(f"the server exited with status {process.returncode}{log()}")
        try:
            with urllib.request.urlopen(f"{base}/health", timeout=1) as answer:
                if answer.status == 200:
                    return
        except urllib.error.HTTPError:
            if any_status:
                return
        except OSError:  # not listening yet
            pass
        if time.monotonic() > deadline:
            raise TimeoutError(f"the server did not answer {base}/health within {timeout:g} s{log()}")
        time.sleep(0.2)
