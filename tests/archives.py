"""Test helpers: small MovieLens archives in GroupLens's layout, and a local HTTP server for them."""

from __future__ import annotations

import hashlib
import http.server
import io
import threading
import zipfile
from collections import Counter

# (user, item, rating, timestamp). After the paper's preprocessing (rating > 3.5, users with
# >= 5 such ratings): user 1 keeps items 10, 20, 30, 40, 50 (its 3.5 is dropped: strictly
# greater), user 2 keeps 10, 20, 30, 40, 60, user 3 has only 2 ratings > 3.5 and is dropped.
RATINGS = [
    (1, 10, 5.0, 881250949),
    (1, 20, 4.0, 881250950),
    (1, 30, 4.5, 881250951),
    (1, 40, 4.0, 881250952),
    (1, 50, 5.0, 881250953),
    (1, 60, 3.5, 881250954),
    (2, 10, 4.0, 881250955),
    (2, 20, 4.0, 881250956),
    (2, 30, 5.0, 881250957),
    (2, 40, 4.0, 881250958),
    (2, 60, 4.0, 881250959),
    (2, 70, 1.0, 881250960),
    (3, 10, 5.0, 881250961),
    (3, 70, 4.0, 881250962),
    (3, 20, 2.0, 881250963),
]
EXPECTED_USERS = [1, 2]
EXPECTED_ITEMS = [10, 20, 30, 40, 50, 60]
EXPECTED_DENSE = [[1, 1, 1, 1, 1, 0], [1, 1, 1, 1, 0, 1]]
# titles with the characters that trip naive parsers: ':' in '::' files, ',' in CSV, latin-1
TITLES = {10: "Star Wars: Episode IV (1977)", 20: "Amélie (2001)", 30: "Seven, the movie (1995)",
          40: "Heat (1995)", 50: "Fargo (1996)", 60: "Big (1988)", 70: "Jaws (1975)"}

# name -> (top folder, ratings file, items file)
LAYOUT = {
    "ml-100k": ("ml-100k", "u.data", "u.item"),
    "ml-1m": ("ml-1m", "ratings.dat", "movies.dat"),
    "ml-10m": ("ml-10M100K", "ratings.dat", "movies.dat"),
    "ml-20m": ("ml-20m", "ratings.csv", "movies.csv"),
    "ml-25m": ("ml-25m", "ratings.csv", "movies.csv"),
    "ml-32m": ("ml-32m", "ratings.csv", "movies.csv"),
    "ml-latest-small": ("ml-latest-small", "ratings.csv", "movies.csv"),
}


def _fmt(x: float) -> str:
    return str(int(x)) if x == int(x) else str(x)


def grouplens_files(name: str, ratings=RATINGS, titles=TITLES) -> dict[str, bytes]:
    """The ratings and titles files of ``name`` as GroupLens writes them: {path in zip: bytes}."""
    folder, rfile, ifile = LAYOUT[name]
    if name == "ml-100k":  # integer ratings (4.5 -> 4, 3.5 -> 3: same outcome), tab-separated
        r = "".join(f"{u}\t{i}\t{int(x)}\t{t}\n" for u, i, x, t in ratings)
        m = "".join(f"{i}|{title}|01-Jan-1995||http://x|0|1\n" for i, title in titles.items()).encode("latin-1")
    elif rfile == "ratings.dat":  # '::', no header; movies.dat latin-1 (1m) or utf-8 (10m)
        r = "".join(f"{u}::{i}::{_fmt(x)}::{t}\n" for u, i, x, t in ratings)
        m = "".join(f"{i}::{title}::Drama\n" for i, title in titles.items())
        m = m.encode("latin-1" if name == "ml-1m" else "utf-8")
    else:  # CSV with header
        r = "userId,movieId,rating,timestamp\n" + "".join(f"{u},{i},{x},{t}\n" for u, i, x, t in ratings)
        m = ("movieId,title,genres\n" + "".join(
            f'{i},"{title}",Drama\n' if "," in title else f"{i},{title},Drama\n" for i, title in titles.items()
        )).encode("utf-8")
    return {f"{folder}/{rfile}": r.encode("ascii"), f"{folder}/{ifile}": m, f"{folder}/README": b"test archive\n"}


def grouplens_zip(name: str, ratings=RATINGS, titles=TITLES) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED) as zf:
        for path, data in grouplens_files(name, ratings, titles).items():
            zf.writestr(path, data)
    return buf.getvalue()


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


class LocalServer:
    """HTTP server on 127.0.0.1 (ephemeral port) in a thread.

    ``files[path] = bytes`` are served at ``/path`` (a list of bytes: one per request, the
    last one repeated); ``cut[path] = bytes`` announce
    ``len + 1000`` bytes in Content-Length, send the bytes, then close the connection;
    ``unsized[path] = bytes`` are sent without a Content-Length (the end of the body is the
    close of the connection, as some mirrors do), so a cut body looks like a whole one.
    Anything else is a 404. ``requests`` counts GETs per path.
    """

    def __init__(self):
        self.files: dict[str, bytes | list[bytes]] = {}
        self.cut: dict[str, bytes] = {}
        self.unsized: dict[str, bytes | list[bytes]] = {}
        self.requests: Counter = Counter()
        server = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self):  # noqa: N802
                path = self.path.lstrip("/")
                server.requests[path] += 1
                if path in server.files:
                    body = server.files[path]
                    if isinstance(body, list):
                        body = body.pop(0) if len(body) > 1 else body[0]
                    self.send_response(200)
                    self.send_header("Content-Length", str(len(body)))
                    self.end_headers()
                    self.wfile.write(body)
                elif path in server.cut:
                    body = server.cut[path]
                    self.send_response(200)
                    self.send_header("Content-Length", str(len(body) + 1000))
                    self.end_headers()
                    self.wfile.write(body)
                    self.wfile.flush()
                    self.close_connection = True
                elif path in server.unsized:
                    body = server.unsized[path]
                    if isinstance(body, list):
                        body = body.pop(0) if len(body) > 1 else body[0]
                    self.send_response(200)
                    self.end_headers()
                    self.wfile.write(body)
                    self.wfile.flush()
                    self.close_connection = True
                else:
                    self.send_error(404, "Not Found")

            def log_message(self, *args):  # keep test output quiet
                pass

        self._httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._thread = threading.Thread(target=self._httpd.serve_forever, args=(0.02,), daemon=True)

    @property
    def url(self) -> str:
        host, port = self._httpd.server_address[:2]
        return f"http://{host}:{port}"

    def __enter__(self) -> "LocalServer":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._httpd.shutdown()
        self._httpd.server_close()
        self._thread.join(timeout=5)
