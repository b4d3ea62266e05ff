"""`tensormine keys ...` and `tensormine chain ...`: identities and the ledger by hand.

    tensormine keys new alice
    tensormine chain init --owner alice --config configs/demo.yaml
    tensormine chain run --config configs/demo.yaml            # in its own terminal
    tensormine chain faucet --key alice --amount 5000
    tensormine chain register --key alice
    tensormine chain stake add --key alice --amount 2000
    tensormine chain weights --key alice --uids 1,2 --weights 0.7,0.3 [--reveal]
    tensormine chain reveal --key alice        # commit-reveal: reveal what is due now
    tensormine chain status | metagraph | balances | schedule | simulate --blocks N
    tensormine chain commitments --round W     # miners' contribution digests for window W

Amounts on the command line are TAO (up to 9 decimals); the ledger counts rao.
Commands that change state sign an extrinsic with the named key and wait until a block
includes it (`--no-wait` returns after the pool accepted it). On a ledger with
commit-reveal (`chain.commit_reveal`, the default) `chain weights` commits the weights,
keeps their salt in `<keys dir>/reveals/` and says in which blocks to reveal them with
`chain reveal`; `--reveal` waits for that window and reveals at once.
"""

from __future__ import annotations

import argparse
import datetime as dt
import logging
import time
from collections.abc import Sequence
from decimal import Decimal, InvalidOperation
from pathlib import Path
from typing import Any

from rich.table import Table

from chain import emission as em
from chain.commit_reveal import pending_commits, reveal_blocks
from chain.config import RAO_PER_TAO, ChainConfig
from chain.errors import ChainError
from chain.interface import blocks_until_epoch
from chain.keys import (
    KeyFileError,
    create_key,
    default_keys_dir,
    is_address,
    list_keys,
    load_key,
)
from chain.ledger import Ledger
from chain.node import producer_lock, run_producer
from chain.replay import replay
from chain.reveals import PendingReveals, commit_and_reveal, reveal_due
from chain.runtime import validate_weight_vector
from chain.simulate import project
from common.cli import CliError, add_config_args, make_console
from tensormine.config import load_config

logger = logging.getLogger(__name__)


# ---- helpers -------------------------------------------------------------------------
def parse_tao(text: str) -> int:
    """'1.5' -> 1_500_000_000 rao; positive, at most 9 decimals."""
    try:
        value = Decimal(text)
    except InvalidOperation:
        raise CliError(f"amount {text!r} is not a number of TAO") from None
    rao = value * RAO_PER_TAO
    if not value.is_finite() or rao != rao.to_integral_value():
        raise CliError(f"amount {text!r}: TAO has at most 9 decimals")
    if rao <= 0:
        raise CliError(f"amount {text!r} must be positive")
    return int(rao)


def tao(rao: int) -> str:
    sign = "-" if rao < 0 else ""
    whole, frac = divmod(abs(rao), RAO_PER_TAO)
    return f"{sign}{whole:,}.{frac:09d} τ"


def when(seconds_from_now: float) -> str:
    if seconds_from_now > 1e11:
        return "beyond year 5000"
    moment = dt.datetime.now(dt.UTC) + dt.timedelta(seconds=seconds_from_now)
    return moment.strftime("%Y-%m-%d %H:%M UTC")


def _chain_config(args: argparse.Namespace) -> ChainConfig:
    cfg = load_config(args.config, args.overrides).chain
    if getattr(args, "db", None):
        cfg = cfg.model_copy(update={"db": Path(args.db)})
    return cfg


def open_ledger(args: argparse.Namespace) -> Ledger:
    cfg = _chain_config(args)
    ledger = Ledger(cfg.db)
    mine = cfg.genesis_dict()
    stored = ledger.config.genesis_dict()
    differ = sorted(k for k in mine if mine[k] != stored[k] and k in stored)
    if differ and (args.config or args.overrides):
        logger.warning(
            "the ledger keeps its genesis parameters; your config differs in: %s", ", ".join(differ)
        )
    return ledger


