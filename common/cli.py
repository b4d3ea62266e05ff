"""What every command of the `tensormine` command line shares: the expected-error class,
the options that load a run config, and the console tables print to.

Component packages add their subcommands in their own `cli` modules and import these
from here; `tensormine.cli` wires the subcommands together.
"""

from __future__ import annotations

import argparse
import sys

from rich.console import Console

from common.errors import TensormineError


class CliError(TensormineError):
    """An expected failure: printed as one line, exit status 2."""


def make_console() -> Console:
    """A rich console; off a terminal (pipes, files, tests) tables get 200 columns, not 80."""
    return Console() if sys.stdout.isatty() else Console(width=200)


def add_config_args(parser: argparse.ArgumentParser) -> None:
    """The options every command that reads a run config takes."""
    parser.add_argument("--config", "-c", help="run config YAML (default: built-in defaults)")
    parser.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a config key, e.g. --set chain.tempo=10 (repeatable)",
    )
