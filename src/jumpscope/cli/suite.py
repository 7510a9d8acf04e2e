"""``jumpscope suite``: options generated from the suite, activation, trainer and SAE configs."""

from __future__ import annotations

import argparse

from .common import add_training_job_arguments, command, sae_fields_from_args, training_job_from_args
from .dataclass_args import dataclass_from_args_or_exit


def add_suite_arguments(parser: argparse.ArgumentParser) -> None:
    from ..jobs.suite import SuiteConfig

    add_training_job_arguments(parser, SuiteConfig, "suite")


@command("suite", "Train a Gemma-Scope-style suite: an SAE for every layer and site at several sparsities, "
                  "from one forward pass per batch, in the public release layout with an index.",
         add_suite_arguments)
def suite(args: argparse.Namespace) -> int:
    from ..activations import ActivationConfig
    from ..jobs.suite import SuiteConfig, run_suite
    config = training_job_from_args(args.parser, SuiteConfig, args)
    activations = dataclass_from_args_or_exit(args.parser, ActivationConfig, args)
    _, table = run_suite(config, activations, sae_fields_from_args(args.parser, args, config.arch))
    if not table:  # a torchrun process other than the first: nothing to report
        return 0
    print(table)
    print(f"suite written to {config.out} (index.json, index.md)")
    return 0
