"""Property tests: random extrinsic sequences never break the ledger's books."""

from __future__ import annotations

import contextlib
import tempfile
from pathlib import Path

from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, rule

from chain.emission import TOTAL_SUPPLY_RAO
from chain.errors import ChainError
from chain.keys import Keypair
from chain.ledger import Ledger
from chain.replay import replay

from .conftest import TAO, fast_config

KEYS = [Keypair.generate() for _ in range(5)]
key = st.sampled_from(KEYS)
amount = st.integers(min_value=1, max_value=200 * TAO)


class LedgerMachine(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        self.dir = tempfile.TemporaryDirectory()
        cfg = fast_config(Path(self.dir.name) / "l.sqlite", max_uids=4, immunity_period=3)
        self.ledger = Ledger.create(cfg.db, cfg, KEYS[0].address)

    def submit(self, kp: Keypair, call: str, args: dict[str, object]) -> None:
        # Refused calls are part of the exploration; they must change nothing.
        with contextlib.suppress(ChainError):
            self.ledger.submit_call(kp, call, args)

    @rule(kp=key, value=amount)
    def faucet(self, kp: Keypair, value: int) -> None:
        self.submit(kp, "faucet", {"amount": min(value, 100_000 * TAO)})

    @rule(kp=key)
    def register(self, kp: Keypair) -> None:
        self.submit(kp, "register", {})

    @rule(kp=key, value=amount)
    def add_stake(self, kp: Keypair, value: int) -> None:
        self.submit(kp, "add_stake", {"amount": value})

    @rule(kp=key, value=amount)
    def remove_stake(self, kp: Keypair, value: int) -> None:
        self.submit(kp, "remove_stake", {"amount": value})

    @rule(kp=key, dest=key, value=amount)
    def transfer(self, kp: Keypair, dest: Keypair, value: int) -> None:
        self.submit(kp, "transfer", {"dest": dest.address, "amount": value})

    @rule(kp=key, weights=st.lists(st.integers(0, 65535), min_size=1, max_size=4))
    def set_weights(self, kp: Keypair, weights: list[int]) -> None:
        self.submit(kp, "set_weights", {"uids": list(range(len(weights))), "weights": weights})

    @rule(blocks=st.integers(min_value=1, max_value=12))
    def produce(self, blocks: int) -> None:
        self.ledger.advance(blocks)

    @invariant()
    def books_balance(self) -> None:
        issuance, pending = self.ledger.issuance()
        held = sum(a.balance + a.stake for a in self.ledger.accounts())
        assert held + pending == issuance
        assert 0 <= issuance <= TOTAL_SUPPLY_RAO
        assert all(a.balance >= 0 and a.stake >= 0 for a in self.ledger.accounts())

    def teardown(self) -> None:
        self.ledger.produce_block()
        replay(self.ledger)  # raises if history does not rebuild the same state
        self.ledger.close()
        self.dir.cleanup()


LedgerMachine.TestCase.settings = settings(
    max_examples=12,
    stateful_step_count=25,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)
TestLedgerMachine = LedgerMachine.TestCase
