"""``jumpscope sweep``: options generated from the sweep, activation, trainer and SAE configs."""

from __future__ import annotations

import argparse

from .common import add_training_job_arguments, command, sae_fields_from_args, training_job_from_args
from .dataclass_args import dataclass_from_args_or_exit


def add_sweep_arguments(parser: argparse.ArgumentParser) -> None:
    from ..jobs.sweep import SweepConfig

    add_training_job_arguments(parser, SweepConfig, "sweep")


@command("sweep", "Train several sparsity levels of several architectures on one activation stream, evaluate "
                  "each with the model in the loop, and write plots and a report.", add_sweep_arguments)
def sweep(args: argparse.Namespace) -> int:
    from ..activations import ActivationConfig
    from ..jobs.sweep import SweepConfig, run_sweep

    config = training_job_from_args(args.parser, SweepConfig, args)
    activations = dataclass_from_args_or_exit(args.parser, ActivationConfig, args)
    sae_fields = sae_fields_from_args(args.parser, args, config.archs)
    _, report = run_sweep(config, activations, sae_fields)
    if not report:  # a torchrun process other than the first: nothing to report
        return 0
    print(report)
    print(f"SAEs, sweep.json, plots and report.md written to {config.out}")
    return 0
