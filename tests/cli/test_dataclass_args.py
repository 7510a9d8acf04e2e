"""Nested dataclass fields in the option generator: options of their own, rebuilt into the instance."""

from __future__ import annotations

import argparse
from dataclasses import dataclass, field
from typing import Literal

import pytest

from jumpscope.cli.dataclass_args import (add_dataclass_arguments, add_nested_arguments, dataclass_from_args,
                                          dataclass_from_args_or_exit)


@dataclass
class Inner:
    count: int = 3
    """A count."""
    scale: float = 1.0
    """A scale."""
    flag: bool = True
    """A flag."""
    sizes: tuple[int, ...] = (1, 2)
    """Some sizes."""
    tags: list[str] = field(default_factory=list)
    """Some tags."""

    def __post_init__(self) -> None:
        if self.count < 0:
            raise ValueError(f"count must be >= 0, got {self.count}")


@dataclass
class Outer:
    total: int = 10
    """The outer total."""
    inner: Inner = field(default_factory=lambda: Inner(scale=2.0), metadata={"exclude": ("tags",)})
    """Nested options; the outer config sets the tags itself."""

    def __post_init__(self) -> None:
        if self.total < 0:
            raise ValueError(f"total must be >= 0, got {self.total}")


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="prog")
    add_dataclass_arguments(parser, Outer)
    return parser


def test_nested_fields_are_options_of_their_own_rebuilt_into_the_instance() -> None:
    help_text = _parser().format_help()
    assert "--inner" not in help_text and "--tags" not in help_text  # excluded: the outer config sets it
    assert "--count INT" in help_text and "A scale. (default: 2.0)" in help_text  # the default instance's
    args = _parser().parse_args(["--total", "4", "--no-flag", "--sizes", "7"])
    assert dataclass_from_args(Outer, args) == Outer(total=4, inner=Inner(scale=2.0, flag=False, sizes=(7,)))
    assert dataclass_from_args(Outer, args, inner={"tags": ["t"]}).inner.tags == ["t"]  # a dict sets fields on top
    assert dataclass_from_args(Outer, args, inner=Inner(count=5)).inner == Inner(count=5)  # an instance replaces
    assert dataclass_from_args(Outer, _parser().parse_args([])) == Outer()


def test_nested_options_in_their_own_group_and_their_errors(capsys) -> None:
    parser = argparse.ArgumentParser(prog="prog")
    add_dataclass_arguments(parser, Outer, exclude=("inner",))
    add_nested_arguments(parser.add_argument_group("inner things"), Outer, "inner")
    assert parser.format_help().split("inner things:")[1].lstrip().startswith("--count INT")
    for argv, message in [(["--total", "-1", "--count", "-3"], "total must be >= 0, got -1 (option --total)"),
                          (["--count", "-3"], "count must be >= 0, got -3 (option --count)")]:
        with pytest.raises(SystemExit):  # the outer config's own errors first
            dataclass_from_args_or_exit(parser, Outer, parser.parse_args(argv))
        assert f"prog: error: {message}" in capsys.readouterr().err


@dataclass
class Modes:
    modes: tuple[Literal["plain", "fancy"], ...] = ("plain",)
    """Modes, several allowed."""
    sizes: tuple[int, ...] = ()
    """Sizes; none given by default."""


def test_a_tuple_of_literals_takes_several_choices_and_refuses_others(capsys) -> None:
    parser = argparse.ArgumentParser()
    add_dataclass_arguments(parser, Modes)
    assert dataclass_from_args(Modes, parser.parse_args(["--modes", "fancy", "plain"])).modes == ("fancy", "plain")
    assert dataclass_from_args(Modes, parser.parse_args([])) == Modes()
    assert "(default: none given)" in parser.format_help()
    with pytest.raises(SystemExit):
        parser.parse_args(["--modes", "plain", "odd"])
    assert "invalid choice" in capsys.readouterr().err
