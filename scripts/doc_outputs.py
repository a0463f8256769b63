"""Regenerate the outputs the documentation prints, by running the commands that print them.

The pages are README.md and every Markdown page under docs/ (``pages()``). Run it alone on a quiet
machine after changing anything a documented command prints:

    python scripts/doc_outputs.py                          # run every marked command, rewrite the outputs that differ
    python scripts/doc_outputs.py --check                  # run them, report the blocks that differ (exit 1)
    python scripts/doc_outputs.py --page docs/quickstart.md   # one page only

It takes about as long as the commands themselves: about two minutes on our 2-core CPU
unloaded for the blocks there are now (ML-100K training ~20 s, `recvae tune` on ML-100K ~60 s,
the service ~5 s); on a loaded machine many times that (48 minutes at a load average of 8-13),
and timings are then meaningless: the check ignores them, and only ``--timings`` writes them.

**Markers.** An output block is a fenced block right after an HTML comment line of the form

    <!-- output[ (FLAGS)] of ... -->

and its commands are, in this order of precedence:

- the command after ``of:`` (``<!-- output of: recvae train --dataset ml-100k ... -->``), which
  must appear in a code block earlier on the same page (for an output printed away from its command);
- the block's own leading ``$ `` lines (a block that shows the command and its output), whose
  output is the rest of the block;
- the commands of the fenced block right before the marker (only blank lines between), one per
  line (``\\`` continues a line, ``#`` starts a comment).

FLAGS (comma-separated): ``small`` -- quick enough for the test suite, which runs these end to
end (tests/test_doc_outputs.py); ``stderr`` -- the output is stdout and stderr together, and a
non-zero exit status is expected (an error example).

**How commands run.** In a scratch directory that links every top-level entry of the repository
except run outputs (``runs``, ``prepared``), with ``data`` linked to the data directory
(``$RECVAE_DATA`` when set, else the repository's ``data``), so relative paths read as from the
repository root and every run writes into the scratch directory; all blocks share it, in the
order of ``pages()``, so a later block uses the runs of earlier ones, also of an earlier page. ``recvae`` is this interpreter's ``-m
recvae`` with the repository first on the import path (``.venv/bin/`` before it is dropped),
``python`` this interpreter. A command ending in ``&`` is a server: it starts in the background
(on a free port substituted for its ``--port``, and in the ``curl`` URLs), the next command waits
until it answers ``/health``, and it is stopped (SIGTERM, then SIGKILL) when the block ends,
whatever happens (a ``sleep``, ``wait`` or ``kill %1`` after it is skipped). ``curl`` is done
in-process as the HTTP request it describes (``-X``, ``-H``, ``-d``/``--data`` with ``@file``,
``--json``), its output the answer's body.

**Normalization.** Written outputs have the scratch directory, the repository path, process ids
and dates replaced by ``...``. The check ignores timings (a number followed by ``s``, ``ms`` or
``min``; cells of a table column headed ``seconds``, ``s``, ``time`` ...) and treats ``...`` in
the page as matching anything on its line (a line holding only ``...``, any number of lines).
The test suite, whose machine may compute differently from the one that recorded the outputs,
compares by ``differences`` instead: numbers within a tolerance, item lists by their overlap (the
rules and their reasons are above it). Only the blocks that differ are rewritten (with this run's timings), so a run on a busy machine
leaves the recorded timings of a quiet one; ``--timings`` rewrites every block run. Each page is
rewritten at once, atomically, and only when some block changed.
"""

from __future__ import annotations

import argparse
import contextlib
import difflib
import os
import re
import shlex
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
README = REPO / "README.md"
DOCS = REPO / "docs"


#: pages whose runs others use come first (the guides serve the run of the MovieLens page)
FIRST = ("quickstart.md", "movielens.md")


def pages() -> list[Path]:
    """README.md, the quickstart, the first MovieLens run, then the other Markdown pages under
    docs/ (not the built site) in path order: the order their blocks run in."""
    rest = sorted(p for p in DOCS.rglob("*.md") if "_build" not in p.relative_to(DOCS).parts)
    first = [DOCS / name for name in FIRST]
    return [README] + first + [p for p in rest if p not in first]


