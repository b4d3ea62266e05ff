"""What every chain backend returns: the values of `chain.interface.Chain`'s reads and
writes, in tensormine's own terms (rao integers, u16-scaled Yuma outputs as floats in
[0, 1], SS58 addresses), whichever chain produced them."""

from __future__ import annotations

from dataclasses import dataclass

from chain import errors
from chain.errors import ChainError


@dataclass(frozen=True)
class BlockInfo:
    """A block as the project uses it: its number, hash (hex, no 0x) and timestamp."""

    number: int
    hash: str
    timestamp: float


@dataclass(frozen=True)
class Receipt:
    """An extrinsic's outcome: `status` is ok | failed | dropped once included (a refusal
    names its `chain.errors` class in `error_type`), or pending (block -1) when the
    caller did not wait for inclusion."""

    hash: str
    block: int
    status: str
    error_type: str | None
    error: str | None

    @property
    def ok(self) -> bool:
        return self.status == "ok"

    def raise_for_status(self) -> Receipt:
        if self.ok or self.status == "pending":
            return self
        cls = getattr(errors, self.error_type or "", ChainError)
        if not (isinstance(cls, type) and issubclass(cls, ChainError)):
            cls = ChainError
        raise cls(f"{self.error} (extrinsic {self.hash[:12]}… in block {self.block})")


@dataclass(frozen=True)
class Neuron:
    """One UID of the metagraph. `stake` and `balance` are rao (`balance` is the hotkey
    account's free balance on the local ledger, 0 where the chain does not say);
    rank … validator_trust are u16 values scaled to [0, 1]; `emission` is the rao paid at
    the last epoch."""

    uid: int
    hotkey: str
    coldkey: str
    stake: int
    balance: int
    registered_block: int
    last_update: int
    validator_permit: bool
    rank: float
    trust: float
    consensus: float
    incentive: float
    dividends: float
    validator_trust: float
    emission: int


@dataclass(frozen=True)
class ContributionCommitment:
    """A miner's sha256 `digest` of its pseudo-gradient for training window `round`, as
    included in block `block` (compare with the window's deadline block)."""

    hotkey: str
    round: int
    digest: str
    block: int
