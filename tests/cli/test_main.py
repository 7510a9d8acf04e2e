"""The command line and the dataclass -> argparse generator behind it."""

from __future__ import annotations

import argparse
import dataclasses
import logging
import subprocess
import sys
from dataclasses import dataclass, field
from typing import ClassVar, Literal

import pytest
import torch

import jumpscope
from jumpscope import sae as sae_module
from jumpscope.cli import COMMANDS, main
from jumpscope.cli.dataclass_args import (add_dataclass_arguments, dataclass_from_args, dataclass_from_args_or_exit,
                                  field_docs, field_table)
from jumpscope.train.config import TrainerConfig


@dataclass
class Base:
    """A test config."""

    size: int
    """Number of things."""

    rate: float = 0.5
    """How fast,
        over two lines."""

    undocumented: int = 1
    name: ClassVar[str] = "base"


@dataclass
class Child(Base):
    rate: float = 0.25  # re-declared without a docstring: keeps Base's

    undocumented: int = 2
    """Now documented."""

    mode: Literal["fast", "slow"] = "fast"
    """Speed mode."""


@dataclass
class Options:
    count: int = 3
    """A count."""
    scale: float = 1.0
    """A scale."""
    flag: bool = True
    """A flag."""
    limit: float | None = 2.0
    """A limit; none removes it."""
    mode: Literal["a", "b"] = "a"
    """A mode."""
    maybe_mode: Literal["x", "y"] | None = None
    """An optional mode."""
    sizes: tuple[int, ...] = (1, 2)
    """Some sizes."""
    pair: tuple[float, float] = (0.0, 1.0)
    """Two floats."""
    tags: list[str] = field(default_factory=list)
    """Some tags; 100% optional."""

    def __post_init__(self) -> None:
        if self.count < 0:
            raise ValueError(f"count must be >= 0, got {self.count}")


def _parser(cls: type, **kwargs) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="prog")
    add_dataclass_arguments(parser, cls, **kwargs)
    return parser


# -- field_docs ------------------------------------------------------------------------------------
def test_field_docs_inherits_and_overrides() -> None:
    assert field_docs(Base) == {"size": "Number of things.", "rate": "How fast, over two lines."}
    docs = field_docs(Child)
    assert docs["size"] == "Number of things."
    assert docs["rate"] == "How fast, over two lines."  # inherited by a re-declared field
    assert docs["undocumented"] == "Now documented."
    assert docs["mode"] == "Speed mode."


def _config_classes() -> list[type]:
    return [sae_module.config_class(name) for name in sae_module.architectures()] + [TrainerConfig]


@pytest.mark.parametrize("cls", _config_classes(), ids=lambda cls: cls.__name__)
def test_every_config_field_has_a_docstring(cls: type) -> None:
    docs = field_docs(cls)
    missing = [f.name for f in dataclasses.fields(cls) if not docs.get(f.name, "").strip()]
    assert not missing, f"{cls.__name__} fields without an attribute docstring: {missing}"


# -- add_dataclass_arguments / dataclass_from_args --------------------------------------------------
def test_round_trip_defaults() -> None:
    assert dataclass_from_args(Options, _parser(Options).parse_args([])) == Options()


def test_round_trip_every_type() -> None:
    args = _parser(Options).parse_args(
        ["--count", "7", "--scale", "0.125", "--no-flag", "--limit", "none", "--mode", "b",
         "--maybe-mode", "y", "--sizes", "4", "5", "6", "--pair", "2.5", "3", "--tags", "p", "q"])
    assert dataclass_from_args(Options, args) == Options(
        count=7, scale=0.125, flag=False, limit=None, mode="b", maybe_mode="y", sizes=(4, 5, 6),
        pair=(2.5, 3.0), tags=["p", "q"])
    args = _parser(Options).parse_args(["--flag", "--limit", "3", "--maybe-mode", "none", "--count", "1e3"])
    assert dataclass_from_args(Options, args, scale=9.0) == Options(count=1000, limit=3.0, scale=9.0)


def test_prefix_exclude_defaults_and_required() -> None:
    parser = _parser(Child, prefix="child-", exclude=("undocumented",), defaults={"rate": 0.75})
    args = parser.parse_args(["--child-size", "4"])
    assert not hasattr(args, "child_undocumented")
    assert dataclass_from_args(Child, args, prefix="child-") == Child(size=4, rate=0.75)
    with pytest.raises(SystemExit) as exc:
        parser.parse_args([])  # size has no default: a required option
    assert exc.value.code == 2
    help_text = parser.format_help()
    assert "--child-mode {fast,slow}" in help_text and "Speed mode. (default: fast)" in help_text
    assert "How fast, over two lines. (default: 0.75)" in help_text
    assert "100% optional" in _parser(Options).format_help()  # '%' survives argparse's formatting


