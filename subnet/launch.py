"""The chain side of `tensormine subnet up`: keys, ledger, funding, registration, stake,
and the command lines of the children.

    parts = participants(cfg)                       # owner, validators, miners (keys reused)
    ledger = open_or_create_ledger(cfg, parts.owner)
    ...start the block producer (`producer_argv`)...
    populate(ledger, cfg, parts, book)              # idempotent: a resumed run adds nothing
    wait_for_permits(ledger, parts.validators)

Every ledger change goes through signed extrinsics, as a real participant would make
them. `populate` looks at the ledger before each step, so a second `subnet up` on the
same folder registers nobody twice and stakes nothing twice; the stake the launcher added
is kept in ``<run dir>/subnet/stakes.json`` (the `StakeBook`), which is also how the view
tells a validator's earned emission from the stake it was given.
"""

from __future__ import annotations

import json
import logging
import socket
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from chain.config import RAO_PER_TAO
from chain.errors import ChainError
from chain.keys import Keypair, create_key, load_key
from chain.ledger import Ledger
from tensormine.config import RunConfig

logger = logging.getLogger(__name__)

OWNER = "owner"


@dataclass(frozen=True)
class Participant:
    """A hotkey the subnet starts a process for."""

    name: str
    role: str  # "validator" | "miner"
    behaviour: str  # "honest" or an adversarial miner behaviour
    keypair: Keypair


@dataclass(frozen=True)
class Participants:
    owner: Keypair
    validators: list[Participant]
    miners: list[Participant]

    @property
    def all(self) -> list[Participant]:
        return [*self.validators, *self.miners]


def key(keys_dir: Path, name: str) -> Keypair:
    """The key `name`, created on first use (a resumed run reuses it)."""
    if (keys_dir / f"{name}.json").exists():
        return load_key(keys_dir, name)
    return create_key(keys_dir, name)


def participants(cfg: RunConfig) -> Participants:
    sub = cfg.subnet
    keys_dir = sub.keys_folder(cfg.run.dir)
    validators = [
        Participant(f"validator-{i}", "validator", "honest", key(keys_dir, f"validator-{i}"))
        for i in range(sub.validators)
    ]
    miners = [
        Participant(f"miner-{i}", "miner", sub.behaviour(i), key(keys_dir, f"miner-{i}"))
        for i in range(sub.miners)
    ]
    return Participants(key(keys_dir, OWNER), validators, miners)


def open_or_create_ledger(cfg: RunConfig, owner: Keypair) -> tuple[Ledger, bool]:
    """(ledger, created): a new ledger owned by `owner`, or the run's existing one."""
    db = cfg.chain.db
    if not db.exists():
        return Ledger.create(db, cfg.chain, owner.address), True
    ledger = Ledger(db)
    if ledger.owner != owner.address:
        ledger.close()
        raise ChainError(
            f"{db} belongs to another owner ({ledger.owner}), not this run's key "
            f"{owner.address}; use a fresh run.dir/chain.db or the run's own keys"
        )
    return ledger, False


class StakeBook:
    """Rao each hotkey was given as stake by the launcher, persisted across resumes."""

    def __init__(self, path: Path) -> None:
        self.path = path
        try:
            raw = json.loads(path.read_text())
            self.staked: dict[str, int] = {str(k): int(v) for k, v in raw.items()}
        except FileNotFoundError:
            self.staked = {}

    def add(self, address: str, rao: int) -> None:
        self.staked[address] = self.staked.get(address, 0) + rao
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text(json.dumps(self.staked, indent=1))
        tmp.replace(self.path)

    def given(self, address: str) -> int:
        return self.staked.get(address, 0)


def _fund(ledger: Ledger, kp: Keypair, need: int, hashes: list[str]) -> None:
    """Faucet calls (each within the ledger's per-call cap) until `kp` holds `need` rao."""
    acct = ledger.account(kp.address)
    missing = need - acct.balance
    cap = ledger.config.faucet_rao
    if missing <= 0:
        return
    if cap == 0:
        raise ChainError(f"{ledger.path} has no faucet (chain.faucet_rao = 0) to fund {kp.address}")
    while missing > 0:
        amount = min(missing, cap)
        hashes.append(ledger.submit_call(kp, "faucet", {"amount": amount}))
        missing -= amount


