"""The service's settings: defaults, limits and the environment its worker processes read."""

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
