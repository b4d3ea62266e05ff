"""What miners and validators call: sign, submit, wait, in one line each.

    client = LedgerClient(Ledger(path), keypair)
    client.register()
    client.set_weights([1, 2], [0.7, 0.3])

`weights_to_wire` turns float weights into the u16 vector the chain stores (largest
weight 65535, as subtensor's set_weights upscales it), refusing negative, NaN, infinite
and all-zero vectors before anything is signed. On a commit-reveal ledger `set_weights`
commits the weights and reveals the earlier commits due now (`chain.reveals`).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

from chain.consensus import weights_to_u16
from chain.errors import InvalidWeights
from chain.keys import Keypair
from chain.ledger import Ledger
from chain.reveals import PendingReveals, commit_and_reveal, start_revealer, wait_reveals
from chain.runtime import validate_weight_vector
from chain.types import Receipt


def weights_to_wire(uids: Sequence[int], weights: Sequence[float]) -> tuple[list[int], list[int]]:
    """(uids, u16 weights) ready for a set_weights extrinsic; raises `InvalidWeights`."""
    values = [float(w) for w in weights]
    if any(math.isnan(w) or math.isinf(w) for w in values):
        raise InvalidWeights("weights must be finite numbers (got NaN or infinity)")
    if any(w < 0 for w in values):
        raise InvalidWeights(f"weights must be >= 0 (got {min(values)})")
    if not any(w > 0 for w in values):
        raise InvalidWeights("all weights are zero")
    if len(uids) != len(values):
        raise InvalidWeights(f"{len(uids)} UIDs but {len(values)} weights")
    scaled = weights_to_u16(values)
    return [int(u) for u in uids], [int(w) for w in scaled]


class LedgerClient:
    """A ledger handle plus the key that signs for it."""

    def __init__(
        self,
        ledger: Ledger,
        keypair: Keypair,
        *,
        timeout: float | None = None,
        reveals: PendingReveals | None = None,
        auto_reveal: bool = True,
    ):
        """`reveals`: where the secrets of unrevealed weight commits are kept (default:
        this process's shared in-memory store for the key); `auto_reveal`: reveal them on
        time from a background thread (`chain.reveals.start_revealer`)."""
        self.ledger = ledger
        self.keypair = keypair
        self.timeout = timeout
        self.reveals = reveals
        self.auto_reveal = auto_reveal

    @property
    def address(self) -> str:
        return self.keypair.address

    def call(self, call: str, args: dict[str, Any], *, wait: bool = True) -> Receipt | str:
        xt_hash = self.ledger.submit_call(self.keypair, call, args)
        return self.ledger.wait(xt_hash, timeout=self.timeout) if wait else xt_hash

    def uid(self) -> int | None:
        return self.ledger.uid_of(self.address)

    def register(self) -> int:
        """Register (if needed) and return the UID."""
        uid = self.uid()
        if uid is None:
            self.call("register", {})
            uid = self.uid()
        assert uid is not None
        return uid

    def set_weights(
        self, uids: Sequence[int], weights: Sequence[float], *, wait: bool = True
    ) -> Receipt | str:
        """Set the weights or, on a commit-reveal ledger, reveal what is due and commit
        them; returns the (commit's) receipt, or its hash with `wait=False`."""
        wire_uids, wire_weights = weights_to_wire(uids, weights)
        validate_weight_vector(wire_uids, wire_weights, len(self.ledger.neurons()))
        if not self.ledger.config.commit_reveal:
            return self.call("set_weights", {"uids": wire_uids, "weights": wire_weights}, wait=wait)
        store = self.reveals or PendingReveals.shared(self.ledger.genesis_hash, self.address)
        sent = commit_and_reveal(self.ledger, self.keypair, wire_uids, wire_weights, store)
        if self.auto_reveal:
            start_revealer(self.ledger.path, self.keypair, store)
        if not wait:
            return sent.commit
        wait_reveals(self.ledger, sent.reveals, self.timeout)
        return self.ledger.wait(sent.commit, timeout=self.timeout)
