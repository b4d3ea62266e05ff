"""`LocalChain`: the `Chain` interface on the SQLite ledger of `chain.ledger`.

    chain = LocalChain(Ledger("runs/local/ledger.sqlite"), Identity.single(keypair))
    chain.register(); chain.set_weights([0, 1], [0.5, 0.5])

Writes are signed extrinsics submitted to the ledger's pool and waited for (a block
producer, `tensormine chain run` or `subnet up`, includes them); a refusal raises the
`chain.errors` class the runtime named. One key is hotkey and coldkey on this ledger.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from chain.client import weights_to_wire
from chain.errors import ChainError, NotIncluded
from chain.interface import Chain, Identity
from chain.ledger import Ledger
from chain.reveals import PendingReveals, commit_and_reveal, start_revealer, wait_reveals
from chain.runtime import validate_weight_vector
from chain.types import BlockInfo, ContributionCommitment, Neuron, Receipt


class LocalChain(Chain):
    """A handle on one ledger file; cheap to open, one per thread."""

    backend = "local"

    def __init__(
        self,
        ledger: Ledger,
        identity: Identity | None = None,
        *,
        timeout: float | None = None,
        reveals_dir: Path | None = None,
        auto_reveal: bool = True,
    ) -> None:
        """`reveals_dir` (a validator's run folder) keeps the salts and weights of
        unrevealed commits on a commit-reveal ledger, so a restart can still reveal them
        (in memory without it); `auto_reveal` reveals them on time from a background
        thread even when `set_weights` is not called again in the reveal window."""
        super().__init__(identity)
        self.ledger = ledger
        self.netuid = ledger.config.netuid
        self.timeout = timeout
        self.reveals_dir = reveals_dir
        self.auto_reveal = auto_reveal

    @classmethod
    def open(
        cls, path: Path | str, identity: Identity | None = None, *, reveals_dir: Path | None = None
    ) -> LocalChain:
        return cls(Ledger(path), identity, reveals_dir=reveals_dir)

    @property
    def path(self) -> Path:
        return self.ledger.path

    # ---- lifecycle -------------------------------------------------------------------
    def reopen(self, identity: Identity | None = None) -> LocalChain:
        return LocalChain(
            Ledger(self.ledger.path),
            identity,
            timeout=self.timeout,
            reveals_dir=self.reveals_dir,
            auto_reveal=self.auto_reveal,
        )

    def close(self) -> None:
        self.ledger.close()

    @property
    def describe(self) -> str:
        return f"the ledger {self.ledger.path}"

    # ---- time ------------------------------------------------------------------------
    def block_number(self) -> int:
        return self.ledger.block_number()

    def block(self, number: int) -> BlockInfo | None:
        header = self.ledger.block(number)
        if header is None:
            return None
        return BlockInfo(header.number, header.hash, header.timestamp)

    @property
    def block_time_s(self) -> float:
        return self.ledger.config.block_time_s

    @property
    def tempo(self) -> int:
        return self.ledger.config.tempo

    def wait_for_block(self, number: int, *, timeout: float | None = None) -> BlockInfo:
        limit = (
            timeout
            if timeout is not None
            else max(30.0, 5 * self.block_time_s * max(1, number - self.block_number()))
        )
        deadline = time.monotonic() + limit
        poll = min(0.2, self.block_time_s / 4)
        while True:
            info = self.block(number)
            if info is not None:
                return info
            if time.monotonic() >= deadline:
                raise NotIncluded(
                    f"block {number} not produced within {limit:.0f}s (head "
                    f"{self.block_number()}); is `tensormine chain run` producing blocks on "
                    f"{self.ledger.path}?"
                )
            time.sleep(poll)

    # ---- metagraph -------------------------------------------------------------------
    def neurons(self, *, block: int | None = None) -> list[Neuron]:
        if block is None or block >= self.block_number():
            return self.ledger.neurons()
        pinned = self.ledger.epoch_neurons(block)
        if pinned is None:
            raise ChainError(
                f"{self.describe} keeps the metagraph only as each recent epoch left it; "
                f"none ran by block {block}"
            )
        return pinned[1]

    def uid_of(self, hotkey: str) -> int | None:
        return self.ledger.uid_of(hotkey)

    def epoch_neurons(self, at_block: int) -> tuple[int, list[Neuron]] | None:
        return self.ledger.epoch_neurons(at_block)

    def weights(self, *, block: int | None = None) -> dict[int, list[tuple[int, int]]]:
        if block is not None and block < self.block_number():
            raise ChainError(f"{self.describe} keeps only the current weights")
        return self.ledger.weights()

    def balance(self, address: str) -> int:
        return self.ledger.account(address).balance

    # ---- commitments -----------------------------------------------------------------
    def commitments(self, *, block: int | None = None) -> dict[str, tuple[str, int]]:
        current = self.ledger.commitments()
        if block is None:
            return current
        # Commitments are replaced in place; one made after `block` hides the older one.
        return {h: v for h, v in current.items() if v[1] <= block}

    def contribution_commitments(
        self, round: int, *, block: int | None = None
    ) -> dict[str, ContributionCommitment]:
        rows = self.ledger.contribution_commitments(round)
        if block is None:
            return rows
        return {h: c for h, c in rows.items() if c.block <= block}

    def contribution_commitment(
        self, hotkey: str, round: int, *, block: int | None = None
    ) -> ContributionCommitment | None:
        found = self.ledger.contribution_commitment(hotkey, round)
        if found is None or (block is not None and found.block > block):
            return None
        return found

    # ---- writes ----------------------------------------------------------------------
    def _call(self, call: str, args: dict[str, Any], *, timeout: float | None = None) -> Receipt:
        key = self.signer().hotkey
        xt_hash = self.ledger.submit_call(key, call, args)
        return self.ledger.wait(xt_hash, timeout=self.timeout if timeout is None else timeout)

    def submit(self, call: str, args: dict[str, Any]) -> str:
        """Submit without waiting (returns the extrinsic hash; `ledger.wait` it)."""
        return self.ledger.submit_call(self.signer().hotkey, call, args)

    def register(self) -> int:
        address = self.signer().address
        uid = self.ledger.uid_of(address)
        if uid is None:
            self._call("register", {})
            uid = self.ledger.uid_of(address)
        if uid is None:  # pragma: no cover - the receipt said ok
            raise ChainError(f"{address} registered but holds no UID")
        return uid

    def set_weights(
        self, uids: Sequence[int], weights: Sequence[float], *, wait: bool = True
    ) -> Receipt:
        """Without commit-reveal: set the weights. With it (`chain.commit_reveal`): reveal
        the earlier commits that are due now, commit these weights and return the commit's
        receipt; they count from the first epoch after their reveal. `wait=False`: a
        pending receipt as soon as the pool took the (commit) extrinsic."""
        wire_uids, wire_weights = weights_to_wire(uids, weights)
        args = {"uids": wire_uids, "weights": wire_weights}
        if not self.ledger.config.commit_reveal:
            if wait:
                return self._call("set_weights", args)
            return Receipt(self.submit("set_weights", args), -1, "pending", None, None)
        # The ledger sees only a hash at commit time: check the vector here.
        validate_weight_vector(wire_uids, wire_weights, len(self.ledger.neurons()))
        key = self.signer().hotkey
        store = PendingReveals.shared(self.ledger.genesis_hash, key.address, self.reveals_dir)
        sent = commit_and_reveal(self.ledger, key, wire_uids, wire_weights, store)
        if self.auto_reveal:
            start_revealer(self.ledger.path, key, store)
        if not wait:
            return Receipt(sent.commit, -1, "pending", None, None)
        wait_reveals(self.ledger, sent.reveals, self.timeout)
        return self.ledger.wait(sent.commit, timeout=self.timeout)

    def commit(self, data: str, *, wait: bool = True) -> Receipt:
        if not wait:
            return Receipt(self.submit("commit", {"data": data}), -1, "pending", None, None)
        return self._call("commit", {"data": data})

    def commit_contribution(
        self, round: int, digest: str, *, timeout: float | None = None
    ) -> Receipt:
        args = {"round": round, "digest": digest}
        return self._call("commit_contribution", args, timeout=timeout)

    def add_stake(self, amount_rao: int) -> Receipt:
        return self._call("add_stake", {"amount": amount_rao})

    def remove_stake(self, amount_rao: int) -> Receipt:
        return self._call("remove_stake", {"amount": amount_rao})

    def transfer(self, dest: str, amount_rao: int) -> Receipt:
        return self._call("transfer", {"dest": dest, "amount": amount_rao})
