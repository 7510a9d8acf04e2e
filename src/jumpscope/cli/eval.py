"""``jumpscope eval``: options generated from the eval job and activation configs."""

from __future__ import annotations

import argparse
from pathlib import Path

from .common import command
from .dataclass_args import add_dataclass_arguments, dataclass_from_args_or_exit

# The eval job names the model itself (default: the SAEs' own), so the activation config's is not an option.
ACTIVATION_JOB_FIELDS = ("model", "cache", "shuffle_buffer_tokens", "seed")


def add_eval_arguments(parser: argparse.ArgumentParser) -> None:
    from ..activations import ActivationConfig
    from ..jobs.evaluate import EvalJobConfig

    parser.add_argument("saes", nargs="+", metavar="SAE", help="SAE folders or files (native, SAELens, sparsify, "
                        "Gemma Scope), or hf://owner/name/path (--allow-network to download)")
    add_dataclass_arguments(parser.add_argument_group("evaluation"), EvalJobConfig, exclude=("saes",))
    add_dataclass_arguments(parser.add_argument_group("text and model"), ActivationConfig,
                            exclude=ACTIVATION_JOB_FIELDS)


@command("eval", "Evaluate SAEs on held-out text: L0, FVU, dead latents, and the model's loss with each "
                 "spliced in (delta LM loss, KL, CE loss recovered).", add_eval_arguments)
def evaluate(args: argparse.Namespace) -> int:
    from ..activations import ActivationConfig
    from ..jobs.evaluate import EvalJobConfig, run_eval

    job = dataclass_from_args_or_exit(args.parser, EvalJobConfig, args, saes=tuple(args.saes))
    activations = dataclass_from_args_or_exit(args.parser, ActivationConfig, args)
    _, table = run_eval(job, activations)
    print(table)
    print(f"results written to {job.out} and {Path(job.out).with_suffix('.md')}")
    return 0
