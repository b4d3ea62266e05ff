"""`tensormine subnet up | status | down`: the command line of the local subnet.

    tensormine subnet up --config configs/demo.yaml
    tensormine subnet up --config configs/demo.yaml --miners 6 --validators 2 --windows 8 \\
        --adversaries free-rider,copier --shards 2 --processes-per-miner 2
    tensormine subnet status --config configs/demo.yaml
    tensormine subnet down --config configs/demo.yaml

Every option is a shorthand for ``--set`` on the run config (``--miners 6`` is
``--set subnet.miners=6``; ``--preset small`` takes the `model:` and `outer:` sections
of ``configs/small.yaml``), so the children see exactly the config the launcher saw.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

import yaml

from common.cli import CliError, add_config_args, make_console
from subnet.config import BEHAVIOURS
from tensormine.config import read_yaml

DEFAULT_CONFIG = "configs/demo.yaml"


def _adversaries(value: str) -> list[str]:
    names = [v.strip() for v in value.split(",") if v.strip()]
    bad = [n for n in names if n not in BEHAVIOURS or n == "honest"]
    if bad:
        raise argparse.ArgumentTypeError(
            f"unknown behaviour {', '.join(bad)}; choose from {', '.join(BEHAVIOURS[1:])}"
        )
    return names


# What `--preset` takes from a preset: the model and the outer step measured for it (a
# sharded model wants half a plain step: benchmarks/RESULTS.md); the data, the inner loop
# and the windows stay the demo's, sized for a laptop.
PRESET_SECTIONS = ("model", "outer")


def preset_overrides(preset: str) -> list[str]:
    """``<section>.<key>=<value>`` for every key of a preset's `model:` and `outer:`
    sections (`PRESET_SECTIONS`; `model:` is required)."""
    path = (
        Path(preset) if preset.endswith((".yaml", ".yml")) else Path("configs") / f"{preset}.yaml"
    )
    if not path.is_file():
        raise CliError(f"--preset {preset}: no such preset ({path})")
    try:
        tree: Any = read_yaml(path.read_text(encoding="utf-8")) or {}
    except yaml.YAMLError as exc:
        raise CliError(f"--preset {preset}: {path} is not valid YAML: {exc}") from exc
    tree = tree if isinstance(tree, dict) else {}
    if not isinstance(tree.get("model"), dict):
        raise CliError(f"--preset {preset}: {path} has no model: section")
    out = []
    for section in PRESET_SECTIONS:
        values = tree.get(section) or {}
        if not isinstance(values, dict):
            raise CliError(f"--preset {preset}: {path}: {section}: is not a mapping")
        out += [f"{section}.{k}={json.dumps(v)}" for k, v in values.items()]
    return out


def overrides_of(args: argparse.Namespace) -> list[str]:
    """The options as ``--set`` items, in the order they apply (the user's --set last)."""
    out: list[str] = preset_overrides(args.preset) if args.preset else []
    if args.miners is not None:
        out.append(f"subnet.miners={args.miners}")
    if args.validators is not None:
        # Top-K permits == validators: a miner's growing stake can never win a permit.
        out += [
            f"subnet.validators={args.validators}",
            f"chain.max_validators={max(args.validators, 1)}",
        ]
    if args.windows is not None:
        out.append(f"subnet.windows={args.windows}")
    if args.shards is not None:
        out.append(f"model.shards={args.shards}")
    if args.processes_per_miner is not None:
        out.append(f"subnet.processes_per_miner={args.processes_per_miner}")
    if args.adversaries is not None:
        out.append(f"subnet.adversaries=[{', '.join(args.adversaries)}]")
    return [*out, *args.overrides]


def cmd_up(args: argparse.Namespace) -> int:
    from subnet.up import Subnet, SubnetError, finish
    from tensormine.config import load_config

    overrides = overrides_of(args)
    cfg = load_config(args.config, overrides)
    console = make_console()
    subnet = Subnet(cfg, args.config, overrides)
    try:
        outcome = subnet.run(console)
    except SubnetError as exc:
        raise CliError(str(exc)) from exc
    finally:
        subnet.close()
    return finish(cfg, subnet, outcome, console, sample=not args.no_sample)


def cmd_status(args: argparse.Namespace) -> int:
    from subnet.up import status
    from tensormine.config import load_config

    return status(load_config(args.config, overrides_of(args)), make_console())


def cmd_down(args: argparse.Namespace) -> int:
    from subnet.up import down
    from tensormine.config import load_config

    return down(load_config(args.config, overrides_of(args)), make_console())


def _options(p: argparse.ArgumentParser) -> None:
    add_config_args(p)
    p.add_argument("--miners", type=int, help="number of miners (subnet.miners)")
    p.add_argument("--validators", type=int, help="number of validators (subnet.validators)")
    p.add_argument("--windows", type=int, help="windows every miner trains (subnet.windows)")
    p.add_argument("--shards", type=int, help="model shards (model.shards)")
    p.add_argument(
        "--preset",
        help="model preset: tiny, small, 1b, moe, moe-small or a YAML file (its model: and outer:)",
    )
    p.add_argument("--processes-per-miner", type=int, help="accelerate processes per miner (DDP)")
    p.add_argument(
        "--adversaries",
        type=_adversaries,
        metavar="B[,B...]",
        help="behaviours of the last miners: " + ", ".join(BEHAVIOURS[1:]),
    )
    p.set_defaults(config=DEFAULT_CONFIG)


def build_overrides_parser() -> argparse.ArgumentParser:
    """A parser of the shared options alone (tests, and scripts that build overrides)."""
    parser = argparse.ArgumentParser(prog="tensormine subnet")
    _options(parser)
    return parser


def register(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    p = sub.add_parser("subnet", help="the whole subnet on this machine: up, status, down")
    ssub = p.add_subparsers(dest="subnet_command", metavar="COMMAND", required=True)
    up = ssub.add_parser(
        "up",
        help="start ledger, validators and miners; watch; summarise",
        description="Start a local subnet (ledger, validators, miners on 127.0.0.1), show it "
        "live, and end with a summary, plots, the final checkpoint and a text sample. "
        "Ctrl+C stops everything; running it again on the same run folder resumes.",
    )
    _options(up)
    up.add_argument("--no-sample", action="store_true", help="skip pulling and sampling the model")
    up.set_defaults(handler=cmd_up)
    st = ssub.add_parser("status", help="the run's ledger, processes and last windows")
    _options(st)
    st.set_defaults(handler=cmd_status)
    dn = ssub.add_parser("down", help="stop a running `subnet up` and everything it started")
    _options(dn)
    dn.set_defaults(handler=cmd_down)
