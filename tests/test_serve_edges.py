"""`recvae serve` at its edges, through the real server in a subprocess on a free local port: a
damaged run (whatever the number of workers), NaN/Infinity in a body, slow clients, SIGTERM."""

from __future__ import annotations

import contextlib
import os
from pathlib import Path
import shutil
import signal
import socket
import subprocess
import sys
import time

import pytest

httpx = pytest.importorskip("httpx")
pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")

from recvae.cli import main  # noqa: E402
from recvae.serve.server import wait_until_ready  # noqa: E402

from test_serve import free_port, run_dir  # noqa: E402,F401  (run_dir: the module's trained run)

ROOT = Path(__file__).resolve().parents[1]


def env():
    return {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}


def stop(proc: subprocess.Popen) -> None:
    """Kill ``proc`` and everything it started (its own process group), if still running."""
    if proc.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
    proc.wait(timeout=15)


def finish(argv: list[str], timeout: float) -> tuple[int, str, float]:
    """Run ``argv`` in its own process group; ``(exit status, output, seconds)``; killed with all
    its children and failed if still running after ``timeout``."""
    start = time.monotonic()
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env(), start_new_session=True)
    try:
        out, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        stop(proc)
        pytest.fail(f"{' '.join(argv[:6])}...: still running after {timeout} s")
    finally:
        stop(proc)
    return proc.returncode, out.decode(), time.monotonic() - start


@contextlib.contextmanager
def serve(folder, log: Path, *extra):
    """The real `recvae serve` (log level info: one access line per request) logging to ``log``;
    yields ``(port, process)``; always stopped, with its workers. One worker unless ``extra`` says."""
    port = free_port()
    workers = () if "--workers" in extra else ("--workers", "1")
    with open(log, "wb") as out:
        proc = subprocess.Popen([sys.executable, "-m", "recvae.cli", "serve", str(folder), "--port", str(port),
                                 *workers, *extra],
                                stdout=out, stderr=subprocess.STDOUT, env=env(), start_new_session=True)
    try:
        wait_until_ready(f"http://127.0.0.1:{port}", proc, 90, log.read_text)
        yield port, proc
    finally:
        if proc.poll() is None:
            proc.terminate()
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(timeout=20)
        stop(proc)


def slow_client(port: int, body: bytes = b"{", length: int = 100) -> socket.socket:
    """A client announcing ``length`` body bytes and sending only ``body``."""
    c = socket.create_connection(("127.0.0.1", port), timeout=30)
    c.sendall(b"POST /recommend HTTP/1.1\r\nHost: test\r\nContent-Type: application/json\r\n"
              b"Content-Length: %d\r\n\r\n" % length + body)
    return c


def read_until_closed(c: socket.socket, timeout: float) -> tuple[bytes, bool]:
    """``(bytes received, closed by the server)`` within ``timeout`` seconds."""
    c.settimeout(timeout)
    data = b""
    try:
        while chunk := c.recv(65536):
            data += chunk
        return data, True
    except TimeoutError:
        return data, False
    except ConnectionResetError:
        return data, True


def status(response: bytes) -> int | None:
    return int(response.split(b" ", 2)[1]) if response.startswith(b"HTTP/1.1 ") else None


# -- a damaged run ------------------------------------------------------------------------------

@pytest.fixture(params=["weights", "model.json"])
def damaged_run(request, run_dir, tmp_path):  # noqa: F811
    bad = tmp_path / "run"
    shutil.copytree(run_dir, bad)
    if request.param == "weights":
        (bad / "model" / "weights.pt").write_bytes(os.urandom(300))
        return bad, "weights.pt"
    (bad / "model" / "model.json").write_text("not json {")
    return bad, "model.json"


@pytest.mark.slow
@pytest.mark.parametrize("workers", ["1", "2"])
def test_damaged_run_is_one_line_and_exit_2_whatever_the_workers(damaged_run, workers):
    bad, name = damaged_run
    rc, out, seconds = finish([sys.executable, "-m", "recvae.cli", "serve", str(bad), "--port", str(free_port()),
                               "--workers", workers], timeout=60)
    assert rc == 2, out
    assert len(out.strip().splitlines()) == 1 and out.startswith("recvae: error: "), out
    assert f"{bad / 'model' / name}" in out
    assert "Traceback" not in out and "Uvicorn running" not in out
    assert seconds < 60


