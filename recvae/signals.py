"""SIGINT and SIGTERM: raised as exceptions in the main thread, and held back while a file
set that belongs together (a checkpoint and the history it records) is being written."""

from __future__ import annotations

import contextlib
import os
import signal
import threading


class Terminated(BaseException):
    """SIGTERM, raised in the main thread like KeyboardInterrupt for SIGINT."""


#: exit statuses of a command stopped by a signal: 128 + the signal's number, as a shell reports it
EXIT_SIGINT, EXIT_SIGTERM = 128 + signal.SIGINT, 128 + signal.SIGTERM


_received: list[int] = []  # the signals that sigterm_raises() turned into exceptions


def _raise_terminated(signum, frame):
    _received.append(signum)
    raise Terminated()


def _raise_interrupt(signum, frame):
    _received.append(signum)
    raise KeyboardInterrupt


def received() -> int | None:
    """The last signal raised as an exception within :func:`sigterm_raises` (None: none). An
    interrupt that lands inside an import can surface as an ``ImportError`` (numpy and torch
    wrap it): this says it was the signal."""
    return _received[-1] if _received else None


def _main_thread() -> bool:
    return threading.current_thread() is threading.main_thread()


@contextlib.contextmanager
def sigterm_raises():
    """Within the block SIGTERM raises :class:`Terminated`, as SIGINT raises KeyboardInterrupt
    (unless SIGINT is ignored, as in a background job); both are recorded (:func:`received`).
    The previous handlers come back after it. Outside the main thread, where Python cannot
    handle signals, nothing changes."""
    if not _main_thread():
        yield
        return
    _received.clear()  # what came before belongs to another command (several run in one test process)
    previous = signal.signal(signal.SIGTERM, _raise_terminated)
    previous_int = signal.getsignal(signal.SIGINT)
    if previous_int is signal.default_int_handler:
        signal.signal(signal.SIGINT, _raise_interrupt)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous if previous is not None else signal.SIG_DFL)
        if previous_int is signal.default_int_handler:
            signal.signal(signal.SIGINT, previous_int)


def stopped_by(error: BaseException) -> tuple[str, int]:
    """The signal that stopped a command and its exit status: (name, 128 + number)."""
    if isinstance(error, KeyboardInterrupt) or (not isinstance(error, Terminated) and received() == signal.SIGINT):
        return "SIGINT", EXIT_SIGINT
    return "SIGTERM", EXIT_SIGTERM


@contextlib.contextmanager
def deferred():
    """SIGINT and SIGTERM that arrive within the block take effect when it ends, as they would
    have at its start: a write of several files is never cut in the middle (a signal inside
    ``torch.save`` once surfaced as a ``RuntimeError`` instead of the interrupt)."""
    if not _main_thread():
        yield
        return
    received: list[int] = []
    previous = {s: signal.signal(s, lambda signum, frame: received.append(signum))
                for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler if handler is not None else signal.SIG_DFL)
        if received:
            s = received[0]
            handler = previous[s]
            if callable(handler):
                handler(s, None)  # KeyboardInterrupt / Terminated, as if the signal came now
            elif handler == signal.SIG_DFL:
                os.kill(os.getpid(), s)


@contextlib.contextmanager
def noted():
    """SIGINT / SIGTERM that arrive within the block, whoever handles them, raise
    KeyboardInterrupt / Terminated when it ends (the last one; nothing when none came).

    For a server that installs its own handlers and ends quietly: uvicorn swallows the
    KeyboardInterrupt of one worker, and its supervisor of several never passes a signal on,
    so ``serve`` exited 0 without a stop line. The signals are seen through Python's wakeup
    file descriptor, which the C-level handler writes whatever Python handler runs."""
    if not _main_thread():
        yield
        return
    read, write = os.pipe()
    os.set_blocking(read, False)
    os.set_blocking(write, False)
    previous = signal.set_wakeup_fd(write, warn_on_full_buffer=False)
    try:
        yield
    finally:
        signal.set_wakeup_fd(previous)
        try:
            seen = os.read(read, 1024)
        except BlockingIOError:
            seen = b""
        os.close(read)
        os.close(write)
    last = next((s for s in reversed(seen) if s in (signal.SIGINT, signal.SIGTERM)), None)
    if last is not None:
        _received.append(last)
        raise KeyboardInterrupt if last == signal.SIGINT else Terminated()


def exit_on_signal(line: str) -> None:
    """From now until the process ends, SIGINT / SIGTERM end it at once with ``line`` on stderr
    and 130 / 143: a command that has finished is still running its exit hooks (tqdm's monitor
    thread, ...), where a Ctrl-C printed 'Exception ignored in atexit callback' and exit 0."""
    if not _main_thread():
        return

    def leave(signum, frame):
        os.write(2, (line.replace("{signal}", signal.Signals(signum).name) + "\n").encode())
        os._exit(128 + signum)

    for s in (signal.SIGINT, signal.SIGTERM):
        signal.signal(s, leave)
