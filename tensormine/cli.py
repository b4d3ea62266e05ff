"""The `tensormine` command: one entry point, one subcommand per component.

    tensormine --help
    tensormine keys new alice
    tensormine chain status --config configs/demo.yaml --set chain.tempo=10

Each component package that has commands exposes ``register(subparsers)`` in its own
``cli`` module; this file only wires them together, sets up logging and turns the
project's expected errors into one clear line and a non-zero exit code.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys
from collections.abc import Callable, Sequence

from common.cli import CliError as CliError  # the name component CLIs and tests import
from common.cli import add_config_args as add_config_args
from common.cli import make_console as make_console
from common.errors import TensormineError
from tensormine import __version__

# Component modules that add subcommands, in the order `--help` lists them.
COMMAND_MODULES = (
    "chain.cli",
    "store.cli",
    "train.cli",
    "validation.cli",
    "subnet.cli",
    "tensormine.demo",
)

logger = logging.getLogger("tensormine")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="tensormine",
        description="Run and inspect a decentralized training subnet.",
    )
    parser.add_argument("--version", action="version", version=f"tensormine {__version__}")
    parser.add_argument("-v", "--verbose", action="count", default=0, help="more logging")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name in COMMAND_MODULES:
        try:
            module = importlib.import_module(name)
        except ModuleNotFoundError as exc:
            # A component that is not installed adds no commands; a broken one still fails.
            missing = exc.name or ""
            if name != missing and not name.startswith(missing + "."):
                raise
            continue
        module.register(sub)
    return parser


def _expected_errors() -> tuple[type[BaseException], ...]:
    """What the command line reports in one line (exit 2): the project's error root, and
    a missing file the user named."""
    return (TensormineError, FileNotFoundError)


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    level = logging.WARNING - 10 * min(args.verbose, 2) if args.verbose else logging.INFO
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    handler: Callable[[argparse.Namespace], int | None] = args.handler
    try:
        return handler(args) or 0
    except _expected_errors() as exc:
        print(f"tensormine {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
