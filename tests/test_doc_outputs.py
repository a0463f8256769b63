"""The documentation's `recvae` commands (README.md and every page under docs/) name commands
and flags that exist (read through the parser), and the outputs marked `small` are what the
commands print (scripts/doc_outputs.py): the documentation cannot drift from the command line
unnoticed."""

from __future__ import annotations

import argparse
import difflib
import os
import re
import shlex
from pathlib import Path

import pytest

from repo_scripts import load_script

from recvae.cli import build_parser

REPO = Path(__file__).resolve().parents[1]


# ---- the printed outputs (scripts/doc_outputs.py) ----------------------------------------
#
# Which documented commands the suite runs end to end: the output blocks whose marker says `small`
# (`<!-- output (small) of ... -->`): ML-100K or quicker, together under ~60 s on our 2-core CPU
# unloaded, and needing no block that is not small (test_small_blocks_need_only_small_blocks).


def _load_script():
    return load_script("scripts/doc_outputs.py")


ro = _load_script()

def page_commands(page: Path) -> list[str]:
    """Each `recvae ...` invocation inside a page's code blocks (continuations joined, comments
    and prompts cut)."""
    lines = page.read_text().splitlines()
    commands = []
    for start, end in ro._fences(lines):
        for command in ro.commands_of(lines[start + 1:end]):
            for part in re.split(r"&&|;", command):
                part = part.strip().removeprefix("$ ").removeprefix(".venv/bin/")
                if part.startswith("recvae ") and not part.startswith("recvae on ") and ":" not in part.split()[1]:
                    commands.append(part.rstrip("&").strip())
    return commands


def options_of(parser: argparse.ArgumentParser) -> set[str]:
    return {o for a in parser._actions for o in a.option_strings}


PAGES = ro.pages()
COMMANDS = [(ro.page_name(page), command) for page in PAGES for command in page_commands(page)]
BLOCKS = {ro.page_name(page): ro.parse(page.read_text(), ro.page_name(page)) for page in PAGES}
SMALL = [b for blocks in BLOCKS.values() for b in blocks if b.small]


def test_the_docs_have_commands_to_check():
    assert len(COMMANDS) >= 15, COMMANDS
    assert {"README.md", "docs/quickstart.md"} <= {page for page, _ in COMMANDS}


@pytest.mark.parametrize("page, command", COMMANDS, ids=[f"{p}:{c[:50]}" for p, c in COMMANDS])
def test_each_documented_command_and_flag_exists(page, command):
    parser = build_parser()
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction)).choices
    words = [w for w in shlex.split(command.replace("[", " ").replace("]", " "))[1:] if w != "..."]
    while words and words[0] in ("-q", "--quiet", "--debug"):
        words.pop(0)
    assert words and words[0] in sub, f"{command}: no command {words[:1]}"
    command = sub[words[0]]
    getattr(command, "add_hyperparameters", lambda: None)()  # train's and tune's, from the models' tables
    flags = options_of(command) | options_of(parser)
    unknown = [w.split("=")[0] for w in words[1:] if w.startswith("-") and w != "-" and w.split("=")[0] not in flags]
    assert not unknown, f"{command}: unknown flag(s) {unknown}"


FAKE = """# fake

```bash
recvae train --out runs/a   # trains
```

<!-- output (small) of the block above -->
```
trained in 17.5 s
done
```

Some text.

<!-- output of: recvae train --out runs/a -->
```text
again 3 s
```

<!-- output (stderr) of its $ lines -->
```
$ recvae evaluate runs/a \\
    --split test
| trial | seconds |
|---|---|
| x | 4.2 |
```

A marker shown in a code block is none:

```
<!-- output of the block above -->
```
"""


def test_markers_tie_each_output_to_its_commands():
    blocks = ro.parse(FAKE)
    assert [b.commands for b in blocks] == [
        ["recvae train --out runs/a"],
        ["recvae train --out runs/a"],
        ["recvae evaluate runs/a --split test"],
    ]
    assert [b.flags for b in blocks] == [{"small"}, set(), {"stderr"}]
    assert [b.recorded for b in blocks] == [
        "trained in 17.5 s\ndone",
        "again 3 s",
        "| trial | seconds |\n|---|---|\n| x | 4.2 |",
    ]
    assert len({b.key for b in blocks}) == 3  # the same command twice: two keys
    assert ro.with_dependencies(blocks, [blocks[2]]) == blocks[1:]  # the last to write runs/a before it
    assert ro.with_dependencies(blocks, [blocks[0]]) == blocks[:1]


