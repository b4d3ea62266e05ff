"""The ledger's SQLite file: schema, connection settings, and the state digest.

One file holds everything. Processes share it through SQLite itself: WAL journaling so
readers never block the block producer, a busy timeout so writers queue instead of
failing, and `BEGIN IMMEDIATE` around every change so each block (extrinsics, emission,
epoch) commits whole or not at all, even under SIGKILL.

State tables (what a replay must rebuild bit for bit): `state`, `accounts`, `neurons`,
`weights`, `bonds`, `commitments`. History tables: `blocks`, `extrinsics`. The `pool`
holds submitted extrinsics that no block has taken yet.
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

SCHEMA = """
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

STATE_TABLES = {
    "state": "id",
    "accounts": "address",
    "neurons": "uid",
    "weights": "uid",
    "bonds": "uid",
    "commitments": "hotkey",
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
    """sha256 over every state table in key order: equal digests mean equal state."""
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
