"""`SubtensorReads`: the read half of `BittensorChain`, everything a `Chain` reads from
subtensor through the bittensor SDK.

Each read goes through the SDK's typed reads or its generic storage queries
(``client.query(storage.SubtensorModule.Tempo, [netuid], block=)``), pinned to a block
when the caller names one, so a past read needs the node to still hold that block's
state (`PastStateUnavailable` otherwise, naming ``chain.archive_network``). Every SDK
failure passes through `chain.bittensor.errors.translate`.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

from bittensor import BittensorError
from bittensor import constants as sdk_constants
from bittensor import storage as sdk_storage

from chain.bittensor.commitments import (
    CONTRIBUTION_RESERVE_BYTES,
    RAW_FIELD_BYTES,
    contribution_in,
)
from chain.bittensor.connection import endpoint_of
from chain.bittensor.errors import translate
from chain.bittensor.metagraph import neurons_of, weight_rows
from chain.config import ChainConfig
from chain.errors import ChainError, NotIncluded
from chain.interface import Chain, Identity, blocks_until_epoch, parse_commitment_fields
from chain.types import BlockInfo, ContributionCommitment, Neuron

T = TypeVar("T")
ST = sdk_storage.SubtensorModule
SDK_FAILURES = (BittensorError, OSError, TimeoutError, RuntimeError)


class SubtensorReads(Chain):
    """Reads of one subnet through a connected `bittensor.SyncClient`; the writes are
    `BittensorChain`'s."""

    def __init__(
        self,
        client: Any,
        config: ChainConfig,
        identity: Identity | None = None,
        *,
        substrate: object | None = None,
        cache_dir: Path | None = None,
    ) -> None:
        super().__init__(identity)
        self._client: Any = client
        self.config = config
        self.netuid = config.netuid
        self.endpoint = endpoint_of(config.network)
        self.cache_dir = cache_dir
        self._substrate = substrate
        self._block_time: float | None = None
        self._max_fields_cache: int | None = None

    # ---- plumbing --------------------------------------------------------------------
    def _sdk(self, action: str, call: Callable[[], T]) -> T:
        """Run one SDK call, turning its failures into `chain.errors` classes."""
        try:
            return call()
        except SDK_FAILURES as error:
            raise translate(error, action, where=self.describe) from error

    def _query(self, item: Any, params: list[Any], *, block: int | None = None) -> Any:
        at = "" if block is None else f" at block {block}"
        return self._sdk(
            f"reading {item[0]}.{item[1]}{at}",
            lambda: self._client.query(item, params, block=block),
        )

    def _pinned(self, block: int | None) -> int | None:
        """The block a read pins to: None (the head) for None or a block not produced
        yet, as the local ledger answers such reads with the current state."""
        if block is None or block > self.block_number():
            return None
        return block

    @property
    def client(self) -> Any:
        """The connected `bittensor.SyncClient`, for what this interface does not cover
        (hyperparameters, pending timelocked commits, ...)."""
        return self._client

    @property
    def describe(self) -> str:
        network = self.config.network
        where = network if network == self.endpoint else f"{network} ({self.endpoint})"
        return f"subtensor {where} netuid {self.netuid}"

    # ---- time ------------------------------------------------------------------------
    def block_number(self) -> int:
        return int(self._sdk("reading the head block", lambda: self._client.block))

    def block(self, number: int) -> BlockInfo | None:
        if number < 0 or number > self.block_number():
            return None
        info = self._sdk(f"reading block {number}", lambda: self._client.block_info(number))
        if info is None:
            return None
        return BlockInfo(
            int(info.number), str(info.hash or "").removeprefix("0x"), info.timestamp.timestamp()
        )

    @property
    def block_time_s(self) -> float:
        if self._block_time is None:
            self._block_time = float(
                self._sdk("reading the block time", lambda: self._client.block_time())
            )
        return self._block_time

    @property
    def tempo(self) -> int:
        return int(self._query(ST.Tempo, [self.netuid]))

    def wait_for_block(self, number: int, *, timeout: float | None = None) -> BlockInfo:
        head = self.block_number()
        limit = (
            timeout
            if timeout is not None
            else max(30.0, 5 * self.block_time_s * max(1, number - head))
        )
        try:
            self._client.wait_for_block(number, timeout=max(limit, 0.001))
        except TimeoutError:
            raise NotIncluded(
                f"block {number} not produced within {limit:.1f}s on {self.describe} (head "
                f"{self.block_number()})"
            ) from None
        except SDK_FAILURES as error:
            raise translate(error, f"waiting for block {number}", where=self.describe) from error
        info = self.block(number)
        if info is None:
            raise NotIncluded(f"block {number} reported but not readable on {self.describe}")
        return info

    # ---- metagraph -------------------------------------------------------------------
    def neurons(self, *, block: int | None = None) -> list[Neuron]:
        block = self._pinned(block)
        where = "now" if block is None else f"at block {block}"
        metagraph = self._sdk(
            f"reading the metagraph {where}",
            lambda: self._client.subnets.metagraph(self.netuid, block=block, commitments=False),
        )
        if metagraph is None:
            raise ChainError(f"subnet {self.netuid} does not exist on {self.describe} ({where})")
        return neurons_of(metagraph)

    def uid_of(self, hotkey: str) -> int | None:
        uid = self._query(ST.Uids, [self.netuid, hotkey])
        return None if uid is None else int(uid)

    def last_epoch_block(self, at_block: int) -> int | None:
        """The block of the last epoch at or before `at_block`: the chain's own
        ``LastEpochBlock`` as of that block (epochs can move: owner-triggered epochs,
        tempo changes), or the schedule of `chain.interface.is_epoch_block` where the
        runtime has no such item. None when no epoch ran by then."""
        last = self._query(ST.LastEpochBlock, [self.netuid], block=at_block)
        if last is not None:
            return int(last) if 0 < int(last) <= at_block else None
        tempo = int(self._query(ST.Tempo, [self.netuid], block=at_block))
        since = (tempo + 1 - blocks_until_epoch(at_block, self.netuid, tempo)) % (tempo + 1)
        return at_block - since if at_block - since > 0 else None

    def epoch_neurons(self, at_block: int) -> tuple[int, list[Neuron]] | None:
        at = min(at_block, self.block_number())
        if at < 0:
            return None
        epoch_block = self.last_epoch_block(at)
        if epoch_block is None:
            return None
        return epoch_block, self.neurons(block=epoch_block)

    def weights(self, *, block: int | None = None) -> dict[int, list[tuple[int, int]]]:
        block = self._pinned(block)
        rows = self._sdk(
            "reading the weights",
            lambda: self._client.query_map(ST.Weights, [self.netuid], block=block),
        )
        return weight_rows(rows)

    def balance(self, address: str) -> int:
        free = self._sdk(
            f"reading the balance of {address}", lambda: self._client.balances.get(address)
        )
        return int(free.rao)

    # ---- commitments -----------------------------------------------------------------
    def _commitment_records(self, block: int | None) -> dict[str, Any]:
        block = self._pinned(block)
        where = "now" if block is None else f"at block {block}"
        records: dict[str, Any] = self._sdk(
            f"reading the commitments {where}",
            lambda: self._client.subnets.commitments(self.netuid, block=block),
        )
        return records

    def commitments(self, *, block: int | None = None) -> dict[str, tuple[str, int]]:
        return {
            hotkey: (str(c.value), int(c.block))
            for hotkey, c in self._commitment_records(block).items()
            if c.uid is not None and c.value is not None
        }

    def commitment_fields(self, hotkey: str) -> dict[str, Any]:
        record = self._sdk(
            f"reading the commitment of {hotkey}",
            lambda: self._client.identity.commitment(self.netuid, hotkey),
        )
        return parse_commitment_fields(None if record is None else str(record.data))

    def contribution_commitments(
        self, round: int, *, block: int | None = None
    ) -> dict[str, ContributionCommitment]:
        out: dict[str, ContributionCommitment] = {}
        for hotkey, record in self._commitment_records(block).items():
            if record.value is None:
                continue
            named = contribution_in(parse_commitment_fields(str(record.value)))
            if named is not None and named[0] == round:
                out[hotkey] = ContributionCommitment(hotkey, round, named[1], int(record.block))
        return dict(sorted(out.items()))

    def max_commitment_fields(self) -> int:
        """``Commitments.MaxFields``: how many fields one commitment holds (cached)."""
        if self._max_fields_cache is None:
            self._max_fields_cache = int(
                self._sdk(
                    "reading Commitments.MaxFields",
                    lambda: self._client.constant(sdk_constants.Commitments.MaxFields),
                )
            )
        return self._max_fields_cache

    def max_commitment_bytes(self) -> int:
        """Room (UTF-8 bytes) for the components' keys of the commitment: ``MaxFields``
        Raw fields of `RAW_FIELD_BYTES`, less `CONTRIBUTION_RESERVE_BYTES` kept for each
        window's contribution key (see `chain.bittensor.commitments`)."""
        return RAW_FIELD_BYTES * self.max_commitment_fields() - CONTRIBUTION_RESERVE_BYTES
