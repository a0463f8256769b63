"""What a request must pass before it is scored: a bounded body that arrives in time, finite
numbers only; and the service's error body (FastAPI's ``{"detail": [...]}``)."""

import asyncio
import json
import logging
import math

from recvae.serve.settings import BODY_KEY, BODY_TIMEOUT

logger = logging.getLogger(__name__)


def error(status: int, loc: list, msg: str, kind: str, headers: dict | None = None):
    """A JSON error response shaped like FastAPI's validation errors."""
    from fastapi.responses import JSONResponse

    return JSONResponse({"detail": [{"loc": loc, "msg": msg, "type": kind}]}, status_code=status, headers=headers)


class BodyLimit:
    """ASGI middleware guarding the edges of every HTTP request.

    * 413 for a request body over ``max_body`` bytes, checked on the Content-Length and on the
      bytes actually received (chunked uploads), before any parsing;
    * 408 (and the connection closed) for a body that has not fully arrived ``body_timeout``
      seconds after the headers, so a client announcing more bytes than it sends holds nothing;
    * 503 (connection closed) for a request the server cancels because the grace period after
      SIGTERM is over: the client gets an answer and the log no traceback.

    The body read is kept in the scope (``BODY_KEY``) for the fast path of ``/recommend`` and the
    422 handler. ``inflight`` (a set) holds the tasks of the requests being answered, for the
    application's shutdown to let those cancelled at the end of the grace period send their 503.
    """

    def __init__(self, app, max_body: int, body_timeout: float = BODY_TIMEOUT, inflight: set | None = None):
        self.app = app
        self.max_body = max_body
        self.body_timeout = body_timeout
        self.inflight = set() if inflight is None else inflight

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        task = asyncio.current_task()
        self.inflight.add(task)
        try:
            await self._answer(scope, receive, send)
        finally:
            self.inflight.discard(task)

    async def _answer(self, scope, receive, send):
        started = False

        async def tracked_send(message):
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self._guarded(scope, receive, tracked_send)
        except asyncio.CancelledError:  # only the server cancels a request: shutdown past --grace
            if not started:
                await error(503, [], "the server is shutting down", "shutting_down",
                            headers={"connection": "close"})(scope, receive, send)

    async def _guarded(self, scope, receive, send):
        if scope["method"] in ("GET", "HEAD"):
            return await self.app(scope, receive, send)
        length = dict(scope["headers"]).get(b"content-length")
        if length is not None and (not length.isdigit() or int(length) > self.max_body):
            return await self._too_large(scope, receive, send)
        chunks, outcome = await self._read_body(receive)
        if outcome == "disconnected":
            return
        if outcome == "too_large":
            return await self._too_large(scope, receive, send)
        if outcome == "timeout":
            return await self._timed_out(scope, receive, send)
        body = b"".join(chunks)
        scope[BODY_KEY] = body
        replayed = False

        async def replay():
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()

        await self.app(scope, replay, send)

    async def _read_body(self, receive) -> tuple[list, str | None]:
        """The body's chunks, and None, or why reading stopped: ``"disconnected"``,
        ``"too_large"`` or ``"timeout"`` (not all of it within ``body_timeout``). The deadline is
        one timer that cancels this task (no task per message, as ``asyncio.wait_for`` makes);
        any other cancellation (shutdown) propagates."""
        loop = asyncio.get_running_loop()
        task = asyncio.current_task()
        expired = False

        def expire():
            nonlocal expired
            expired = True
            task.cancel()

        timer = loop.call_at(loop.time() + self.body_timeout, expire)
        chunks, total, more = [], 0, True
        try:
            while more:
                message = await receive()
                if message["type"] == "http.disconnect":
                    return chunks, "disconnected"
                chunks.append(message.get("body", b""))
                total += len(chunks[-1])
                if total > self.max_body:
                    return chunks, "too_large"
                more = message.get("more_body", False)
        except asyncio.CancelledError:
            if not expired:
                raise
            if hasattr(task, "uncancel"):  # Python 3.11+: the cancellation was this timer's, now handled
                task.uncancel()
            return chunks, "timeout"
        finally:
            timer.cancel()
        return chunks, None

    async def _too_large(self, scope, receive, send):
        response = error(413, ["body"], f"request body larger than {self.max_body} bytes (--max-body)", "too_large")
        await response(scope, receive, send)

    async def _timed_out(self, scope, receive, send):
        response = error(408, ["body"], f"request body not received within {self.body_timeout:g} s (--body-timeout)",
                         "timeout", headers={"connection": "close"})
        await response(scope, receive, send)


class _NonFinite:
    """Stands for a JSON number that is not finite (``NaN``, ``Infinity``, ``1e999``) while
    looking for it in a body: its text as written."""

    def __init__(self, text: str):
        self.text = text


def _parse_float(text: str):
    value = float(text)
    return value if math.isfinite(value) else _NonFinite(text)


def first_non_finite(body) -> tuple[list, str] | None:
    """``(path, text)`` of the first non-finite number in the JSON ``body`` (bytes), in document
    order, or None (none, or not JSON). Python's JSON parser accepts ``NaN``, ``Infinity`` and
    overflowing numbers, which JSON itself does not have."""
    try:
        value = json.loads(body, parse_constant=_NonFinite, parse_float=_parse_float)
    except (TypeError, ValueError, RecursionError):
        return None
    stack = [([], value)]
    while stack:
        path, v = stack.pop()
        if isinstance(v, _NonFinite):
            return path, v.text
        children = v.items() if isinstance(v, dict) else enumerate(v) if isinstance(v, list) else ()
        stack.extend((path + [key], child) for key, child in reversed(list(children)))
    return None


def _has_non_finite(value) -> bool:
    if isinstance(value, float):
        return not math.isfinite(value)
    if isinstance(value, dict):
        return any(_has_non_finite(v) for v in value.values())
    if isinstance(value, (list, tuple)):
        return any(_has_non_finite(v) for v in value)
    return False


def _finite(value):
    """``value`` with non-finite floats replaced by their JSON-ish text (so it can be encoded)."""
    if isinstance(value, float) and not math.isfinite(value):
        return "NaN" if math.isnan(value) else ("Infinity" if value > 0 else "-Infinity")
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite(v) for v in value]
    return value


async def validation_failed(request, exc):
    """FastAPI's 422 for a body that fails validation, unchanged, except where the body holds a
    non-finite number (``NaN``, ``Infinity``): the one error naming where the first one is
    (FastAPI's own answer would fail to encode, a 500 with a traceback)."""
    from fastapi.encoders import jsonable_encoder
    from fastapi.exception_handlers import request_validation_exception_handler
    from fastapi.responses import JSONResponse

    errors = exc.errors()
    if not _has_non_finite(errors):
        return await request_validation_exception_handler(request, exc)
    found = first_non_finite(request.scope.get(BODY_KEY))
    if found is None:  # not expected: every non-finite input comes from the body
        return JSONResponse({"detail": _finite(jsonable_encoder(errors))}, status_code=422)
    path, text = found
    why = "JSON has no NaN or Infinity" if text.lstrip("-") in ("NaN", "Infinity") else "beyond the range of a float"
    return error(422, ["body", *path], f"Input should be a finite number, got {text} ({why})", "finite_number")
