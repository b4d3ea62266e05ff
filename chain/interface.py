"""`Chain`: everything a miner, validator or averager asks of the chain, in one interface.

    chain = open_chain(cfg.chain, identity=identity)     # chain.factory
    uid = chain.register()
    chain.commit('{"dht": "/ip4/…", "store": "runs/x/contributions"}')
    chain.set_weights([0, 3], [0.25, 0.75])
    epoch_block, metagraph = chain.epoch_neurons(at_block=1234)

Two backends implement it: `chain.local.LocalChain` (the SQLite ledger, the default) and
`chain.bittensor.BittensorChain` (subtensor through the official `bittensor` SDK). Code
above `chain/` sees only this class and `chain.types`, so the same miner and validator
run against either.

A handle is bound to at most one `Identity` (the keys that sign its writes); reads need
none. Handles are not shared between threads: `reopen()` gives a thread its own.
Every failure raises a `chain.errors.ChainError` subclass naming the cause.
"""

from __future__ import annotations

import json
from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass
from types import TracebackType
from typing import Any, Protocol, runtime_checkable

from chain.errors import ChainError
from chain.types import BlockInfo, ContributionCommitment, Neuron, Receipt


@runtime_checkable
class SigningKey(Protocol):
    """A key that signs messages: an Ed25519 `chain.keys.Keypair` or a Bittensor wallet's
    sr25519 key. `chain.keys.verify` checks either against the SS58 address."""

    @property
    def address(self) -> str: ...

    def sign(self, message: bytes) -> bytes: ...


@dataclass(frozen=True)
class Identity:
    """Who signs: the hotkey (a neuron's identity: weights, commitments, registration,
    every signature peers check) and, where a write moves funds, the coldkey. On the
    local ledger one key is both. `coldkey` is None when only its address is known (a
    Bittensor wallet whose coldkey is not unlocked); writes that need it then fail."""

    hotkey: SigningKey
    coldkey: SigningKey | None
    coldkey_address: str

    @classmethod
    def single(cls, key: SigningKey) -> Identity:
        """One key as hotkey and coldkey (the local ledger's accounts)."""
        return cls(hotkey=key, coldkey=key, coldkey_address=key.address)

    @property
    def address(self) -> str:
        """The hotkey's SS58 address: the neuron's name on the chain."""
        return self.hotkey.address


def is_epoch_block(block: int, netuid: int, tempo: int) -> bool:
    """Subtensor's schedule: a subnet's epoch runs when (block + netuid + 1) mod
    (tempo + 1) == tempo, i.e. when blocks_until_next_epoch reaches 0."""
    return (block + netuid + 1) % (tempo + 1) == tempo


def blocks_until_epoch(block: int, netuid: int, tempo: int) -> int:
    """Blocks after `block` until the next epoch block (0 if `block` is one)."""
    return tempo - (block + netuid + 1) % (tempo + 1)


def parse_commitment_fields(data: str | None) -> dict[str, Any]:
    """A commitment as a JSON object, or {} when there is none or it is not one."""
    if data is None:
        return {}
    try:
        body = json.loads(data)
    except ValueError:
        return {}
    return body if isinstance(body, dict) else {}


