"""``jumpscope steer``: options generated from the steering job config."""

from __future__ import annotations

import argparse
import json

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
    output = parser.add_argument_group("output")
    output.add_argument("--json", action="store_true",
                        help="print one JSON object (every generation and measure) instead of the report")
    output.add_argument("--out", metavar="FILE", help="also write the JSON object to this file")


@command("steer", "Generate from prompts with and without steering, clamping or ablating SAE latents, print "
                  "the continuations side by side, and measure the concept rate and fluency cost of each "
                  "(optionally beside a random-direction control).", add_steer_arguments)
def steer(args: argparse.Namespace) -> int:
    from ..jobs.steer import SteerJobConfig, steer_results
    from ..jobs.steer_measures import format_steer
    from ..safeio import write_text

    job = dataclass_from_args_or_exit(args.parser, SteerJobConfig, args)
    results = steer_results(job)
    text = json.dumps({k: v for k, v in results.items() if k != "header"}, indent=2)
    if args.out:
        write_text(args.out, text + "\n")
    print(text if args.json else format_steer(results, job.width))
    return 0
