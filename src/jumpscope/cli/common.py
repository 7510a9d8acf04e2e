"""What every command shares: the command registry, the SAE-source and network options, and the
options of the training jobs (train, sweep, suite, jsae) generated from their configs."""

from __future__ import annotations

import argparse
import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from .dataclass_args import (add_dataclass_arguments, add_nested_arguments, config_error_message, dataclass_from_args,
                             option_name)

__all__ = ["Command", "COMMANDS", "command", "SAE_SOURCES", "add_network_argument", "existing_sae_path",
           "ACTIVATION_JOB_FIELDS", "add_training_job_arguments", "training_job_from_args", "add_sae_arguments",
           "sae_fields_from_args", "activations_from_args", "print_report"]


@dataclass(frozen=True)
class Command:
    name: str
    help: str
    configure: Callable[[argparse.ArgumentParser], None]
    run: Callable[[argparse.Namespace], int]


COMMANDS: dict[str, Command] = {}


def command(name: str, help: str, configure: Callable[[argparse.ArgumentParser], None]):
    """Decorator registering ``run(args) -> int`` as subcommand ``name``; ``help`` is its
    one-line description, ``configure(parser)`` adds its arguments."""

    def register(run: Callable[[argparse.Namespace], int]) -> Callable[[argparse.Namespace], int]:
        COMMANDS[name] = Command(name, help, configure, run)
        return run

    return register



SAE_SOURCES = ("an SAE folder or file (native, SAELens, sparsify, Gemma Scope params.npz) or an SAE on the Hugging "
               "Face hub as hf://owner/name/path (e.g. hf://google/gemma-scope-2b-pt-res/layer_20/width_16k/"
               "average_l0_71)")


def add_network_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--allow-network", action="store_true",
                        help="download an hf:// SAE that is not in the local Hugging Face cache")



def existing_sae_path(path: str) -> Path | str:
    from ..formats import hub

    if hub.is_hub_reference(path):
        return path
    if not Path(path).exists():
        raise FileNotFoundError(f"no SAE at {path}: no such file or folder")
    return Path(path)



# The eval and dashboard jobs name the model themselves (default: the SAEs' own), so the activation
# config's is not an option of theirs.
ACTIVATION_JOB_FIELDS = ("model", "cache", "shuffle_buffer_tokens", "seed")


# -- the training jobs' options ------------------------------------------------------------------------
SAE_PREFIX = "sae-"


def _sae_config_classes() -> list[type]:
    from ..sae import architectures, config_class

    return [config_class(name) for name in architectures()]


def add_training_job_arguments(parser: argparse.ArgumentParser, job: type, title: str, *, exclude: tuple[str, ...] = (),
                      sae_options: bool = True) -> None:
    """The options of a training job: its own config's, then the activation config's, its nested
    trainer config's (in their own group) and (``sae_options``) the SAE configs'. Shared by train,
    sweep, suite and jsae."""
    from ..activations import ActivationConfig

    add_dataclass_arguments(parser.add_argument_group(title), job, exclude=(*exclude, "trainer"))
    add_dataclass_arguments(parser.add_argument_group("activations"), ActivationConfig)
    add_nested_arguments(parser.add_argument_group("trainer"), job, "trainer")
    if sae_options:
        add_sae_arguments(parser)


def training_job_from_args(parser: argparse.ArgumentParser, job: type, args: argparse.Namespace, **overrides):
    """The training job's config, its nested trainer config included, from the options. The
    trainer is checked with the job's --tokens as its total_tokens, so a careless trainer option
    is a one-line usage error naming the option before any model loads."""
    tokens = getattr(args, "tokens", next(f.default for f in dataclasses.fields(job) if f.name == "tokens"))
    try:
        return dataclass_from_args(job, args, trainer={"total_tokens": tokens}, **overrides)
    except (ValueError, TypeError) as error:
        message = config_error_message(job, error, options=getattr(parser, "_option_string_actions", None))
        parser.error(message.replace("total_tokens", "--tokens"))


def add_sae_arguments(parser: argparse.ArgumentParser) -> None:
    """``--sae-FIELD`` for every field of any architecture's config not set by the job itself
    (its ``job_fields``)."""
    group = parser.add_argument_group("SAE options (any architecture's config field; see `jumpscope archs NAME`)")
    classes = _sae_config_classes()
    seen = {name for cls in classes for name in cls.job_fields}
    for cls in classes:
        fields = [f.name for f in dataclasses.fields(cls) if f.name not in seen]
        seen.update(fields)
        add_dataclass_arguments(group, cls, prefix=SAE_PREFIX,
                                exclude=[f.name for f in dataclasses.fields(cls) if f.name not in fields])


def sae_fields_from_args(parser: argparse.ArgumentParser, args: argparse.Namespace,
                         archs: str | tuple[str, ...]) -> dict:
    """The ``--sae-FIELD`` values given; each must be a field of at least one of ``archs``."""
    from ..sae import config_class

    archs = (archs,) if isinstance(archs, str) else archs
    own = {f.name for arch in archs for f in dataclasses.fields(config_class(arch))}
    given = {key[len(SAE_PREFIX):].replace("-", "_"): value for key, value in vars(args).items()
             if key.startswith(SAE_PREFIX.replace("-", "_"))}
    foreign = sorted(name for name in given if name not in own)
    if foreign:
        parser.error(f"{', '.join(option_name(n, SAE_PREFIX) for n in foreign)} not a field of "
                     f"{' or '.join(map(repr, archs))} (see `jumpscope archs {archs[0]}`)")
    return given


def activations_from_args(args: argparse.Namespace):
    """The ActivationConfig of a job's options (one-line error on a bad value)."""
    from ..activations import ActivationConfig
    from .dataclass_args import dataclass_from_args_or_exit

    return dataclass_from_args_or_exit(args.parser, ActivationConfig, args)


def print_report(report: str, written: str) -> int:
    """Print a training job's table and where its files went; under torchrun only the first
    process has a report (the others print nothing)."""
    if report:
        print(report)
        print(written)
    return 0
