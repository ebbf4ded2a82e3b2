"""Command-line interface: parse arguments and call library functions, nothing else.

Each subcommand has an `_add_<name>(subparsers)` that declares its arguments and sets `func`.
"""

from __future__ import annotations

import argparse
import sys


def main(argv: list[str] | None = None) -> None:
    """Entry point of the `trajformer` command."""
    parser = argparse.ArgumentParser(prog="trajformer", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    for add in _COMMANDS:
        add(sub)
    args = parser.parse_args(argv)
    try:
        args.func(args)
    except (ValueError, FileNotFoundError, FileExistsError, KeyError) as err:
        # Library errors are one-line messages that name the problem and the fix.
        print(f"trajformer {args.command}: error: {err}", file=sys.stderr)
        sys.exit(2)


_COMMANDS: list = []