def test_bad_choice_exits_2_naming_the_option(capsys) -> None:
    with pytest.raises(SystemExit) as exc:
        _parser(Options).parse_args(["--mode", "c"])
    assert exc.value.code == 2
    assert "--mode" in capsys.readouterr().err


def test_post_init_error_exits_2_naming_the_option(capsys) -> None:
    parser = _parser(Options)
    with pytest.raises(SystemExit) as exc:
        dataclass_from_args_or_exit(parser, Options, parser.parse_args(["--count", "-3"]))
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert "prog: error: count must be >= 0, got -3 (option --count)" in err
    assert "Traceback" not in err


def test_real_configs_generate_options() -> None:
    for cls in _config_classes():
        parser = _parser(cls)
        sizes = {"d_in": 8, "d_sae": 64} if "d_in" in {f.name for f in dataclasses.fields(cls)} else {}
        argv = [text for name, value in sizes.items() for text in (f"--{name.replace('_', '-')}", str(value))]
        assert dataclass_from_args(cls, parser.parse_args(argv)) == cls(**sizes)
    parser = _parser(sae_module.config_class("jumprelu"))
    args = parser.parse_args(["--d-in", "8", "--d-sae", "16", "--target-l0", "32"])
    with pytest.raises(SystemExit):  # target_l0 must lie in (0, d_sae)
        dataclass_from_args_or_exit(parser, sae_module.config_class("jumprelu"), args)


def test_field_table() -> None:
    assert field_table(Base) == [("size", "int", "required", "Number of things."),
                                 ("rate", "float", "0.5", "How fast, over two lines."),
                                 ("undocumented", "int", "1", "")]


# -- the jumpscope command -------------------------------------------------------------------------
def test_version(capsys) -> None:
    assert main(["--version"]) == 0
    assert capsys.readouterr().out.strip() == f"jumpscope {jumpscope.__version__}"


def test_no_command_prints_help(capsys) -> None:
    assert main([]) == 0
    out = capsys.readouterr().out
    assert "usage: jumpscope" in out and all(name in out for name in COMMANDS)


