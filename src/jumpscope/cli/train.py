"""``jumpscope train``: options generated from the job, activation, trainer and SAE configs."""

from __future__ import annotations

import argparse

from .common import (activations_from_args, add_training_job_arguments, command, print_report, sae_fields_from_args,
                     training_job_from_args)


def add_train_arguments(parser: argparse.ArgumentParser) -> None:
    from ..jobs.train import TrainJobConfig

    parser.add_argument("--site", action="append", default=None, metavar="SITE",
                        help="a hook site such as layers.3.resid_post (repeatable; one SAE each; default: the "
                             "middle layer's resid_post)")
    add_training_job_arguments(parser, TrainJobConfig, "job", exclude=("site",))


@command("train", "Train SAEs on a model's activations (default: JumpReLU on MiniLM, built-in corpus).",
         add_train_arguments)
def train(args: argparse.Namespace) -> int:
    from ..jobs.train import TrainJobConfig, run_train

    job = training_job_from_args(args.parser, TrainJobConfig, args, site=tuple(args.site or ()))
    _, summary = run_train(job, activations_from_args(args), sae_fields_from_args(args.parser, args, job.arch))
    return print_report(summary, f"SAEs, log and summary written to {job.out}")
