"""Ledger fixtures: a fresh ledger with short tempo, an open faucet and funded keys."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from chain.config import RAO_PER_TAO, ChainConfig
from chain.keys import Keypair
from chain.ledger import Ledger

TAO = RAO_PER_TAO


def fast_config(db: Path, **changes: object) -> ChainConfig:
    """A quick ledger. Weights take effect at once (`commit_reveal` off): tests of other
    things set them in one call; `test_commit_reveal.py` turns it on."""
    base: dict[str, object] = {
        "db": db,
        "block_time_s": 0.05,
        "tempo": 9,
        "weights_rate_limit": 0,
        "immunity_period": 5,
        "validator_min_stake_rao": 10 * TAO,
        "faucet_rao": 100_000 * TAO,
        "commit_reveal": False,
    }
    base.update(changes)
    return ChainConfig.model_validate(base)


@pytest.fixture
def owner() -> Keypair:
    return Keypair.generate()


@pytest.fixture
def ledger(tmp_path: Path, owner: Keypair) -> Iterator[Ledger]:
    cfg = fast_config(tmp_path / "ledger.sqlite")
    led = Ledger.create(cfg.db, cfg, owner.address)
    yield led
    led.close()


def do(ledger: Ledger, kp: Keypair, call: str, args: dict[str, object]) -> None:
    """Submit, include in the next block, and raise if it failed."""
    h = ledger.submit_call(kp, call, args)
    ledger.produce_block()
    receipt = ledger.receipt(h)
    assert receipt is not None
    receipt.raise_for_status()


def fund(ledger: Ledger, kp: Keypair, tao: int) -> None:
    do(ledger, kp, "faucet", {"amount": tao * TAO})


def subnet(
    ledger: Ledger, miners: int, validators: list[int]
) -> tuple[list[Keypair], list[Keypair]]:
    """Register validators first (UIDs 0..V-1, staked `validators[i]` TAO), then miners."""
    vals = [Keypair.generate() for _ in validators]
    mins = [Keypair.generate() for _ in range(miners)]
    hashes = []
    for kp, stake in zip(vals, validators, strict=True):
        hashes.append(ledger.submit_call(kp, "faucet", {"amount": (stake + 1) * TAO}))
        hashes.append(ledger.submit_call(kp, "register", {}))
        hashes.append(ledger.submit_call(kp, "add_stake", {"amount": stake * TAO}))
    for kp in mins:
        hashes.append(ledger.submit_call(kp, "register", {}))
    ledger.produce_block()
    for h in hashes:
        receipt = ledger.receipt(h)
        assert receipt is not None
        receipt.raise_for_status()
    return vals, mins
