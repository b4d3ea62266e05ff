"""`BittensorChain` beyond the shared contract: the calls the SDK composes (pallet, call,
arguments, hotkey or coldkey signer), commit-reveal, commitment limits, the connection,
pruned state and where the SDK's caches land. All on `InMemorySubtensor`, no network."""

from __future__ import annotations

import json
import os
import socket
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from bittensor import calls as bt_calls

from chain.bittensor import BittensorChain
from chain.bittensor.commitments import CONTRIBUTION_RESERVE_BYTES
from chain.bittensor.errors import receipt_of
from chain.bittensor.paths import RUNTIME_CACHE_VARIABLE, SDK_FILE_VARIABLES
from chain.bittensor.signing import IdentityWallet
from chain.config import RAO_PER_TAO, ChainConfig
from chain.errors import (
    ChainError,
    ChainUnreachable,
    CommitmentTooLong,
    InsufficientFunds,
    NotIncluded,
    PastStateUnavailable,
    RateLimited,
    WalletError,
)
from chain.interface import Identity
from chain.keys import Keypair
from tests.chain.substrate import InMemorySubtensor, SdkKey, SubmittedCall, isolate_sdk_paths

TAO = RAO_PER_TAO
NETUID = 1


@pytest.fixture
def home(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Path:
    isolate_sdk_paths(monkeypatch, tmp_path / "home")
    return tmp_path / "home"


@pytest.fixture
def sub() -> InMemorySubtensor:
    return InMemorySubtensor(netuid=NETUID, tempo=9)


@pytest.fixture
def config(tmp_path: Path) -> ChainConfig:
    return ChainConfig(
        backend="bittensor", network="local", netuid=NETUID, cache_dir=tmp_path / "run" / "bt"
    )


class Opener:
    """Handles on one in-memory chain, closed after the test."""

    def __init__(self, sub: InMemorySubtensor, config: ChainConfig) -> None:
        self.sub, self.config, self.handles = sub, config, list[BittensorChain]()

    def identity(self, tao: int = 0) -> Identity:
        hotkey, coldkey = SdkKey.generate(), SdkKey.generate()
        self.sub.fund(coldkey.address, tao * TAO)
        return Identity(hotkey=hotkey, coldkey=coldkey, coldkey_address=coldkey.address)

    def __call__(self, identity: Identity | None = None) -> BittensorChain:
        chain = BittensorChain.connect(self.config, identity, substrate=self.sub)
        self.handles.append(chain)
        return chain

    def validator(self, stake_tao: int = 50) -> tuple[Identity, BittensorChain, int]:
        identity = self.identity(stake_tao + 10)
        chain = self(identity)
        uid = chain.register()
        chain.add_stake(stake_tao * TAO)
        self.sub.advance_to_epoch()
        return identity, chain, uid


@pytest.fixture
def opener(home: Path, sub: InMemorySubtensor, config: ChainConfig) -> Iterator[Opener]:
    made = Opener(sub, config)
    yield made
    for chain in made.handles:
        chain.close()


# ---- the calls the SDK composes --------------------------------------------------------
def test_writes_compose_the_expected_calls_and_signers(opener: Opener) -> None:
    sub = opener.sub
    alice = opener.identity(tao=100)
    hot, cold = alice.address, alice.coldkey_address
    chain = opener(alice)
    uid = chain.register()
    carrier, register = sub.calls[-2:]
    assert (carrier.pallet, carrier.function, carrier.signer) == (
        "MevShield",
        "submit_encrypted",
        cold,
    )
    assert (register.function, register.args, register.signer, register.shielded) == (
        "burned_register",
        {"netuid": NETUID, "hotkey": hot},
        cold,
        True,
    )
    chain.add_stake(50 * TAO)
    stake = sub.calls[-1]
    assert (stake.function, stake.signer) == ("add_stake_limit", cold)
    assert stake.args["hotkey"] == hot and stake.args["amount_staked"] == 50 * TAO
    sub.advance_to_epoch()
    chain.set_weights([uid], [1.0])
    weights = sub.calls[-1]
    assert (weights.pallet, weights.function, weights.signer) == (
        "SubtensorModule",
        "set_mechanism_weights",
        hot,
    )
    assert weights.args == {
        "netuid": NETUID,
        "mecid": 0,
        "dests": [uid],
        "weights": [65535],
        "version_key": 0,
    }
    chain.commit("x" * 130)
    commit = sub.calls[-1]
    assert (commit.pallet, commit.function, commit.signer) == ("Commitments", "set_commitment", hot)
    assert commit.args == {
        "netuid": NETUID,
        "info": {"fields": [{"Raw128": b"x" * 128}, {"Raw2": b"xx"}]},
    }
    chain.remove_stake(5 * TAO)
    assert (sub.calls[-1].function, sub.calls[-1].signer) == ("remove_stake_limit", cold)
    bob = SdkKey.generate().address
    chain.transfer(bob, 2 * TAO)
    transfer = sub.calls[-1]
    assert (transfer.pallet, transfer.function, transfer.signer) == (
        "Balances",
        "transfer_keep_alive",
        cold,
    )
    assert transfer.args == {"dest": bob, "value": 2 * TAO}
    assert all(call.success for call in sub.calls)


def test_commit_reveal_subnets_get_a_timelocked_commit_and_no_visible_weights(
    opener: Opener,
) -> None:
    opener.sub.state.commit_reveal = True
    _, chain, uid = opener.validator()
    receipt = chain.set_weights([uid], [1.0])
    commit = opener.sub.calls[-1]
    assert receipt.ok and commit.function == "commit_timelocked_mechanism_weights"
    assert commit.args["commit_reveal_version"] == 4 and commit.args["reveal_round"] > 0
    assert len(commit.args["commit"]) > 0
    assert uid not in chain.weights()
    pending = opener.sub.state.timelocked
    assert [hotkey for rows in pending.values() for hotkey, *_ in rows] == [chain.signer().address]


def test_set_weights_without_waiting_is_pending(opener: Opener) -> None:
    _, chain, uid = opener.validator()
    receipt = chain.set_weights([uid], [1.0], wait=False)
    assert (receipt.status, receipt.block) == ("pending", -1)


def test_an_ed25519_key_signs_subtensor_extrinsics(opener: Opener) -> None:
    key = Keypair.generate()
    opener.sub.fund(key.address, 10 * TAO)
    chain = opener(Identity.single(key))
    uid = chain.register()
    assert chain.neurons()[uid].hotkey == key.address
    assert opener.sub.calls[-1].signer == key.address


def test_hotkey_only_wallets_commit_but_cannot_move_funds(opener: Opener) -> None:
    funded = opener.identity(tao=10)
    opener(funded).register()
    hotkey_only = Identity(
        hotkey=funded.hotkey, coldkey=None, coldkey_address=funded.coldkey_address
    )
    chain = opener(hotkey_only)
    assert chain.register() == 0
    chain.commit('{"a":1}')
    calls = len(opener.sub.calls)
    with pytest.raises(WalletError, match="TENSORMINE_COLDKEY_PASSWORD"):
        chain.add_stake(TAO)
    with pytest.raises(WalletError):
        chain.transfer(SdkKey.generate().address, TAO)
    assert len(opener.sub.calls) == calls


def test_registration_without_funds_is_insufficient_funds(opener: Opener) -> None:
    with pytest.raises(InsufficientFunds, match="NotEnoughBalanceToStake"):
        opener(opener.identity()).register()


def test_neurons_scale_u16_scores(opener: Opener) -> None:
    _, chain, uid = opener.validator()
    opener.sub.set_scores(uid, rank=65535, trust=32768, incentives=0, validator_trust=65535)
    opener.sub.produce_blocks()
    neuron = chain.neurons()[uid]
    assert neuron.rank == 1.0 and neuron.trust == pytest.approx(0.5, abs=1e-4)
    assert neuron.validator_trust == 1.0 and neuron.balance == 0


# ---- commitments -----------------------------------------------------------------------
def test_a_full_commitment_still_takes_a_windows_contribution(opener: Opener) -> None:
    """Components fill the commitment up to `max_commitment_bytes`; the largest round
    and a digest still fit beside them, within the chain's 384 bytes."""
    alice = opener.identity(tao=10)
    chain = opener(alice)
    chain.register()
    room = chain.max_commitment_bytes()
    filler = json.dumps({"k": ""}, separators=(",", ":"))
    full = json.dumps({"k": "x" * (room - len(filler))}, separators=(",", ":"))
    assert len(full.encode()) == room
    chain.commit(full)
    chain.commit_contribution(2**63 - 1, "ab" * 32)
    text = chain.commitments()[alice.address][0]
    assert 384 - 10 < len(text.encode()) <= 384
    got = chain.contribution_commitments(2**63 - 1)[alice.address]
    assert got.digest == "ab" * 32


def test_commitment_too_long_is_refused_before_any_submit(opener: Opener) -> None:
    alice = opener.identity(tao=10)
    chain = opener(alice)
    chain.register()
    # 3 Raw fields of 128 bytes; the components' keys get that less the room kept for a
    # window's contribution key, which a commitment at the components' limit still fits.
    assert chain.max_commitment_bytes() == 384 - CONTRIBUTION_RESERVE_BYTES
    calls = len(opener.sub.calls)
    with pytest.raises(CommitmentTooLong, match="384 bytes"):
        chain.commit("x" * 385)
    with pytest.raises(CommitmentTooLong):
        chain.commit("é" * 193)  # 386 bytes of UTF-8
    assert len(opener.sub.calls) == calls
    text = "é" * 150 + "x" * 84  # 384 bytes, a two-byte character cut across fields
    chain.commit(text)
    assert chain.commitments()[alice.address][0] == text


def test_commitment_space_per_epoch_is_checked_before_submitting(opener: Opener) -> None:
    opener.sub.state.max_space = 250
    alice = opener.identity(tao=10)
    chain = opener(alice)
    chain.register()
    chain.commit("y" * 200)
    calls = len(opener.sub.calls)
    with pytest.raises(RateLimited, match="50 of 250 commitment bytes"):
        chain.commit_contribution(1, "ab" * 32)
    assert len(opener.sub.calls) == calls
    opener.sub.advance_to_epoch()
    chain.commit_contribution(1, "ab" * 32)
    assert chain.contribution_commitment(alice.address, 1) is not None


def test_a_contribution_commitment_keeps_other_keys_and_replaces_the_last_round(
    opener: Opener,
) -> None:
    alice = opener.identity(tao=10)
    chain = opener(alice)
    chain.register()
    chain.commit('{"dht":["/ip4/1.2.3.4/tcp/1"]}')
    first = chain.commit_contribution(1, "ab" * 32)
    second = chain.commit_contribution(2, "cd" * 32)
    assert chain.commitment_fields(alice.address) == {
        "c": [2, "cd" * 32],
        "dht": ["/ip4/1.2.3.4/tcp/1"],
    }
    assert chain.contribution_commitments(1) == {}
    assert chain.contribution_commitments(1, block=first.block)[alice.address].digest == "ab" * 32
    assert chain.contribution_commitments(2)[alice.address].block == second.block


def test_commit_contribution_gives_up_after_its_timeout(
    opener: Opener, monkeypatch: pytest.MonkeyPatch
) -> None:
    chain = opener(opener.identity(tao=10))
    chain.register()
    monkeypatch.setattr(chain, "commit", lambda data: time.sleep(0.5))
    with pytest.raises(NotIncluded, match="round-3"):
        chain.commit_contribution(3, "ab" * 32, timeout=0.05)


# ---- connection, pruned state, caches --------------------------------------------------
def test_an_unreachable_endpoint_is_retried_then_chain_unreachable(
    opener: Opener, config: ChainConfig
) -> None:
    opener.sub.fail_connects(10)
    cfg = config.model_copy(update={"retries": 2})
    with pytest.raises(ChainUnreachable, match=r"ws://127\.0\.0\.1:9944 \(local\) after 3"):
        BittensorChain.connect(cfg, None, substrate=opener.sub, retry_delay_s=0.001)
    assert opener.sub.connect_attempts == 3
    opener.sub.fail_connects(2)
    chain = BittensorChain.connect(cfg, None, substrate=opener.sub, retry_delay_s=0.001)
    chain.close()
    assert opener.sub.connect_attempts == 6


def test_the_sdk_websocket_backend_reports_a_closed_port_as_unreachable(
    home: Path, config: ChainConfig
) -> None:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    cfg = config.model_copy(update={"network": f"ws://127.0.0.1:{port}", "retries": 1})
    with pytest.raises(ChainUnreachable, match=r"check chain\.network"):
        BittensorChain.connect(cfg, None, retry_delay_s=0.001)


def test_pruned_state_is_past_state_unavailable_naming_the_archive_setting(
    opener: Opener,
) -> None:
    chain = opener(opener.identity(tao=10))
    chain.register()
    first = opener.sub.advance_to_epoch()
    second = opener.sub.advance_to_epoch()
    assert chain.epoch_neurons(first) is not None
    opener.sub.prune_before(second)
    with pytest.raises(PastStateUnavailable, match=r"chain\.archive_network"):
        chain.epoch_neurons(second - 1)
    with pytest.raises(PastStateUnavailable):
        chain.contribution_commitments(1, block=first)
    assert chain.epoch_neurons(second) is not None


def test_sdk_caches_land_in_the_configured_folder_not_home(
    opener: Opener, config: ChainConfig, home: Path
) -> None:
    opener()
    folder = config.cache_dir
    assert folder is not None and (folder / "btcli_token_symbols.json").is_file()
    assert os.environ[RUNTIME_CACHE_VARIABLE] == str(folder.resolve() / "runtime-cache")
    for name, file in SDK_FILE_VARIABLES.items():
        assert os.environ[name] == str(folder.resolve() / file)
    assert not (home / ".bittensor").exists()


def test_without_a_cache_dir_the_sdk_caches_go_next_to_the_run_ledger(
    opener: Opener, config: ChainConfig, tmp_path: Path
) -> None:
    cfg = config.model_copy(update={"cache_dir": None, "db": tmp_path / "runs" / "x" / "l.db"})
    BittensorChain.connect(cfg, None, substrate=opener.sub).close()
    assert (tmp_path / "runs" / "x" / "bittensor" / "btcli_token_symbols.json").is_file()


def test_a_subnet_that_does_not_exist_is_refused_at_connect(
    opener: Opener, config: ChainConfig
) -> None:
    with pytest.raises(ChainError, match="subnet 7 does not exist"):
        BittensorChain.connect(config.model_copy(update={"netuid": 7}), None, substrate=opener.sub)


def test_reopen_gives_another_handle_on_the_same_chain(opener: Opener) -> None:
    alice = opener.identity(tao=10)
    chain = opener()
    own = chain.reopen(alice)
    opener.handles.append(own)
    uid = own.register()
    assert chain.uid_of(alice.address) == uid and own.describe == chain.describe


def test_the_node_refuses_weights_inside_the_rate_limit_in_its_pool(opener: Opener) -> None:
    """The SDK's preflight refuses first; a raw call meets the node's own check."""
    opener.sub.state.weights_rate_limit = 5
    alice, chain, uid = opener.validator()
    chain.set_weights([uid], [1.0])
    call = bt_calls.SubtensorModule.set_mechanism_weights(
        netuid=NETUID, mecid=0, dests=[uid], weights=[65535], version_key=0
    )
    result = chain.client.submit_call(
        call, IdentityWallet(alice), signer="hotkey", wait_for_finalization=False
    )
    assert not result.success and result.error.name == "RateLimitExceeded"
    assert receipt_of(result, "set_weights", head=chain.block_number()).error_type == "RateLimited"
    assert opener.sub.calls[-1] == SubmittedCall(
        "SubtensorModule",
        "set_mechanism_weights",
        call.params,
        alice.address,
        None,
        False,
        "RateLimitExceeded",
    )


def test_without_last_epoch_block_the_epoch_schedule_is_computed(opener: Opener) -> None:
    chain = opener()
    first = opener.sub.advance_to_epoch()
    opener.sub.produce_blocks(3)
    assert chain.last_epoch_block(chain.block_number()) == first
    opener.sub.stateful_epochs = False
    assert chain.last_epoch_block(chain.block_number()) == first
    assert chain.last_epoch_block(first - 1) is None


def test_a_contributions_location_that_leaves_no_room_is_refused_at_start(
    opener: Opener,
) -> None:
    """On subtensor the commitment is small (384 bytes, less a window's contribution key):
    a miner whose DHT address and store location do not fit together is told at start-up
    which setting to shorten, before anything is submitted."""
    from train.startup import StartupError, commit_contributions_location

    alice = opener.identity(tao=10)
    chain = opener(alice)
    chain.register()
    dht_like = {"dht": ["/ip4/203.0.113.7/tcp/31337/p2p/12D3KooW" + "A" * 44], "x": "y" * 120}
    chain.commit(json.dumps(dht_like, separators=(",", ":")))
    calls = len(opener.sub.calls)
    with pytest.raises(StartupError, match="use a shorter store location"):
        commit_contributions_location(chain, "/" + "long-folder-name/" * 10 + "store")
    assert len(opener.sub.calls) == calls
    assert commit_contributions_location(chain, "org/run") is True  # a Hub repo id


def test_a_dht_address_and_a_store_location_fit_subtensors_commitment(opener: Opener) -> None:
    """What a miner commits at start-up on subtensor (a real hivemind DHT's address with
    its peer key's proof, then its contributions location: a Hub repo, since validators on
    other hosts cannot read a local folder) fits the room the chain leaves beside a
    window's contribution key, and the window's key still fits after them. (A local
    absolute path of ~70 characters does not: 302 bytes of 291.)"""
    from averaging.dht import commitment_for, start_dht
    from averaging.participant import commit_address
    from averaging.settings import DHTConfig
    from train.startup import commit_contributions_location

    alice = opener.identity(tao=10)
    chain = opener(alice)
    chain.register()
    dht = start_dht(DHTConfig(), run="fits")
    try:
        assert commit_address(chain, dht, run="fits")
        assert len(commitment_for(dht, chain, alice.address, run="fits")) <= (
            chain.max_commitment_bytes()
        )
    finally:
        dht.shutdown()
    assert commit_contributions_location(chain, "tensormine-org/subnet-run-2026-12")
    opener.sub.produce_blocks(1)
    chain.commit_contribution(12, "cd" * 32)
    body = json.loads(chain.commitments()[alice.address][0])
    assert set(body) == {"c", "contributions", "dht", "dht_proof"} and body["dht"]
