"""``jumpscope sweep``: options generated from the sweep, activation, trainer and SAE configs."""

from __future__ import annotations

import argparse

from .common import (activations_from_args, add_training_job_arguments, command, print_report, sae_fields_from_args,
                     training_job_from_args)


def add_sweep_arguments(parser: argparse.ArgumentParser) -> None:
    from ..jobs.sweep import SweepConfig

    add_training_job_arguments(parser, SweepConfig, "sweep")


@command("sweep", "Train several sparsity levels of several architectures on one activation stream, evaluate "
                  "each with the model in the loop, and write plots and a report.", add_sweep_arguments)
def sweep(args: argparse.Namespace) -> int:
    from ..jobs.sweep import SweepConfig, run_sweep

    config = training_job_from_args(args.parser, SweepConfig, args)
    _, report = run_sweep(config, activations_from_args(args), sae_fields_from_args(args.parser, args, config.archs))
    return print_report(report, f"SAEs, sweep.json, plots and report.md written to {config.out}")
