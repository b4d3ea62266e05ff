"""`tensormine demo ledger`: the ledger alone, live, then its future (no training).

    tensormine demo ledger                      # ~30 s: 2 validators, 4 miners, 3 epochs
    tensormine demo ledger --epochs 5 --config configs/demo.yaml
    tensormine demo                             # the whole subnet: `tensormine subnet up`

`make demo` runs the whole subnet (`tensormine subnet up --config configs/demo.yaml`);
this command shows the ledger's economics on their own. It creates keys and a fresh
ledger under ``<run dir>/ledger-demo`` (never touching the subnet's own ledger),
produces blocks on a clock in a background thread exactly like `tensormine chain run`,
funds, registers and stakes two validators and four miners through signed extrinsics,
has the validators set (slightly disagreeing) weights, and prints the metagraph after
every epoch: Yuma consensus clipping, incentive, dividends and emission as they happen.
It then verifies the ledger by replaying it from genesis and fast-forwards it to the end
of emission with `chain simulate`, showing every halving. The ledger stays in the run
folder for the `tensormine chain ...` commands to inspect.
"""

from __future__ import annotations

import argparse
import logging
import shutil
import threading
import time

from rich.console import Console
from rich.table import Table

from chain.cli import tao
from chain.config import RAO_PER_TAO
from chain.emission import schedule
from chain.interface import Identity
from chain.keys import Keypair, create_key
from chain.ledger import Ledger
from chain.local import LocalChain
from chain.node import run_producer
from chain.replay import replay
from chain.simulate import Halving, project
from common.cli import make_console
from tensormine.config import load_config

logger = logging.getLogger(__name__)

VALIDATOR_STAKE_TAO = (1_500, 800)
MINER_WEIGHTS = (
    [0.40, 0.30, 0.20, 0.10],  # validator 0
    [0.30, 0.40, 0.20, 0.10],  # validator 1 disagrees on the top two miners
)


def metagraph_table(ledger: Ledger, title: str) -> Table:
    table = Table(
        "uid", "role", "stake τ", "consensus", "incentive", "dividends", "emission τ", title=title
    )
    for nr in ledger.neurons():
        table.add_row(
            str(nr.uid),
            "validator" if nr.uid < 2 else "miner",
            f"{nr.stake / RAO_PER_TAO:,.3f}",
            f"{nr.consensus:.3f}",
            f"{nr.incentive:.3f}",
            f"{nr.dividends:.3f}",
            f"{nr.emission / RAO_PER_TAO:.4f}",
        )
    return table


def populate(ledger: Ledger, validators: list[Keypair], miners: list[Keypair]) -> None:
    """Fund, register and stake through signed extrinsics, then set the weights."""
    hashes: list[str] = []
    for i, kp in enumerate(validators):
        hashes.append(ledger.submit_call(kp, "faucet", {"amount": 2_000 * RAO_PER_TAO}))
        hashes.append(ledger.submit_call(kp, "register", {}))
        stake = VALIDATOR_STAKE_TAO[i] * RAO_PER_TAO
        hashes.append(ledger.submit_call(kp, "add_stake", {"amount": stake}))
    hashes += [ledger.submit_call(kp, "register", {}) for kp in miners]
    for h in hashes:
        ledger.wait(h)
    miner_uids = [len(validators) + i for i in range(len(miners))]
    for kp, weights in zip(validators, MINER_WEIGHTS, strict=True):
        LocalChain(ledger, Identity.single(kp)).set_weights(miner_uids, weights)


def watch_epochs(ledger: Ledger, epochs: int, console: Console) -> None:
    """Print the metagraph after each of the next `epochs` epochs."""
    seen = 0
    last = ledger.head().number
    while seen < epochs:
        time.sleep(ledger.config.block_time_s / 2)
        head = ledger.head().number
        for number in range(last + 1, head + 1):
            block = ledger.block(number)
            if block is not None and block.epoch:
                seen += 1
                console.print(metagraph_table(ledger, f"after the epoch at block {number}"))
        last = head


