"""Check the built documentation site: open it in headless Chromium and follow every link.

    python scripts/check_site.py docs/_build/html

1. Every internal link of every page (``href`` to a page of the site, with or without
   ``#anchor``) points to a file that exists, and its anchor is an ``id`` in that file.
2. The site is served on 127.0.0.1 and headless Chromium loads the index, the quickstart, an API
   page and the command-line reference: each must render its own title and content (a missing
   page, a server error or an empty render fails), and every anchor the rendered page links to
   within itself must exist in the DOM the browser built.

Exit status 0 when all holds, 1 with one line per problem, 3 when no Chromium is installed
(Debian package ``chromium``; ``.ci/run`` installs it). Reads nothing from the network.
"""

from __future__ import annotations

import argparse
import functools
import html.parser
import http.server
import shutil
import subprocess
import sys
import tempfile
import threading
from pathlib import Path
from urllib.parse import unquote, urlsplit

#: pages the browser opens, with a text each must show once rendered
BROWSER_PAGES = {
    "index.html": "Quickstart",
    "quickstart.html": "from your CSV to a served model",
    "reference/api/models.html": "MultVAE",
    "reference/cli.html": "recvae train",
}
CHROMIUM_FLAGS = [
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync",
]


class _Page(html.parser.HTMLParser):
    """The ids and the link targets of one HTML document."""

    def __init__(self):
        super().__init__()
        self.ids: set[str] = set()
        self.links: list[str] = []

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        if attrs.get("id"):
            self.ids.add(attrs["id"])
        if tag == "a" and attrs.get("name"):
            self.ids.add(attrs["name"])
        if tag in ("a", "link") and attrs.get("href"):
            self.links.append(attrs["href"])
        if tag in ("img", "script") and attrs.get("src"):
            self.links.append(attrs["src"])


def parse(text: str) -> _Page:
    page = _Page()
    page.feed(text)
    return page


def internal_target(page: Path, href: str, root: Path) -> tuple[Path, str] | None:
    """The file and anchor an internal ``href`` of ``page`` names; None for an external link."""
    parts = urlsplit(href)
    if parts.scheme or parts.netloc or href.startswith(("mailto:", "javascript:", "data:")):
        return None
    path, anchor = parts.path, parts.fragment
    target = (page.parent / unquote(path)).resolve() if path else page.resolve()
    if target.is_dir():
        target = target / "index.html"
    return target, unquote(anchor)


def check_links(root: Path) -> list[str]:
    """Every internal link of every page leads to an existing file and anchor."""
    root = root.resolve()
    problems, parsed = [], {}

    def ids_of(path: Path) -> set[str]:
        if path not in parsed:
            parsed[path] = parse(path.read_text(errors="replace")).ids
        return parsed[path]

    pages = sorted(root.rglob("*.html"))
    if not pages:
        return [f"{root}: no HTML pages (was the site built?)"]
    for page in pages:
        for href in parse(page.read_text(errors="replace")).links:
            found = internal_target(page, href, root)
            if found is None:
                continue
            target, anchor = found
            where = page.relative_to(root)
            if not target.is_file():
                problems.append(f"{where}: link {href!r}: no such page")
            elif anchor and target.suffix == ".html" and anchor not in ids_of(target):
                problems.append(f"{where}: link {href!r}: no anchor {anchor!r} in {target.relative_to(root)}")
    return problems


def chromium() -> str | None:
    return next(filter(None, map(shutil.which, ("chromium", "chromium-browser", "google-chrome"))), None)


@functools.lru_cache(maxsize=None)
def _quiet_handler(root: str):
    class Handler(http.server.SimpleHTTPRequestHandler):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, directory=root, **kwargs)

        def log_message(self, *args):
            pass

    return Handler


def check_in_browser(root: Path, browser: str, pages: dict[str, str] = BROWSER_PAGES) -> list[str]:
    """Serve ``root`` on 127.0.0.1 and have headless Chromium render each page of ``pages``."""
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _quiet_handler(str(root.resolve())))
    threading.Thread(target=server.serve_forever, daemon=True).start()
    problems = []
    try:
        with tempfile.TemporaryDirectory(prefix="check-site-") as profile:
            for name, text in pages.items():
                url = f"http://127.0.0.1:{server.server_port}/{name}"
                try:
                    r = subprocess.run([browser, *CHROMIUM_FLAGS, f"--user-data-dir={profile}", "--dump-dom", url],
                                       capture_output=True, text=True, timeout=60)
                except subprocess.TimeoutExpired:
                    problems.append(f"{name}: Chromium did not render it within 60 s")
                    continue
                dom = r.stdout
                if r.returncode != 0 or "<body" not in dom:
                    problems.append(f"{name}: Chromium rendered nothing (exit {r.returncode}): {r.stderr.strip()[-300:]}")
                    continue
                if "Error response" in dom or "404" in dom.split("<title>")[-1].split("</title>")[0]:
                    problems.append(f"{name}: the server answered an error page")
                    continue
                if text not in dom:
                    problems.append(f"{name}: the rendered page does not show {text!r}")
                page = parse(dom)
                for href in page.links:
                    if href.startswith("#") and len(href) > 1 and unquote(href[1:]) not in page.ids:
                        problems.append(f"{name}: link {href!r}: no such anchor in the rendered page")
    finally:
        server.shutdown()
        server.server_close()
    return problems


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("site", type=Path, help="the built site (docs/_build/html)")
    args = p.parse_args(argv)
    problems = check_links(args.site)
    browser = chromium()
    if browser is None:
        print("check_site: no Chromium found (install the Debian package chromium)", file=sys.stderr)
        for line in problems:
            print(line)
        return 3
    problems += check_in_browser(args.site, browser)
    for line in problems:
        print(line)
    n = len(list(args.site.rglob("*.html")))
    print(f"check_site: {n} pages, {len(problems)} problem(s); {len(BROWSER_PAGES)} rendered in {Path(browser).name}",
          file=sys.stderr)
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
