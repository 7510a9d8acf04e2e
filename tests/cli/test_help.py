"""Every command's options and help text, compared with a snapshot taken before the command line
was reorganised (issue 13): a refactor must not change what users see. When an option changes on
purpose, regenerate it with ``JUMPSCOPE_UPDATE_HELP=1 pytest tests/cli/test_help.py`` and
review the diff."""

from __future__ import annotations

import argparse
import os
from pathlib import Path

import pytest

from jumpscope.cli import build_parser

SNAPSHOT = Path(__file__).with_name("help_snapshot.txt")


def every_help(monkeypatch) -> str:
    monkeypatch.setenv("COLUMNS", "100")  # argparse wraps to the terminal's width
    parser = build_parser()
    commands = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction)).choices
    parts = [f"=== jumpscope\n{parser.format_help()}"]
    parts += [f"=== jumpscope {name}\n{sub.format_help()}" for name, sub in sorted(commands.items())]
    return "\n".join(parts)


def test_every_command_help_is_unchanged(monkeypatch):
    text = every_help(monkeypatch)
    if os.environ.get("JUMPSCOPE_UPDATE_HELP") == "1":
        SNAPSHOT.write_text(text)
        pytest.skip("snapshot rewritten")
    assert text == SNAPSHOT.read_text()
