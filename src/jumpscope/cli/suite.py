"""``jumpscope suite``: options generated from the suite, activation, trainer and SAE configs."""

from __future__ import annotations

import argparse

from .common import (activations_from_args, add_training_job_arguments, command, print_report, sae_fields_from_args,
                     training_job_from_args)


def add_suite_arguments(parser: argparse.ArgumentParser) -> None:
    from ..jobs.suite import SuiteConfig

    add_training_job_arguments(parser, SuiteConfig, "suite")


@command("suite", "Train a Gemma-Scope-style suite: an SAE for every layer and site at several sparsities, "
                  "from one forward pass per batch, in the public release layout with an index.",
         add_suite_arguments)
def suite(args: argparse.Namespace) -> int:
    from ..jobs.suite import SuiteConfig, run_suite

    config = training_job_from_args(args.parser, SuiteConfig, args)
    _, table = run_suite(config, activations_from_args(args), sae_fields_from_args(args.parser, args, config.arch))
    return print_report(table, f"suite written to {config.out} (index.json, index.md)")
