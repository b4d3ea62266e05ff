"""The ledger: one SQLite file that any number of processes read and submit to.

    ledger = Ledger.create("runs/local/ledger.sqlite", ChainConfig(), owner=alice.address)
    h = ledger.submit_call(alice, "faucet", {"amount": 10**12})   # -> extrinsic hash
    ledger.produce_block()                                          # normally `chain run`
    ledger.wait(h)                                                  # receipt, or raises

Submitting checks the extrinsic completely before it enters the pool (signature, nonce,
ledger, and a dry run of the call against the current state plus the signer's own pending
calls), so bad input is refused at once with a `ChainError` and changes nothing. A block
then applies the pool in order. A call that became invalid in between still fails inside
its block: its nonce is used and the failure is recorded in its receipt, as on a
substrate chain. Every block is one SQLite transaction.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import sqlite3
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any

from chain.config import ChainConfig
from chain.emission import block_emission
from chain.errors import BadNonce, ChainError, CorruptLedger, InvalidCall, NotIncluded
from chain.extrinsics import I64_MAX, Extrinsic, parse_args, sign_extrinsic
from chain.interface import SigningKey, parse_commitment_fields
from chain.keys import is_address, signing_bytes
from chain.runtime import Account, Runtime
from chain.storage import (
    NEURON_COLUMNS,
    NEURONS_FROM,
    begin,
    connect,
    create_schema,
    ensure_tables,
    read_meta,
)
from chain.types import ContributionCommitment, Neuron, Receipt

logger = logging.getLogger(__name__)

MAX_EXTRINSICS_PER_BLOCK = 1024
SUBMIT_TRIES = 3  # signing again when another handle of the key took the nonce
ZERO_HASH = "0" * 64
U16_MAX = 65535


@dataclass(frozen=True)
class BlockHeader:
    number: int
    hash: str
    parent_hash: str
    timestamp: float
    extrinsics_root: str
    emission: int
    epoch: bool


def _header(row: tuple[Any, ...]) -> BlockHeader:
    number, digest, parent, ts, root, emission, epoch = row
    return BlockHeader(int(number), digest, parent, float(ts), root, int(emission), bool(epoch))


def block_hash(
    number: int, parent: str, timestamp: float, root: str, emission: int, epoch: bool
) -> str:
    body = {
        "number": number,
        "parent": parent,
        "timestamp": timestamp,
        "extrinsics_root": root,
        "emission": emission,
        "epoch": epoch,
    }
    return hashlib.sha256(signing_bytes(body)).hexdigest()


def extrinsics_root(records: list[tuple[str, str, str | None]]) -> str:
    """Commits to each extrinsic's hash and outcome, in block order."""
    return hashlib.sha256(signing_bytes([list(r) for r in records])).hexdigest()


def _neuron(r: Sequence[Any]) -> Neuron:
    """A `Neuron` from a row in `chain.storage.NEURON_COLUMNS` order (u16 fields scaled)."""
    rank, trust, consensus, incentive, dividends, vtrust = (int(v) / U16_MAX for v in r[7:13])
    return Neuron(
        uid=int(r[0]),
        hotkey=str(r[1]),
        coldkey=str(r[1]),
        stake=int(r[2]),
        balance=int(r[3]),
        registered_block=int(r[4]),
        last_update=int(r[5]),
        validator_permit=bool(r[6]),
        rank=rank,
        trust=trust,
        consensus=consensus,
        incentive=incentive,
        dividends=dividends,
        validator_trust=vtrust,
        emission=int(r[13]),
    )


def _contribution(r: Sequence[Any]) -> ContributionCommitment:
    return ContributionCommitment(str(r[0]), int(r[1]), str(r[2]), int(r[3]))


def _genesis_from_meta(meta: dict[str, str], path: Path) -> tuple[ChainConfig, str, str]:
    try:
        genesis = json.loads(meta["genesis"])
        # A genesis from before commit-reveal existed ran without it.
        stored = {"commit_reveal": False, **genesis["config"]}
        config = ChainConfig.model_validate({**stored, "db": str(path)})
        return config, str(genesis["owner"]), meta["genesis_hash"]
    except (KeyError, ValueError, TypeError) as exc:
        raise CorruptLedger(f"{path}: unreadable genesis record ({exc})") from exc


