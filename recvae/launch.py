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
    code = run_command()
    distributed = sys.modules.get("recvae.distributed")  # imported by every command that can join a group
    if distributed is not None and distributed.launched_by_torchrun():
        _leave_now(code)
    from recvae.signals import exit_on_signal

    # the command is done; the interpreter's exit hooks (tqdm's monitor thread) still run
    exit_on_signal("recvae: stopped by {signal}; no output was left half-written")
    sys.exit(code)


def _leave_now(code: int) -> None:
    """End a process of torchrun (or of another launcher that sets ``RANK`` and ``WORLD_SIZE``)
    once its command is done, without the interpreter's teardown.

    At that teardown, C++ threads and objects of torch and gloo are destroyed in no fixed order;
    now and then one aborts the process ("terminate called without an active exception",
    SIGABRT) after the command had finished. torchrun then counts the rank as failed, stops the
    others and, across machines, the other nodes' agents wait 5 minutes for it at their exit
    barrier. Everything the command wrote is complete by now (files are renamed into place),
    so only the streams need flushing."""
    import logging

    logging.shutdown()
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):
            pass
    os._exit(code)


if __name__ == "__main__":  # pragma: no cover
    main()
