"""Verifying a ledger by replaying it from genesis (`tensormine chain verify`).

The replay builds a fresh in-memory ledger from the genesis record, re-executes every
block with the same runtime code that produced it (emission, epochs, each extrinsic) and
checks, block by block, that every extrinsic has the same outcome and every block hash
links to its parent and matches its contents. At the end the state digest of the replay
must equal the file's. Any difference raises `CorruptLedger` naming the first block
where the two part ways.
"""

from __future__ import annotations

import sqlite3
from dataclasses import dataclass

from chain.errors import CorruptLedger
from chain.ledger import Ledger, apply_extrinsic, block_hash, extrinsics_root
from chain.runtime import Runtime
from chain.storage import create_schema, state_digest


@dataclass(frozen=True)
class ReplayReport:
    blocks: int
    extrinsics: int
    digest: str


def replay(ledger: Ledger) -> ReplayReport:
    """Re-execute `ledger` from genesis and compare; raises `CorruptLedger` on a mismatch."""
    check = ledger.conn.execute("PRAGMA quick_check").fetchone()[0]
    if check != "ok":
        raise CorruptLedger(f"{ledger.path}: SQLite integrity check failed: {check}")
    mem = sqlite3.connect(":memory:", isolation_level=None)
    meta = dict(ledger.conn.execute("SELECT key, value FROM meta").fetchall())
    create_schema(mem, {k: v for k, v in meta.items() if k not in ("format", "version")})
    mem.execute("INSERT INTO state VALUES (1, 0, 0, 0)")
    rt = Runtime(mem, ledger.config, ledger.owner, ledger.genesis_hash)

    ledger.conn.execute("BEGIN")  # a consistent snapshot of the file while we read it
    try:
        blocks = ledger.conn.execute(
            "SELECT number, hash, parent_hash, timestamp, extrinsics_root, emission, epoch "
            "FROM blocks ORDER BY number"
        ).fetchall()
        if not blocks or blocks[0][0] != 0 or blocks[0][1] != ledger.genesis_hash:
            raise CorruptLedger(f"{ledger.path}: block 0 is not this ledger's genesis")
        count = 0
        parent = blocks[0][1]
        for expected, (number, digest, parent_hash, ts, root, emission, epoch) in enumerate(
            blocks[1:], start=1
        ):
            if number != expected:
                raise CorruptLedger(f"block {expected} is missing (next stored is {number})")
            if parent_hash != parent:
                raise CorruptLedger(
                    f"block {number}: parent hash does not link to block {number - 1}"
                )
            mem.execute("BEGIN")
            minted, ran = rt.on_initialize(number)
            if minted != emission or ran != bool(epoch):
                raise CorruptLedger(f"block {number}: emission/epoch differ on replay")
            records: list[tuple[str, str, str | None]] = []
            rows = ledger.conn.execute(
                "SELECT hash, body, status, error_type FROM extrinsics "
                "WHERE block = ? ORDER BY idx",
                (number,),
            ).fetchall()
            for xt_hash, body, status, error_type in rows:
                got = apply_extrinsic(rt, body, number)
                if (got[0], got[1]) != (status, error_type):
                    raise CorruptLedger(
                        f"block {number}: extrinsic {xt_hash[:12]}… recorded {status} "
                        f"but replays as {got[0]} ({got[2]})"
                    )
                records.append((xt_hash, status, error_type))
            mem.execute("COMMIT")
            if extrinsics_root(records) != root:
                raise CorruptLedger(f"block {number}: extrinsics root does not match")
            if block_hash(number, parent_hash, ts, root, emission, bool(epoch)) != digest:
                raise CorruptLedger(f"block {number}: hash does not match its header")
            parent = digest
            count += len(rows)
        live = state_digest(ledger.conn)
    finally:
        ledger.conn.execute("COMMIT")
    replayed = state_digest(mem)
    mem.close()
    if live != replayed:
        raise CorruptLedger(
            f"{ledger.path}: state after replaying {len(blocks) - 1} blocks differs from the file"
        )
    return ReplayReport(len(blocks) - 1, count, live)