def _keys_dir(args: argparse.Namespace) -> Path:
    return Path(args.keys_dir) if args.keys_dir else default_keys_dir()


def _address(args: argparse.Namespace, who: str) -> str:
    if is_address(who):
        return who
    return load_key(_keys_dir(args), who).address


def _submit(args: argparse.Namespace, call: str, call_args: dict[str, Any]) -> int:
    kp = load_key(_keys_dir(args), args.key)
    with open_ledger(args) as ledger:
        xt_hash = ledger.submit_call(kp, call, call_args)
        if args.no_wait:
            print(f"{call} accepted into the pool: {xt_hash}")
            return 0
        receipt = ledger.wait(xt_hash, timeout=args.timeout)
        print(f"{call} included in block {receipt.block}: {xt_hash}")
    return 0


def _add_key_args(p: argparse.ArgumentParser, *, key: bool = True) -> None:
    if key:
        p.add_argument("--key", "-k", required=True, help="name of the signing key")
    p.add_argument("--keys-dir", help="key directory (default $TENSORMINE_HOME/keys)")


def _add_ledger_args(p: argparse.ArgumentParser) -> None:
    add_config_args(p)
    p.add_argument("--db", help="ledger file (default: chain.db from the config)")


def _add_submit_args(p: argparse.ArgumentParser) -> None:
    _add_ledger_args(p)
    _add_key_args(p)
    p.add_argument("--no-wait", action="store_true", help="return once the pool accepted it")
    p.add_argument("--timeout", type=float, help="seconds to wait for inclusion")


# ---- keys ----------------------------------------------------------------------------
def cmd_keys_new(args: argparse.Namespace) -> int:
    kp = create_key(_keys_dir(args), args.name, overwrite=args.force)
    print(f"{args.name}: {kp.address}  ({_keys_dir(args) / (args.name + '.json')}, mode 600)")
    return 0


def cmd_keys_list(args: argparse.Namespace) -> int:
    rows = list_keys(_keys_dir(args))
    if not rows:
        print(f"no keys in {_keys_dir(args)}; create one with `tensormine keys new NAME`")
        return 0
    table = Table("name", "address", title=str(_keys_dir(args)))
    for name, address in rows:
        table.add_row(name, address)
    make_console().print(table)
    return 0


# ---- ledger lifecycle ------------------------------------------------------------------
def cmd_init(args: argparse.Namespace) -> int:
    cfg = _chain_config(args)
    owner = _address(args, args.owner)
    ledger = Ledger.create(cfg.db, cfg, owner)
    print(f"ledger created at {cfg.db}: genesis {ledger.genesis_hash[:16]}…, owner {owner}")
    ledger.close()
    return 0


def cmd_run(args: argparse.Namespace) -> int:
    with open_ledger(args) as ledger:
        block_time = ledger.config.block_time_s
        print(f"producing blocks every {block_time}s on {ledger.path} (Ctrl+C stops)")
        started, first = time.monotonic(), ledger.head().number

        def report(header: Any) -> None:
            if header.epoch or header.number % max(1, int(60 / block_time)) == 0:
                rate = (header.number - first) / max(1e-9, time.monotonic() - started)
                logger.info(
                    "block %d%s, %.2f blocks/s, pool %d",
                    header.number,
                    " (epoch)" if header.epoch else "",
                    rate,
                    ledger.pool_size(),
                )

        produced = run_producer(ledger, max_blocks=args.blocks, on_block=report)
        print(f"stopped after {produced} blocks; head is block {ledger.head().number}")
    return 0


def cmd_advance(args: argparse.Namespace) -> int:
    with open_ledger(args) as ledger, producer_lock(ledger.path):
        header = ledger.advance(args.blocks)
        print(f"head is block {header.number} ({header.hash[:16]}…)")
    return 0


def cmd_verify(args: argparse.Namespace) -> int:
    with open_ledger(args) as ledger:
        report = replay(ledger)
    print(
        f"ok: replayed {report.blocks} blocks and {report.extrinsics} extrinsics from genesis; "
        f"state digest {report.digest[:16]}… matches"
    )
    return 0


