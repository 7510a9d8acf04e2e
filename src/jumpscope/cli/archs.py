"""``jumpscope archs``: the registered SAE architectures, their config fields and presets."""

from __future__ import annotations

import argparse
import textwrap

from .common import command
from .dataclass_args import field_table


def add_archs_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("name", nargs="?", help="an architecture: show its config fields and presets")


def _summary(cls: type) -> str:
    text = " ".join((cls.__doc__ or "").split())
    return text.split(". ")[0].rstrip(".") + "." if text else ""


@command("archs", "List the SAE architectures, or show one's config fields and presets.", add_archs_arguments)
def archs(args: argparse.Namespace) -> int:
    from ..sae import architectures, config_class

    if args.name is None:
        names = architectures()
        width = max(map(len, names), default=0)
        for name in names:
            print(f"{name:<{width}}  {_summary(config_class(name))}")
        return 0
    cls = config_class(args.name)
    print(f"{args.name} ({cls.__name__})")
    print(textwrap.fill(" ".join((cls.__doc__ or "").split()), 88))
    print("\nconfig fields:")
    for name, type_, default, doc in field_table(cls):
        print(f"  {name}: {type_} = {default}")
        print(textwrap.fill(doc or "(undocumented)", 88, initial_indent=" " * 6, subsequent_indent=" " * 6))
    presets = getattr(cls, "presets", {}) or {}
    if presets:
        print(f"\npresets ({cls.__name__}.preset(name, **overrides)):")
        for preset, values in presets.items():
            settings = ", ".join(f"{key}={value!r}" for key, value in values.items())
            print(textwrap.fill(f"{preset}: {settings}", 88, initial_indent="  ", subsequent_indent=" " * 6))
    return 0
