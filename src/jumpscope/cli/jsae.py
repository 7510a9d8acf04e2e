"""``jumpscope jsae``: options generated from the Jacobian SAE job, activation and trainer configs."""

from __future__ import annotations

import argparse

from .common import add_training_job_arguments, command, training_job_from_args
from .dataclass_args import dataclass_from_args_or_exit


def add_jsae_arguments(parser: argparse.ArgumentParser) -> None:
    from ..jobs.jsae import JsaeJobConfig

    add_training_job_arguments(parser, JsaeJobConfig, "Jacobian SAE", sae_options=False)


@command("jsae", "Train a Jacobian SAE pair around one layer's MLP (TopK SAEs on its input and output, "
                 "penalising the Jacobian between their latents) and measure how sparse its computation is.",
         add_jsae_arguments)
def jsae(args: argparse.Namespace) -> int:
    from ..activations import ActivationConfig
    from ..jobs.jsae import JsaeJobConfig, run_jsae

    job = training_job_from_args(args.parser, JsaeJobConfig, args)
    activations = dataclass_from_args_or_exit(args.parser, ActivationConfig, args)
    _, table = run_jsae(job, activations)
    if not table:  # a torchrun process other than the first: nothing to report
        return 0
    print(table)
    print(f"the pair's SAEs (input/, output/) and summary written to {job.out}")
    return 0
