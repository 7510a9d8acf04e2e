"""``jumpscope jsae``: options generated from the Jacobian SAE job, activation and trainer configs."""

from __future__ import annotations

import argparse

from .common import activations_from_args, add_training_job_arguments, command, print_report, training_job_from_args


def add_jsae_arguments(parser: argparse.ArgumentParser) -> None:
    from ..jobs.jsae import JsaeJobConfig

    add_training_job_arguments(parser, JsaeJobConfig, "Jacobian SAE", sae_options=False)


@command("jsae", "Train a Jacobian SAE pair around one layer's MLP (TopK SAEs on its input and output, "
                 "penalising the Jacobian between their latents) and measure how sparse its computation is.",
         add_jsae_arguments)
def jsae(args: argparse.Namespace) -> int:
    from ..jobs.jsae import JsaeJobConfig, run_jsae

    job = training_job_from_args(args.parser, JsaeJobConfig, args)
    _, table = run_jsae(job, activations_from_args(args))
    return print_report(table, f"the pair's SAEs (input/, output/) and summary written to {job.out}")
