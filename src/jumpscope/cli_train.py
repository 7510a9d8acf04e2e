"""``jumpscope train``: options generated from the job, activation, trainer and SAE configs."""

from __future__ import annotations

import argparse
import dataclasses

from .cli import command
from .config_cli import add_dataclass_arguments, config_error_message, dataclass_from_args_or_exit, option_name

SAE_PREFIX = "sae-"
# Set by the job from the data and the generic options; not options of their own.
SAE_JOB_FIELDS = ("d_in", "d_sae", "d_out", "site", "target_site", "skip_connection", "model", "target_l0",
                  "l0_coefficient", "l1_coefficient", "k")
TRAINER_JOB_FIELDS = ("total_tokens", "out_dir", "device")


def _sae_config_classes() -> list[type]:
    from .sae import architectures, config_class

    return [config_class(name) for name in architectures()]


def add_job_arguments(parser: argparse.ArgumentParser, job: type, title: str, *, exclude: tuple[str, ...] = (),
                      sae_options: bool = True) -> None:
    """The options of a training job: its own config's, then the activation, trainer and
    (``sae_options``) SAE configs'. Shared by train, sweep, suite and jsae."""
    from .jobs.activations import ActivationConfig
    from .train import TrainerConfig

    add_dataclass_arguments(parser.add_argument_group(title), job, exclude=exclude)
    add_dataclass_arguments(parser.add_argument_group("activations"), ActivationConfig)
    add_dataclass_arguments(parser.add_argument_group("trainer"), TrainerConfig, exclude=TRAINER_JOB_FIELDS)
    if sae_options:
        add_sae_arguments(parser)


def trainer_fields_from_args(args: argparse.Namespace, tokens: int | None = None) -> dict:
    """The trainer options given on the command line (those the job does not set itself). With
    the job's ``tokens`` they are checked at once (a TrainerConfig is built), so a careless one is
    a one-line usage error naming the option before any model loads."""
    from .train import TrainerConfig

    fields = {f.name: getattr(args, f.name) for f in dataclasses.fields(TrainerConfig)
              if f.name not in TRAINER_JOB_FIELDS and hasattr(args, f.name)}
    if tokens is not None:
        try:
            TrainerConfig(**fields, total_tokens=tokens)
        except (ValueError, TypeError) as error:
            message = config_error_message(TrainerConfig, error, options=getattr(args.parser, "_option_string_actions",
                                                                                 None))
            args.parser.error(message.replace("total_tokens", "--tokens"))
    return fields


def add_train_arguments(parser: argparse.ArgumentParser) -> None:
    from .jobs.train import TrainJobConfig

    parser.add_argument("--site", action="append", default=None, metavar="SITE",
                        help="a hook site such as layers.3.resid_post (repeatable; one SAE each; default: the "
                             "middle layer's resid_post)")
    add_job_arguments(parser, TrainJobConfig, "job", exclude=("site",))


def add_sae_arguments(parser: argparse.ArgumentParser) -> None:
    """``--sae-FIELD`` for every field of any architecture's config not set by the job itself."""
    group = parser.add_argument_group("SAE options (any architecture's config field; see `jumpscope archs NAME`)")
    seen = set(SAE_JOB_FIELDS)
    for cls in _sae_config_classes():
        fields = [f.name for f in dataclasses.fields(cls) if f.name not in seen]
        seen.update(fields)
        add_dataclass_arguments(group, cls, prefix=SAE_PREFIX,
                                exclude=[f.name for f in dataclasses.fields(cls) if f.name not in fields])


def sae_fields_from_args(parser: argparse.ArgumentParser, args: argparse.Namespace,
                         archs: str | tuple[str, ...]) -> dict:
    """The ``--sae-FIELD`` values given; each must be a field of at least one of ``archs``."""
    from .sae import config_class

    archs = (archs,) if isinstance(archs, str) else archs
    own = {f.name for arch in archs for f in dataclasses.fields(config_class(arch))}
    given = {key[len(SAE_PREFIX):].replace("-", "_"): value for key, value in vars(args).items()
             if key.startswith(SAE_PREFIX.replace("-", "_"))}
    foreign = sorted(name for name in given if name not in own)
    if foreign:
        parser.error(f"{', '.join(option_name(n, SAE_PREFIX) for n in foreign)} not a field of "
                     f"{' or '.join(map(repr, archs))} (see `jumpscope archs {archs[0]}`)")
    return given


@command("train", "Train SAEs on a model's activations (default: JumpReLU on MiniLM, built-in corpus).",
         add_train_arguments)
def train(args: argparse.Namespace) -> int:
    from .jobs.activations import ActivationConfig
    from .jobs.train import TrainJobConfig, run_train

    parser = args.parser
    job = dataclass_from_args_or_exit(parser, TrainJobConfig, args, site=tuple(args.site or ()))
    activations = dataclass_from_args_or_exit(parser, ActivationConfig, args)
    trainer_fields = trainer_fields_from_args(args, job.tokens)
    _, summary = run_train(job, activations, trainer_fields, sae_fields_from_args(parser, args, job.arch))
    if not summary:  # a torchrun process other than the first: nothing to report
        return 0
    print(summary)
    print(f"SAEs, log and summary written to {job.out}")
    return 0
