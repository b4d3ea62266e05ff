"""The ledger's SQLite file: schema, connection settings, and the state digest.

One file holds everything. Processes share it through SQLite itself: WAL journaling so
readers never block the block producer, a busy timeout so writers queue instead of
failing, and `BEGIN IMMEDIATE` around every change so each block (extrinsics, emission,
epoch) commits whole or not at all, even under SIGKILL.

State tables (what a replay must rebuild bit for bit): `state`, `accounts`, `neurons`,
`weights`, `bonds`, `commitments`, `contribution_commitments`: one row per (hotkey,
round) a miner committed a pseudo-gradient digest for, kept for good, a replaced UID's
rows too (validators still read them for past windows; the growth is one row per miner
per window), and `weight_commits`: validators' pending weight commits under
commit-reveal (`chain.commit_reveal`), at most one per (hotkey, reveal window), removed
when revealed, replaced, expired or when the hotkey loses its UID. History tables:
`blocks`, `extrinsics`, and `epoch_neurons`, the metagraph as each of the last
`EPOCH_HISTORY` epochs left it (so that peers reading at different moments can agree on
"the weights as of block b", as `metagraph(block=b)` answers on the real chain). The
`pool` holds submitted extrinsics that no block has taken yet.
"""

from __future__ import annotations

import hashlib
import json
import sqlite3
from pathlib import Path
from typing import Any

from chain.errors import CorruptLedger

FORMAT = "tensormine-ledger"
VERSION = 1

# The neurons' columns that `Ledger.neurons()` reads, in its order; an epoch copies them.
NEURON_COLUMNS = (
    "n.uid, n.hotkey, COALESCE(a.stake, 0), COALESCE(a.balance, 0), n.registered_block, "
    "n.last_update, n.validator_permit, n.rank, n.trust, n.consensus, n.incentive, "
    "n.dividends, n.validator_trust, n.emission"
)
NEURONS_FROM = "FROM neurons n LEFT JOIN accounts a ON a.address = n.hotkey"
EPOCH_HISTORY = 64  # epochs kept in `epoch_neurons`

# Added after version 1 without a version bump: `ensure_tables` creates it in older files.
EPOCH_NEURONS_SCHEMA = """
CREATE TABLE IF NOT EXISTS epoch_neurons (
    block INTEGER NOT NULL,
    uid INTEGER NOT NULL,
    hotkey TEXT NOT NULL,
    stake INTEGER NOT NULL,
    balance INTEGER NOT NULL,
    registered_block INTEGER NOT NULL,
    last_update INTEGER NOT NULL,
    validator_permit INTEGER NOT NULL,
    rank INTEGER NOT NULL,
    trust INTEGER NOT NULL,
    consensus INTEGER NOT NULL,
    incentive INTEGER NOT NULL,
    dividends INTEGER NOT NULL,
    validator_trust INTEGER NOT NULL,
    emission INTEGER NOT NULL,
    PRIMARY KEY (block, uid)
);
"""

# Also added after version 1; a state table, but an empty one adds nothing to
# `state_digest`, so files from before it keep their digest.
CONTRIBUTION_COMMITMENTS_SCHEMA = """
CREATE TABLE IF NOT EXISTS contribution_commitments (
    hotkey TEXT NOT NULL,
    round INTEGER NOT NULL,
    digest TEXT NOT NULL,
    block INTEGER NOT NULL,
    PRIMARY KEY (hotkey, round)
);
"""
# Also added after version 1, the same way: pending weight commits (`chain.commit_reveal`).
# `epoch` is the reveal-window index of the block that included the commit.
WEIGHT_COMMITS_SCHEMA = """
CREATE TABLE IF NOT EXISTS weight_commits (
    hotkey TEXT NOT NULL,
    epoch INTEGER NOT NULL,
    commit_hash TEXT NOT NULL,
    block INTEGER NOT NULL,
    PRIMARY KEY (hotkey, epoch)
);
"""
LATE_TABLES = {
    "epoch_neurons": EPOCH_NEURONS_SCHEMA,
    "contribution_commitments": CONTRIBUTION_COMMITMENTS_SCHEMA,
    "weight_commits": WEIGHT_COMMITS_SCHEMA,
}