@pytest.mark.parametrize(
    "bad, message",
    [
        ("<!-- output of the block above -->\ntext\n", "must be followed by a fenced block"),
        ("text\n\n<!-- output of the block above -->\n```\nx\n```\n", "no command for this output"),
        ("```\nrecvae a\n```\n<!-- output of: recvae b -->\n```\nx\n```\n", "in no code block above"),
        ("```\nrecvae a\n```\n<!-- output (fast) of the block above -->\n```\nx\n```\n", "unknown flag"),
        ("```\n# only a comment\n```\n<!-- output of the block above -->\n```\nx\n```\n", "holds no command"),
    ],
)
def test_a_marker_that_cannot_be_understood_is_refused(bad, message):
    with pytest.raises(ro.DocsError, match=message):
        ro.parse(bad)


def test_display_normalization_hides_paths_pids_and_dates():
    raw = "run /scratch/x1/runs/a written by pid 4121 at 2024-05-01 12:30:05  \nnext\n\n"
    assert ro.for_display(raw, ["/scratch/x1"]) == "run .../runs/a written by pid ... at ...\nnext"


def test_the_check_ignores_timings_and_dots_but_not_figures():
    recorded = "trained in 17.5 s\n| trial | seconds |\n|---|---|\n| x | 4.2 |\nrun: ... (pid ...)\n...\nend"
    fresh = "trained in 301.0 s\n| trial | seconds |\n|---|---|\n| x | 18.44 |\nrun: /a/b (pid ...)\nl1\nl2\nend"
    assert ro.matches(recorded, fresh)
    assert ro.matches(recorded, fresh.replace("l1\nl2\n", ""))  # a `...` line: any number of lines
    assert not ro.matches(recorded, fresh.replace("end", "end2"))
    assert not ro.matches(recorded.replace("| x |", "| y |"), fresh)  # only the time column is free
    assert not ro.matches("NDCG 0.4459 in 2 s", "NDCG 0.4460 in 2 s")
    assert not ro.matches("a\nb", "a\nb\nc")


RECORDED_BF16 = """multvae on ml-100k: trained in 16.4 s
| split | users | Recall@20 | NDCG@100 |
|---|---|---|---|
| test | 94 | 0.3954 ± 0.0302 | 0.4492 ± 0.0211 |

top-5 for test user 2 (32 fold-in items; * = held out, i.e. a hit):
   1.  9  Dead Man Walking (1995)
   2.  515  Boot, Das (1981)
   3.* 300  Air Force One (1997)
   4.  744  Michael Collins (1996)
   5.  124  Lone Star (1996)
{"items":[1,222,257,258,294],"scores":[5.80,5.52,5.34,5.32,5.11],"source":"model","unknown_items":[]}"""

# what an AVX2-only CPU printed (fp32; the numbers and lists of RECVAE_CPU_BF16=0 here)
FRESH_FP32 = """multvae on ml-100k: trained in 49.2 s
| split | users | Recall@20 | NDCG@100 |
|---|---|---|---|
| test | 94 | 0.3952 ± 0.0304 | 0.4453 ± 0.0215 |

top-5 for test user 2 (32 fold-in items; * = held out, i.e. a hit):
   1.  9  Dead Man Walking (1995)
   2.  515  Boot, Das (1981)
   3.* 283  Emma (1996)
   4.  124  Lone Star (1996)
   5.* 300  Air Force One (1997)
{"items":[1,222,257,258,174],"scores":[5.60,5.33,5.07,5.02,4.92],"source":"model","unknown_items":[]}"""


def test_another_machines_output_agrees_within_the_tolerance():
    assert not ro.matches(RECORDED_BF16, FRESH_FP32)  # not literally
    assert ro.differences(RECORDED_BF16, FRESH_FP32) == []
    assert ro.differences(RECORDED_BF16, RECORDED_BF16.replace("16.4 s", "3 s")) == []