def page_name(path: Path) -> str:
    try:
        return str(path.resolve().relative_to(REPO))
    except ValueError:
        return path.name
#: Top-level entries not linked into the scratch directory: where commands write their runs.
OUTPUT_DIRS = {"runs", "prepared", ".git", "data"}

MARKER = re.compile(r"^<!--\s*output\b\s*(?:\((?P<flags>[^)]*)\))?(?P<text>.*?)-->\s*$")
FENCE = re.compile(r"^(`{3,}|~{3,})")
FLAGS = {"small", "stderr"}


class DocsError(Exception):
    """A marker that cannot be understood, or a command that failed."""


@dataclass
class Block:
    """One marked output block: the page lines its body spans and the commands that print it."""

    marker_line: int  # 0-based line of the marker
    start: int  # first line of the recorded output (after the fence and any `$ ` lines)
    end: int  # the closing fence's line (exclusive end of the output)
    commands: list[str]
    flags: set[str] = field(default_factory=set)
    recorded: str = ""
    key: str = ""  # its commands (and rank among blocks of the same commands): stable when lines move
    page: str = "README.md"  # the page it is on, as the repository names it

    @property
    def small(self) -> bool:
        return "small" in self.flags

    @property
    def label(self) -> str:
        first = self.commands[0] if self.commands else "?"
        return f"{self.page}:{self.marker_line + 1} ({first[:60]})"


# ---- parsing -------------------------------------------------------------------------------


def strip_comment(line: str) -> str:
    """``line`` without a shell comment (a ``#`` at a word start, outside quotes)."""
    quote = None
    for i, c in enumerate(line):
        if quote:
            if c == quote:
                quote = None
        elif c in "'\"":
            quote = c
        elif c == "#" and (i == 0 or line[i - 1].isspace()):
            return line[:i].rstrip()
    return line.rstrip()


def commands_of(lines: list[str]) -> list[str]:
    """Shell commands of a code block's lines: continuations joined, comments and ``$ `` cut."""
    out, pending = [], ""
    for raw in lines:
        line = raw.rstrip()
        if line.endswith("\\"):
            pending += line[:-1].strip() + " "
            continue
        line = strip_comment((pending + line.strip()).strip())
        pending = ""
        line = line.removeprefix("$ ").strip()
        if line:
            out.append(line)
    if pending.strip():
        out.append(strip_comment(pending.strip()))
    return out


def canonical(command: str) -> str:
    """A command as compared between a marker and a code block: ``.venv/bin/`` dropped, spaces squeezed."""
    return " ".join(command.replace(".venv/bin/", "").split())


def _fences(lines: list[str]) -> list[tuple[int, int]]:
    """(opening line, closing line) of each fenced block."""
    spans, open_at, fence = [], None, ""
    for i, line in enumerate(lines):
        m = FENCE.match(line)
        if not m:
            continue
        if open_at is None:
            open_at, fence = i, m.group(1)
        elif line.strip() == fence[0] * len(line.strip()) and len(line.strip()) >= len(fence):
            spans.append((open_at, i))
            open_at = None
    return spans


