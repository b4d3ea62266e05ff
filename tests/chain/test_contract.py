"""One contract for every `chain.interface.Chain` backend, run on each:

- ``local``: `LocalChain` on a fresh SQLite ledger (`tests.chain.conftest.fast_config`,
  commit-reveal off), a thread including submitted extrinsics as they arrive;
- ``bittensor``: `BittensorChain` through the real bittensor SDK on
  `tests.chain.substrate.InMemorySubtensor`.

A test asks its `Env` for funded identities, handles and blocks; everything else goes
through the `Chain` interface alone.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from chain.bittensor import BittensorChain
from chain.config import RAO_PER_TAO, ChainConfig
from chain.errors import (
    AlreadyCommitted,
    ChainError,
    InsufficientFunds,
    InvalidCall,
    InvalidWeights,
    NotIncluded,
    NotRegistered,
    NoValidatorPermit,
    RateLimited,
)
from chain.interface import Chain, Identity, is_epoch_block
from chain.keys import Keypair
from chain.ledger import Ledger
from chain.local import LocalChain
from chain.types import ContributionCommitment
from tests.chain.conftest import do, fast_config
from tests.chain.substrate import InMemorySubtensor, SdkKey, isolate_sdk_paths

TAO = RAO_PER_TAO
TEMPO = 9
NETUID = 1
DIGEST = "ab" * 32


class Env:
    """A fresh chain of one backend, and what a test needs around the interface."""

    name: str
    tempo = TEMPO
    netuid = NETUID

    def __init__(self) -> None:
        self.handles: list[Chain] = []

    def identity(self, tao: int = 0) -> Identity:
        raise NotImplementedError

    def open(self, identity: Identity | None) -> Chain:
        raise NotImplementedError

    def chain(self, identity: Identity | None = None) -> Chain:
        handle = self.open(identity)
        self.handles.append(handle)
        return handle

    def produce(self) -> int:
        """One block; returns its number."""
        raise NotImplementedError

    def advance(self, blocks: int) -> int:
        head = -1
        for _ in range(blocks):
            head = self.produce()
        return head

    def advance_to_epoch(self) -> int:
        while True:
            block = self.produce()
            if is_epoch_block(block, self.netuid, self.tempo):
                return block

    def close(self) -> None:
        for handle in self.handles:
            handle.close()


class LocalEnv(Env):
    name = "local"

    def __init__(self, folder: Path, **changes: object) -> None:
        super().__init__()
        cfg = fast_config(folder / "ledger.sqlite", commit_reveal=False, **changes)
        self.ledger = Ledger.create(cfg.db, cfg, Keypair.generate().address)
        self._stop = threading.Event()
        self._producer = threading.Thread(target=self._include, daemon=True)
        self._producer.start()

    def _include(self) -> None:
        """Make a block whenever the pool holds an extrinsic (writes wait for one)."""
        with Ledger(self.ledger.path) as ledger:
            while not self._stop.is_set():
                if ledger.pool_size():
                    ledger.produce_block()
                else:
                    time.sleep(0.002)

    def identity(self, tao: int = 0) -> Identity:
        key = Keypair.generate()
        if tao:
            do(self.ledger, key, "faucet", {"amount": tao * TAO})
        return Identity.single(key)

    def open(self, identity: Identity | None) -> Chain:
        return LocalChain(Ledger(self.ledger.path), identity, timeout=10)

    def produce(self) -> int:
        return self.ledger.produce_block().number

    def close(self) -> None:
        self._stop.set()
        self._producer.join(timeout=5)
        super().close()
        self.ledger.close()


class BittensorEnv(Env):
    name = "bittensor"

    def __init__(self, folder: Path, **changes: object) -> None:
        super().__init__()
        self.substrate = InMemorySubtensor(netuid=NETUID, tempo=TEMPO, **changes)
        self.config = ChainConfig(
            backend="bittensor", network="local", netuid=NETUID, cache_dir=folder / "bittensor"
        )

    def identity(self, tao: int = 0) -> Identity:
        hotkey, coldkey = SdkKey.generate(), SdkKey.generate()
        if tao:
            self.substrate.fund(coldkey.address, tao * TAO)
        return Identity(hotkey=hotkey, coldkey=coldkey, coldkey_address=coldkey.address)

    def open(self, identity: Identity | None) -> Chain:
        return BittensorChain.connect(self.config, identity, substrate=self.substrate)

    def produce(self) -> int:
        return self.substrate.produce_blocks(1)


@pytest.fixture
def sdk_paths(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    isolate_sdk_paths(monkeypatch, tmp_path / "home")


@pytest.fixture(params=["local", "bittensor"])
def make_env(
    request: pytest.FixtureRequest, tmp_path: Path, sdk_paths: None
) -> Iterator[Callable[..., Env]]:
    made: list[Env] = []

    def make(**changes: object) -> Env:
        folder = tmp_path / f"env{len(made)}"
        folder.mkdir()
        env = (
            LocalEnv(folder, **changes)
            if request.param == "local"
            else BittensorEnv(folder, **changes)
        )
        made.append(env)
        return env

    yield make
    for env in made:
        env.close()


@pytest.fixture
def env(make_env: Callable[..., Env]) -> Env:
    return make_env()


def registered(env: Env, tao: int = 10) -> tuple[Identity, Chain, int]:
    identity = env.identity(tao)
    chain = env.chain(identity)
    return identity, chain, chain.register()


def staked_validator(env: Env, stake_tao: int = 50) -> tuple[Identity, Chain, int]:
    identity, chain, uid = registered(env, tao=stake_tao + 10)
    chain.add_stake(stake_tao * TAO)
    env.advance_to_epoch()
    return identity, chain, uid


# ---- time ----------------------------------------------------------------------------
def test_blocks_time_and_epochs(env: Env) -> None:
    chain = env.chain()
    head = chain.block_number()
    info = chain.block(head)
    assert info is not None and info.number == head and info.timestamp > 0
    assert len(info.hash) == 64 and int(info.hash, 16) >= 0
    assert chain.block(head + 100) is None
    assert chain.tempo == env.tempo and chain.block_time_s > 0
    upcoming = chain.next_epoch_block()
    assert upcoming >= head and is_epoch_block(upcoming, env.netuid, env.tempo)
    assert chain.next_epoch_block(upcoming) == upcoming
    env.advance(2)
    assert chain.wait_for_block(head + 2, timeout=5).number == head + 2
    later = chain.block(head + 2)
    assert later is not None and later.timestamp >= info.timestamp and later.hash != info.hash
    with pytest.raises(NotIncluded):
        chain.wait_for_block(chain.block_number() + 50, timeout=0.2)


# ---- metagraph -----------------------------------------------------------------------
def test_register_is_idempotent_and_shows_in_the_metagraph(env: Env) -> None:
    alice, chain, uid = registered(env)
    assert chain.register() == uid
    assert chain.uid_of(alice.address) == uid
    assert chain.uid_of(env.identity().address) is None
    neuron = chain.neurons()[uid]
    assert (neuron.uid, neuron.hotkey, neuron.coldkey) == (
        uid,
        alice.address,
        alice.coldkey_address,
    )
    assert not neuron.validator_permit and neuron.stake == 0
    assert all(0.0 <= x <= 1.0 for x in (neuron.trust, neuron.incentive, neuron.dividends))


def test_stake_permit_weights_and_unstake(env: Env) -> None:
    val, chain, vuid = registered(env, tao=60)
    _, _, muid = registered(env)
    before = chain.balance(val.coldkey_address)
    assert chain.add_stake(50 * TAO).ok
    assert chain.balance(val.coldkey_address) <= before - 50 * TAO
    assert chain.neurons()[vuid].stake >= 50 * TAO  # the local ledger pays epochs in stake
    env.advance_to_epoch()
    assert chain.neurons()[vuid].validator_permit
    receipt = chain.set_weights([vuid, muid], [0.25, 0.75])
    assert receipt.ok and receipt.block > 0
    row = dict(chain.weights()[vuid])
    assert row[muid] == 65535 and abs(row[vuid] - 21845) <= 1
    free = chain.balance(val.coldkey_address)
    chain.remove_stake(10 * TAO)
    assert chain.balance(val.coldkey_address) == free + 10 * TAO


def test_epoch_neurons_are_the_metagraph_the_last_epoch_left(env: Env) -> None:
    chain = env.chain()
    assert chain.epoch_neurons(0) is None
    alice, own, uid = registered(env, tao=60)
    first = env.advance_to_epoch()
    own.add_stake(50 * TAO)
    second = env.advance_to_epoch()
    block, neurons = chain.epoch_neurons(second - 1) or (None, [])
    assert block == first and neurons[uid].hotkey == alice.address and neurons[uid].stake == 0
    block, neurons = chain.epoch_neurons(second) or (None, [])
    assert block == second and neurons[uid].stake >= 50 * TAO
    assert neurons[uid].validator_permit


# ---- commitments ---------------------------------------------------------------------
def test_commit_and_read_commitments(env: Env) -> None:
    alice, chain, _ = registered(env)
    receipt = chain.commit('{"a":1}')
    assert chain.commitments()[alice.address] == ('{"a":1}', receipt.block)
    assert alice.address not in chain.commitments(block=receipt.block - 1)
    assert chain.commitment_fields(alice.address) == {"a": 1}
    assert env.chain().commitment_fields(env.identity().address) == {}


def test_contribution_commitments_by_round_and_block(env: Env) -> None:
    alice, chain, _ = registered(env)
    chain.commit('{"a":1}')
    receipt = chain.commit_contribution(7, DIGEST)
    mine = ContributionCommitment(alice.address, 7, DIGEST, receipt.block)
    assert chain.contribution_commitments(7) == {alice.address: mine}
    assert chain.contribution_commitments(7, block=receipt.block) == {alice.address: mine}
    assert chain.contribution_commitments(7, block=receipt.block - 1) == {}
    assert chain.contribution_commitments(8) == {}
    assert chain.contribution_commitment(alice.address, 7) == mine
    assert chain.commitment_fields(alice.address)["a"] == 1
    with pytest.raises(AlreadyCommitted):
        chain.commit_contribution(7, "cd" * 32)
    with pytest.raises(InvalidCall):
        chain.commit_contribution(8, "not-a-digest")
    bob, other, _ = registered(env)
    other.commit_contribution(7, "cd" * 32)
    assert set(chain.contribution_commitments(7)) == {alice.address, bob.address}


# ---- transfers -----------------------------------------------------------------------
def test_transfer_moves_free_balance(env: Env) -> None:
    alice = env.identity(tao=10)
    bob = env.identity()
    chain = env.chain(alice)
    assert chain.transfer(bob.coldkey_address, 3 * TAO).ok
    assert chain.balance(bob.coldkey_address) == 3 * TAO
    assert chain.balance(alice.coldkey_address) <= 7 * TAO
    with pytest.raises(InsufficientFunds):
        chain.transfer(bob.coldkey_address, 1_000 * TAO)


# ---- refusals ------------------------------------------------------------------------
def test_refusals_raise_our_error_classes(env: Env) -> None:
    _, validator, vuid = staked_validator(env)
    _, miner, muid = registered(env)
    stranger = env.chain(env.identity(tao=5))
    with pytest.raises(NotRegistered):
        stranger.set_weights([vuid], [1.0])
    with pytest.raises(NotRegistered):
        stranger.commit("hello")
    with pytest.raises(NoValidatorPermit):
        miner.set_weights([vuid], [1.0])
    with pytest.raises(InsufficientFunds):
        miner.add_stake(1_000 * TAO)
    with pytest.raises(InvalidWeights):
        validator.set_weights([muid], [-1.0])
    with pytest.raises(InvalidWeights):
        validator.set_weights([muid, vuid], [0.0, 0.0])
    with pytest.raises(ChainError):
        env.chain().commit("no signer")


def test_weights_rate_limit(make_env: Callable[..., Env]) -> None:
    env = make_env(weights_rate_limit=12)
    _, validator, vuid = staked_validator(env)
    env.advance(12)
    validator.set_weights([vuid], [1.0])
    with pytest.raises(RateLimited):
        validator.set_weights([vuid], [1.0])
