"""``mconv convert`` and ``mconv inspect``: the checkpoint commands, registered with the
``mconv`` command line through the ``mconv.commands`` entry point (mconv itself never
imports layouts).

    mconv convert SRC DST [--from F] [--to F] [--dtype D] [--spec FILE] [--groups NAME=G]
                  [--kind NAME=K]
    mconv inspect FILE [--from F] [--spec-out FILE]   format, layout and a table of tensors
"""

from __future__ import annotations

import argparse
import os
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
    from .adapters import KINDS

    overrides: dict[str, dict] = {}
    for name, value in _pairs(args.groups, "--groups", parser).items():
        if not value.isdigit() or int(value) < 1:
            parser.error(f"--groups needs a positive integer, but got --groups {name}={value}")
        overrides.setdefault(name, {})["groups"] = int(value)
    for name, value in _pairs(args.kind, "--kind", parser).items():
        if value not in KINDS:
            parser.error(f"--kind must be one of {KINDS}, but got {value!r}")
        overrides.setdefault(name, {})["kind"] = value
    return overrides


def _run(command: str, action) -> int:
    try:
        action()
        sys.stdout.flush()
    except BrokenPipeError:  # `mconv inspect FILE | head`: the reader has what it wanted
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())  # the interpreter's final flush must not fail
        return 0
    except (OSError, ValueError, TypeError) as error:
        print(f"mconv {command}: error: {error}", file=sys.stderr)
        return 1
    return 0


def convert_command(commands) -> None:
    """Add ``convert`` to the ``mconv`` subcommands (an ``argparse`` subparsers object)."""
    from .adapters import FRAMEWORKS, KINDS
    from .convert import CAST_DTYPES

    parser = commands.add_parser("convert", help="convert a checkpoint to safetensors or .pkl")
    parser.add_argument("src")
    parser.add_argument("dst", help="output path ending in .safetensors or .pkl")
    parser.add_argument("--from", dest="from_framework", choices=FRAMEWORKS,
                        help="layout of SRC (default: detected)")  # fmt: skip
    parser.add_argument("--to", dest="to_framework", choices=FRAMEWORKS, default="torch",
                        help="layout of DST")  # fmt: skip
    parser.add_argument("--dtype", choices=CAST_DTYPES, help="cast floating tensors")
    parser.add_argument("--groups", action="append", metavar="NAME=G",
                        help="groups of a conv weight")  # fmt: skip
    parser.add_argument("--kind", action="append", metavar="NAME=KIND", help=f"one of {KINDS}")
    parser.add_argument("--progress", action="store_true", help="always show the progress bar")
    parser.add_argument("--spec", metavar="FILE", help="JSON: what each tensor is (kind, groups, "
                        "ndim, role); `mconv inspect SRC --spec-out FILE` writes one to edit")  # fmt: skip

    def run(args) -> int:
        from . import convert as tool

        overrides = _overrides(args, parser)

        def action():
            out = tool.convert(args.src, args.dst, args.from_framework, args.to_framework,
                               args.dtype, overrides, progress=args.progress,
                               spec=args.spec)  # fmt: skip
            print(f"wrote {len(out)} tensors ({args.to_framework} layout) to {args.dst}")

        return _run("convert", action)

    parser.set_defaults(run=run)


def inspect_command(commands) -> None:
    """Add ``inspect`` to the ``mconv`` subcommands."""
    from .adapters import FRAMEWORKS

    parser = commands.add_parser("inspect", help="show a checkpoint's tensors")
    parser.add_argument("file")
    parser.add_argument("--from", dest="from_framework", choices=FRAMEWORKS)
    parser.add_argument("--spec-out", metavar="FILE",
                        help="also write what is known of each tensor as a --spec file to edit")  # fmt: skip

    def run(args) -> int:
        from . import convert as tool

        return _run("inspect", lambda: tool.inspect(args.file, args.from_framework,
                                                    spec_out=args.spec_out))  # fmt: skip

    parser.set_defaults(run=run)