def show_future(ledger: Ledger, console: Console) -> None:
    """Fast-forward to the end of emission and show the halvings and who earns what."""
    issuance, _ = ledger.issuance()
    eras = schedule(issuance, ledger.head().number)
    started = time.perf_counter()
    proj = project(ledger, eras[-1].start_block - ledger.head().number)
    took = time.perf_counter() - started
    halvings = Table(
        "halving", "block", "issuance", "emission / block",
        title="fast-forward to the end of emission (fixed weights)",
    )  # fmt: skip
    rows: list[tuple[str, Halving | None]] = [
        (str(i), h) for i, h in enumerate(proj.halvings, start=1)
    ]
    if len(rows) > 7:
        rows = [*rows[:6], ("…", None), rows[-1]]
    for label, h in rows:
        if h is None:
            halvings.add_row(label, "…", "…", "…")
        else:
            halvings.add_row(label, f"{h.block:,}", tao(h.issuance), tao(h.emission_per_block))
    console.print(halvings)
    shares = Table("uid", "earned to the cap", "share", title="who earns the 21 M")
    for uid, amount in enumerate(proj.earned):
        shares.add_row(str(uid), tao(amount), f"{amount / proj.paid:.2%}")
    shares.add_row("owner", tao(proj.owner_earned), f"{proj.owner_earned / proj.paid:.2%}")
    console.print(shares)
    blocks = proj.block - proj.start_block
    console.print(f"{proj.epochs:,} epochs over {blocks:,} blocks projected in {took:.2f}s")


def run(args: argparse.Namespace) -> int:
    cfg = load_config(args.config, args.overrides)
    console = make_console()
    # Its own folder: the subnet's ledger, store and keys under run.dir stay untouched.
    folder = cfg.run.dir / "ledger-demo"
    if folder.exists():
        shutil.rmtree(folder)
    keys_dir = folder / "keys"
    owner = create_key(keys_dir, "owner")
    validators = [create_key(keys_dir, f"validator-{i}") for i in range(2)]
    miners = [create_key(keys_dir, f"miner-{i}") for i in range(4)]
    chain_cfg = cfg.chain.model_copy(update={"db": folder / "ledger.sqlite"})
    ledger = Ledger.create(chain_cfg.db, chain_cfg, owner.address)
    console.print(
        f"[bold]ledger[/] {chain_cfg.db}: a block every {chain_cfg.block_time_s}s, "
        f"an epoch every {chain_cfg.tempo + 1} blocks"
    )
    stop = threading.Event()
    producer = threading.Thread(
        target=lambda: run_producer(Ledger(chain_cfg.db), stop=stop), name="producer", daemon=True
    )
    producer.start()
    try:
        populate(ledger, validators, miners)
        console.print(
            "registered 2 validators (stake "
            + " τ and ".join(f"{s:,}" for s in VALIDATOR_STAKE_TAO)
            + " τ) and 4 miners; weights "
            + "; ".join(str(w) for w in MINER_WEIGHTS)
        )
        watch_epochs(ledger, args.epochs, console)
    finally:
        stop.set()
        producer.join(timeout=10)
    issuance, pending = ledger.issuance()
    owner_balance = ledger.account(owner.address).balance
    console.print(
        f"issuance {tao(issuance)} (pending {tao(pending)}); owner received {tao(owner_balance)}"
    )
    report = replay(ledger)
    console.print(f"verified: replaying {report.blocks} blocks from genesis rebuilds the state")
    show_future(ledger, console)
    console.print(
        f"\nInspect the ledger: [bold]tensormine chain metagraph --db {chain_cfg.db}[/] "
        f"(also: status, balances, schedule, verify; keys in {keys_dir})"
    )
    ledger.close()
    return 0


def run_subnet(args: argparse.Namespace) -> int:
    """`tensormine demo` alone: the whole subnet, as `make demo` runs it."""
    from subnet.cli import cmd_up

    for name in ("miners", "validators", "windows", "shards", "preset"):
        setattr(args, name, None)
    args.processes_per_miner = args.adversaries = None
    args.no_sample = False
    return cmd_up(args)


def register(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    from common.cli import add_config_args

    p = sub.add_parser(
        "demo", help="the local subnet demo (= subnet up); `demo ledger`: the ledger alone"
    )
    add_config_args(p)
    p.set_defaults(handler=run_subnet, config="configs/demo.yaml")
    dsub = p.add_subparsers(dest="demo_command", metavar="WHAT")
    ledger = dsub.add_parser("ledger", help="watch a local ledger pay validators and miners")
    add_config_args(ledger)
    ledger.add_argument("--epochs", type=int, default=3, help="epochs to watch (default 3)")
    ledger.set_defaults(handler=run, config="configs/demo.yaml")
