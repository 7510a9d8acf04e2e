"""``python -m jumpscope``: the command line (see :mod:`jumpscope.cli`)."""

from .cli import main

raise SystemExit(main())