SCHEMA = (
    """
CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE state (
    id INTEGER PRIMARY KEY CHECK (id = 1),
    block INTEGER NOT NULL,
    total_issuance INTEGER NOT NULL,
    pending_emission INTEGER NOT NULL
);
CREATE TABLE accounts (
    address TEXT PRIMARY KEY,
    balance INTEGER NOT NULL CHECK (balance >= 0),
    stake INTEGER NOT NULL CHECK (stake >= 0),
    nonce INTEGER NOT NULL CHECK (nonce >= 0)
);
CREATE TABLE neurons (
    uid INTEGER PRIMARY KEY,
    hotkey TEXT NOT NULL UNIQUE,
    registered_block INTEGER NOT NULL,
    last_update INTEGER NOT NULL,
    weights_block INTEGER,
    validator_permit INTEGER NOT NULL DEFAULT 0,
    rank INTEGER NOT NULL DEFAULT 0,
    trust INTEGER NOT NULL DEFAULT 0,
    consensus INTEGER NOT NULL DEFAULT 0,
    incentive INTEGER NOT NULL DEFAULT 0,
    dividends INTEGER NOT NULL DEFAULT 0,
    validator_trust INTEGER NOT NULL DEFAULT 0,
    emission INTEGER NOT NULL DEFAULT 0
);
CREATE TABLE weights (uid INTEGER PRIMARY KEY, data TEXT NOT NULL);
CREATE TABLE bonds (uid INTEGER PRIMARY KEY, data TEXT NOT NULL);
CREATE TABLE commitments (hotkey TEXT PRIMARY KEY, data TEXT NOT NULL, block INTEGER NOT NULL);
CREATE TABLE blocks (
    number INTEGER PRIMARY KEY,
    hash TEXT NOT NULL UNIQUE,
    parent_hash TEXT NOT NULL,
    timestamp REAL NOT NULL,
    extrinsics_root TEXT NOT NULL,
    emission INTEGER NOT NULL,
    epoch INTEGER NOT NULL
);
CREATE TABLE extrinsics (
    hash TEXT PRIMARY KEY,
    block INTEGER NOT NULL,
    idx INTEGER NOT NULL,
    body TEXT NOT NULL,
    status TEXT NOT NULL CHECK (status IN ('ok', 'failed', 'dropped')),
    error_type TEXT,
    error TEXT,
    UNIQUE (block, idx)
);
CREATE TABLE pool (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    hash TEXT NOT NULL UNIQUE,
    signer TEXT NOT NULL,
    nonce INTEGER NOT NULL,
    body TEXT NOT NULL,
    submitted_at REAL NOT NULL
);
CREATE INDEX pool_signer ON pool (signer, nonce);
"""
    + EPOCH_NEURONS_SCHEMA
    + CONTRIBUTION_COMMITMENTS_SCHEMA
    + WEIGHT_COMMITS_SCHEMA
)

# table -> its primary key, the ORDER BY of `state_digest` (a total order on the rows)
STATE_TABLES = {
    "state": "id",
    "accounts": "address",
    "neurons": "uid",
    "weights": "uid",
    "bonds": "uid",
    "commitments": "hotkey",
    "contribution_commitments": "hotkey, round",
    "weight_commits": "hotkey, epoch",
}


def connect(path: Path | str, *, timeout: float = 30.0) -> sqlite3.Connection:
    """Open a connection in autocommit mode with the ledger's pragmas."""
    try:
        conn = sqlite3.connect(str(path), timeout=timeout, isolation_level=None)
        conn.execute("PRAGMA journal_mode=WAL")
        # NORMAL is durable against a killed process (the WAL is fsynced at checkpoint);
        # only a power loss can drop the last transactions.
        conn.execute("PRAGMA synchronous=NORMAL")
        conn.execute(f"PRAGMA busy_timeout={int(timeout * 1000)}")
        conn.execute("PRAGMA foreign_keys=ON")
    except sqlite3.DatabaseError as exc:
        raise CorruptLedger(f"{path}: not a readable SQLite database ({exc})") from exc
    return conn


def ensure_tables(conn: sqlite3.Connection) -> None:
    """Create the tables (`LATE_TABLES`) that a ledger written by an older version lacks."""
    for name, schema in LATE_TABLES.items():
        row = conn.execute(
            "SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = ?", (name,)
        ).fetchone()
        if row is None:
            conn.executescript(schema)


def record_epoch(conn: sqlite3.Connection, block: int) -> None:
    """Copy the metagraph as this epoch leaves it into `epoch_neurons` (inside the
    epoch's transaction) and forget epochs older than the last `EPOCH_HISTORY`."""
    conn.execute(
        f"INSERT OR REPLACE INTO epoch_neurons SELECT ?, {NEURON_COLUMNS} {NEURONS_FROM}",
        (block,),
    )
    conn.execute(
        "DELETE FROM epoch_neurons WHERE block < (SELECT MIN(block) FROM "
        "(SELECT DISTINCT block FROM epoch_neurons ORDER BY block DESC LIMIT ?))",
        (EPOCH_HISTORY,),
    )


def create_schema(conn: sqlite3.Connection, meta: dict[str, str]) -> None:
    conn.executescript(SCHEMA)
    conn.executemany(
        "INSERT INTO meta (key, value) VALUES (?, ?)",
        [("format", FORMAT), ("version", str(VERSION)), *meta.items()],
    )


def read_meta(conn: sqlite3.Connection, path: Path | str) -> dict[str, str]:
    """The meta table, after checking this really is a ledger of our version."""
    try:
        rows = conn.execute("SELECT key, value FROM meta").fetchall()
    except sqlite3.DatabaseError as exc:
        raise CorruptLedger(f"{path}: not a tensormine ledger ({exc})") from exc
    meta = {str(k): str(v) for k, v in rows}
    if meta.get("format") != FORMAT:
        raise CorruptLedger(f"{path}: not a tensormine ledger (format {meta.get('format')!r})")
    if meta.get("version") != str(VERSION):
        raise CorruptLedger(f"{path}: ledger format version {meta.get('version')}, need {VERSION}")
    return meta


def state_digest(conn: sqlite3.Connection) -> str:
    """sha256 over every state table in key order: equal digests mean equal state.

    Rows are fed to the hash one by one, each tagged with its table, so an empty table
    feeds nothing: adding a state table keeps the digests of ledgers that never use it."""
    h = hashlib.sha256()
    for table, key in STATE_TABLES.items():
        cursor = conn.execute(f"SELECT * FROM {table} ORDER BY {key}")
        columns = [d[0] for d in cursor.description]
        for row in cursor:
            record: dict[str, Any] = {"table": table, **dict(zip(columns, row, strict=True))}
            h.update(json.dumps(record, sort_keys=True).encode())
    return h.hexdigest()


def begin(conn: sqlite3.Connection) -> None:
    """Start a write transaction that holds the write lock from its first statement."""
    conn.execute("BEGIN IMMEDIATE")
