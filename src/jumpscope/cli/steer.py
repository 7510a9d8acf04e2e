"""``jumpscope steer``: options generated from the steering job config."""

from __future__ import annotations

import argparse

from .common import SAE_SOURCES, command
from .dataclass_args import add_dataclass_arguments, dataclass_from_args_or_exit, field_docs

# Options that may be repeated (--steer 12:8 --steer 3:-2) as well as given several values at once.
REPEATABLE = {"prompt": "TEXT", "steer": "LATENT:ALPHA", "clamp": "LATENT:VALUE", "ablate": "LATENT[,LATENT]"}


def add_steer_arguments(parser: argparse.ArgumentParser) -> None:
    from ..jobs.steer import SteerJobConfig

    docs = field_docs(SteerJobConfig)
    parser.add_argument("sae", metavar="SAE", help=SAE_SOURCES)
    group = parser.add_argument_group("prompts and interventions")
    for name, metavar in REPEATABLE.items():
        group.add_argument(f"--{name}", dest=name, action="extend", nargs="+", metavar=metavar,
                           default=argparse.SUPPRESS, help=docs[name] + " May be repeated.")
    add_dataclass_arguments(parser.add_argument_group("model and generation"), SteerJobConfig,
                            exclude=("sae", *REPEATABLE))


@command("steer", "Generate from prompts with and without steering, clamping or ablating SAE latents, and "
                  "print the two continuations side by side.", add_steer_arguments)
def steer(args: argparse.Namespace) -> int:
    from ..jobs.steer import SteerJobConfig, run_steer

    job = dataclass_from_args_or_exit(args.parser, SteerJobConfig, args)
    print(run_steer(job))
    return 0