class Ledger:
    """A handle on one ledger file. Cheap to open; open one per process or thread."""

    def __init__(self, path: Path | str, *, timeout: float = 30.0) -> None:
        self.path = Path(path)
        if not self.path.is_file():
            raise FileNotFoundError(
                f"no ledger at {self.path}; create one with `tensormine chain init`"
            )
        self.conn = connect(self.path, timeout=timeout)
        try:
            meta = read_meta(self.conn, self.path)
        except CorruptLedger:
            self.conn.close()
            raise
        self.config, self.owner, self.genesis_hash = _genesis_from_meta(meta, self.path)
        ensure_tables(self.conn)

    # ---- lifecycle ---------------------------------------------------------------
    @classmethod
    def create(
        cls,
        path: Path | str,
        config: ChainConfig,
        owner: str,
        *,
        timestamp: float | None = None,
    ) -> Ledger:
        """Write genesis to a new file (atomically: a temp file renamed into place)."""
        path = Path(path)
        if not is_address(owner):
            raise InvalidCall(f"owner {owner!r} is not an SS58 address")
        if path.exists():
            raise ChainError(f"{path} already exists; open it instead of creating it")
        path.parent.mkdir(parents=True, exist_ok=True)
        ts = time.time() if timestamp is None else timestamp
        genesis: dict[str, Any] = {
            "config": config.genesis_dict(),
            "owner": owner,
            "timestamp": ts,
            "salt": os.urandom(16).hex(),
        }
        genesis_hash = hashlib.sha256(signing_bytes(genesis)).hexdigest()
        tmp = path.with_name(path.name + f".creating-{os.getpid()}")
        conn = sqlite3.connect(str(tmp), isolation_level=None)
        try:
            # Not yet visible under its real name, so no transaction is needed until rename.
            create_schema(conn, {"genesis": json.dumps(genesis), "genesis_hash": genesis_hash})
            conn.execute("INSERT INTO state VALUES (1, 0, 0, 0)")
            conn.execute(
                "INSERT INTO blocks VALUES (0, ?, ?, ?, ?, 0, 0)",
                (genesis_hash, ZERO_HASH, ts, extrinsics_root([])),
            )
        finally:
            conn.close()
        tmp.replace(path)
        return cls(path)

    def close(self) -> None:
        self.conn.close()

    def __enter__(self) -> Ledger:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    @contextlib.contextmanager
    def _write(self) -> Iterator[Runtime]:
        begin(self.conn)
        try:
            yield Runtime(self.conn, self.config, self.owner, self.genesis_hash)
        except BaseException:
            self.conn.execute("ROLLBACK")
            raise
        self.conn.execute("COMMIT")

    @contextlib.contextmanager
    def _read(self) -> Iterator[Runtime]:
        # One read transaction so every query sees the same block.
        self.conn.execute("BEGIN")
        try:
            yield Runtime(self.conn, self.config, self.owner, self.genesis_hash)
        finally:
            self.conn.execute("COMMIT")

    # ---- reads -------------------------------------------------------------------
    def head(self) -> BlockHeader:
        row = self.conn.execute(
            "SELECT number, hash, parent_hash, timestamp, extrinsics_root, emission, epoch "
            "FROM blocks ORDER BY number DESC LIMIT 1"
        ).fetchone()
        return _header(row)

    def block(self, number: int) -> BlockHeader | None:
        row = self.conn.execute(
            "SELECT number, hash, parent_hash, timestamp, extrinsics_root, emission, epoch "
            "FROM blocks WHERE number = ?",
            (number,),
        ).fetchone()
        return None if row is None else _header(row)

    def block_number(self) -> int:
        return int(self.conn.execute("SELECT block FROM state").fetchone()[0])

    def issuance(self) -> tuple[int, int]:
        """(total issuance, pending emission) in rao."""
        with self._read() as rt:
            return rt.issuance()

    def block_emission(self) -> int:
        """Rao the next block will mint."""
        return block_emission(self.issuance()[0])

    def account(self, address: str) -> Account:
        with self._read() as rt:
            return rt.account(address)

    def accounts(self) -> list[Account]:
        rows = self.conn.execute(
            "SELECT address, balance, stake, nonce FROM accounts ORDER BY address"
        ).fetchall()
        return [Account(str(r[0]), int(r[1]), int(r[2]), int(r[3])) for r in rows]

    def uid_of(self, hotkey: str) -> int | None:
        with self._read() as rt:
            return rt.uid_of(hotkey)

    def neurons(self) -> list[Neuron]:
        """The metagraph now, by UID."""
        rows = self.conn.execute(f"SELECT {NEURON_COLUMNS} {NEURONS_FROM} ORDER BY n.uid")
        return [_neuron(r) for r in rows.fetchall()]

    def epoch_neurons(self, at_block: int) -> tuple[int, list[Neuron]] | None:
        """The metagraph as the last epoch at or before `at_block` left it: `(that epoch's
        block, neurons by UID)`, or None if none ran by then (or it is older than the last
        `chain.storage.EPOCH_HISTORY` epochs). Trust, incentive and the other Yuma outputs
        change only at epochs, so processes that ask at different moments for the same
        `at_block` get the same answer, where `neurons()` may straddle an epoch."""
        row = self.conn.execute(
            "SELECT MAX(block) FROM epoch_neurons WHERE block <= ?", (int(at_block),)
        ).fetchone()
        if row is None or row[0] is None:
            return None
        block = int(row[0])
        rows = self.conn.execute(
            "SELECT uid, hotkey, stake, balance, registered_block, last_update, "
            "validator_permit, rank, trust, consensus, incentive, dividends, validator_trust, "
            "emission FROM epoch_neurons WHERE block = ? ORDER BY uid",
            (block,),
        ).fetchall()
        return block, [_neuron(r) for r in rows]

    def weights(self) -> dict[int, list[tuple[int, int]]]:
        """Stored u16 weight rows: validator UID -> [(UID, weight)]."""
        rows = self.conn.execute("SELECT uid, data FROM weights ORDER BY uid").fetchall()
        return {int(u): [(int(a), int(b)) for a, b in json.loads(d)] for u, d in rows}

    def commitments(self) -> dict[str, tuple[str, int]]:
        """hotkey -> (data, block) of each registered hotkey's latest commitment."""
        rows = self.conn.execute("SELECT hotkey, data, block FROM commitments").fetchall()
        return {str(h): (str(d), int(b)) for h, d, b in rows}

    def commitment_fields(self, hotkey: str) -> dict[str, Any]:
        """`hotkey`'s latest commitment as a JSON object, or {} when it has none or it is
        not one (`chain.interface.parse_commitment_fields`)."""
        current = self.commitments().get(hotkey)
        return parse_commitment_fields(None if current is None else current[0])

    def contribution_commitments(self, round: int) -> dict[str, ContributionCommitment]:
        """hotkey -> its contribution commitment for training window `round`, hotkeys
        that lost their UID since included."""
        if not 0 <= round <= I64_MAX:
            return {}
        rows = self.conn.execute(
            "SELECT hotkey, round, digest, block FROM contribution_commitments "
            "WHERE round = ? ORDER BY hotkey",
            (int(round),),
        ).fetchall()
        return {str(r[0]): _contribution(r) for r in rows}

    def contribution_commitment(self, hotkey: str, round: int) -> ContributionCommitment | None:
        if not 0 <= round <= I64_MAX:
            return None
        row = self.conn.execute(
            "SELECT hotkey, round, digest, block FROM contribution_commitments "
            "WHERE hotkey = ? AND round = ?",
            (hotkey, int(round)),
        ).fetchone()
        return None if row is None else _contribution(row)

    def pool_size(self) -> int:
        return int(self.conn.execute("SELECT COUNT(*) FROM pool").fetchone()[0])

    def next_nonce(self, address: str) -> int:
        with self._read() as rt:
            pending = self.conn.execute("SELECT COUNT(*) FROM pool WHERE signer = ?", (address,))
            return rt.account(address).nonce + int(pending.fetchone()[0])

    # ---- submitting ----------------------------------------------------------------
    def submit(self, xt: Extrinsic) -> str:
        """Admit `xt` to the pool after full validation; returns its hash."""
        parse_args(xt.call, xt.args)
        with self._write() as rt:
            pending = self.conn.execute(
                "SELECT body FROM pool WHERE signer = ? ORDER BY nonce", (xt.signer,)
            ).fetchall()
            rt.check(xt, expected_nonce=rt.account(xt.signer).nonce + len(pending))
            number = rt.block() + 1
            self.conn.execute("SAVEPOINT dry_run")
            try:
                for (body,) in pending:
                    with contextlib.suppress(ChainError):
                        rt.execute(Extrinsic.from_json(body), number)
                rt.execute(xt, number)
            finally:
                self.conn.execute("ROLLBACK TO dry_run")
                self.conn.execute("RELEASE dry_run")
            self.conn.execute(
                "INSERT INTO pool (hash, signer, nonce, body, submitted_at) VALUES (?, ?, ?, ?, ?)",
                (xt.hash, xt.signer, xt.nonce, xt.to_json(), time.time()),
            )
        return xt.hash

    def submit_call(self, keypair: SigningKey, call: str, args: dict[str, Any]) -> str:
        """Sign `call` with the signer's next nonce and submit it. Another handle of the
        same key (a thread, a process) may take that nonce in between: signing again with
        the next one is retried a few times before the `BadNonce` goes to the caller."""
        for attempt in range(1, SUBMIT_TRIES + 1):
            nonce = self.next_nonce(keypair.address)
            try:
                return self.submit(sign_extrinsic(keypair, call, args, nonce, self.genesis_hash))
            except BadNonce as exc:
                if attempt == SUBMIT_TRIES:
                    raise
                logger.info("%s: nonce %d taken meanwhile (%s); signing again", call, nonce, exc)
        raise AssertionError("unreachable")  # pragma: no cover

    def receipt(self, xt_hash: str) -> Receipt | None:
        row = self.conn.execute(
            "SELECT block, status, error_type, error FROM extrinsics WHERE hash = ?", (xt_hash,)
        ).fetchone()
        if row is None:
            return None
        return Receipt(xt_hash, int(row[0]), str(row[1]), row[2], row[3])

    def wait(self, xt_hash: str, timeout: float | None = None) -> Receipt:
        """Block until `xt_hash` is in a block; raise its error if it failed."""
        limit = timeout if timeout is not None else max(30.0, 5 * self.config.block_time_s)
        deadline = time.monotonic() + limit
        poll = min(0.2, self.config.block_time_s / 4)
        while True:
            receipt = self.receipt(xt_hash)
            if receipt is not None:
                return receipt.raise_for_status()
            if time.monotonic() >= deadline:
                raise NotIncluded(
                    f"extrinsic {xt_hash[:12]}… not in a block after {limit:.0f}s; "
                    f"is `tensormine chain run` producing blocks on {self.path}?"
                )
            time.sleep(poll)

    # ---- producing -----------------------------------------------------------------
    def produce_block(self, timestamp: float | None = None) -> BlockHeader:
        """Make the next block from the pool: one transaction, all or nothing."""
        with self._write() as rt:
            parent = self.head()
            number = parent.number + 1
            minted, epoch = rt.on_initialize(number)
            pool = self.conn.execute(
                "SELECT id, hash, body FROM pool ORDER BY id LIMIT ?", (MAX_EXTRINSICS_PER_BLOCK,)
            ).fetchall()
            records: list[tuple[str, str, str | None]] = []
            for idx, (_, xt_hash, body) in enumerate(pool):
                status, error_type, error = apply_extrinsic(rt, body, number)
                self.conn.execute(
                    "INSERT INTO extrinsics VALUES (?, ?, ?, ?, ?, ?, ?)",
                    (xt_hash, number, idx, body, status, error_type, error),
                )
                records.append((xt_hash, status, error_type))
            if pool:
                self.conn.execute("DELETE FROM pool WHERE id <= ?", (pool[-1][0],))
            ts = time.time() if timestamp is None else timestamp
            root = extrinsics_root(records)
            digest = block_hash(number, parent.hash, ts, root, minted, epoch)
            self.conn.execute(
                "INSERT INTO blocks VALUES (?, ?, ?, ?, ?, ?, ?)",
                (number, digest, parent.hash, ts, root, minted, int(epoch)),
            )
        return BlockHeader(number, digest, parent.hash, ts, root, minted, epoch)

    def advance(self, blocks: int) -> BlockHeader:
        """Produce `blocks` blocks now (tests and `chain advance`)."""
        header = self.head()
        for _ in range(blocks):
            header = self.produce_block()
        return header


def apply_extrinsic(rt: Runtime, body: str, number: int) -> tuple[str, str | None, str | None]:
    """Apply one pooled extrinsic inside a block: (status, error type, error message).

    'dropped': not valid any more (signature, nonce), nothing changes; 'failed': the call
    was refused, only the nonce is used; 'ok': applied.
    """
    try:
        xt = Extrinsic.from_json(body)
        rt.check(xt)
    except ChainError as exc:
        return "dropped", type(exc).__name__, str(exc)
    rt.conn.execute("SAVEPOINT xt")
    try:
        rt.execute(xt, number)
        outcome: tuple[str, str | None, str | None] = ("ok", None, None)
    except ChainError as exc:
        rt.conn.execute("ROLLBACK TO xt")
        outcome = ("failed", type(exc).__name__, str(exc))
    rt.conn.execute("RELEASE xt")
    rt.bump_nonce(xt.signer)
    return outcome
