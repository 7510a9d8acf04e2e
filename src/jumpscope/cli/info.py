"""``jumpscope info``: an SAE's architecture, sizes, model, site and metadata."""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from .common import SAE_SOURCES, add_network_argument, command, existing_sae_path


def add_info_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("path", help=SAE_SOURCES)
    parser.add_argument("--json", action="store_true", help="print one JSON object instead")
    add_network_argument(parser)



@command("info", "Print an SAE's architecture, sizes, model, site and metadata.", add_info_arguments)
def info(args: argparse.Namespace) -> int:
    from .. import formats
    from ..formats import native

    path = existing_sae_path(args.path)
    fmt = formats.detect_format(path, allow_network=args.allow_network)
    sae = formats.load(path, format=fmt, allow_network=args.allow_network)
    cfg = sae.cfg
    report: dict[str, Any] = {
        "path": str(path), "format": fmt, "architecture": sae.architecture, "d_in": cfg.d_in,
        "d_sae": cfg.d_sae, "d_out": cfg.d_output, "model": cfg.model, "site": cfg.site,
        "parameters": sum(p.numel() for p in sae.parameters()),
        "metadata": native.read_metadata(path) if fmt == "native" and isinstance(path, Path) else
        getattr(sae, "source", None) or {},
    }
    if args.json:
        print(json.dumps(report, indent=2, default=str))
        return 0
    for key, value in report.items():
        if key != "metadata":
            print(f"{key + ':':<14}{'-' if value is None else value}")
    print("metadata:" + ("" if report["metadata"] else "     -"))
    for key, value in report["metadata"].items():
        print(f"  {key}: {value if isinstance(value, str) else json.dumps(value, default=str)}")
    return 0
