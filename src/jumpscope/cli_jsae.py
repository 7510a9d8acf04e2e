"""``jumpscope jsae``: options generated from the Jacobian SAE job, activation and trainer configs."""

from __future__ import annotations

import argparse
import dataclasses

from .cli import command
from .cli_train import TRAINER_JOB_FIELDS
from .config_cli import add_dataclass_arguments, dataclass_from_args_or_exit


def add_jsae_arguments(parser: argparse.ArgumentParser) -> None:
    from .jobs.activations import ActivationConfig
    from .jobs.jsae import JsaeJobConfig
    from .train import TrainerConfig

    add_dataclass_arguments(parser.add_argument_group("Jacobian SAE"), JsaeJobConfig)
    add_dataclass_arguments(parser.add_argument_group("activations"), ActivationConfig)
    add_dataclass_arguments(parser.add_argument_group("trainer"), TrainerConfig, exclude=TRAINER_JOB_FIELDS)


@command("jsae", "Train a Jacobian SAE pair around one layer's MLP (TopK SAEs on its input and output, "
                 "penalising the Jacobian between their latents) and measure how sparse its computation is.",
         add_jsae_arguments)
def jsae(args: argparse.Namespace) -> int:
    from .jobs.activations import ActivationConfig
    from .jobs.jsae import JsaeJobConfig, run_jsae
    from .train import TrainerConfig

    job = dataclass_from_args_or_exit(args.parser, JsaeJobConfig, args)
    activations = dataclass_from_args_or_exit(args.parser, ActivationConfig, args)
    trainer_fields = {f.name: getattr(args, f.name) for f in dataclasses.fields(TrainerConfig)
                      if f.name not in TRAINER_JOB_FIELDS and hasattr(args, f.name)}
    _, table = run_jsae(job, activations, trainer_fields)
    if not table:  # a torchrun process other than the first: nothing to report
        return 0
    print(table)
    print(f"the pair's SAEs (input/, output/) and summary written to {job.out}")
    return 0