@pytest.mark.slow
def test_a_worker_that_cannot_load_the_run_stops_the_server(run_dir, tmp_path):  # noqa: F811
    """The run damaged after the parent's check: the parent's check is skipped here, so only the
    workers (fresh processes) meet the damage; the server stops instead of respawning them."""
    bad = tmp_path / "run"
    shutil.copytree(run_dir, bad)
    (bad / "model" / "weights.pt").write_bytes(os.urandom(300))
    skip_check = ("import sys, recvae.serve.server; recvae.serve.server.check_run = lambda *a, **k: None; "
                  "from recvae.cli import main; sys.exit(main(sys.argv[1:]))")
    rc, out, _ = finish([sys.executable, "-c", skip_check, "serve", str(bad), "--port", str(free_port()),
                         "--workers", "2", "--threads", "1"], timeout=120)
    assert rc == 2, out
    last = out.strip().splitlines()[-1]
    assert last.startswith("recvae: error: a worker could not load the run, server stopped: ")
    assert str(bad / "model" / "weights.pt") in last
    assert "Traceback" not in out and "died" not in out  # no respawn


@pytest.mark.parametrize(
    "argv, message",
    [
        (["serve", "nowhere", "--body-timeout", "0"], "--body-timeout: expected a positive number of seconds, got 0"),
        (["serve", "nowhere", "--keep-alive", "-1"], "--keep-alive: expected a positive number of seconds, got -1"),
        (["serve", "nowhere", "--grace", "nan"], "--grace: expected a positive number of seconds, got nan"),
    ],
)
def test_bad_timeouts_are_one_line(argv, message, capsys):
    assert main(argv) == 2
    assert capsys.readouterr().err.strip() == f"recvae: error: {message}"


# -- NaN and Infinity ---------------------------------------------------------------------------

@pytest.fixture(scope="module")
def logged_server(run_dir, tmp_path_factory):  # noqa: F811
    log = tmp_path_factory.mktemp("serve-log") / "server.log"
    with serve(run_dir, log) as (port, _):
        yield f"http://127.0.0.1:{port}", log


@pytest.mark.slow
@pytest.mark.parametrize(
    "body, loc, text",
    [
        (b'{"items": [NaN]}', ["body", "items", 0], "NaN"),
        (b'{"items": ["m1", Infinity]}', ["body", "items", 1], "Infinity"),
        (b'{"items": ["m1"], "k": NaN}', ["body", "k"], "NaN"),
        (b'{"items": ["m1"], "k": -Infinity}', ["body", "k"], "-Infinity"),
        (b'{"items": ["m1"], "k": 1e999}', ["body", "k"], "1e999"),
        (b'{"user": NaN}', ["body", "user"], "NaN"),
        (b'{"user": Infinity, "k": 3}', ["body", "user"], "Infinity"),
        (b'{"items": ["m1"], "exclude": ["m2", NaN]}', ["body", "exclude", 1], "NaN"),
        (b'{"items": [["m1", NaN]]}', ["body", "items", 0, 1], "NaN"),
        (b'{"items": ["m1"], "colour": NaN}', ["body", "colour"], "NaN"),
        (b"NaN", ["body"], "NaN"),
    ],
)
def test_non_finite_numbers_are_422_naming_the_field(logged_server, body, loc, text):
    base, log = logged_server
    before = log.read_text().splitlines()
    r = httpx.post(f"{base}/recommend", content=body, headers={"content-type": "application/json"}, timeout=30)
    assert r.status_code == 422
    (detail,) = r.json()["detail"]
    assert detail["loc"] == loc and detail["type"] == "finite_number"
    assert detail["msg"].startswith(f"Input should be a finite number, got {text} (")
    time.sleep(0.2)
    after = log.read_text().splitlines()
    assert len(after) - len(before) <= 1, after[len(before):]
    assert "Traceback" not in log.read_text() and "\" 500 " not in "\n".join(after[len(before):])


@pytest.mark.slow
def test_finite_floats_keep_fastapis_422(logged_server):
    base, _ = logged_server
    r = httpx.post(f"{base}/recommend", json={"items": ["m1"], "k": 1.5}, timeout=30)
    assert r.status_code == 422
    assert r.json()["detail"] == [{"type": "int_type", "loc": ["body", "k"], "msg": "Input should be a valid integer",
                                   "input": 1.5}]


