"""`recvae serve`: the real server in a subprocess on a free local port, answers checked against
``model.recommend`` for the same histories, and the 4xx cases."""

from __future__ import annotations

import asyncio
import contextlib
import json
from pathlib import Path
import socket
import subprocess
import sys
import time

import numpy as np
import pytest

httpx = pytest.importorskip("httpx")
pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")

from recvae.cli import main  # noqa: E402
from recvae.recommend import RunRecommender, user_items_csr  # noqa: E402
from recvae.serve.server import wait_until_ready  # noqa: E402

from test_recommend_cli import make_log  # noqa: E402

MAX_BODY = 4000


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    folder = tmp_path_factory.mktemp("serve")
    log = folder / "log.csv"
    make_log(int_ids=False).to_csv(log, index=False)
    out = folder / "run"
    argv = ["-q", "train", "--data", str(log), "--user-col", "uid", "--item-col", "iid", "--rating-col", "stars",
            "--model", "multdae", "--epochs", "3", "--batch-size", "30", "--out", str(out),
            "--n-heldout-users", "10", "--show", "0"]
    assert main(argv) == 0
    return out


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def start_server(run_dir, *extra):
    """The real `recvae serve` in a subprocess on a free port; yields (base URL, process); always stopped.
    One worker unless ``extra`` says (the default is one per core: slower to start, on every test)."""
    port = free_port()
    workers = () if "--workers" in extra else ("--workers", "1")
    proc = subprocess.Popen(
        [sys.executable, "-m", "recvae.cli", "-q", "serve", str(run_dir), "--port", str(port), *workers, *extra],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
    )
    base = f"http://127.0.0.1:{port}"
    try:
        try:
            wait_until_ready(base, proc, 90)
        except RuntimeError as e:  # it exited: its whole output can be read now
            raise RuntimeError(f"{e}: {proc.stdout.read().decode()}") from None
        yield base, proc
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=15)


@pytest.fixture(scope="module")
def server(run_dir):
    with start_server(run_dir, "--max-body", str(MAX_BODY), "--max-batch", "8") as (base, _):
        yield base


@pytest.fixture(scope="module")
def run(run_dir):
    return RunRecommender(run_dir)


def post(server, body, **kw):
    return httpx.post(f"{server}/recommend", json=body, timeout=30, **kw)


def expected(run, items, k, exclude=()):
    codes = run.items.get_indexer(items)
    extra = run.items.get_indexer(list(exclude))
    x = user_items_csr(np.zeros(len(codes), int), codes, 1, run.n_items)
    ex = user_items_csr(np.zeros(len(extra), int), extra, 1, run.n_items)
    ids, scores = run.model.recommend(x, N=k, exclude=ex)
    return run.item_ids[ids[0]].tolist(), scores[0]


@pytest.mark.slow
def test_health_and_model(server, run):
    assert httpx.get(f"{server}/health").json() == {"status": "ok"}
    info = httpx.get(f"{server}/model").json()
    assert info["model"] == "MultDAE" and info["dataset"] == "log.csv"
    assert info["n_items"] == run.n_items and info["n_users"] == 90
    assert info["metrics"]["test"]["metrics"]["ndcg@100"]["mean"] == run.metrics["test"]["metrics"]["ndcg@100"]["mean"]


@pytest.mark.slow
def test_new_user_equals_model_recommend(server, run):
    r = post(server, {"items": ["m1", "m2", "m5", "nope"], "k": 7, "exclude": ["m3"]})
    assert r.status_code == 200
    body = r.json()
    items, scores = expected(run, ["m1", "m2", "m5"], 7, exclude=["m3"])
    assert body["items"] == items and body["source"] == "model" and body["unknown_items"] == ["nope"]
    np.testing.assert_allclose(body["scores"], scores, rtol=1e-5, atol=1e-6)


