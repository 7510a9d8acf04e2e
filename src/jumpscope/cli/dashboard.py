"""``jumpscope dashboard``: options generated from the dashboard job, example and activation configs."""

from __future__ import annotations

import argparse

from .common import ACTIVATION_JOB_FIELDS, command
from .dataclass_args import add_dataclass_arguments, dataclass_from_args_or_exit


def add_dashboard_arguments(parser: argparse.ArgumentParser) -> None:
    from ..analysis.examples import ExamplesConfig
    from ..activations import ActivationConfig
    from ..jobs.dashboard import DashboardJobConfig

    parser.add_argument("sae", metavar="SAE", help="an SAE folder or file (native, SAELens, sparsify, Gemma Scope), "
                        "or hf://owner/name/path (--allow-network to download)")
    add_dataclass_arguments(parser.add_argument_group("dashboard"), DashboardJobConfig, exclude=("sae",))
    add_dataclass_arguments(parser.add_argument_group("examples"), ExamplesConfig)
    add_dataclass_arguments(parser.add_argument_group("text and model"), ActivationConfig,
                            exclude=(*ACTIVATION_JOB_FIELDS, "eval_every", "outlier_norm_factor"))  # every window


@command("dashboard", "Find every latent's top-activating examples over a corpus and write a static site "
                      "(index with search, one page per latent, histograms, logit lens) that opens from file://.",
         add_dashboard_arguments)
def dashboard(args: argparse.Namespace) -> int:
    from ..analysis.examples import ExamplesConfig
    from ..activations import ActivationConfig
    from ..jobs.dashboard import DashboardJobConfig, run_dashboard
    from ..sae.metrics import dead_label

    job = dataclass_from_args_or_exit(args.parser, DashboardJobConfig, args, sae=args.sae)
    examples = dataclass_from_args_or_exit(args.parser, ExamplesConfig, args)
    activations = dataclass_from_args_or_exit(args.parser, ActivationConfig, args)
    # without --corpus the job scans the SAE's own training corpus
    summary = run_dashboard(job, activations, examples, corpus_given=hasattr(args, "corpus"))
    print(f"{summary['d_sae']:,} latents: {summary['dead']:.1%} {dead_label(summary['n_tokens'])}, "
          f"{summary['dense_above_0.1']:.1%} dense (> 10% of tokens); "
          f"{summary['seconds']['total']:.0f} s")
    print(f"open {summary['index']} in a browser (file://, no server needed; or: jumpscope serve {job.out})")
    return 0