# ---- reads ---------------------------------------------------------------------------
def cmd_status(args: argparse.Namespace) -> int:
    with open_ledger(args) as ledger:
        cfg = ledger.config
        head = ledger.head()
        issuance, pending = ledger.issuance()
        per_block = em.block_emission(issuance)
        table = Table(show_header=False, title=f"ledger {ledger.path}")
        table.add_row("block", f"{head.number}  ({head.hash[:16]}…)")
        table.add_row("block time", f"{cfg.block_time_s}s; epoch every {cfg.tempo + 1} blocks")
        table.add_row(
            "next epoch",
            f"in {blocks_until_epoch(head.number + 1, cfg.netuid, cfg.tempo) + 1} blocks",
        )
        table.add_row("total issuance", tao(issuance))
        table.add_row("pending emission", tao(pending))
        table.add_row("emission per block", tao(per_block))
        change = em.next_emission_change(issuance)
        if change is None:
            table.add_row("next halving", "none: emission has ended")
        else:
            blocks = em.blocks_to_reach(issuance, change, per_block)
            table.add_row(
                "next halving",
                f"block {head.number + blocks} (in {blocks:,} blocks, "
                f"~{when(blocks * cfg.block_time_s)}) "
                f"at issuance {tao(change)}",
            )
        table.add_row("registered UIDs", f"{len(ledger.neurons())} / {cfg.max_uids}")
        table.add_row("extrinsics in pool", str(ledger.pool_size()))
        make_console().print(table)
    return 0


def cmd_metagraph(args: argparse.Namespace) -> int:
    with open_ledger(args) as ledger:
        table = Table(
            "uid",
            "hotkey",
            "stake τ",
            "VP",
            "incentive",
            "dividends",
            "emission τ",
            "trust",
            "v-trust",
            "consensus",
            "last update",
            title=f"metagraph at block {ledger.head().number}",
        )
        for nr in ledger.neurons():
            table.add_row(
                str(nr.uid),
                nr.hotkey[:10] + "…" if not args.full else nr.hotkey,
                f"{nr.stake / RAO_PER_TAO:,.3f}",
                "✓" if nr.validator_permit else "",
                f"{nr.incentive:.4f}",
                f"{nr.dividends:.4f}",
                f"{nr.emission / RAO_PER_TAO:,.6f}",
                f"{nr.trust:.4f}",
                f"{nr.validator_trust:.4f}",
                f"{nr.consensus:.4f}",
                str(nr.last_update),
            )
        make_console().print(table)
    return 0


def cmd_balances(args: argparse.Namespace) -> int:
    with open_ledger(args) as ledger:
        names = {addr: name for name, addr in list_keys(_keys_dir(args))}
        table = Table("address", "key", "free", "staked", "nonce", title="balances")
        total = 0
        for acct in ledger.accounts():
            total += acct.balance + acct.stake
            table.add_row(
                acct.address,
                names.get(acct.address, ""),
                tao(acct.balance),
                tao(acct.stake),
                str(acct.nonce),
            )
        issuance, pending = ledger.issuance()
        make_console().print(table)
        print(f"held {tao(total)} + pending {tao(pending)} = issuance {tao(issuance)}")
    return 0


def cmd_commitments(args: argparse.Namespace) -> int:
    with open_ledger(args) as ledger:
        head = ledger.head().number
        rows = ledger.contribution_commitments(args.round)
    table = Table(
        "hotkey", "digest", "block", title=f"contribution commitments, round {args.round}"
    )
    for c in rows.values():
        table.add_row(c.hotkey, c.digest, str(c.block))
    make_console().print(table)
    print(f"{len(rows)} commitments for round {args.round}; head is block {head}")
    return 0