# -- slow clients, keep-alive, SIGTERM ----------------------------------------------------------

@pytest.mark.slow
def test_a_body_that_does_not_arrive_is_408_and_closed_within_the_bound(run_dir, tmp_path):  # noqa: F811
    with serve(run_dir, tmp_path / "server.log", "--body-timeout", "1") as (port, _):
        c = slow_client(port)
        start = time.monotonic()
        data, closed = read_until_closed(c, 15)
        seconds = time.monotonic() - start
        c.close()
        assert status(data) == 408 and closed, data
        assert b"request body not received within 1 s (--body-timeout)" in data
        assert 0.8 < seconds < 6
        assert httpx.get(f"http://127.0.0.1:{port}/health", timeout=10).status_code == 200


@pytest.mark.slow
def test_idle_keep_alive_connections_are_closed(run_dir, tmp_path):  # noqa: F811
    with serve(run_dir, tmp_path / "server.log", "--keep-alive", "1") as (port, _):
        c = socket.create_connection(("127.0.0.1", port), timeout=10)
        c.sendall(b"GET /health HTTP/1.1\r\nHost: test\r\n\r\n")
        first = b""
        while not first.endswith(b'{"status":"ok"}'):
            first += c.recv(65536)
        assert status(first) == 200
        start = time.monotonic()
        rest, closed = read_until_closed(c, 15)
        c.close()
        assert closed and rest == b""
        assert time.monotonic() - start < 5


@pytest.mark.slow
def test_sigterm_with_slow_clients_exits_with_the_defaults(run_dir, tmp_path):  # noqa: F811
    """20 clients each announcing 100 bytes and sending one: with the default options (body
    timeout 5 s, grace 10 s) SIGTERM ends the server within the grace period."""
    log = tmp_path / "server.log"
    with serve(run_dir, log) as (port, proc):
        clients = [slow_client(port) for _ in range(20)]
        time.sleep(0.5)
        start = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=10 + 5)
        except subprocess.TimeoutExpired:
            pytest.fail("still running 15 s after SIGTERM (grace 10 s)")
        assert time.monotonic() - start < 15
        for c in clients:
            data, closed = read_until_closed(c, 2)
            c.close()
            assert closed and status(data) in (408, 503, None)
    assert "Traceback" not in log.read_text()


@pytest.mark.slow
def test_sigterm_finishes_running_requests_and_exits_after_the_grace_period(run_dir, tmp_path):  # noqa: F811
    """A body timeout far beyond the grace period: 20 clients that never finish their body are
    answered 503 when the grace period ends; one that finishes its body after SIGTERM, within the
    grace period, gets its answer; the server exits within grace + a little."""
    log = tmp_path / "server.log"
    grace = 2.0
    with serve(run_dir, log, "--body-timeout", "60", "--grace", str(grace)) as (port, proc):
        hung = [slow_client(port) for _ in range(20)]
        body = b'{"items": ["m1", "m2"], "k": 3}'
        finishing = slow_client(port, body[:5], len(body))
        time.sleep(0.5)
        start = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        time.sleep(0.5)
        finishing.sendall(body[5:])
        answer, closed = read_until_closed(finishing, 10)
        finishing.close()
        assert status(answer) == 200 and b'"source":"model"' in answer, answer
        try:
            proc.wait(timeout=grace + 8)
        except subprocess.TimeoutExpired:
            pytest.fail(f"still running {grace + 8} s after SIGTERM (grace {grace} s)")
        assert time.monotonic() - start < grace + 8
        statuses = []
        for c in hung:
            data, closed = read_until_closed(c, 2)
            c.close()
            assert closed
            statuses.append(status(data))
        assert set(statuses) <= {503, None} and 503 in statuses
    assert "Traceback" not in log.read_text()


def test_a_port_in_use_is_one_line_and_exit_2(tmp_path, capsys):
    """uvicorn's own line and exit 3 before (issue 28); now refused before the run loads."""
    (tmp_path / "run.json").write_text("{}")  # a run directory to the command's first check; never loaded
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        assert main(["serve", str(tmp_path), "--port", str(port)]) == 2
    assert capsys.readouterr().err == (f"recvae: error: --port {port}: already in use on 127.0.0.1 (another server "
                                       "listens there; stop it or choose another port)\n")
