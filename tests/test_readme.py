"""The README's `recvae` commands name commands and flags that exist (read through the parser),
so the documentation cannot drift from the command line unnoticed."""

from __future__ import annotations

import argparse
import re
import shlex
from pathlib import Path

import pytest

from recvae.cli import build_parser

README = Path(__file__).resolve().parents[1] / "README.md"


def readme_commands() -> list[str]:
    """Each `recvae ...` invocation inside the README's code blocks (comments and prompts cut)."""
    commands, inside = [], False
    for line in README.read_text().splitlines():
        if line.startswith("```"):
            inside = not inside
            continue
        if not inside:
            continue
        for part in re.split(r"&&|;", line.split("  #")[0].split(" # ")[0]):
            part = part.strip().removeprefix("$ ").removeprefix(".venv/bin/")
            if part.startswith("recvae ") and not part.startswith("recvae on ") and ":" not in part.split()[1]:
                commands.append(part.rstrip("&").strip())
    return commands


def options_of(parser: argparse.ArgumentParser) -> set[str]:
    return {o for a in parser._actions for o in a.option_strings}


COMMANDS = readme_commands()


def test_the_readme_has_commands_to_check():
    assert len(COMMANDS) >= 15, COMMANDS


@pytest.mark.parametrize("command", COMMANDS)
def test_each_readme_command_and_flag_exists(command):
    parser = build_parser()
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction)).choices
    words = [w for w in shlex.split(command.replace("[", " ").replace("]", " "))[1:] if w != "..."]
    while words and words[0] in ("-q", "--quiet", "--debug"):
        words.pop(0)
    assert words and words[0] in sub, f"{command}: no command {words[:1]}"
    flags = options_of(sub[words[0]]) | options_of(parser)
    unknown = [w.split("=")[0] for w in words[1:] if w.startswith("-") and w.split("=")[0] not in flags]
    assert not unknown, f"{command}: unknown flag(s) {unknown}"
