"""`tensormine miner ...`: the miner in one process (same options as `python -m train.miner`).

For several processes per miner use accelerate directly:
``accelerate launch --num_processes 2 -m train.miner --config configs/tiny.yaml --hotkey NAME``.
"""

from __future__ import annotations

import argparse
from typing import Any


def _run(args: argparse.Namespace) -> int:
    from train.miner import main

    forwarded = ["--hotkey", args.hotkey]
    if args.config:
        forwarded += ["--config", args.config]
    for item in args.overrides:
        forwarded += ["--set", item]
    if args.keys_dir:
        forwarded += ["--keys-dir", args.keys_dir]
    if args.windows is not None:
        forwarded += ["--windows", str(args.windows)]
    if args.behaviour != "honest":
        forwarded += ["--behaviour", args.behaviour]
    return main(forwarded)


def register(sub: Any) -> None:
    from common.cli import add_config_args

    p = sub.add_parser("miner", help="train the assigned shard each window and publish it")
    add_config_args(p)
    p.add_argument("--hotkey", required=True, help="name of the miner's key")
    p.add_argument("--keys-dir", help="key directory (default $TENSORMINE_HOME/keys)")
    p.add_argument("--windows", type=int, help="stop after this many windows")
    p.add_argument(
        "--behaviour",
        default="honest",
        help="an adversarial miner for demos: free-rider, noise, copier or wrong-data",
    )
    p.set_defaults(handler=_run)
