"""``jumpscope convert``: an SAE from one format to another."""

from __future__ import annotations

import argparse
from pathlib import Path

from .common import SAE_SOURCES, add_network_argument, command, existing_sae_path


def add_convert_arguments(parser: argparse.ArgumentParser) -> None:
    from ..formats import FORMATS as FORMAT_NAMES

    parser.add_argument("src", help="the SAE to read (its format is detected unless --from is given): " + SAE_SOURCES)
    parser.add_argument("dst", help="where to write it")
    parser.add_argument("--to", required=True, choices=FORMAT_NAMES, help="the format to write")
    parser.add_argument("--from", dest="from_format", choices=FORMAT_NAMES, help="the format of SRC")
    parser.add_argument("--force", action="store_true", help="overwrite DST if it exists")
    add_network_argument(parser)


@command("convert", "Convert an SAE between the native, Gemma Scope and SAELens formats.", add_convert_arguments)
def convert(args: argparse.Namespace) -> int:
    from .. import formats

    src = existing_sae_path(args.src)
    dst = Path(args.dst)
    if dst.exists() and not args.force and (dst.is_file() or any(dst.iterdir())):
        raise FileExistsError(f"{dst} already exists; pass --force to overwrite it")
    sae = formats.load(src, format=args.from_format, allow_network=args.allow_network)
    written = formats.save(sae, dst, format=args.to)
    print(f"wrote {sae.architecture} SAE (d_in={sae.cfg.d_in}, d_sae={sae.cfg.d_sae}) "
          f"as {args.to} to {written or dst}")
    return 0
