"""`BittensorChain`: the `Chain` interface on subtensor, through the bittensor SDK (v11).

    chain = BittensorChain.connect(cfg.chain, identity)    # or chain.factory.open_chain
    uid = chain.register()
    chain.set_weights([0, 3], [0.25, 0.75])

Reads go through the SDK's typed reads and generic storage queries, pinned to a block
when one is asked for; writes go through its intents and ``client.execute(intent,
wallet)`` (``BurnedRegister``, ``SetWeights``, ``AddStake``, ``RemoveStake``,
``Transfer``), which preflight, conform and sign them, and pick the chain's path: the
SDK switches weights to a timelocked commit-reveal v4 commit when the subnet runs
commit-reveal and MEV-shields registration. Commitments, which no intent wraps, are a
raw ``Commitments.set_commitment`` call (``client.submit_call``), checked against the
chain's limits first (`chain.bittensor.commitments`).

As on the local ledger, a write returns its `Receipt` once a block includes it and a
refusal raises the `chain.errors` class naming the cause (`chain.bittensor.errors`).
Amounts are rao of TAO, except stake: on dynamic-TAO subnets ``add_stake`` swaps TAO
into the subnet's alpha (slippage-protected at 5%) and ``remove_stake`` takes alpha rao.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from concurrent.futures import TimeoutError as FutureTimeout
from pathlib import Path
from typing import Any, TypeVar

from bittensor import Balance
from bittensor import calls as sdk_calls
from bittensor import storage as sdk_storage
from bittensor.intents import AddStake, BurnedRegister, RemoveStake, SetWeights, Transfer

from chain.bittensor.commitments import contribution_body, raw_fields, space_cost, space_left
from chain.bittensor.connection import open_client
from chain.bittensor.errors import receipt_of, result_block, translate_weights
from chain.bittensor.paths import redirect_sdk_caches
from chain.bittensor.reads import SDK_FAILURES, ST, SubtensorReads
from chain.bittensor.signing import IdentityWallet
from chain.config import ChainConfig
from chain.errors import ChainError, InvalidCall, NotIncluded, RateLimited, WalletError
from chain.interface import Identity
from chain.types import Receipt

logger = logging.getLogger(__name__)

T = TypeVar("T")


class BittensorChain(SubtensorReads):
    """A handle on one subnet of a subtensor chain; one per thread (`reopen`)."""

    backend = "bittensor"

    @classmethod
    def connect(
        cls,
        config: ChainConfig,
        identity: Identity | None = None,
        *,
        substrate: object | None = None,
        default_cache_dir: Path | None = None,
        retry_delay_s: float = 1.0,
    ) -> BittensorChain:
        """Connect to ``config.network`` (`ChainUnreachable` after ``config.retries``
        retries) and check that subnet ``config.netuid`` exists. The SDK's caches go to
        ``config.cache_dir``, else `default_cache_dir`, else ``<config.db's folder>/
        bittensor`` (the run folder). `substrate` replaces the SDK's websocket backend."""
        cache_dir = config.cache_dir or default_cache_dir or config.db.parent / "bittensor"
        redirect_sdk_caches(cache_dir)
        client = open_client(config, substrate, retry_delay_s=retry_delay_s)
        chain = cls(client, config, identity, substrate=substrate, cache_dir=cache_dir)
        try:
            exists = chain._query(ST.NetworksAdded, [config.netuid])
        except ChainError:
            chain.close()
            raise
        if not exists:
            chain.close()
            raise ChainError(f"subnet {config.netuid} does not exist on {chain.describe}")
        logger.info("connected to %s", chain.describe)
        return chain

    # ---- lifecycle -------------------------------------------------------------------
    def reopen(self, identity: Identity | None = None) -> BittensorChain:
        return BittensorChain.connect(
            self.config, identity, substrate=self._substrate, default_cache_dir=self.cache_dir
        )

    def close(self) -> None:
        self._client.close()

    # ---- writes ----------------------------------------------------------------------
    def _wallet(self, *, coldkey: bool) -> IdentityWallet:
        identity = self.signer()
        wallet = IdentityWallet(identity)
        if coldkey and not wallet.has_coldkey:
            raise WalletError(
                f"this write moves funds and needs the coldkey {identity.coldkey_address}, "
                "which is not unlocked: set the password in the variable "
                f"{self.config.wallet.password_env} names"
            )
        return wallet

    def _receipt(self, action: str, result: Any, *, waited: bool = True) -> Receipt:
        head = result_block(result)
        if head is None and waited:
            head = self.block_number()
        receipt = receipt_of(result, action, head=-1 if head is None else head, waited=waited)
        logger.info(
            "%s on %s: %s in block %d%s",
            action,
            self.describe,
            receipt.status,
            receipt.block,
            f" ({receipt.error})" if receipt.error else "",
        )
        return receipt.raise_for_status()

    def _execute(self, action: str, intent: Any, wallet: IdentityWallet) -> Receipt:
        result = self._sdk(
            action,
            lambda: self._client.execute(
                intent, wallet, wait_for_inclusion=True, wait_for_finalization=False
            ),
        )
        return self._receipt(action, result)

    def register(self) -> int:
        address = self.signer().address
        uid = self.uid_of(address)
        if uid is not None:
            return uid
        intent = BurnedRegister(netuid=self.netuid, hotkey_ss58=address)
        self._execute("register", intent, self._wallet(coldkey=True))
        uid = self.uid_of(address)
        if uid is None:
            raise ChainError(f"{address} registered on {self.describe} but holds no UID")
        return uid

    def set_weights(
        self, uids: Sequence[int], weights: Sequence[float], *, wait: bool = True
    ) -> Receipt:
        wallet = self._wallet(coldkey=False)
        try:
            intent = SetWeights(
                netuid=self.netuid, uids=[int(u) for u in uids], weights=[float(w) for w in weights]
            )
            result = self._client.execute(
                intent, wallet, wait_for_inclusion=wait, wait_for_finalization=False
            )
        except SDK_FAILURES as error:
            raise translate_weights(error, where=self.describe) from error
        return self._receipt("set_weights", result, waited=wait)

    def _check_space(self, hotkey: str, cost: int) -> None:
        """`RateLimited` when the chain's ``UsedSpaceOf`` says this epoch's commitment
        budget cannot take `cost` more bytes (the chain would refuse it)."""
        commitments = sdk_storage.Commitments
        max_space = self._query(commitments.MaxSpace, [])
        usage = self._query(commitments.UsedSpaceOf, [self.netuid, hotkey])
        index = self._query(ST.SubnetEpochIndex, [self.netuid])
        if index is None:
            index = (self.block_number() + self.netuid + 1) // (self.tempo + 1)
        left = space_left(usage, max_space, int(index))
        if left is not None and cost > left:
            raise RateLimited(
                f"{hotkey} has {max(left, 0)} of {max_space} commitment bytes left this epoch "
                f"on {self.describe} and this commitment needs {cost}; the budget renews at "
                f"the next epoch (block {self.next_epoch_block()})"
            )

    def commit(self, data: str, *, wait: bool = True) -> Receipt:
        wallet = self._wallet(coldkey=False)
        fields = raw_fields(data, self.max_commitment_fields(), where=self.describe)
        self._check_space(self.signer().address, space_cost(fields))
        call = sdk_calls.Commitments.set_commitment(netuid=self.netuid, info={"fields": fields})
        result = self._sdk(
            "commit",
            lambda: self._client.submit_call(
                call, wallet, signer="hotkey", wait_for_inclusion=wait, wait_for_finalization=False
            ),
        )
        return self._receipt("commit", result, waited=wait)

    def commit_contribution(
        self, round: int, digest: str, *, timeout: float | None = None
    ) -> Receipt:
        address = self.signer().address
        text = contribution_body(
            self.commitment_fields(address), round, digest, hotkey=address, where=self.describe
        )
        what = f"the round-{round} contribution commitment"
        return self._within(timeout, what, lambda: self.commit(text))

    def _within(self, timeout: float | None, what: str, write: Callable[[], T]) -> T:
        """Run `write` (which waits for inclusion), giving up after `timeout` seconds with
        `NotIncluded`; the extrinsic, already submitted, may still land."""
        if timeout is None:
            return write()
        pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="bittensor-write")
        try:
            return pool.submit(write).result(timeout=timeout)
        except FutureTimeout:
            raise NotIncluded(
                f"{what} was not included within {timeout:g}s on {self.describe}; it may "
                "still land in a later block"
            ) from None
        finally:
            pool.shutdown(wait=False)

    def add_stake(self, amount_rao: int) -> Receipt:
        intent = AddStake(
            hotkey_ss58=self.signer().address,
            netuid=self.netuid,
            amount_tao=Balance.from_rao(_positive(amount_rao, "add_stake")),
        )
        return self._execute("add_stake", intent, self._wallet(coldkey=True))

    def remove_stake(self, amount_rao: int) -> Receipt:
        intent = RemoveStake(
            hotkey_ss58=self.signer().address,
            netuid=self.netuid,
            amount_alpha=Balance.from_rao(_positive(amount_rao, "remove_stake"), self.netuid),
        )
        return self._execute("remove_stake", intent, self._wallet(coldkey=True))

    def transfer(self, dest: str, amount_rao: int) -> Receipt:
        intent = Transfer(
            dest_ss58=dest, amount_tao=Balance.from_rao(_positive(amount_rao, "transfer"))
        )
        return self._execute("transfer", intent, self._wallet(coldkey=True))


def _positive(amount: int, call: str) -> int:
    if int(amount) <= 0:
        raise InvalidCall(f"{call}: the amount must be a positive number of rao (got {amount})")
    return int(amount)
