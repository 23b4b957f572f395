"""The ``mconv`` command line: ``mconv demo``, ``mconv version``.

Exit codes: 0 success, 2 usage error.
"""

from __future__ import annotations

import argparse
import sys


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="mconv", description="N-d convolutions on NumPy.")
    commands = parser.add_subparsers(dest="command", required=True)
    demo = commands.add_parser("demo", help="train a small CNN on a synthetic task")
    demo.add_argument("--steps", type=int, default=60, help="training steps (default 60)")
    commands.add_parser("version", help="print the version")
    args = parser.parse_args(argv)
    if args.command == "version":
        from . import __version__

        print(__version__)
        return 0
    if args.steps < 1:
        parser.error(f"--steps must be >= 1, but got --steps={args.steps}")
    from .demo import main as demo_main

    return demo_main(args.steps)


if __name__ == "__main__":
    sys.exit(main())