def cmd_schedule(args: argparse.Namespace) -> int:
    with open_ledger(args) as ledger:
        issuance, _ = ledger.issuance()
        head = ledger.head().number
        block_time = ledger.config.block_time_s
    table = Table("era", "start block", "issuance at start", "emission / block", "blocks", "≈ date")
    for era in em.schedule(issuance, head):
        table.add_row(
            str(era.index),
            f"{era.start_block:,}",
            tao(era.start_issuance),
            tao(era.emission_per_block),
            "—" if era.blocks is None else f"{era.blocks:,}",
            when((era.start_block - head) * block_time),
        )
    make_console().print(table)
    print(f"cap {tao(em.TOTAL_SUPPLY_RAO)}; emission is 0 from the last era on")
    return 0


def cmd_simulate(args: argparse.Namespace) -> int:
    with open_ledger(args) as ledger:
        issuance, _ = ledger.issuance()
        block = ledger.head().number
        if args.to_cap:
            eras = em.schedule(issuance, block)
            blocks = eras[-1].start_block - block
        elif args.blocks is not None:
            blocks = args.blocks
        else:
            raise CliError("say how far: --blocks N or --to-cap")
        started = time.perf_counter()
        proj = project(ledger, blocks)
        took = time.perf_counter() - started
        block_time = ledger.config.block_time_s
        owner = ledger.owner
    halvings = Table("block", "≈ date", "issuance", "emission / block", title="halvings crossed")
    for h in proj.halvings:
        halvings.add_row(
            f"{h.block:,}",
            when((h.block - block) * block_time),
            tao(h.issuance),
            tao(h.emission_per_block),
        )
    earned = Table("uid", "hotkey", "earned", "share", title=f"emission over {blocks:,} blocks")
    for uid, (hotkey, amount) in enumerate(zip(proj.hotkeys, proj.earned, strict=True)):
        share = amount / proj.paid if proj.paid else 0.0
        earned.add_row(str(uid), hotkey[:12] + "…", tao(amount), f"{share:.2%}")
    earned.add_row(
        "owner",
        owner[:12] + "…",
        tao(proj.owner_earned),
        f"{proj.owner_earned / proj.paid:.2%}" if proj.paid else "",
    )
    make_console().print(halvings)
    make_console().print(earned)
    print(
        f"blocks {proj.start_block:,} → {proj.block:,}: issuance {tao(proj.start_issuance)} → "
        f"{tao(proj.issuance)}, still pending {tao(proj.pending)}; {proj.epochs:,} epochs "
        f"({proj.explicit_epochs} run in full) in {took:.3f}s"
    )
    return 0


# ---- extrinsics ------------------------------------------------------------------------
def cmd_register(args: argparse.Namespace) -> int:
    return _submit(args, "register", {})


def cmd_faucet(args: argparse.Namespace) -> int:
    return _submit(args, "faucet", {"amount": parse_tao(args.amount)})


def cmd_stake(args: argparse.Namespace) -> int:
    call = "add_stake" if args.action == "add" else "remove_stake"
    return _submit(args, call, {"amount": parse_tao(args.amount)})


def cmd_transfer(args: argparse.Namespace) -> int:
    return _submit(
        args, "transfer", {"dest": _address(args, args.to), "amount": parse_tao(args.amount)}
    )


