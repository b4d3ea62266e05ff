"""`tensormine pull` and `tensormine store ls`: checkpoints and contributions by hand.

    tensormine pull runs/local/store --to work/latest                # latest window
    tensormine pull runs/local/store --window 12 --to work/w12
    tensormine pull my-org/tensormine-model --revision window-12 --to work/w12   # the Hub
    tensormine store ls runs/local/store
    tensormine store ls hf://datasets/my-miner/contributions --window 12
    tensormine store ls                                  # the store of --config

SOURCE is a local store folder when that path exists, else a Hub repo id (``org/name``,
``datasets/org/name``, or with an ``hf://`` prefix to be explicit). The Hub is reached
through ``HF_ENDPOINT`` / ``HF_TOKEN`` as usual. A pull verifies every file's sha256 and
the safetensors headers before the destination folder appears, and the result loads
with ``AutoModelForCausalLM.from_pretrained(DIR)`` alone.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import TYPE_CHECKING

from common.cli import CliError, add_config_args
from store.errors import Rejected, StoreError
from tensormine.config import load_config

if TYPE_CHECKING:  # store.api loads torch: not at start-up of every `tensormine` command
    from store.api import Store
    from store.backend import CheckpointRef
    from store.checkpoint import Provenance


def _loss(prov: Provenance) -> float | None:
    """The held-out loss a checkpoint records (validators write `heldout_loss`)."""
    return prov.metrics.get("heldout_loss", prov.metrics.get("loss"))


def human_bytes(n: int) -> str:
    size = float(n)
    for unit in ("B", "kB", "MB", "GB", "TB"):
        if size < 1000 or unit == "TB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1000
    raise AssertionError("unreachable")


def _open(args: argparse.Namespace, source: str | None) -> Store:
    from store.api import open_source, open_store

    cfg = load_config(args.config, args.overrides).store
    if source is None:
        return open_store(cfg, create=False)
    return open_source(source, cfg)


def _describe(prov: Provenance) -> list[str]:
    loss = _loss(prov)
    lines = [
        f"  run {prov.run_id}, parent {prov.parent_revision or '-'}, ledger block "
        f"{prov.ledger_block if prov.ledger_block is not None else '-'}"
        + (f", loss {loss:.4f}" if loss is not None else ""),
    ]
    others = {k: v for k, v in sorted(prov.metrics.items()) if k not in ("loss", "heldout_loss")}
    if others:
        lines.append("  metrics: " + ", ".join(f"{k} {v:.4g}" for k, v in others.items()))
    lines.append(f"  contributors ({len(prov.contributors)}):")
    for c in prov.contributors:
        lines.append(f"    uid {c.uid:>4}  {c.hotkey}  score {c.score:.4g}  weight {c.weight:.4g}")
    return lines


def cmd_pull(args: argparse.Namespace) -> int:
    try:
        store = _open(args, args.source)
        pulled = store.pull_checkpoint(
            Path(args.to),
            window=args.window,
            revision=args.revision,
            progress=False if args.no_progress else None,
        )
    except StoreError as exc:
        raise CliError(str(exc)) from exc
    ref, prov = pulled.ref, pulled.provenance
    print(
        f"pulled window {ref.window} ({ref.revision} @ {ref.commit[:12]}) from {ref.source} "
        f"into {pulled.path}"
    )
    print(f"  {len(prov.files) + 1} files, {human_bytes(prov.total_bytes)}, sha256 verified")
    for line in _describe(prov):
        print(line)
    return 0


def _checkpoint_row(store: Store, ref: CheckpointRef, latest: CheckpointRef | None) -> str:
    try:
        prov = store.read_provenance(ref)
        loss = _loss(prov)
        detail = (
            f"{len(prov.files) + 1:>5}  {human_bytes(prov.total_bytes):>9}  "
            f"{f'{loss:.4f}' if loss is not None else '-':>8}  {len(prov.contributors):>5}"
        )
    except Rejected as exc:
        detail = f"unreadable: {exc}"
    mark = "  (latest)" if latest is not None and latest.commit == ref.commit else ""
    return f"  {ref.window:>6}  {ref.revision:<14}  {ref.commit[:12]}  {detail}{mark}"


def cmd_ls(args: argparse.Namespace) -> int:
    try:
        store = _open(args, args.source)
        checkpoints = [
            r for r in store.list_checkpoints() if args.window is None or r.window == args.window
        ]
        latest = store.latest() if checkpoints else None
        contributions = store.list_contributions(args.window)
        print(f"store {store.location}")
        print(f"checkpoints ({len(checkpoints)}):")
        if checkpoints:
            print(
                f"  {'window':>6}  {'revision':<14}  {'commit':<12}  {'files':>5}  "
                f"{'size':>9}  {'loss':>8}  {'contr':>5}"
            )
        for ref in checkpoints:
            print(_checkpoint_row(store, ref, latest))
        print(f"contributions ({len(contributions)}):")
        if contributions:
            print(
                f"  {'window':>6}  {'shard':>5}  {'uid':>4}  {'size':>9}  "
                f"{'received (UTC)':<19}  hotkey"
            )
        for c in contributions:
            try:
                manifest = store.read_manifest(c)
                uid, size = f"{manifest.uid:>4}", f"{human_bytes(manifest.size):>9}"
            except Rejected as exc:
                uid, size = f"{'?':>4}", f"{exc.reason:>9}"
            when = c.received_at.strftime("%Y-%m-%d %H:%M:%S")
            print(f"  {c.window:>6}  {c.shard:>5}  {uid}  {size}  {when:<19}  {c.hotkey}")
    except StoreError as exc:
        raise CliError(str(exc)) from exc
    return 0


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    pull = sub.add_parser(
        "pull",
        help="download a checkpoint from a local store or the Hub, verified",
        description="Copy or download one checkpoint into DIR and verify every file.",
    )
    pull.add_argument("source", metavar="SOURCE", help="local store folder or Hub repo id")
    which = pull.add_mutually_exclusive_group()
    which.add_argument("--window", "-w", type=int, help="the checkpoint of window W")
    which.add_argument(
        "--revision", "-r", help="latest, window-<w>, a commit id (Hub: also a branch)"
    )
    pull.add_argument("--to", required=True, metavar="DIR", help="absent or empty folder")
    pull.add_argument("--no-progress", action="store_true", help="never show a progress bar")
    add_config_args(pull)
    pull.set_defaults(handler=cmd_pull)

    store = sub.add_parser("store", help="inspect checkpoint and contribution stores")
    store_sub = store.add_subparsers(dest="store_command", metavar="COMMAND", required=True)
    ls = store_sub.add_parser(
        "ls",
        help="windows, revisions, contributions and sizes of a store",
        description="List a store: checkpoints per window, then contributions.",
    )
    ls.add_argument(
        "source",
        metavar="SOURCE",
        nargs="?",
        help="local store folder or Hub repo id (default: the store of --config)",
    )
    ls.add_argument("--window", "-w", type=int, help="only this window")
    add_config_args(ls)
    ls.set_defaults(handler=cmd_ls)
