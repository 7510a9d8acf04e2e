"""``jumpscope autointerp``: options generated from the autointerp job (its nested scoring config
in its own group) and the activation config."""

from __future__ import annotations

import argparse

from .common import ACTIVATION_JOB_FIELDS, command
from .dataclass_args import add_dataclass_arguments, add_nested_arguments, dataclass_from_args_or_exit


def add_autointerp_arguments(parser: argparse.ArgumentParser) -> None:
    from ..activations import ActivationConfig
    from ..jobs.autointerp import AutointerpJobConfig

    parser.add_argument("sae", metavar="SAE", help="an SAE folder or file (native, SAELens, sparsify, Gemma Scope)")
    add_dataclass_arguments(parser.add_argument_group("autointerp"), AutointerpJobConfig,
                            exclude=("sae", "autointerp"))
    add_nested_arguments(parser.add_argument_group("explaining and scoring"), AutointerpJobConfig, "autointerp")
    add_dataclass_arguments(parser.add_argument_group("text and model (when scanning)"), ActivationConfig,
                            exclude=(*ACTIVATION_JOB_FIELDS, "eval_every", "outlier_norm_factor"))


@command("autointerp", "Explain every latent with an LLM (a local chat model, or any OpenAI-compatible server) "
                       "and score the explanations on held-out examples (detection, fuzzing, simulation), "
                       "beside random-direction controls.", add_autointerp_arguments)
def autointerp(args: argparse.Namespace) -> int:
    from ..activations import ActivationConfig
    from ..jobs.autointerp import AutointerpJobConfig, run_autointerp

    job = dataclass_from_args_or_exit(args.parser, AutointerpJobConfig, args, sae=args.sae)
    activations = dataclass_from_args_or_exit(args.parser, ActivationConfig, args)
    summary = run_autointerp(job, activations, corpus_given=hasattr(args, "corpus"))
    if job.dry_run:
        return 0
    for kind, entry in summary["scores"].items():
        scores = ", ".join(f"{name} {entry[name]['mean']:.3f}" for name in ("detection", "fuzzing", "simulation")
                           if entry[name]["mean"] is not None)
        print(f"{'SAE latents' if kind == 'sae' else 'random-direction controls'}: {entry['explained']} of "
              f"{entry['latents']} explained; {scores or 'no scores'}")
    print(f"explanations and scores in {job.out} (summary.md, explanations.csv, neuronpedia/)"
          + (f"; dashboard updated: {summary['dashboard']}" if summary["dashboard"] else ""))
    return 0