@pytest.mark.slow
def test_known_user_gets_full_history_with_seen_items_excluded(server, run):
    user = run.user_ids[-1]  # a held-out test user: fold-in + held-out items
    row = len(run.user_ids) - 1
    body = post(server, {"user": str(user), "k": 5}).json()
    ids, scores = run.model.recommend(run.known[row], N=5, exclude=run.seen[row])
    assert body["items"] == run.item_ids[ids[0]].tolist()
    np.testing.assert_allclose(body["scores"], scores[0], rtol=1e-5, atol=1e-6)
    assert not set(body["items"]) & set(run.item_ids[run.seen[row].indices])


@pytest.mark.slow
def test_unknown_items_only_get_the_popularity_fallback(server, run):
    body = post(server, {"items": ["nope"], "k": 3}).json()
    assert body["source"] == "popularity"
    order = np.argsort(-run.popularity, kind="stable")[:3]
    assert body["items"] == run.item_ids[order].tolist()
    np.testing.assert_allclose(body["scores"], run.popularity[order], rtol=1e-6)


@pytest.mark.slow
def test_concurrent_requests_are_answered_each_as_alone(server, run):
    histories = [[f"m{i}", f"m{i + 1}"] for i in range(0, 60, 3)]

    async def fire():
        async with httpx.AsyncClient(base_url=server, timeout=30) as client:
            return await asyncio.gather(*[
                client.post("/recommend", json={"items": h, "k": 1 + n % 6}) for n, h in enumerate(histories)
            ])

    answers = asyncio.run(fire())
    for n, (h, r) in enumerate(zip(histories, answers)):
        items, scores = expected(run, h, 1 + n % 6)
        assert r.json()["items"] == items
        np.testing.assert_allclose(r.json()["scores"], scores, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize(
    "body, status, loc, message",
    [
        ({"user": "nobody"}, 404, ["body", "user"], "unknown user 'nobody'"),
        ({"items": []}, 422, ["body", "items"], "empty: give at least one item id"),
        ({"items": ["m1"], "k": 0}, 422, ["body", "k"], "k must lie in 1..119, got 0"),
        ({"items": ["m1"], "k": 5000}, 422, ["body", "k"], "k must lie in 1..119"),
        ({"items": ["m1"], "k": "3"}, 422, ["body", "k"], "valid integer"),
        ({"items": "m1"}, 422, ["body", "items"], "valid list"),
        ({"items": [["m1"]]}, 422, ["body", "items", 0, "int"], "valid integer"),
        ({"items": ["m1"], "user": "u1"}, 422, ["body"], "exactly one of 'user'"),
        ({"items": ["m1"], "colour": "red"}, 422, ["body", "colour"], "Extra inputs"),
        ({}, 422, ["body"], "exactly one of 'user'"),
        ({"items": ["m1"], "k": True}, 422, ["body", "k"], "valid integer"),
        ({"items": [True]}, 422, ["body", "items", 0, "int"], "valid integer"),
        ({"items": ["m1"], "exclude": None}, 422, ["body", "exclude"], "valid list"),
        ({"items": ["m1"], "k": 12345678901234567890123}, 422, ["body", "k"], "got 12345678901234567890123"),
        ({"items": ["m1"], "exclude": ["m2", 1.5]}, 422, ["body", "exclude", 1, "int"], "valid integer"),
    ],
)
@pytest.mark.slow
def test_bad_requests_name_the_field(server, body, status, loc, message):
    r = post(server, body)
    assert r.status_code == status
    detail = r.json()["detail"][0]
    assert detail["loc"] == loc and message in detail["msg"]


@pytest.mark.slow
@pytest.mark.parametrize(
    "body",
    [
        {"items": ["m1", "m2", "nope"], "k": 4, "exclude": ["m3", "gone"]},
        {"user": "u1", "k": 3},
        {"items": ["nope"]},
        {"items": ["m1", 123456789012345678901234567890]},  # read by FastAPI both times, echoed as is
        {"items": ["m1"], "k": 0},
        {"user": "nobody"},
        {"items": []},
        {},
    ],
)
def test_fast_path_answers_as_fastapi_does(server, body):
    """A plain JSON body is answered without FastAPI's validation; the same body under another
    JSON media type goes through FastAPI: the same status and the same bytes."""
    raw = json.dumps(body).encode()
    fast = httpx.post(f"{server}/recommend", content=raw, headers={"content-type": "application/json"}, timeout=30)
    slow = httpx.post(f"{server}/recommend", content=raw, headers={"content-type": "application/vnd.test+json"},
                      timeout=30)
    assert fast.status_code == slow.status_code and fast.content == slow.content
    if fast.status_code == 200:
        assert fast.json()["unknown_items"] == [i for i in body.get("exclude", []) + body.get("items", [])
                                                if i not in ("m1", "m2", "m3")]
    assert fast.headers["content-type"] == slow.headers["content-type"] == "application/json"


@pytest.mark.slow
def test_oversized_and_malformed_bodies(server):
    big = {"items": ["m1"] * 2000}
    r = post(server, big)
    assert r.status_code == 413
    assert r.json()["detail"][0]["msg"] == f"request body larger than {MAX_BODY} bytes (--max-body)"
    r = httpx.post(f"{server}/recommend", content=b"{not json", headers={"content-type": "application/json"})
    assert r.status_code == 422 and r.json()["detail"][0]["type"] == "json_invalid"
    assert httpx.get(f"{server}/health").status_code == 200, "the server survives bad input"


@pytest.mark.parametrize(
    "argv, message",
    [
        (["serve", "nowhere"], "RUN_DIR nowhere: not a run directory (no run.json)"),
        (["serve", "nowhere", "--port", "70000"], "--port: expected 1..65535, got 70000"),
        (["serve", "nowhere", "--workers", "0"], "--workers: expected a positive integer, got 0"),
        (["serve", "nowhere", "--batch-wait", "-1"], "--batch-wait: expected milliseconds in 0..1000, got -1"),
    ],
)
def test_serve_bad_arguments_are_one_line(argv, message, capsys):
    assert main(argv) == 2
    assert capsys.readouterr().err.strip() == f"recvae: error: {message}"


@pytest.mark.slow
def test_two_workers_each_load_the_model_and_answer_alike(run_dir, run):
    items, scores = expected(run, ["m1", "m2", "m5"], 5)
    with start_server(run_dir, "--workers", "2", "--threads", "1") as (base, proc):
        children = Path(f"/proc/{proc.pid}/task/{proc.pid}/children")
        if children.exists():  # Linux: the supervisor's worker processes
            deadline = time.monotonic() + 60
            while len(children.read_text().split()) < 2 and time.monotonic() < deadline:
                time.sleep(0.2)
            assert len(children.read_text().split()) >= 2
        for _ in range(12):  # requests spread over the workers: every answer the model's
            body = httpx.post(f"{base}/recommend", json={"items": ["m1", "m2", "m5"], "k": 5}, timeout=30).json()
            assert body["items"] == items
            np.testing.assert_allclose(body["scores"], scores, rtol=1e-5, atol=1e-6)


@pytest.mark.slow
def test_similar_items_through_the_service_equal_the_library(server, run):
    item = run.item_ids[3].item() if hasattr(run.item_ids[3], "item") else run.item_ids[3]
    answer = httpx.post(f"{server}/similar", json={"item": item, "k": 5}, timeout=30)
    assert answer.status_code == 200, answer.text
    ids, scores = run.model.similar_items(3, N=5)
    assert answer.json()["items"] == run.item_ids[ids].tolist()
    np.testing.assert_allclose(answer.json()["scores"], scores, rtol=1e-6)
    unknown = httpx.post(f"{server}/similar", json={"item": "no-such-item", "k": 5}, timeout=30)
    assert unknown.status_code == 404 and unknown.json()["detail"][0]["loc"] == ["body", "item"]
    too_many = httpx.post(f"{server}/similar", json={"item": item, "k": 0}, timeout=30)
    assert too_many.status_code == 422 and too_many.json()["detail"][0]["loc"] == ["body", "k"]


@pytest.mark.slow
def test_recvae_similar_writes_the_models_similar_items(run_dir, run, tmp_path, capsys):
    items = [str(run.item_ids[3]), str(run.item_ids[7])]
    out = tmp_path / "similar.csv"
    assert main(["-q", "similar", str(run_dir), "--items", *items, "--k", "4", "--output", str(out)]) == 0
    import pandas as pd

    table = pd.read_csv(out, dtype={"item": str, "similar_item": str})
    assert list(table.columns) == ["item", "rank", "similar_item", "score"] and len(table) == 8
    ids, _ = run.model.similar_items(np.array([3, 7]), N=4)
    assert table["similar_item"].tolist() == [str(i) for i in run.item_ids[ids.ravel()]]
    assert main(["similar", str(run_dir), "--items", "no-such-item"]) == 2
    assert capsys.readouterr().err.strip() == (
        "recvae: error: --items: 'no-such-item' is not an item of the run (--items value 1)")


@pytest.mark.parametrize(
    "body, fields",
    [
        (b'{"items": [1, "a"], "k": 5}', (None, [1, "a"], [], 5)),
        (b'{"user": "u1"}', ("u1", None, [], 10)),
        (b'{"user": 7, "items": null, "exclude": ["m2"]}', (7, None, ["m2"], 10)),
        (b"{}", (None, None, [], 10)),  # accepted as RecommendRequest accepts it; the answer refuses it
    ],
)
def test_plain_fields_take_what_the_request_model_takes(body, fields):
    from recvae.serve.app import plain_fields

    assert plain_fields(body) == fields


@pytest.mark.parametrize(
    "body",
    [b"", b"{not json", b"[1]", b'"m1"', b'{"items": [NaN]}', b'{"k": Infinity}', b'{"k": 1e999}',
     b'{"items": [true]}', b'{"k": true}', b'{"k": 3.0}', b'{"k": 123456789012345678901234567890}',
     b'{"items": "m1"}', b'{"items": [["m1"]]}', b'{"user": 1.5}', b'{"user": ["u1"]}', b'{"exclude": null}',
     b'{"items": ["m1"], "colour": "red"}', b'\xef\xbb\xbf{"items": ["m1"]}', b'{"items": ["\\ud800"]}'],
)
def test_plain_fields_leave_everything_else_to_fastapi(body):
    """None: FastAPI validates the body and says what is wrong (or answers it, as before)."""
    from recvae.serve.app import plain_fields

    assert plain_fields(body) is None


class _Scorer:
    """A stand-in for RunRecommender: records the size of each batch scored."""

    n_items = 5

    def __init__(self):
        self.batches = []

    def recommend_arrays(self, positives, exclude, k):
        self.batches.append(positives.shape[0])
        n = positives.shape[0]
        ids = np.tile(np.arange(k), (n, 1))
        return ids, np.ones((n, k), dtype=np.float32), np.zeros(n, dtype=bool)


def test_micro_batches_wait_for_the_last_batchs_clients():
    from recvae.serve.batching import MicroBatcher

    async def scenario():
        loop = asyncio.get_running_loop()
        scorer = _Scorer()
        batcher = MicroBatcher(scorer, max_batch=8, batch_wait=0.5)
        batcher.start()
        one, none = np.array([1]), np.array([], dtype=np.int64)

        async def late(delay):
            await asyncio.sleep(delay)
            return await batcher.submit(one, none, 2)

        async def timed(*delays):
            start = loop.time()
            answers = await asyncio.gather(*[late(d) for d in delays])
            return answers, loop.time() - start

        try:
            first, alone = await timed(0)  # a lone request: scored at once
            await timed(0, 0, 0)  # queued together: one batch
            answers, gathered = await timed(0, 0.05, 0.1)  # the last batch had 3: the next waits for 3
            _, waited = await timed(0)  # waits the whole 0.5 s for 3 that do not come, then goes alone
            _, again = await timed(0)  # the last batch had 1: scored at once
        finally:
            await batcher.stop()
        return scorer.batches, first + answers, (alone, gathered, waited, again)

    batches, answers, (alone, gathered, waited, again) = asyncio.run(scenario())
    assert batches == [1, 3, 3, 1, 1]
    assert all(ids.tolist() == [0, 1] and not fallback for ids, _, fallback in answers)
    assert alone < 0.25 and 0.09 < gathered < 0.4 and 0.45 < waited < 1.5 and again < 0.25


class _SlowScorer(_Scorer):
    """A pass takes 20 ms, as a real one takes milliseconds: clients queue while it runs."""

    def recommend_arrays(self, positives, exclude, k):
        time.sleep(0.02)
        return super().recommend_arrays(positives, exclude, k)


def test_clients_that_start_apart_end_in_one_batch():
    """8 clients in a loop (answer, then the next request 1 ms later), the second 4 arriving
    while the first 4 are scored: the batches merge into one of 8 and stay so, instead of two
    groups of 4 taking turns, each paying a whole pass (what 8 connections once settled into)."""
    from recvae.serve.batching import MicroBatcher

    async def scenario():
        scorer = _SlowScorer()
        batcher = MicroBatcher(scorer, max_batch=64, batch_wait=0.05)
        batcher.start()
        one, none = np.array([1]), np.array([], dtype=np.int64)

        async def client(start, rounds=8):
            await asyncio.sleep(start)
            for _ in range(rounds):
                await batcher.submit(one, none, 2)
                await asyncio.sleep(0.001)

        try:
            await asyncio.gather(*[client(0.0) for _ in range(4)], *[client(0.005) for _ in range(4)])
        finally:
            await batcher.stop()
        return scorer.batches

    batches = asyncio.run(scenario())
    # from the second pass on one batch holds every client; the first 4, a round ahead, end alone
    assert batches == [4] + [8] * 7 + [4], batches


@pytest.mark.slow
def test_workers_score_in_bf16_when_asked(run_dir, run):
    """--precision reaches every worker (through the environment): the answers are the bf16
    model's, not the float32 one's."""
    half = RunRecommender(run_dir, precision="bf16")
    items, scores = expected(half, ["m1", "m2", "m5"], 5)
    _, exact = expected(run, ["m1", "m2", "m5"], 5)
    assert not np.allclose(scores, exact, rtol=1e-6, atol=0)
    with start_server(run_dir, "--workers", "2", "--threads", "1", "--precision", "bf16") as (base, _):
        for _ in range(6):
            body = httpx.post(f"{base}/recommend", json={"items": ["m1", "m2", "m5"], "k": 5}, timeout=30).json()
            assert body["items"] == items
            np.testing.assert_allclose(body["scores"], scores, rtol=1e-6)


def test_waiting_for_a_server_that_exits_or_never_answers():
    """The one wait for `/health` (tests, benchmarks, the README's examples): it says the exit
    status and the log's tail of a server that died, and gives up after its timeout."""
    base = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    proc = subprocess.Popen([sys.executable, "-c", "import sys; sys.exit(3)"])
    proc.wait()
    with pytest.raises(RuntimeError, match=r"^the server exited with status 3: address in use$"):
        wait_until_ready(base, proc, 30, lambda: "address in use")
    start = time.monotonic()
    with pytest.raises(TimeoutError, match=r"did not answer http://127\.0\.0\.1:\d+/health within 0\.5 s$"):
        wait_until_ready(base, timeout=0.5)
    assert time.monotonic() - start < 5


def test_the_loaded_run_is_frozen_out_of_full_garbage_collections(run_dir):
    """At startup the app moves every object alive (the libraries, the run) into the
    collector's permanent generation: a full collection walked ~210,000 of them (~95 ms on
    ML-20M's run), and under load that pause was the service's p99."""
    import gc

    from recvae.serve import create_app

    async def startup_and_shutdown():
        app = create_app(run_dir, threads=1)
        messages = asyncio.Queue()
        for m in ({"type": "lifespan.startup"}, {"type": "lifespan.shutdown"}):
            messages.put_nowait(m)
        sent, frozen = [], []

        async def send(message):
            sent.append(message["type"])
            if message["type"] == "lifespan.startup.complete":
                frozen.append(gc.get_freeze_count())

        await app({"type": "lifespan", "asgi": {"version": "3.0"}, "state": {}}, messages.get, send)
        return sent, frozen

    gc.unfreeze()
    try:
        sent, frozen = asyncio.run(startup_and_shutdown())
    finally:
        gc.unfreeze()
    assert sent == ["lifespan.startup.complete", "lifespan.shutdown.complete"]
    assert frozen[0] > 10_000, frozen