def _int_list(text: str) -> list[int]:
    try:
        return [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise CliError(f"{text!r} is not a comma-separated list of UIDs") from None


def _float_list(text: str) -> list[float]:
    try:
        return [float(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise CliError(f"{text!r} is not a comma-separated list of numbers") from None


def cmd_weights(args: argparse.Namespace) -> int:
    from chain.client import weights_to_wire

    uids, weights = weights_to_wire(_int_list(args.uids), _float_list(args.weights))
    with open_ledger(args) as ledger:
        commit_reveal = ledger.config.commit_reveal
    if not commit_reveal:
        return _submit(args, "set_weights", {"uids": uids, "weights": weights})
    return _commit_weights(args, uids, weights)


def _reveals_store(args: argparse.Namespace, ledger: Ledger, address: str) -> PendingReveals:
    return PendingReveals.shared(ledger.genesis_hash, address, _keys_dir(args) / "reveals")


def _commit_weights(args: argparse.Namespace, uids: list[int], weights: list[int]) -> int:
    kp = load_key(_keys_dir(args), args.key)
    with open_ledger(args) as ledger:
        validate_weight_vector(uids, weights, len(ledger.neurons()))
        store = _reveals_store(args, ledger, kp.address)
        sent = commit_and_reveal(ledger, kp, uids, weights, store)
        if args.no_wait:
            print(f"commit_weights accepted into the pool: {sent.commit}")
            return 0
        _wait_revealed(ledger, sent.reveals, args.timeout)
        receipt = ledger.wait(sent.commit, timeout=args.timeout)
        first, last = reveal_blocks(receipt.block, ledger.config)
        print(f"weights committed in block {receipt.block}: {sent.commit}")
        if not args.reveal:
            print(
                f"reveal them in blocks {first}..{last} with `tensormine chain reveal --key "
                f"{args.key}` (or commit with --reveal to wait and reveal); until then they "
                f"count for nothing. Salt kept in {store.path}"
            )
            return 0
        limit = args.timeout or 30.0 + 5 * ledger.config.block_time_s * (first - receipt.block)
        deadline = time.monotonic() + limit
        while ledger.block_number() + 1 < first:
            if time.monotonic() > deadline:
                raise CliError(f"block {first} not reached in {limit:.0f}s; is the ledger running?")
            time.sleep(min(0.2, ledger.config.block_time_s / 4))
        hashes = reveal_due(ledger, kp, store)
        if not hashes:
            raise CliError(
                f"the reveal window (blocks {first}..{last}) passed before the reveal could be "
                "submitted; the commit counts for nothing: set the weights again"
            )
        _wait_revealed(ledger, hashes, args.timeout, strict=True)
    return 0


def _wait_revealed(
    ledger: Ledger, hashes: Sequence[str], timeout: float | None, *, strict: bool = False
) -> None:
    for xt in hashes:
        try:
            receipt = ledger.wait(xt, timeout=timeout)
        except ChainError as exc:
            if strict:
                raise
            print(f"an earlier commit's reveal was refused: {exc}")
            continue
        print(f"weights revealed in block {receipt.block}: {xt}")


def cmd_reveal(args: argparse.Namespace) -> int:
    kp = load_key(_keys_dir(args), args.key)
    with open_ledger(args) as ledger:
        store = _reveals_store(args, ledger, kp.address)
        hashes = reveal_due(ledger, kp, store)
        if args.no_wait:
            for xt in hashes:
                print(f"reveal_weights accepted into the pool: {xt}")
            return 0
        _wait_revealed(ledger, hashes, args.timeout, strict=True)
        waiting = {c.commit_hash: c for c in pending_commits(ledger.conn, kp.address)}
        for entry in store.entries():
            commit = waiting.get(entry.commit_hash)
            if commit is not None and entry.reveal_xt not in hashes:
                first, last = reveal_blocks(commit.block, ledger.config)
                print(f"the commit of block {commit.block} is revealed in blocks {first}..{last}")
        if not hashes and not store.entries():
            print(f"nothing to reveal for {args.key} on {ledger.path}")
    return 0


def cmd_commit(args: argparse.Namespace) -> int:
    return _submit(args, "commit", {"data": args.data})


# ---- wiring --------------------------------------------------------------------------
def register(sub: Any) -> None:
    keys = sub.add_parser("keys", help="create and list hotkeys (Ed25519)")
    ksub = keys.add_subparsers(dest="keys_command", metavar="ACTION", required=True)
    p = ksub.add_parser("new", help="create a key pair file (mode 600)")
    p.add_argument("name")
    p.add_argument("--force", action="store_true", help="overwrite an existing key")
    _add_key_args(p, key=False)
    p.set_defaults(handler=cmd_keys_new)
    p = ksub.add_parser("list", help="list keys and their addresses")
    _add_key_args(p, key=False)
    p.set_defaults(handler=cmd_keys_list)

    chain = sub.add_parser("chain", help="the ledger: blocks, stake, weights, emission")
    csub = chain.add_subparsers(dest="chain_command", metavar="ACTION", required=True)
    p = csub.add_parser("init", help="create a new ledger (genesis)")
    _add_ledger_args(p)
    _add_key_args(p, key=False)
    p.add_argument("--owner", required=True, help="subnet owner: key name or address")
    p.set_defaults(handler=cmd_init)
    p = csub.add_parser("run", help="produce blocks on a clock")
    _add_ledger_args(p)
    p.add_argument("--blocks", type=int, help="stop after this many blocks")
    p.set_defaults(handler=cmd_run)
    p = csub.add_parser("advance", help="produce N blocks now (development)")
    _add_ledger_args(p)
    p.add_argument("blocks", type=int)
    p.set_defaults(handler=cmd_advance)
    p = csub.add_parser("verify", help="replay from genesis and compare state")
    _add_ledger_args(p)
    p.set_defaults(handler=cmd_verify)
    for name, handler, text in (
        ("status", cmd_status, "block, issuance, emission, next halving"),
        ("metagraph", cmd_metagraph, "one row per UID"),
        ("balances", cmd_balances, "free and staked balance of every account"),
        ("schedule", cmd_schedule, "every halving era from now to the cap"),
    ):
        p = csub.add_parser(name, help=text)
        _add_ledger_args(p)
        if name == "balances":
            _add_key_args(p, key=False)
        if name == "metagraph":
            p.add_argument("--full", action="store_true", help="show whole hotkeys")
        p.set_defaults(handler=handler)
    p = csub.add_parser("commitments", help="miners' contribution digests for one round")
    _add_ledger_args(p)
    p.add_argument("--round", type=int, required=True, help="training window")
    p.set_defaults(handler=cmd_commitments)
    p = csub.add_parser("simulate", help="fast-forward emission and epochs with fixed weights")
    _add_ledger_args(p)
    p.add_argument("--blocks", type=int, help="blocks to run ahead")
    p.add_argument("--to-cap", action="store_true", help="run until emission ends")
    p.set_defaults(handler=cmd_simulate)

    p = csub.add_parser("register", help="register the key's hotkey to a UID")
    _add_submit_args(p)
    p.set_defaults(handler=cmd_register)
    p = csub.add_parser("faucet", help="mint TAO to the key (development ledgers)")
    _add_submit_args(p)
    p.add_argument("--amount", required=True, help="TAO")
    p.set_defaults(handler=cmd_faucet)
    p = csub.add_parser("stake", help="add or remove stake")
    p.add_argument("action", choices=["add", "remove"])
    _add_submit_args(p)
    p.add_argument("--amount", required=True, help="TAO")
    p.set_defaults(handler=cmd_stake)
    p = csub.add_parser("transfer", help="send free TAO")
    _add_submit_args(p)
    p.add_argument("--to", required=True, help="key name or address")
    p.add_argument("--amount", required=True, help="TAO")
    p.set_defaults(handler=cmd_transfer)
    p = csub.add_parser("weights", help="set weights (validators with a permit)")
    _add_submit_args(p)
    p.add_argument("--uids", required=True, help="e.g. 1,2,3")
    p.add_argument("--weights", required=True, help="e.g. 0.5,0.3,0.2 (normalized by the chain)")
    p.add_argument(
        "--reveal", action="store_true", help="commit-reveal: wait for the window and reveal"
    )
    p.set_defaults(handler=cmd_weights)
    p = csub.add_parser("reveal", help="commit-reveal: reveal the key's weights due now")
    _add_submit_args(p)
    p.set_defaults(handler=cmd_reveal)
    p = csub.add_parser("commit", help="publish a short string (e.g. a DHT address)")
    _add_submit_args(p)
    p.add_argument("--data", required=True)
    p.set_defaults(handler=cmd_commit)


__all__ = ["ChainError", "KeyFileError", "register"]
