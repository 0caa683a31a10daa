"""The ``daar-ops`` console command.

Each module in :mod:`daar_ops.commands` adds one subcommand through ``register(subparsers)``, which
sets ``func`` (taking the parsed namespace, returning an exit code) as the parser default.
"""

from __future__ import annotations

import argparse
import importlib
import os
import pkgutil
import sys

import daar_ops
import daar_ops.commands


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="daar-ops",
        description="Diversity-aware SFT data selection for Data-Juicer: DaaR, QDIT, DS2.",
    )
    parser.add_argument("--version", action="version", version=f"daar-ops {daar_ops.__version__}")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    for info in sorted(pkgutil.iter_modules(daar_ops.commands.__path__), key=lambda m: m.name):
        if not info.name.startswith("_"):
            importlib.import_module(f"daar_ops.commands.{info.name}").register(subparsers)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    try:
        return int(args.func(args) or 0)
    except (ValueError, OSError) as err:
        # A user error (bad argument, file, artifact, a full or read-only disk): one line, no
        # traceback, exit code 2. DAAR_OPS_DEBUG=1 shows the traceback.
        if os.environ.get("DAAR_OPS_DEBUG"):
            raise
        print(f"daar-ops {args.command}: error: {error_message(err)}", file=sys.stderr)
        return 2


def error_message(err: BaseException) -> str:
    """One line for a user error; an OS error names its file and what the system said."""
    if isinstance(err, OSError) and err.strerror and not isinstance(err, FileNotFoundError):
        where = f" {err.filename}" if err.filename else ""
        hint = {28: " (the disk is full)", 30: " (a read-only file system)",
                13: " (permission denied)"}.get(err.errno or 0, "")
        return f"cannot write or read{where}: {err.strerror}{hint}"
    text = str(err)
    if isinstance(err, FileNotFoundError) and err.filename and err.strerror:
        text = f"{err.filename} does not exist"
    return text


if __name__ == "__main__":
    sys.exit(main())
