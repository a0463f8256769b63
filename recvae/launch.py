"""The first lines the ``recvae`` program runs: a Ctrl-C or SIGTERM that lands while the command
line is still being imported is one line and 130 / 143 too, not an import's traceback."""

import os
import signal
import sys


def _stopped_early(signum, frame):
    name = "SIGINT" if signum == signal.SIGINT else "SIGTERM"
    os.write(2, f"recvae: stopped by {name}; nothing was done\n".encode())
    os._exit(128 + signum)


def main() -> None:
    watched = [s for s in (signal.SIGINT, signal.SIGTERM) if signal.getsignal(s) is not signal.SIG_IGN]
    previous = {s: signal.signal(s, _stopped_early) for s in watched}
    from recvae.cli import main as run_command

    for s, handler in previous.items():
        signal.signal(s, handler)
    sys.exit(run_command())


if __name__ == "__main__":  # pragma: no cover
    main()