def parse(text: str, page: str = "README.md") -> list[Block]:
    """The marked output blocks of a page's text, in order; ``DocsError`` for a bad marker."""
    lines = text.splitlines()
    fences = _fences(lines)
    opening = {o: c for o, c in fences}
    inside = {k for o, c in fences for k in range(o, c + 1)}  # a marker shown in a code block is none
    blocks, seen = [], {}
    for i, line in enumerate(lines):
        m = MARKER.match(line.strip()) if line.startswith("<!--") and i not in inside else None
        if not m:
            continue
        where = f"{page}:{i + 1}"
        flags = {f.strip() for f in (m.group("flags") or "").split(",") if f.strip()}
        if flags - FLAGS:
            raise DocsError(f"{where}: unknown flag(s) {sorted(flags - FLAGS)} (known: {sorted(FLAGS)})")
        j = i + 1
        while j < len(lines) and not lines[j].strip():
            j += 1
        if j not in opening:
            raise DocsError(f"{where}: an output marker must be followed by a fenced block")
        close = opening[j]
        body_start = j + 1
        text_part = m.group("text").strip()
        if text_part.startswith("of:"):
            command = text_part[3:].strip()
            earlier = [canonical(c) for o, c_end in fences if c_end < i for c in commands_of(lines[o + 1:c_end])]
            if not any(canonical(command) in c for c in earlier):
                raise DocsError(f"{where}: the command of the marker is in no code block above: {command}")
            commands = [command]
        elif lines[body_start:close] and lines[body_start].startswith("$ "):
            k = body_start
            while k < close and (lines[k].startswith("$ ") or lines[k - 1].rstrip().endswith("\\")):
                k += 1
            commands, body_start = commands_of(lines[body_start:k]), k
        else:
            k = i - 1
            while k >= 0 and not lines[k].strip():
                k -= 1
            before = [o for o, c in fences if c == k]
            if not before:
                raise DocsError(
                    f"{where}: no command for this output: put the marker right after the command's "
                    "block, start the block with `$ ` lines, or name the command with `of: ...`"
                )
            commands = commands_of(lines[before[0] + 1:k])
        if not commands:
            raise DocsError(f"{where}: the command block of this output holds no command")
        key = "\n".join(commands)
        seen[key] = seen.get(key, 0) + 1
        key += f"\n#{seen[key]}"
        blocks.append(Block(i, body_start, close, commands, flags, "\n".join(lines[body_start:close]), key, page))
    return blocks


# ---- normalization -------------------------------------------------------------------------

_TIME = re.compile(r"(?<![\w.])\d+(?:\.\d+)?(?= ?(?:ms|s|sec|secs|seconds|min)\b)")
_TIME_HEADER = re.compile(r"\b(ms|s|sec|secs|seconds|time|min)\b", re.I)
_PID = re.compile(r"\b(pid) \d+")
_DATE = re.compile(r"\b\d{4}-\d{2}-\d{2}[T ]\d{2}:\d{2}(?::\d{2}(?:\.\d+)?)?(?:Z|[+-]\d{2}:?\d{2})?\b")  # a date with its time: when a thing ran


def for_display(output: str, paths: list[str] = ()) -> str:
    """What is written to a page: paths of this machine, pids and dates as ``...``; lines
    right-stripped, no trailing blank lines."""
    for p in sorted({str(p) for p in paths if str(p) not in ("", "/", ".")}, key=len, reverse=True):
        output = output.replace(p, "...")
    output = _PID.sub(r"\1 ...", output)
    output = _DATE.sub("...", output)
    return "\n".join(line.rstrip() for line in output.splitlines()).strip("\n")


def for_comparison(text: str) -> str:
    """``text`` with its timings replaced by ``<t>``: numbers followed by a time unit, and the
    cells of markdown table columns whose header names a time."""
    out, timed = [], set()
    lines = text.splitlines()
    for n, line in enumerate(lines):
        cells = line.split("|")
        if line.lstrip().startswith("|") and len(cells) > 2:
            following = lines[n + 1] if n + 1 < len(lines) else ""
            if re.fullmatch(r"\s*\|[\s\-:|]+\|\s*", following):  # a header row
                timed = {k for k, c in enumerate(cells) if _TIME_HEADER.search(c)}
            elif not re.fullmatch(r"\s*\|[\s\-:|]+\|\s*", line):
                cells = ["<t>" if k in timed and k not in (0, len(cells) - 1) else c for k, c in enumerate(cells)]
                line = "|".join(cells)
        else:
            timed = set()
        out.append(_TIME.sub("<t>", line).rstrip())
    return "\n".join(out).strip("\n")


def pattern_of(recorded: str) -> re.Pattern:
    """A regex for the recorded output: ``...`` matches anything on its line, a line of only
    ``...`` any number of lines."""
    parts = []
    for line in for_comparison(recorded).splitlines():
        if line.strip() == "...":
            parts.append(r"(?:[^\n]*\n)*?")
        else:
            parts.append(r"[^\n]*?".join(re.escape(p) for p in line.split("...")) + r"\n")
    return re.compile("".join(parts), re.S)


def matches(recorded: str, output: str) -> bool:
    """Whether a fresh (display-normalized) output equals the recorded one modulo timings and ``...``."""
    return pattern_of(recorded).fullmatch(for_comparison(output) + "\n") is not None


