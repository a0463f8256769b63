"""``recvae serve``: the HTTP service of a run (needs recvae[serve])."""

from __future__ import annotations


from recvae.cli.common import DEVICE_HELP, PRECISION_HELP, PRECISIONS, CLIError

#: --unknown-users: ``recvae.serve.settings.UNKNOWN_USERS``, written out because importing the
#: service (torch, FastAPI) here would slow every command's start; a test checks both agree
UNKNOWN_USERS = ("404", "popular")


def add_parser(sub, common) -> None:
    v = sub.add_parser("serve", parents=[common], help="an HTTP service answering top-K requests from a run (needs recvae[serve])")
    v.add_argument("run_dir", metavar="RUN_DIR")
    v.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1: this machine only)")
    v.add_argument("--port", type=int, default=8000, help="port (default 8000)")
    v.add_argument("--workers", type=int,
                   help="worker processes; each loads the model and the run's histories once, so memory grows "
                        "with them (default: one per CPU core available, at most 8, with 1 torch thread each: "
                        "the fastest measured; 1 when the model is on CUDA)")
    v.add_argument("--device", help=f"{DEVICE_HELP} (default: the device saved with the model)")
    v.add_argument("--precision", choices=PRECISIONS, default="fp32",
                   help="scoring precision: " + PRECISION_HELP)
    v.add_argument("--max-body", type=int, default=1 << 20, metavar="BYTES", help="largest request body accepted (default 1 MiB; 413 beyond)")
    v.add_argument("--max-batch", type=int, default=64, help="concurrent requests scored in one forward pass (default 64; 1 = no batching)")
    v.add_argument("--batch-wait", type=float, default=2.0, metavar="MS",
                   help="how long a micro-batch waits for as many requests as the last one had "
                        "(default 2 ms; 0: never waits)")
    v.add_argument("--threads", type=int, help="torch threads per worker (default: CPU cores / workers, "
                   "less one for the worker's event loop; at least 1)")
    v.add_argument("--unknown-users", choices=UNKNOWN_USERS, default="404",
                   help="what {\"user\": ID} gets for an id that is not a user of the run: 404 (default: a typo "
                        "is an error, saying why the run left the user out if it did) or popular (the popularity "
                        "list, source \"popularity\", less the items the run recorded for a user it left out)")
    v.add_argument("--body-timeout", type=float, default=5.0, metavar="SECONDS",
                   help="time for a request body to arrive after its headers (default 5; 408 and the connection closed beyond)")
    v.add_argument("--keep-alive", type=float, default=5.0, metavar="SECONDS",
                   help="an idle keep-alive connection is closed after this (default 5)")
    v.add_argument("--grace", type=float, default=10.0, metavar="SECONDS",
                   help="on SIGTERM, time running requests get to finish before they are answered 503 and the server exits (default 10)")
    v.set_defaults(func=run)


def run(args) -> int:
    from recvae.optional import MissingDependencyError
    from recvae.rundir import RUN_JSON, is_run_dir
    from recvae.serve import WorkerStartupError, run_server

    if not 0 < args.port < 65536:
        raise CLIError(f"--port: expected 1..65535, got {args.port}")
    for flag, value in (("--workers", args.workers), ("--max-body", args.max_body), ("--max-batch", args.max_batch),
                        ("--threads", args.threads)):
        if value is not None and value < 1:
            raise CLIError(f"{flag}: expected a positive integer, got {value}")
    for flag, value in (("--body-timeout", args.body_timeout), ("--keep-alive", args.keep_alive), ("--grace", args.grace)):
        if not 0 < value < float("inf"):
            raise CLIError(f"{flag}: expected a positive number of seconds, got {value:g}")
    if not 0 <= args.batch_wait <= 1000:
        raise CLIError(f"--batch-wait: expected milliseconds in 0..1000, got {args.batch_wait:g}")
    if not is_run_dir(args.run_dir):
        raise CLIError(f"RUN_DIR {args.run_dir}: not a run directory (no {RUN_JSON})")
    try:
        run_server(args.run_dir, host=args.host, port=args.port, workers=args.workers, device=args.device,
                   max_body=args.max_body, max_batch=args.max_batch, threads=args.threads,
                   log_level="warning" if args.quiet else "info", body_timeout=args.body_timeout,
                   keep_alive=args.keep_alive, grace=args.grace, batch_wait=args.batch_wait / 1000,
                   precision=args.precision, unknown_users=args.unknown_users)
    except (MissingDependencyError, WorkerStartupError) as e:
        raise CLIError(str(e)) from e
    return 0