class Chain(ABC):
    """One subnet on one chain, seen through a handle bound to an optional identity."""

    backend: str
    netuid: int

    def __init__(self, identity: Identity | None = None) -> None:
        self.identity = identity

    # ---- lifecycle -------------------------------------------------------------------
    @abstractmethod
    def reopen(self, identity: Identity | None = None) -> Chain:
        """A new handle on the same chain (for another thread or another signer)."""

    @abstractmethod
    def close(self) -> None: ...

    def __enter__(self) -> Chain:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    @property
    @abstractmethod
    def describe(self) -> str:
        """Where this chain is, for messages: a ledger path or a network and netuid."""

    # ---- time ------------------------------------------------------------------------
    @abstractmethod
    def block_number(self) -> int:
        """The head block's number."""

    @abstractmethod
    def block(self, number: int) -> BlockInfo | None:
        """Block `number`, or None while it is not produced yet."""

    @property
    @abstractmethod
    def block_time_s(self) -> float:
        """Target seconds per block."""

    @property
    @abstractmethod
    def tempo(self) -> int:
        """Blocks between the subnet's epochs."""

    def next_epoch_block(self, block: int | None = None) -> int:
        """The first epoch block at or after `block` (default: the head)."""
        at = self.block_number() if block is None else block
        return at + blocks_until_epoch(at, self.netuid, self.tempo)

    @abstractmethod
    def wait_for_block(self, number: int, *, timeout: float | None = None) -> BlockInfo:
        """Block until block `number` exists; `ChainError` after `timeout` seconds."""

    # ---- metagraph -------------------------------------------------------------------
    @abstractmethod
    def neurons(self, *, block: int | None = None) -> list[Neuron]:
        """The metagraph by UID, now or as it was at a past `block`."""

    def uid_of(self, hotkey: str) -> int | None:
        """`hotkey`'s UID on this subnet, or None."""
        for neuron in self.neurons():
            if neuron.hotkey == hotkey:
                return neuron.uid
        return None

    @abstractmethod
    def epoch_neurons(self, at_block: int) -> tuple[int, list[Neuron]] | None:
        """The metagraph as the last epoch at or before `at_block` left it: (that epoch's
        block, neurons by UID), or None when no epoch ran by then. Processes asking at
        different moments for the same `at_block` get the same answer.
        `chain.errors.PastStateUnavailable` when the chain no longer serves that block."""

    @abstractmethod
    def weights(self, *, block: int | None = None) -> dict[int, list[tuple[int, int]]]:
        """Revealed weight rows as the chain stores them: validator UID ->
        [(UID, u16 weight)], sparse (zero weights absent)."""

    @abstractmethod
    def balance(self, address: str) -> int:
        """Free balance of `address` in rao."""

    # ---- commitments -----------------------------------------------------------------
    @abstractmethod
    def commitments(self, *, block: int | None = None) -> dict[str, tuple[str, int]]:
        """hotkey -> (data, block) of each registered hotkey's latest commitment."""

    def max_commitment_bytes(self) -> int:
        """The longest commitment (UTF-8 bytes) the components' keys may make: what the
        chain stores, less any room the backend keeps for its own keys (on Bittensor, each
        window's contribution commitment)."""
        from chain.extrinsics import MAX_COMMITMENT_BYTES

        return MAX_COMMITMENT_BYTES

    def commitment_fields(self, hotkey: str) -> dict[str, Any]:
        """`hotkey`'s latest commitment as a JSON object, or {} when it has none or it is
        not one. Components share one commitment by owning keys of it (the averaging's
        DHT address, the miner's contributions location): read this, change your keys,
        commit the whole object again."""
        current = self.commitments().get(hotkey)
        return parse_commitment_fields(None if current is None else current[0])

    @abstractmethod
    def contribution_commitments(
        self, round: int, *, block: int | None = None
    ) -> dict[str, ContributionCommitment]:
        """hotkey -> its contribution commitment for training window `round`, as known at
        `block` (default: now). Hotkeys that lost their UID since are kept."""

    def contribution_commitment(
        self, hotkey: str, round: int, *, block: int | None = None
    ) -> ContributionCommitment | None:
        return self.contribution_commitments(round, block=block).get(hotkey)

    # ---- writes (signed by the bound identity) ---------------------------------------
    def signer(self) -> Identity:
        """The bound identity; `ChainError` when this handle has none."""
        if self.identity is None:
            raise ChainError(f"this handle on {self.describe} has no wallet or key to sign with")
        return self.identity

    @abstractmethod
    def register(self) -> int:
        """Register the hotkey (paying the chain's burn) if needed; returns its UID."""

    @abstractmethod
    def set_weights(
        self, uids: Sequence[int], weights: Sequence[float], *, wait: bool = True
    ) -> Receipt:
        """Set the hotkey's weights (non-negative floats, normalised by the chain). Where
        the chain runs commit-reveal this commits them; they count once revealed.
        `wait=False` returns once the chain accepted the extrinsic into its pool (a
        `Receipt` with status "pending" and block -1): a validator's loop never waits for
        a block."""

    @abstractmethod
    def commit(self, data: str, *, wait: bool = True) -> Receipt:
        """Replace the hotkey's commitment (UTF-8 text; `CommitmentTooLong` if the chain
        cannot hold it). `wait=False`: return once the chain took it into its pool (a
        pending `Receipt`)."""

    @abstractmethod
    def commit_contribution(
        self, round: int, digest: str, *, timeout: float | None = None
    ) -> Receipt:
        """Commit the sha256 hex `digest` of the hotkey's contribution to window `round`;
        its inclusion block is the commitment's time. Once per round. `timeout`: seconds
        to wait for inclusion (`chain.errors.NotIncluded` after; default the backend's)."""

    @abstractmethod
    def add_stake(self, amount_rao: int) -> Receipt:
        """Stake `amount_rao` from the coldkey onto the hotkey."""

    @abstractmethod
    def remove_stake(self, amount_rao: int) -> Receipt:
        """Unstake `amount_rao` from the hotkey back to the coldkey."""

    @abstractmethod
    def transfer(self, dest: str, amount_rao: int) -> Receipt:
        """Send `amount_rao` from the coldkey to `dest`."""