@pytest.mark.parametrize("change, reason", [
    (("0.4453", "0.4353"), "decimal number 3: 0.4353 against 0.4492 recorded (tolerance 0.01)"),
    (("| 94 |", "| 93 |"), "the text around the numbers and item lists differs"),  # a count: literal
    (("(32 fold-in", "(31 fold-in"), "the text around the numbers and item lists differs"),
    (("1.  9  Dead Man Walking (1995)\n   2.  515", "1.  7  Richard III (1995)\n   2.  8"), "item list 1: 5 items sharing 2 with the recorded 5 (need the same length and at least 60% shared)"),
    (("   5.* 300  Air Force One (1997)\n", ""), "the text around the numbers and item lists differs"),
    (("258,174]", "258]"), "item list 2: 4 items sharing 4 with the recorded 5 (need the same length and at least 60% shared)"),
    (("[1,222,257", "[7,8,257"), "item list 2: 5 items sharing 2 with the recorded 5 (need the same length and at least 60% shared)"),
    (("5.07,5.02", "5.02,5.07"), "score list 1: 5 scores against 5 recorded, or not best first"),
    (('"model"', '"popular"'), "the text around the numbers and item lists differs"),
])
def test_beyond_the_tolerance_or_in_the_literal_text_it_does_not(change, reason):
    assert FRESH_FP32.count(change[0]) == 1
    assert ro.differences(RECORDED_BF16, FRESH_FP32.replace(*change)) == [reason]


def test_the_rewrite_replaces_only_outputs_atomically(tmp_path, monkeypatch):
    path = tmp_path / "README.md"
    path.write_text(FAKE)
    keys = [b.key for b in ro.parse(FAKE)]
    inode = path.stat().st_ino
    assert ro.rewrite(path, {keys[0]: "trained in 9.1 s\ndone", keys[2]: "| trial | seconds |\n|---|---|\n| y |"})
    text = path.read_text()
    assert text == FAKE.replace("17.5 s", "9.1 s").replace("| x | 4.2 |", "| y |")
    assert path.stat().st_ino != inode  # a new file renamed onto the old one
    assert [p.name for p in tmp_path.iterdir()] == ["README.md"]
    assert not ro.rewrite(path, {keys[1]: "again 3 s"})  # nothing changed: not written

    # lines added above the markers while the commands ran: each output still lands in its block
    path.write_text("intro\n\n" + FAKE)
    assert ro.rewrite(path, {keys[1]: "again 4 s"})
    assert path.read_text() == "intro\n\n" + FAKE.replace("again 3 s", "again 4 s")

    # a write that fails leaves the README as it was, and no temporary file
    def failing_replace(src, dst):
        raise OSError("disk full")

    monkeypatch.setattr(ro.os, "replace", failing_replace)
    monkeypatch.setattr(os, "replace", failing_replace)
    with pytest.raises(OSError, match="disk full"):
        ro.rewrite(path, {keys[1]: "again 5 s"})
    assert "again 4 s" in path.read_text()
    assert [p.name for p in tmp_path.iterdir()] == ["README.md"]


def test_the_docs_mark_their_printed_outputs():
    firsts = [b.commands[0] for blocks in BLOCKS.values() for b in blocks]
    assert any(c.startswith("recvae train --dataset ml-100k") for c in firsts), firsts
    assert any(c.startswith("recvae -q tune") for c in firsts), firsts
    assert any(c.startswith("recvae serve") for c in firsts), firsts
    assert any(b.small for b in BLOCKS["docs/quickstart.md"]), "the quickstart's outputs are not checked"
    assert SMALL, "no output block is marked small"


ALL_BLOCKS = [b for blocks in BLOCKS.values() for b in blocks]


def test_small_blocks_need_only_small_blocks():
    """The end-to-end test runs the small blocks and what they need: nothing that is not small."""
    assert [b.label for b in ro.with_dependencies(ALL_BLOCKS, SMALL)] == [b.label for b in SMALL]


