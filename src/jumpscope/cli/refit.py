"""``jumpscope refit``: options generated from the refit job and activation configs."""

from __future__ import annotations

import argparse
from pathlib import Path

from .common import command
from .dataclass_args import add_dataclass_arguments, dataclass_from_args_or_exit


def add_refit_arguments(parser: argparse.ArgumentParser) -> None:
    from ..activations import ActivationConfig
    from ..jobs.refit import RefitJobConfig

    parser.add_argument("saes", nargs="+", metavar="SAE", help="SAE folders or files (native, SAELens, sparsify, "
                        "Gemma Scope), or hf://owner/name/path (--allow-network to download)")
    add_dataclass_arguments(parser.add_argument_group("refit"), RefitJobConfig, exclude=("saes",))
    add_dataclass_arguments(parser.add_argument_group("text and model"), ActivationConfig,
                            exclude=("model",))  # the SAEs name it; shuffling and the cache apply


@command("refit", "Refit trained SAEs' decoders by least squares on their model's training rows (any format "
                  "jumpscope loads), write them as native folders and evaluate both versions on held-out text.",
         add_refit_arguments)
def refit(args: argparse.Namespace) -> int:
    from ..activations import ActivationConfig
    from ..jobs.refit import RefitJobConfig, run_refit

    job = dataclass_from_args_or_exit(args.parser, RefitJobConfig, args, saes=tuple(args.saes))
    activations = dataclass_from_args_or_exit(args.parser, ActivationConfig, args)
    result = run_refit(job, activations)
    for name, note in result["refit"].items():
        print(f"{name}: FVU on {int(note['refit_rows']):,} training rows {note['refit_fvu_before']:.4f} -> "
              f"{note['refit_fvu_after']:.4f}; written to {Path(job.out) / name}")
    table = Path(job.out) / "refit.md"
    if result["results"]:
        print(table.read_text())
    print(f"results written to {Path(job.out) / 'refit.json'}")
    return 0