# ---- outputs computed on another machine ------------------------------------------------------
#
# The README's outputs are recorded on a CPU with native bf16, where precision "auto" trains in
# bf16; an AVX2-only CPU trains in fp32 (and AMX or another torch build may round differently),
# and training amplifies the last bits. Measured on ML-100K (RECVAE_CPU_BF16=0, fp32, against the
# recorded bf16 run): the metrics moved by at most 0.0052 (validation Recall@50; test NDCG@100
# 0.4453 against 0.4492), their standard errors by 0.0007; the top-10 lists shared 9 of their 10
# items, the served top-5 4 of 5. So a fresh output from another machine is compared (the test
# suite, tests/test_doc_outputs.py) by these rules, never literally; text that does not come from the
# arithmetic (commands, headers, counts of users and items, ranks, JSON keys) stays literal, and
# timings are ignored as in `matches`:
#: A decimal number (a metric, its ± standard error): this far from the recorded one, absolute.
#: Half the standard error of the README's NDCG@100 on 94 test users (± 0.02), twice the largest
#: bf16/fp32 gap seen, and a tenth of the ~0.1 that separates a trained Mult-VAE from popularity.
NUMBER_TOLERANCE = 0.01
#: A ranked list of items (`  3.* 300  Title` lines; a JSON "items" array): the same length and
#: at least this share of the recorded items (3 of 5, 6 of 10), in any order.
ITEM_SHARE = 0.6
# A JSON "scores" array: its length, best first; values follow the items and are not compared.

_DECIMAL = re.compile(r"(?<![\w.])-?\d+\.\d+(?![\w.])")
_RANKED = re.compile(r"^(\s*\d+\.)\*?\s+(\S+)(?:\s.*)?$")


def _arithmetic_parts(text: str) -> tuple[str, list[float], list[list[str]], list[list[float]]]:
    """``text`` (compared form) with what depends on the arithmetic cut out: its skeleton, its
    decimal numbers, its ranked item lists, its score lists."""
    import json

    lines, numbers, lists, scores, current = [], [], [], [], None
    for line in for_comparison(text).splitlines():
        ranked = _RANKED.match(line)
        if ranked:
            if current is None:
                current = []
                lists.append(current)
            current.append(ranked.group(2))
            lines.append(f"{ranked.group(1)} <item>")
            continue
        current = None
        if line.startswith("{"):
            try:
                body = json.loads(line)
            except ValueError:
                body = None
            if isinstance(body, dict):
                if isinstance(body.get("items"), list):
                    lists.append([json.dumps(v) for v in body["items"]])
                    body["items"] = "<items>"
                if isinstance(body.get("scores"), list):
                    scores.append(body["scores"])
                    body["scores"] = "<scores>"
                lines.append(json.dumps(body, sort_keys=True))
                continue
        numbers += [float(v) for v in _DECIMAL.findall(line)]
        lines.append(_DECIMAL.sub("<x>", line))
    return "\n".join(lines), numbers, lists, scores


def differences(recorded: str, output: str) -> list[str]:
    """Why a fresh output, perhaps computed on another machine, does not agree with the recorded
    one by the rules above; empty when it does."""
    if matches(recorded, output):
        return []
    skeleton, numbers, lists, scores = _arithmetic_parts(recorded)
    fresh_skeleton, fresh_numbers, fresh_lists, fresh_scores = _arithmetic_parts(output)
    if not matches(skeleton, fresh_skeleton):
        return ["the text around the numbers and item lists differs"]
    found = []
    if len(numbers) != len(fresh_numbers):
        found.append(f"{len(fresh_numbers)} decimal numbers against {len(numbers)} recorded")
    for n, (a, b) in enumerate(zip(numbers, fresh_numbers), 1):
        if not abs(a - b) <= NUMBER_TOLERANCE:
            found.append(f"decimal number {n}: {b:g} against {a:g} recorded (tolerance {NUMBER_TOLERANCE:g})")
    if len(lists) != len(fresh_lists):
        found.append(f"{len(fresh_lists)} item lists against {len(lists)} recorded")
    for n, (a, b) in enumerate(zip(lists, fresh_lists), 1):
        shared = len(set(a) & set(b))
        if len(a) != len(b) or shared < ITEM_SHARE * len(a):
            found.append(f"item list {n}: {len(b)} items sharing {shared} with the recorded {len(a)} "
                         f"(need the same length and at least {ITEM_SHARE:.0%} shared)")
    if len(scores) != len(fresh_scores):
        found.append(f"{len(fresh_scores)} score lists against {len(scores)} recorded")
    for n, (a, b) in enumerate(zip(scores, fresh_scores), 1):
        if len(a) != len(b) or any(x < y for x, y in zip(b, b[1:])):
            found.append(f"score list {n}: {len(b)} scores against {len(a)} recorded, or not best first")
    return found


