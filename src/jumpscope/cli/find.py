"""``jumpscope find``: concept search; options generated from the find job's config."""

from __future__ import annotations

import argparse
import json

from .common import SAE_SOURCES, add_network_argument, command, existing_sae_path
from .dataclass_args import add_dataclass_arguments, dataclass_from_args_or_exit, field_docs

# Given by hand: positive/negative are repeatable (action="append"), allow_network is the shared option.
HAND_MADE = ("sae", "positive", "negative", "allow_network")


def add_find_arguments(parser: argparse.ArgumentParser) -> None:
    from ..jobs.find import FindJobConfig

    docs = field_docs(FindJobConfig)
    parser.add_argument("sae", metavar="SAE", help=SAE_SOURCES)
    group = parser.add_argument_group("texts")
    for side in ("positive", "negative"):
        group.add_argument(f"--{side}", action="append", required=True, metavar="FILE_OR_TEXT",
                           help=docs[side])
    add_dataclass_arguments(parser.add_argument_group("search"), FindJobConfig, exclude=HAND_MADE)
    output = parser.add_argument_group("output")
    output.add_argument("--json", action="store_true", help="print one JSON object instead of the table")
    output.add_argument("--out", metavar="FILE", help="also write the JSON object to this file")
    add_network_argument(parser)


@command("find", "Concept search: rank an SAE's latents by how well they separate positive from negative "
                 "texts (AUROC of each text's max activation), with the tokens where they fire.", add_find_arguments)
def find(args: argparse.Namespace) -> int:
    from ..jobs.find import FindJobConfig, run_find
    from ..safeio import write_text

    job = dataclass_from_args_or_exit(args.parser, FindJobConfig, args, sae=str(existing_sae_path(args.sae)),
                                      positive=tuple(args.positive), negative=tuple(args.negative),
                                      allow_network=args.allow_network)
    result = run_find(job)
    text = json.dumps(result.to_dict(), indent=2)
    if args.out:
        write_text(args.out, text + "\n")
    print(text if args.json else result.table())
    return 0