@pytest.mark.slow
def test_a_server_block_is_started_asked_and_stopped(tmp_path):
    """`cmd &` starts in the background on a free port, curl is asked of it, and it is stopped,
    also when a later command fails."""
    (tmp_path / "hello.txt").write_text("hi there")
    server = (
        "import http.server, os, sys; open(f'pid-{os.getpid()}', 'w').write(str(os.getpid())); "
        "http.server.test(http.server.SimpleHTTPRequestHandler, port=int(sys.argv[2]), bind='127.0.0.1')"
    )
    (tmp_path / "server.py").write_text(server)
    text = (
        "```bash\npython server.py --port 8000 &\nsleep 2\ncurl -s http://localhost:8000/hello.txt\n"
        "curl -s -X POST localhost:8000/hello.txt -d '{\"a\": 1}'   # not allowed: the error's body\nkill %1\n```\n"
        "<!-- output of the block above -->\n```\nx\n```\n"
    )
    block = ro.parse(text)[0]
    out = ro.run_block(block, tmp_path, timeout=60)
    assert out.startswith("hi there\n") and "501" in out  # http.server answers POST 501
    pids = [int(p.read_text()) for p in tmp_path.glob("pid-*")]
    assert len(pids) == 1 and not _alive(pids[0])

    failing = ro.parse(text.replace("curl -s http://localhost:8000/hello.txt", "exit 3"))[0]
    with pytest.raises(ro.DocsError, match="status 3"):
        ro.run_block(failing, tmp_path, timeout=60)
    pids = [int(p.read_text()) for p in tmp_path.glob("pid-*")]
    assert len(pids) == 2 and not any(map(_alive, pids))


def _alive(pid: int) -> bool:
    """Whether a process runs (a zombie waiting to be reaped does not)."""
    try:
        return "zombie" not in Path(f"/proc/{pid}/status").read_text()
    except FileNotFoundError:
        return False


@pytest.mark.slow
def test_check_and_write_modes_on_a_fake_readme(tmp_path, capsys):
    path = tmp_path / "README.md"
    path.write_text(
        "```\nrecvae --version\necho 'took 12.0 s'\n```\n<!-- output (small) of the block above -->\n```\nold\n```\n"
    )
    assert ro.main(["--check", "--page", str(path)]) == 1
    assert "README.md:5" in capsys.readouterr().out
    assert path.read_text().count("old") == 1
    assert ro.main(["--page", str(path)]) == 0
    from recvae import __version__

    assert f"```\nrecvae {__version__}\ntook 12.0 s\n```" in path.read_text()
    path.write_text(path.read_text().replace("\ntook 12.0 s\n", "\ntook 1.5 s\n"))  # the output's, not the echo's
    assert ro.main(["--check", "--page", str(path)]) == 0  # a timing alone is no difference
    assert ro.main(["--page", str(path)]) == 0 and "took 1.5 s" in path.read_text()  # nor rewritten
    assert ro.main(["--timings", "--page", str(path)]) == 0 and "took 12.0 s" in path.read_text()


@pytest.fixture(scope="module")
def small_outputs(real_data_dir):
    """The small blocks' fresh outputs (one scratch directory, in the order of the pages)."""
    return ro.run_all(ro.with_dependencies(ALL_BLOCKS, SMALL), data=real_data_dir, timeout=600, log=lambda m: None)


@pytest.mark.slow
@pytest.mark.realdata
@pytest.mark.parametrize("block", SMALL, ids=[f"{b.page}:{b.marker_line + 1}" for b in SMALL])
def test_small_documented_commands_print_what_the_page_shows(block, small_outputs):
    """Within the tolerance of scripts/doc_outputs.py (`differences`): this machine may train
    in another precision than the one that recorded the page (fp32 on an AVX2-only CPU)."""
    fresh = small_outputs[block.page, block.key]
    found = ro.differences(block.recorded, fresh)
    assert not found, (
        f"{block.label}: the page's output differs from the command's beyond the tolerance "
        f"({'; '.join(found)}; run scripts/doc_outputs.py):\n"
        + "".join(difflib.unified_diff((block.recorded + "\n").splitlines(True), (fresh + "\n").splitlines(True), block.page, "now"))
    )