def replace_outputs(text: str, new: dict[str, str]) -> str:
    """``text`` with the output of each block (keyed by ``Block.key``) replaced; ``DocsError``
    for a key no block of ``text`` has."""
    lines = text.splitlines()
    blocks = {b.key: b for b in parse(text)}
    missing = set(new) - set(blocks)
    if missing:
        raise DocsError(f"no output block runs {sorted(missing)[0].split(chr(10) + '#')[0]!r} any more")
    for b in sorted((blocks[k] for k in new), key=lambda b: b.start, reverse=True):
        lines[b.start:b.end] = new[b.key].splitlines()
    return "\n".join(lines) + ("\n" if text.endswith("\n") else "")


def rewrite(path: Path, new: dict[str, str]) -> bool:
    """Replace the blocks' outputs in the file at ``path`` as it is now (read again: it may have
    been edited while the commands ran), atomically; whether it changed."""
    from recvae.fileio import write_bytes

    text = path.read_text()
    updated = replace_outputs(text, new)
    if updated == text:
        return False
    write_bytes(path, updated.encode())
    return True


# ---- running -------------------------------------------------------------------------------


def data_dir() -> Path:
    return Path(os.environ.get("RECVAE_DATA") or REPO / "data")


@contextlib.contextmanager
def scratch(data: Path | None = None):
    """A temporary working directory that looks like the repository root (see the module doc)."""
    with tempfile.TemporaryDirectory(prefix="doc-outputs-") as d:
        work = Path(d)
        for entry in REPO.iterdir():
            if entry.name not in OUTPUT_DIRS and not entry.name.startswith(".venv"):
                (work / entry.name).symlink_to(entry)
        (work / "data").symlink_to((data or data_dir()).resolve())
        yield work


def child_env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k != "RECVAE_DATA"}
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), *filter(None, [env.get("PYTHONPATH")])])
    env["PYTHONUNBUFFERED"] = "1"
    return env


def shell_prelude() -> str:
    py = shlex.quote(sys.executable)
    return f"recvae() {{ {py} -m recvae \"$@\"; }}\npython() {{ {py} \"$@\"; }}\npython3() {{ {py} \"$@\"; }}\n"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def curl(command: str, port_map: dict[str, str], timeout: float, work: Path = Path(".")) -> str:
    """Do the HTTP request a ``curl`` command line describes; the answer's body."""
    words = shlex.split(command)[1:]
    method, headers, data, url = None, {}, None, None
    it = iter(words)
    for w in it:
        if w in ("-X", "--request"):
            method = next(it)
        elif w in ("-H", "--header"):
            k, _, v = next(it).partition(":")
            headers[k.strip()] = v.strip()
        elif w in ("-d", "--data", "--data-raw", "--data-binary", "--json"):
            value = next(it)
            data = (work / value[1:]).read_bytes() if value.startswith("@") and w != "--data-raw" else value.encode()
            if w == "--json":
                headers.setdefault("Content-Type", "application/json")
                headers.setdefault("Accept", "application/json")
        elif w in ("-s", "--silent", "-S", "--show-error", "-f", "--fail", "-i"):
            continue
        elif w.startswith("-"):
            raise DocsError(f"curl option {w} is not supported here: {command}")
        else:
            url = w
    if url is None:
        raise DocsError(f"no URL in: {command}")
    if "://" not in url:
        url = "http://" + url
    for old, new in port_map.items():
        url = re.sub(rf":{old}(?=/|$|\?)", f":{new}", url).replace("//localhost:", "//127.0.0.1:")
    request = urllib.request.Request(url, data=data, headers=headers, method=method or ("POST" if data else "GET"))
    try:
        with urllib.request.urlopen(request, timeout=timeout) as r:
            return r.read().decode()
    except urllib.error.HTTPError as e:  # curl -s prints an error's body too
        return e.read().decode()


