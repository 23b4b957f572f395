"""The ``mconv`` command line.

    mconv demo [--steps N] [--device D]         train a small CNN on a synthetic task
    mconv convert SRC DST [--from F] [--to F] [--dtype D] [--groups NAME=G] [--kind NAME=K]
    mconv inspect FILE [--from F]               format, layout and a table of tensors
    mconv version

Exit codes: 0 success, 1 a file could not be read or written, 2 usage error.
"""

from __future__ import annotations

import argparse
import sys


def _pairs(values: list[str], option: str, parser: argparse.ArgumentParser) -> dict[str, str]:
    out = {}
    for item in values or []:
        name, sep, value = item.rpartition("=")
        if not sep or not name or not value:
            parser.error(f"{option} takes NAME=VALUE, but got {option} {item!r}")
        out[name] = value
    return out


def _overrides(args, parser) -> dict[str, dict]:
    overrides: dict[str, dict] = {}
    for name, value in _pairs(args.groups, "--groups", parser).items():
        if not value.isdigit() or int(value) < 1:
            parser.error(f"--groups needs a positive integer, but got --groups {name}={value}")
        overrides.setdefault(name, {})["groups"] = int(value)
    for name, value in _pairs(args.kind, "--kind", parser).items():
        overrides.setdefault(name, {})["kind"] = value
    return overrides


def main(argv: list[str] | None = None) -> int:
    from layouts.adapters import FRAMEWORKS, KINDS
    from layouts.convert import CAST_DTYPES

    parser = argparse.ArgumentParser(prog="mconv", description="N-d convolutions on NumPy.")
    commands = parser.add_subparsers(dest="command", required=True)
    demo = commands.add_parser("demo", help="train a small CNN on a synthetic task")
    demo.add_argument("--steps", type=int, default=60, help="training steps (default 60)")
    demo.add_argument("--device", default="cpu", help="'cpu' (default), 'cuda' or 'cuda:<i>'")
    convert = commands.add_parser("convert", help="convert a checkpoint to safetensors or .pkl")
    convert.add_argument("src")
    convert.add_argument("dst", help="output path ending in .safetensors or .pkl")
    convert.add_argument(
        "--from",
        dest="from_framework",
        choices=FRAMEWORKS,
        help="layout of SRC (default: detected)",
    )
    convert.add_argument(
        "--to", dest="to_framework", choices=FRAMEWORKS, default="torch", help="layout of DST"
    )
    convert.add_argument("--dtype", choices=CAST_DTYPES, help="cast floating tensors")
    convert.add_argument(
        "--groups", action="append", metavar="NAME=G", help="groups of a conv weight"
    )
    convert.add_argument("--kind", action="append", metavar="NAME=KIND", help=f"one of {KINDS}")
    convert.add_argument("--progress", action="store_true", help="always show the progress bar")
    inspect = commands.add_parser("inspect", help="show a checkpoint's tensors")
    inspect.add_argument("file")
    inspect.add_argument("--from", dest="from_framework", choices=FRAMEWORKS)
    commands.add_parser("version", help="print the version")
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
    overrides = _overrides(args, parser) if args.command == "convert" else {}
    for fields in overrides.values():
        if fields.get("kind", "conv") not in KINDS:
            parser.error(f"--kind must be one of {KINDS}, but got {fields['kind']!r}")
    from layouts import convert as tool

    try:
        if args.command == "inspect":
            tool.inspect(args.file, args.from_framework)
        else:
            out = tool.convert(args.src, args.dst, args.from_framework, args.to_framework, args.dtype,
                               overrides, progress=args.progress)  # fmt: skip
            print(f"wrote {len(out)} tensors ({args.to_framework} layout) to {args.dst}")
    except (OSError, ValueError, TypeError) as error:
        print(f"mconv {args.command}: error: {error}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
