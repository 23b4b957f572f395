"""The ``mconv`` command line.

    mconv demo [--steps N] [--device D]         train a small CNN on a synthetic task
    mconv version
    mconv convert ... / mconv inspect ...       checkpoint commands, from ``layouts``

Other packages add commands through the ``mconv.commands`` entry point group: each entry is
a callable that adds a subparser to the given subparsers object and sets its ``run``
default (``run(args) -> exit code``). ``layouts`` registers ``convert`` and ``inspect``
there (``layouts/cli.py``), so mconv never imports it.

Exit codes: 0 success, 1 a file could not be read or written, 2 usage error.
"""

from __future__ import annotations

import argparse
import sys
from importlib.metadata import entry_points

COMMANDS = "mconv.commands"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="mconv", description="N-d convolutions on NumPy.")
    commands = parser.add_subparsers(dest="command", required=True)
    demo = commands.add_parser("demo", help="train a small CNN on a synthetic task")
    demo.add_argument("--steps", type=int, default=60, help="training steps (default 60)")
    demo.add_argument("--device", default="cpu", help="'cpu' (default), 'cuda' or 'cuda:<i>'")
    commands.add_parser("version", help="print the version")
    for entry in sorted(entry_points(group=COMMANDS), key=lambda e: e.name):
        entry.load()(commands)
    args = parser.parse_args(argv)

    if args.command == "version":
        from . import __version__

        print(__version__)
        return 0
    if args.command == "demo":
        if args.steps < 1:
            parser.error(f"--steps must be >= 1, but got --steps={args.steps}")
        from .demo import main as demo_main
        from .nn.module import check_device

        try:
            device = check_device(args.device)
        except ValueError as error:
            parser.error(str(error))
        return demo_main(args.steps, device)
    return args.run(args)


if __name__ == "__main__":
    sys.exit(main())