def test_python_m_help_lists_subcommands() -> None:
    result = subprocess.run([sys.executable, "-m", "jumpscope", "--help"], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    for name in ("archs", "info", "convert"):
        assert name in result.stdout


def test_unknown_command_exits_2(capsys) -> None:
    assert main(["frobnicate"]) == 2
    assert "invalid choice" in capsys.readouterr().err


def test_archs_lists_architectures(capsys) -> None:
    assert main(["archs"]) == 0
    out = capsys.readouterr().out
    assert all(name in out for name in sae_module.architectures())


def test_archs_jumprelu_shows_fields_docs_and_presets(capsys) -> None:
    assert main(["archs", "jumprelu"]) == 0
    out = " ".join(capsys.readouterr().out.split())
    assert "target_l0: float | None = None" in out
    assert " ".join(field_docs(sae_module.config_class("jumprelu"))["target_l0"].split()) in out
    assert "paper:" in out and "tanh:" in out


def test_archs_unknown_exits_2(capsys) -> None:
    assert main(["archs", "nope"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("jumpscope: error:") and "nope" in err and "Traceback" not in err


def test_info_missing_path_exits_2(tmp_path, capsys) -> None:
    missing = tmp_path / "no_such_sae"
    assert main(["info", str(missing)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("jumpscope: error:") and str(missing) in err and "Traceback" not in err


@pytest.fixture
def native_sae(tmp_path):
    formats = pytest.importorskip("jumpscope.formats")
    if not hasattr(formats, "save"):
        pytest.skip("jumpscope.formats.save is not available yet")
    sae = jumpscope.build("jumprelu", d_in=8, d_sae=16, model="test-model", site="layers.0.resid_post")
    with torch.no_grad():
        sae.set_threshold(torch.rand(16, generator=torch.Generator().manual_seed(1)) * 0.3)
        sae.b_enc.normal_(0, 0.2, generator=torch.Generator().manual_seed(2))
    formats.save(sae, tmp_path / "native", format="native")
    return sae, tmp_path / "native"


def test_info_native(native_sae, capsys) -> None:
    _, path = native_sae
    assert main(["info", str(path)]) == 0
    out = capsys.readouterr().out
    for text in ("jumprelu", "native", "d_in:", "8", "d_sae:", "16", "test-model", "layers.0.resid_post"):
        assert text in out


def test_convert_round_trip_preserves_encode(native_sae, tmp_path, capsys) -> None:
    from jumpscope import formats

    sae, path = native_sae
    gemma, back = tmp_path / "gemma", tmp_path / "back"
    assert main(["convert", str(path), str(gemma), "--to", "gemma_scope"]) == 0
    assert main(["convert", str(gemma), str(back), "--to", "native"]) == 0
    assert formats.detect_format(back) == "native"
    x = torch.randn(32, 8, generator=torch.Generator().manual_seed(3))
    loaded = formats.load(back)
    torch.testing.assert_close(loaded.encode(x), sae.encode(x))
    torch.testing.assert_close(loaded(x), sae(x))
    assert main(["convert", str(gemma), str(back), "--to", "native"]) == 2  # exists, no --force
    assert "--force" in capsys.readouterr().err
    assert main(["convert", str(gemma), str(back), "--to", "native", "--force"]) == 0


def test_convert_unrepresentable_exits_2(tmp_path, capsys) -> None:
    formats = pytest.importorskip("jumpscope.formats")
    if not hasattr(formats, "save"):
        pytest.skip("jumpscope.formats.save is not available yet")
    formats.save(jumpscope.build("topk", d_in=8, d_sae=16, k=4), tmp_path / "topk", format="native")
    assert main(["convert", str(tmp_path / "topk"), str(tmp_path / "out"), "--to", "gemma_scope"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("jumpscope: error:") and "Traceback" not in err


def test_corrupt_file_exits_2_and_debug_raises(tmp_path, capsys) -> None:
    pytest.importorskip("jumpscope.formats")
    bad = tmp_path / "params.npz"
    bad.write_bytes(b"not a zip archive")
    assert main(["info", str(bad)]) == 2
    assert capsys.readouterr().err.startswith("jumpscope: error:")
    with pytest.raises((ValueError, OSError)):
        main(["--debug", "info", str(bad)])


# -- careless options and unexpected errors: one line each -----------------------------------------
def _no_model(*args, **kwargs):
    raise AssertionError("a model was loaded although an option was careless")


@pytest.fixture
def no_model_loads(monkeypatch, tmp_path):
    """The model loaders fail the test if called: careless options must be refused before."""
    monkeypatch.setattr("jumpscope.models.loading.load_model", _no_model)
    monkeypatch.setattr("jumpscope.activations.source.load_model", _no_model)
    return ["--model", str(tmp_path / "no_such_model.bin"), "--out", str(tmp_path / "out"), "--device", "cpu"]


CARELESS = [
    ("train", ["--width", "0"], "--width"),
    ("train", ["--width", "-8"], "--width"),
    ("train", ["--tokens", "0"], "--tokens"),
    ("train", ["--eval-tokens", "-1"], "--eval-tokens"),
    ("train", ["--batch-size", "0"], "--batch-size"),
    ("train", ["--init-sample-tokens", "0"], "--init-sample-tokens"),
    ("train", ["--checkpoint-every", "-1"], "--checkpoint-every"),
    ("train", ["--target-l0", "0"], "--target-l0"),
    ("train", ["--target-l0", "64", "--width", "64"], "--target-l0"),
    ("train", ["--arch", "topk", "--k", "65", "--width", "64"], "--k"),
    ("train", ["--arch", "nope"], "--arch"),
    ("train", ["--arch", "jsae"], "jumpscope jsae"),
    ("train", ["--preset", "nope"], "--preset"),
    ("train", ["--model-batch-size", "0"], "--model-batch-size"),
    ("train", ["--shuffle-buffer-tokens", "0"], "--shuffle-buffer-tokens"),
    ("train", ["--cache-shard-rows", "0"], "--cache-shard-rows"),
    ("train", ["--encoding", "no-such-codec"], "--encoding"),
    ("train", ["--width", "many"], "--width"),
    ("sweep", ["--width", "0"], "--width"),
    ("sweep", ["--tokens", "-5"], "--tokens"),
    ("sweep", ["--archs", "topk", "--l0", "64", "--width", "64"], "--l0"),
    ("sweep", ["--archs", "nope"], "--archs"),
    ("sweep", ["--tokens", "100", "--batch-size", "512"], "--batch-size"),
    ("suite", ["--width", "0"], "--width"),
    ("suite", ["--eval-tokens", "0"], "--eval-tokens"),
    ("suite", ["--layers", "-1"], "--layers"),
    ("suite", ["--arch", "nope"], "--arch"),
    ("jsae", ["--k", "0"], "--k"),
    ("jsae", ["--k", "65", "--width", "64"], "--k"),
    ("jsae", ["--tokens", "0"], "--tokens"),
]


@pytest.mark.parametrize("command,argv,option", CARELESS, ids=lambda v: " ".join(v) if isinstance(v, list) else v)
def test_careless_training_options_are_one_line_before_any_model_loads(no_model_loads, capsys, command, argv,
                                                                       option) -> None:
    assert main([command, *no_model_loads, *argv]) == 2
    err = capsys.readouterr().err
    assert len(err.splitlines()) == 1 and err.startswith("jumpscope: error:"), err
    assert option in err and "no_such_model" not in err


@pytest.mark.parametrize("command,argv,option", [
    ("eval", ["--eval-tokens", "0"], "--eval-tokens"),
    ("eval", ["--model-batch-size", "-2"], "--model-batch-size"),
    ("dashboard", ["--tokens", "0"], "--tokens"),
    ("dashboard", ["--n-top", "0"], "--n-top"),
    ("dashboard", ["--logit-lens-tokens", "-1"], "--logit-lens-tokens"),
    ("steer", ["--prompt", "hi", "--steer", "1:2", "--max-new-tokens", "0"], "--max-new-tokens"),
])
def test_careless_options_of_sae_commands_are_one_line(no_model_loads, tmp_path, capsys, command, argv, option):
    sae = tmp_path / "no_such_sae"  # the options are refused before the SAE is even read
    assert main([command, str(sae), *no_model_loads[:2], *argv]) == 2
    err = capsys.readouterr().err
    assert len(err.splitlines()) == 1 and err.startswith("jumpscope: error:"), err
    assert option in err and "no_such" not in err


@pytest.fixture
def failing_archs(monkeypatch):
    from jumpscope.cli import Command

    def install(error: BaseException) -> None:
        def run(args):
            raise error

        monkeypatch.setitem(COMMANDS, "archs", Command("archs", "fails", lambda parser: None, run))

    return install


@pytest.mark.parametrize("error,status,text", [
    (RuntimeError("boom\nsecond line"), 1, "jumpscope: error: RuntimeError: boom second line (unexpected; rerun "
                                           "with --debug"),
    (KeyError("weights"), 1, "jumpscope: error: KeyError: 'weights' (unexpected; rerun with --debug"),
    (MemoryError(), 1, "jumpscope: error: out of memory (MemoryError); try a smaller --batch-size"),
    (RecursionError("too deep"), 1, "jumpscope: error: RecursionError: too deep; rerun with --debug"),
    (jumpscope.errors.ConfigError("width must be positive"), 2, "jumpscope: error: width must be positive"),
    (jumpscope.errors.FormatError("x.npz: truncated"), 2, "jumpscope: error: x.npz: truncated"),
])
def test_every_error_is_one_line_and_debug_raises_it(failing_archs, capsys, error, status, text) -> None:
    failing_archs(error)
    assert main(["archs"]) == status
    err = capsys.readouterr().err
    assert len(err.splitlines()) == 1 and err.startswith(text), err
    with pytest.raises(type(error)):
        main(["--debug", "archs"])


def test_interrupt_is_one_line_and_status_130(failing_archs, capsys) -> None:
    failing_archs(KeyboardInterrupt())
    assert main(["archs"]) == 130
    assert capsys.readouterr().err == "jumpscope: interrupted\n"


def test_library_warnings_are_one_line(monkeypatch, capsys) -> None:
    import warnings

    from jumpscope.cli import Command

    def run(args):
        warnings.warn("context_size 4096 is above\nthe tokenizer's limit")
        return 0

    monkeypatch.setitem(COMMANDS, "archs", Command("archs", "warns", lambda parser: None, run))
    assert main(["archs"]) == 0
    assert capsys.readouterr().err == "jumpscope: warning: context_size 4096 is above the tokenizer's limit\n"


@pytest.mark.parametrize("verbose", [False, True])
def test_library_logs_reach_stderr_as_one_line_each_info_only_when_verbose(capsys, verbose):
    from jumpscope.cli import _logging_to_stderr
    logger = logging.getLogger("jumpscope")
    level, handlers = logger.level, list(logger.handlers)
    with _logging_to_stderr(verbose):
        logging.getLogger("jumpscope.train.trainer").info("resuming from step 4")
        logging.getLogger("jumpscope.sae.mixed").warning("no native bfloat16")
    err = capsys.readouterr().err
    assert "jumpscope: no native bfloat16\n" in err
    assert ("jumpscope: resuming from step 4\n" in err) == verbose
    assert (logger.level, logger.handlers) == (level, handlers)  # left as it was found