def wait_until_serving(proc: subprocess.Popen, port: str, log: Path, timeout: float) -> None:
    from recvae.serve.server import wait_until_ready

    try:
        wait_until_ready(f"http://127.0.0.1:{port}", proc, timeout, lambda: log.read_text()[-2000:],
                         any_status=True)  # a block may start another server
    except (RuntimeError, TimeoutError) as e:
        raise DocsError(str(e)) from None


def stop(proc: subprocess.Popen, grace: float = 20.0) -> None:
    """Stop a command's whole process group (the shell and what it started): SIGTERM, SIGKILL
    after ``grace`` seconds; returns once no process of the group is left."""
    deadline = time.monotonic() + grace
    sent = None
    while True:
        try:
            if sent is None or (sent == signal.SIGTERM and time.monotonic() > deadline):
                sent = signal.SIGTERM if sent is None else signal.SIGKILL
                os.killpg(proc.pid, sent)
            else:
                os.killpg(proc.pid, 0)
        except ProcessLookupError:
            break
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(timeout=0.05)
        if sent == signal.SIGKILL and time.monotonic() > deadline + 10:
            break  # only zombies no one reaps can be left
    proc.wait()


def run_command(command: str, work: Path, env: dict, timeout: float, label: str) -> subprocess.CompletedProcess:
    """Run one command through bash in ``work``; stopped like a server if anything interrupts it."""
    proc = subprocess.Popen(
        ["bash", "-c", shell_prelude() + command], cwd=work, env=env, stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True,
    )
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired as e:
        raise DocsError(f"{label}: `{command}` ran over {timeout:g} s") from e
    finally:
        stop(proc)
    return subprocess.CompletedProcess(proc.args, proc.returncode, out, err)


def run_block(block: Block, work: Path, timeout: float = 3600.0) -> str:
    """Run a block's commands in ``work``; their output, normalized for display."""
    env, servers, port_map, chunks = child_env(), [], {}, []
    try:
        for command in block.commands:
            if command.endswith("&"):
                command = command[:-1].strip()
                port = free_port()
                m = re.search(r"--port[ =](\d+)", command)
                old = m.group(1) if m else "8000"
                command = re.sub(r"--port[ =]\d+", f"--port {port}", command) if m else f"{command} --port {port}"
                port_map[old] = str(port)
                log = work / f".server-{len(servers)}.log"
                with open(log, "wb") as f:
                    proc = subprocess.Popen(
                        ["bash", "-c", shell_prelude() + command], cwd=work, env=env,
                        stdout=f, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True,
                    )
                servers.append(proc)
                wait_until_serving(proc, str(port), log, timeout=min(timeout, 300))
            elif command.split()[0] == "curl":
                chunks.append(curl(command, port_map, timeout, work))
            elif servers and re.fullmatch(r"(kill( -\w+)? (%\d*|\$!)|wait|sleep [\d.]+)", command):
                continue  # the servers' lifetime is the block's
            else:
                r = run_command(command, work, env, timeout, block.label)
                if "stderr" in block.flags:
                    chunks.append(r.stdout + r.stderr)
                elif r.returncode != 0:
                    raise DocsError(
                        f"{block.label}: `{command}` exited with status {r.returncode}:\n{r.stderr[-3000:]}"
                    )
                else:
                    chunks.append(r.stdout)
    finally:
        for proc in servers:
            stop(proc)
    paths = [work, work.resolve(), REPO, data_dir(), data_dir().resolve(), Path.home()]
    return for_display("\n".join(c.rstrip("\n") for c in chunks), paths)


def out_paths(command: str) -> set[str]:
    words = shlex.split(command)
    return {words[k + 1].rstrip("/") for k, w in enumerate(words[:-1]) if w in ("--out", "--output")}