def populate(ledger: Ledger, cfg: RunConfig, parts: Participants, book: StakeBook) -> int:
    """Fund, register and stake every participant that still needs it; returns the number
    of extrinsics it submitted (0 on a resumed run). Needs a running block producer."""
    sub = cfg.subnet
    burn = ledger.config.registration_burn_rao
    hashes: list[str] = []
    stakes: list[tuple[Participant, int]] = []
    # Validators first, so on a fresh ledger they take the low UIDs.
    for i, p in enumerate(parts.validators):
        registered = ledger.uid_of(p.keypair.address) is not None
        stake = max(0, sub.stake_rao(i) - book.given(p.keypair.address))
        need = stake + (0 if registered else burn)
        if need:
            _fund(ledger, p.keypair, max(need, round(sub.validator_fund_tao * RAO_PER_TAO)), hashes)
        if not registered:
            hashes.append(ledger.submit_call(p.keypair, "register", {}))
        if stake:
            hashes.append(ledger.submit_call(p.keypair, "add_stake", {"amount": stake}))
            stakes.append((p, stake))
    for p in parts.miners:
        registered = ledger.uid_of(p.keypair.address) is not None
        need = round(sub.miner_fund_tao * RAO_PER_TAO) if not registered else 0
        if not registered and (need or burn):
            _fund(ledger, p.keypair, max(need, burn), hashes)
        if not registered:
            hashes.append(ledger.submit_call(p.keypair, "register", {}))
    for h in hashes:
        ledger.wait(h)
    for p, stake in stakes:
        book.add(p.keypair.address, stake)
    if hashes:
        logger.info("submitted %d extrinsics (funding, registration, stake)", len(hashes))
    return len(hashes)


def wait_for_permits(ledger: Ledger, validators: list[Participant], *, epochs: int = 2) -> None:
    """Wait until every validator holds a permit (set at an epoch): a miner's shard comes
    from the non-permit UIDs, so miners must not start before the roles are settled."""
    if not validators:
        return
    cfg = ledger.config
    limit = max(15.0, epochs * (cfg.tempo + 1) * cfg.block_time_s * 2)
    deadline = time.monotonic() + limit
    wanted = {p.keypair.address for p in validators}
    while True:
        permitted = {n.hotkey for n in ledger.neurons() if n.validator_permit}
        if wanted <= permitted:
            return
        if time.monotonic() > deadline:
            missing = sorted(p.name for p in validators if p.keypair.address not in permitted)
            raise ChainError(
                f"no validator permit for {', '.join(missing)} after {limit:.0f}s; check "
                "chain.validator_min_stake_rao, chain.max_validators and their stake"
            )
        time.sleep(min(0.5, cfg.block_time_s))


def miner_permits(ledger: Ledger, miners: list[Participant]) -> list[str]:
    """Miners that hold a validator permit (they would stop mining)."""
    by_key = {p.keypair.address: p.name for p in miners}
    return [by_key[n.hotkey] for n in ledger.neurons() if n.validator_permit and n.hotkey in by_key]


# ---- command lines ----------------------------------------------------------------------
def config_args(config_path: str | None, overrides: list[str]) -> list[str]:
    args = ["--config", config_path] if config_path else []
    for item in overrides:
        args += ["--set", item]
    return args


def producer_argv(db: Path) -> list[str]:
    return [sys.executable, "-m", "tensormine.cli", "chain", "run", "--db", str(db)]


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def miner_argv(
    p: Participant,
    *,
    common: list[str],
    keys_dir: Path,
    windows: int,
    processes: int,
    behaviour: str | None = None,
) -> list[str]:
    """`accelerate launch ... -m train.miner ...` for one miner; `behaviour` is passed as
    ``--behaviour`` (spelled as the miner's flag accepts it) unless None."""
    launch = [sys.executable, "-m", "accelerate.commands.launch", "--num_machines", "1"]
    launch += ["--num_processes", str(processes), "--mixed_precision", "no"]
    launch += ["--dynamo_backend", "no"]
    if processes > 1:
        # Without --multi_gpu accelerate starts one process on a CPU machine; each miner's
        # process group needs its own rendezvous port.
        launch += ["--multi_gpu", "--main_process_port", str(free_port())]
    argv = [*launch, "-m", "train.miner", *common, "--hotkey", p.name]
    argv += ["--keys-dir", str(keys_dir), "--windows", str(windows)]
    if behaviour is not None:
        argv += ["--behaviour", behaviour]
    return argv


def validator_argv(
    p: Participant, *, common: list[str], keys_dir: Path, windows: int | None = None
) -> list[str]:
    """`python -m validation.validator ...`; without `windows` it runs until stopped."""
    argv = [sys.executable, "-m", "validation.validator", *common, "--hotkey", p.name]
    argv += ["--keys-dir", str(keys_dir)]
    return argv if windows is None else [*argv, "--windows", str(windows)]
