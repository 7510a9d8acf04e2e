"""``jumpscope train``: options generated from the job, activation, trainer and SAE configs."""

from __future__ import annotations

import argparse

from .common import add_training_job_arguments, command, sae_fields_from_args, training_job_from_args
from .dataclass_args import dataclass_from_args_or_exit


def add_train_arguments(parser: argparse.ArgumentParser) -> None:
    from ..jobs.train import TrainJobConfig

    parser.add_argument("--site", action="append", default=None, metavar="SITE",
                        help="a hook site such as layers.3.resid_post (repeatable; one SAE each; default: the "
                             "middle layer's resid_post)")
    add_training_job_arguments(parser, TrainJobConfig, "job", exclude=("site",))


@command("train", "Train SAEs on a model's activations (default: JumpReLU on MiniLM, built-in corpus).",
         add_train_arguments)
def train(args: argparse.Namespace) -> int:
    from ..activations import ActivationConfig
    from ..jobs.train import TrainJobConfig, run_train

    parser = args.parser
    job = training_job_from_args(parser, TrainJobConfig, args, site=tuple(args.site or ()))
    activations = dataclass_from_args_or_exit(parser, ActivationConfig, args)
    _, summary = run_train(job, activations, sae_fields_from_args(parser, args, job.arch))
    if not summary:  # a torchrun process other than the first: nothing to report
        return 0
    print(summary)
    print(f"SAEs, log and summary written to {job.out}")
    return 0