def with_dependencies(blocks: list[Block], chosen: list[Block]) -> list[Block]:
    """``chosen`` plus, for each path their commands read, the last earlier block that writes it
    (``--out``, ``--output``), and so on; in page order."""
    keep = {id(b) for b in chosen}
    changed = True
    while changed:
        changed = False
        for n, b in enumerate(blocks):
            if id(b) not in keep:
                continue
            words = {w.rstrip("/") for c in b.commands for w in shlex.split(c.rstrip("&"))}
            for word in words - set().union(*map(out_paths, b.commands)):  # not what it writes itself
                writers = [e for e in blocks[:n] if word in set().union(*map(out_paths, e.commands))]
                if writers and id(writers[-1]) not in keep:
                    keep.add(id(writers[-1]))
                    changed = True
    return [b for b in blocks if id(b) in keep]


def run_all(blocks: list[Block], data: Path | None = None, timeout: float = 3600.0,
            log=print) -> dict[tuple[str, str], str]:
    """Run the blocks in order in one scratch directory (a later page uses the runs of an earlier
    one); their outputs keyed by ``(Block.page, Block.key)``."""
    outputs = {}
    with scratch(data) as work:
        for b in blocks:
            t = time.monotonic()
            log(f"running {b.label} ...")
            outputs[b.page, b.key] = run_block(b, work, timeout)
            log(f"  done in {time.monotonic() - t:.1f} s")
    return outputs


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--check", action="store_true", help="report the blocks that differ, write nothing (exit 1 if any)")
    p.add_argument("--small", action="store_true", help="only the blocks marked small (and what they need)")
    p.add_argument("--only", metavar="TEXT", help="only the blocks whose command holds TEXT (and what they need)")
    p.add_argument(
        "--timings", action="store_true",
        help="also rewrite the blocks that match but for timings, to record this run's (on a quiet machine)",
    )
    p.add_argument("--list", action="store_true", help="list the marked blocks and exit")
    p.add_argument("--page", type=Path, action="append", help="only this page (repeatable; default: README.md and docs/)")
    p.add_argument("--timeout", type=float, default=3600.0, help="seconds allowed to each command (default 3600)")
    args = p.parse_args(argv)
    sys.path.insert(0, str(REPO))
    paths = args.page or pages()
    try:
        parsed = {page_name(path): (path, parse(path.read_text(), page_name(path))) for path in paths}
    except DocsError as e:
        print(f"doc_outputs: error: {e}", file=sys.stderr)
        return 2
    blocks = [b for _, page_blocks in parsed.values() for b in page_blocks]
    if args.list:
        for b in blocks:
            print(f"{b.label}{'  [small]' if b.small else ''}: {' ; '.join(b.commands)}")
        return 0
    chosen = [b for b in blocks if (not args.small or b.small) and (not args.only or any(args.only in c for c in b.commands))]
    try:
        outputs = run_all(with_dependencies(blocks, chosen), timeout=args.timeout,
                          log=lambda m: print(m, file=sys.stderr))
    except DocsError as e:
        print(f"doc_outputs: error: {e}", file=sys.stderr)
        return 2
    status = 0
    for name, (path, page_blocks) in parsed.items():
        mine = [b for b in chosen if b.page == name]
        if mine:
            status = max(status, _page(path, name, mine, outputs, args))
    return status


def _page(path: Path, name: str, chosen: list[Block], outputs: dict, args) -> int:
    """Check or rewrite one page's blocks from the outputs of their commands."""
    differ = [b for b in chosen if not matches(b.recorded, outputs[name, b.key])]
    for b in differ:
        print(f"{b.label}: the output differs")
        sys.stdout.writelines(
            difflib.unified_diff(
                (b.recorded + "\n").splitlines(True), (outputs[name, b.key] + "\n").splitlines(True), name, "now", n=1,
            )
        )
    if args.check:
        print(f"{name}: {len(differ)} of {len(chosen)} output block(s) differ" if differ
              else f"{name}: all {len(chosen)} output block(s) match")
        return 1 if differ else 0
    try:
        changed = rewrite(path, {b.key: outputs[name, b.key] for b in (chosen if args.timings else differ)})
    except DocsError as e:
        print(f"doc_outputs: error: {e}", file=sys.stderr)
        return 2
    print(f"{name}: {'rewritten' if changed else 'unchanged'} ({len(differ)} of {len(chosen)} block(s) differed)")
    return 0


if __name__ == "__main__":
    # SIGTERM unwinds like Ctrl-C, so the commands and servers are stopped and the scratch removed
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    sys.exit(main())
