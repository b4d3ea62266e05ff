"""The ledger end to end in one process: flows, refusals, epochs, replay."""

from __future__ import annotations

import dataclasses
import json
import sqlite3
from pathlib import Path

import pytest

from chain import errors
from chain.client import weights_to_wire
from chain.emission import block_emission
from chain.extrinsics import Extrinsic, sign_extrinsic
from chain.interface import Identity, is_epoch_block
from chain.keys import Keypair
from chain.ledger import Ledger
from chain.local import LocalChain
from chain.replay import replay
from chain.storage import EPOCH_HISTORY, state_digest

from .conftest import TAO, do, fast_config, fund, subnet


def held(ledger: Ledger) -> int:
    issuance, pending = ledger.issuance()
    assert sum(a.balance + a.stake for a in ledger.accounts()) + pending == issuance
    return issuance


def test_blocks_link_and_mint(ledger: Ledger) -> None:
    genesis = ledger.head()
    assert genesis.number == 0 and genesis.hash == ledger.genesis_hash
    first = ledger.produce_block()
    second = ledger.produce_block()
    assert first.parent_hash == genesis.hash and second.parent_hash == first.hash
    assert ledger.issuance() == (2 * TAO, 2 * TAO)  # nobody registered: all pending


def test_faucet_register_stake_transfer(ledger: Ledger) -> None:
    alice, bob = Keypair.generate(), Keypair.generate()
    fund(ledger, alice, 100)
    do(ledger, alice, "register", {})
    do(ledger, alice, "add_stake", {"amount": 60 * TAO})
    do(ledger, alice, "transfer", {"dest": bob.address, "amount": 15 * TAO})
    a, b = ledger.account(alice.address), ledger.account(bob.address)
    assert (a.balance, a.stake, a.nonce) == (25 * TAO, 60 * TAO, 4)
    assert b.balance == 15 * TAO
    assert ledger.uid_of(alice.address) == 0
    held(ledger)


def test_epoch_pays_miners_and_validators(ledger: Ledger) -> None:
    (v0, v1), (m0, _m1) = subnet(ledger, miners=2, validators=[300, 100])
    client0, client1 = (LocalChain(ledger, Identity.single(kp)) for kp in (v0, v1))
    client0.set_weights([2, 3], [3.0, 1.0], wait=False)
    client1.set_weights([2, 3], [3.0, 1.0], wait=False)
    while not is_epoch_block(ledger.produce_block().number, 1, 9):
        pass
    neurons = ledger.neurons()
    # Agreeing validators: incentive = their common weights, 0.75 / 0.25.
    assert neurons[2].incentive == pytest.approx(0.75, abs=2e-5)
    assert neurons[3].incentive == pytest.approx(0.25, abs=2e-5)
    assert neurons[0].validator_permit and neurons[1].validator_permit
    assert not neurons[2].validator_permit
    miners_paid = neurons[2].emission + neurons[3].emission
    validators_paid = neurons[0].emission + neurons[1].emission
    assert miners_paid == pytest.approx(validators_paid, rel=1e-6)  # 50/50
    assert neurons[2].emission == pytest.approx(3 * neurons[3].emission, rel=1e-6)
    # First epoch: bonds are the fresh stake-weighted ones, so dividends follow stake 3:1.
    assert neurons[0].emission == pytest.approx(3 * neurons[1].emission, rel=1e-3)
    owner_balance = ledger.account(ledger.owner).balance
    assert owner_balance > 0
    total = owner_balance + miners_paid + validators_paid
    assert owner_balance == pytest.approx(total * 11796 / 65535, abs=2)
    assert ledger.account(m0.address).stake == neurons[2].emission  # emission is staked
    held(ledger)


def test_epoch_neurons_keep_each_epochs_metagraph(ledger: Ledger) -> None:
    """`epoch_neurons(b)` is the metagraph the last epoch at or before b left, whatever
    has happened since: what peers reading at different moments can agree on."""
    (v0, v1), _ = subnet(ledger, miners=2, validators=[300, 100])
    assert ledger.epoch_neurons(ledger.block_number()) is None  # no epoch yet
    client0, client1 = (LocalChain(ledger, Identity.single(kp)) for kp in (v0, v1))
    client0.set_weights([2, 3], [3.0, 1.0], wait=False)
    client1.set_weights([2, 3], [3.0, 1.0], wait=False)
    while not is_epoch_block(first := ledger.produce_block().number, 1, 9):
        pass
    after_first = ledger.neurons()
    got = ledger.epoch_neurons(first)
    assert got == (first, after_first)  # stakes after the epoch's payout included
    assert ledger.epoch_neurons(first - 1) is None
    # The validators change their minds; the next epoch moves incentive to UID 3.
    client0.set_weights([2, 3], [1.0, 3.0], wait=False)
    client1.set_weights([2, 3], [1.0, 3.0], wait=False)
    while not is_epoch_block(second := ledger.produce_block().number, 1, 9):
        pass
    ledger.produce_block()
    assert ledger.neurons()[3].incentive > after_first[3].incentive
    assert ledger.epoch_neurons(second - 1) == (first, after_first)  # still the old one
    pinned = ledger.epoch_neurons(second + 1)
    assert pinned is not None and pinned[0] == second
    assert [n.incentive for n in pinned[1]] == [n.incentive for n in ledger.neurons()]


def test_epoch_history_is_bounded_and_added_to_old_files(tmp_path: Path, owner: Keypair) -> None:
    cfg = fast_config(tmp_path / "old.sqlite", tempo=1)
    with Ledger.create(cfg.db, cfg, owner.address) as ledger:
        subnet(ledger, miners=1, validators=[100])
        for _ in range(2 * EPOCH_HISTORY + 10):
            ledger.produce_block()
        kept = ledger.conn.execute("SELECT DISTINCT block FROM epoch_neurons").fetchall()
        assert len(kept) == EPOCH_HISTORY
        newest = max(b for (b,) in kept)
        assert ledger.epoch_neurons(newest + 5) is not None
        assert ledger.epoch_neurons(min(b for (b,) in kept) - 1) is None  # forgotten
        # A file written before the table existed gets it when opened.
        ledger.conn.execute("DROP TABLE epoch_neurons")
    with Ledger(cfg.db) as ledger:
        assert ledger.epoch_neurons(10**9) is None
        while not is_epoch_block(block := ledger.produce_block().number, 1, 1):
            pass
        assert ledger.epoch_neurons(block) == (block, ledger.neurons())


def test_bad_signature_is_refused_and_changes_nothing(ledger: Ledger) -> None:
    alice, mallory = Keypair.generate(), Keypair.generate()
    fund(ledger, alice, 10)
    before = state_digest(ledger.conn)
    good = sign_extrinsic(
        alice, "transfer", {"dest": mallory.address, "amount": TAO}, 1, ledger.genesis_hash
    )
    forged = dataclasses.replace(good, signature=mallory.sign(good.payload()))
    with pytest.raises(errors.BadSignature):
        ledger.submit(forged)
    tampered = dataclasses.replace(good, args={"dest": mallory.address, "amount": 9 * TAO})
    with pytest.raises(errors.BadSignature):
        ledger.submit(tampered)
    assert state_digest(ledger.conn) == before and ledger.pool_size() == 0


def test_replayed_and_future_nonces(ledger: Ledger) -> None:
    alice, bob = Keypair.generate(), Keypair.generate()
    fund(ledger, alice, 10)
    xt = sign_extrinsic(
        alice, "transfer", {"dest": bob.address, "amount": TAO}, 1, ledger.genesis_hash
    )
    ledger.submit(xt)
    ledger.produce_block()
    before = state_digest(ledger.conn)
    with pytest.raises(errors.BadNonce, match="stale"):
        ledger.submit(xt)  # the very same signed bytes again
    future = sign_extrinsic(
        alice, "transfer", {"dest": bob.address, "amount": TAO}, 5, ledger.genesis_hash
    )
    with pytest.raises(errors.BadNonce, match="ahead"):
        ledger.submit(future)
    assert state_digest(ledger.conn) == before


def test_submit_call_signs_again_when_another_handle_took_the_nonce(
    ledger: Ledger, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Two handles of one key (a validator's revealer thread and its loop) may read the
    same next nonce; the one that loses signs again with the next, a few times at most."""
    alice, bob = Keypair.generate(), Keypair.generate()
    fund(ledger, alice, 10)
    other = Ledger(ledger.path)
    real = ledger.next_nonce
    taken = {"left": 1}

    def racing(address: str) -> int:
        nonce = real(address)
        if taken["left"]:  # another handle submits with that nonce right after we read it
            taken["left"] -= 1
            other.submit_call(alice, "transfer", {"dest": bob.address, "amount": TAO})
        return nonce

    monkeypatch.setattr(ledger, "next_nonce", racing)
    ledger.submit_call(alice, "transfer", {"dest": bob.address, "amount": 2 * TAO})
    ledger.produce_block()
    assert ledger.account(bob.address).balance == 3 * TAO
    taken["left"] = 10**6  # it keeps losing: the BadNonce reaches the caller
    with pytest.raises(errors.BadNonce):
        ledger.submit_call(alice, "transfer", {"dest": bob.address, "amount": TAO})
    other.close()


def test_extrinsic_for_another_ledger(ledger: Ledger, tmp_path: Path, owner: Keypair) -> None:
    other = Ledger.create(
        tmp_path / "other.sqlite", fast_config(tmp_path / "other.sqlite"), owner.address
    )
    alice = Keypair.generate()
    xt = sign_extrinsic(alice, "faucet", {"amount": TAO}, 0, other.genesis_hash)
    with pytest.raises(errors.InvalidCall, match="not this one"):
        ledger.submit(xt)
    other.close()


def test_unregistered_hotkey_cannot_stake_set_weights_or_commit(ledger: Ledger) -> None:
    subnet(ledger, miners=1, validators=[50])
    stranger = Keypair.generate()
    fund(ledger, stranger, 20)
    before = state_digest(ledger.conn)
    for call, args in (
        ("add_stake", {"amount": TAO}),
        ("set_weights", {"uids": [1], "weights": [65535]}),
        ("commit", {"data": "/ip4/127.0.0.1/tcp/1"}),
    ):
        with pytest.raises(errors.NotRegistered, match="register"):
            ledger.submit_call(stranger, call, args)
    assert state_digest(ledger.conn) == before


def test_bad_weights(ledger: Ledger) -> None:
    (v,), _ = subnet(ledger, miners=2, validators=[50])
    before = state_digest(ledger.conn)
    for uids, weights, match in (
        ([1, 7], [1, 1], "unknown UIDs"),
        ([1, 2], [0, 0], "all weights are zero"),
        ([1, 2], [-5, 3], ">= 0"),
        ([1, 1], [1, 2], "twice"),
        ([1], [1, 2], "UIDs but"),
        ([1], [70000], "u16"),
    ):
        with pytest.raises(errors.InvalidWeights, match=match):
            ledger.submit_call(v, "set_weights", {"uids": uids, "weights": weights})
    for weights, match in (
        ([float("nan"), 1.0], "finite"),
        ([-0.5, 1.0], ">= 0"),
        ([0.0, 0.0], "zero"),
    ):
        with pytest.raises(errors.InvalidWeights, match=match):
            weights_to_wire([1, 2], weights)
    # NaN smuggled into the JSON of a raw extrinsic is refused when parsing.
    xt = sign_extrinsic(
        v,
        "set_weights",
        {"uids": [1], "weights": [1]},
        ledger.next_nonce(v.address),
        ledger.genesis_hash,
    )
    raw = json.loads(xt.to_json())
    text = json.dumps(raw).replace('"weights": [1]', '"weights": [NaN]')
    with pytest.raises(errors.InvalidCall, match="NaN"):
        Extrinsic.from_json(text)
    assert state_digest(ledger.conn) == before


def test_weights_need_a_permit(ledger: Ledger) -> None:
    (v,), (m,) = subnet(ledger, miners=1, validators=[50])
    fund(ledger, m, 5)
    do(ledger, m, "add_stake", {"amount": 5 * TAO})  # below the 10 TAO minimum
    before = state_digest(ledger.conn)
    with pytest.raises(errors.NoValidatorPermit, match="permit"):
        ledger.submit_call(m, "set_weights", {"uids": [0], "weights": [1]})
    assert state_digest(ledger.conn) == before
    do(ledger, v, "set_weights", {"uids": [1], "weights": [1]})


def test_rate_limit(tmp_path: Path, owner: Keypair) -> None:
    cfg = fast_config(tmp_path / "l.sqlite", weights_rate_limit=5)
    with Ledger.create(cfg.db, cfg, owner.address) as ledger:
        (v,), _ = subnet(ledger, miners=1, validators=[50])
        do(ledger, v, "set_weights", {"uids": [1], "weights": [1]})
        with pytest.raises(errors.RateLimited, match="next is allowed"):
            ledger.submit_call(v, "set_weights", {"uids": [1], "weights": [2]})
        ledger.advance(5)
        do(ledger, v, "set_weights", {"uids": [1], "weights": [2]})


def test_unstake_more_than_staked_and_overspending(ledger: Ledger) -> None:
    alice = Keypair.generate()
    fund(ledger, alice, 10)
    do(ledger, alice, "register", {})
    do(ledger, alice, "add_stake", {"amount": 4 * TAO})
    before = state_digest(ledger.conn)
    with pytest.raises(errors.InsufficientFunds, match="staked"):
        ledger.submit_call(alice, "remove_stake", {"amount": 5 * TAO})
    with pytest.raises(errors.InsufficientFunds, match="free"):
        ledger.submit_call(alice, "transfer", {"dest": ledger.owner, "amount": 7 * TAO})
    # Two pending calls that are each fine alone but not together: the second is refused.
    ledger.submit_call(alice, "transfer", {"dest": ledger.owner, "amount": 5 * TAO})
    with pytest.raises(errors.InsufficientFunds):
        ledger.submit_call(alice, "transfer", {"dest": ledger.owner, "amount": 5 * TAO})
    assert state_digest(ledger.conn) == before
    ledger.produce_block()
    assert ledger.account(alice.address).balance == 1 * TAO


def test_call_that_fails_inside_its_block_uses_its_nonce_only(ledger: Ledger) -> None:
    alice, bob = Keypair.generate(), Keypair.generate()
    fund(ledger, alice, 10)
    h = ledger.submit_call(alice, "transfer", {"dest": bob.address, "amount": 10 * TAO})
    # Drain the balance behind the pool's back, as a competing process could.
    ledger.conn.execute("UPDATE accounts SET balance = 0 WHERE address = ?", (alice.address,))
    ledger.produce_block()
    receipt = ledger.receipt(h)
    assert receipt is not None and receipt.status == "failed"
    with pytest.raises(errors.InsufficientFunds):
        receipt.raise_for_status()
    assert ledger.account(alice.address).nonce == 2
    assert ledger.account(bob.address).balance == 0


def test_full_subnet_replaces_the_lowest_emission_non_immune_uid(
    tmp_path: Path, owner: Keypair
) -> None:
    cfg = fast_config(tmp_path / "l.sqlite", max_uids=3, immunity_period=20)
    with Ledger.create(cfg.db, cfg, owner.address) as ledger:
        (v,), (m1, m2) = subnet(ledger, miners=2, validators=[50])
        do(ledger, v, "set_weights", {"uids": [1], "weights": [1]})  # m1 earns, m2 does not
        ledger.advance(25)  # past immunity, through two epochs
        late = Keypair.generate()
        do(ledger, late, "register", {})
        assert ledger.uid_of(late.address) == 2
        assert ledger.uid_of(m2.address) is None and ledger.uid_of(m1.address) == 1
        # All immune now except the old ones: the newcomer (immune) is not the one pruned.
        later = Keypair.generate()
        do(ledger, later, "register", {})
        assert ledger.uid_of(late.address) == 2
        with pytest.raises(errors.AlreadyRegistered):
            ledger.submit_call(later, "register", {})


def test_commitments(ledger: Ledger) -> None:
    _, (m,) = subnet(ledger, miners=1, validators=[50])
    do(ledger, m, "commit", {"data": "/ip4/127.0.0.1/tcp/4001/p2p/Qm"})
    assert ledger.commitments()[m.address][0] == "/ip4/127.0.0.1/tcp/4001/p2p/Qm"
    assert ledger.commitment_fields(m.address) == {}  # not a JSON object
    do(ledger, m, "commit", {"data": '{"dht": ["/ip4/127.0.0.1/tcp/1"], "contributions": "a/b"}'})
    assert ledger.commitment_fields(m.address) == {
        "dht": ["/ip4/127.0.0.1/tcp/1"],
        "contributions": "a/b",
    }
    assert ledger.commitment_fields("5NobodyCommitted") == {}
    with pytest.raises(errors.InvalidCall, match="1024"):
        ledger.submit_call(m, "commit", {"data": "x" * 2000})


def test_replay_rebuilds_the_same_state(tmp_path: Path, owner: Keypair) -> None:
    cfg = fast_config(tmp_path / "l.sqlite", max_validators=2)
    with Ledger.create(cfg.db, cfg, owner.address) as ledger:
        (v0, v1), (m0, _m1, _m2) = subnet(ledger, miners=3, validators=[200, 100])
        do(ledger, v0, "set_weights", {"uids": [2, 3], "weights": [2, 1]})
        do(ledger, m0, "commit", {"data": "hello"})
        ledger.advance(12)
        # A race the pool cannot see: a bigger validator stakes in the same block, ahead of
        # v1's weights, so v1 loses its permit and its call fails inside the block.
        whale = Keypair.generate()
        for call, args in (
            ("faucet", {"amount": 500 * TAO}),
            ("register", {}),
            ("add_stake", {"amount": 400 * TAO}),
        ):
            ledger.submit_call(whale, call, args)
        late = ledger.submit_call(v1, "set_weights", {"uids": [3, 4], "weights": [1, 1]})
        ledger.produce_block()
        receipt = ledger.receipt(late)
        assert receipt is not None and receipt.error_type == "NoValidatorPermit"
        ledger.advance(25)
        report = replay(ledger)
        assert report.blocks == ledger.head().number
        assert report.digest == state_digest(ledger.conn)
        held(ledger)


def test_replay_detects_tampering(ledger: Ledger) -> None:
    _, (m,) = subnet(ledger, miners=1, validators=[50])
    ledger.advance(3)
    ledger.conn.execute("UPDATE accounts SET stake = stake + 1 WHERE address = ?", (m.address,))
    with pytest.raises(errors.CorruptLedger, match="differs"):
        replay(ledger)


def test_corrupt_and_foreign_files(tmp_path: Path) -> None:
    garbage = tmp_path / "garbage.sqlite"
    garbage.write_bytes(b"this is not a database" * 100)
    with pytest.raises(errors.CorruptLedger):
        Ledger(garbage)
    foreign = tmp_path / "foreign.sqlite"
    conn = sqlite3.connect(foreign)
    conn.execute("CREATE TABLE meta (key TEXT, value TEXT)")
    conn.execute("INSERT INTO meta VALUES ('format', 'somebody-else')")
    conn.commit()
    conn.close()
    with pytest.raises(errors.CorruptLedger, match="not a tensormine ledger"):
        Ledger(foreign)
    other = tmp_path / "other.sqlite"
    sqlite3.connect(other).execute("CREATE TABLE x (y)").connection.close()
    with pytest.raises(errors.CorruptLedger, match="not a tensormine ledger"):
        Ledger(other)
    with pytest.raises(FileNotFoundError, match="chain init"):
        Ledger(tmp_path / "missing.sqlite")


def test_refuses_to_overwrite_a_ledger(ledger: Ledger, owner: Keypair) -> None:
    with pytest.raises(errors.ChainError, match="already exists"):
        Ledger.create(ledger.path, ledger.config, owner.address)


def test_faucet_limits(ledger: Ledger, tmp_path: Path, owner: Keypair) -> None:
    alice = Keypair.generate()
    with pytest.raises(errors.InvalidCall, match="at most"):
        ledger.submit_call(alice, "faucet", {"amount": 200_000 * TAO})
    cfg = fast_config(tmp_path / "nofaucet.sqlite", faucet_rao=0)
    with (
        Ledger.create(cfg.db, cfg, owner.address) as closed,
        pytest.raises(errors.InvalidCall, match="disabled"),
    ):
        closed.submit_call(alice, "faucet", {"amount": TAO})


def test_block_emission_follows_issuance(ledger: Ledger) -> None:
    # Jump issuance to just below the first halving: the ledger mints what the formula says.
    ledger.conn.execute(
        "UPDATE state SET total_issuance = ?, pending_emission = ?",
        (10_500_000 * TAO - 1, 10_500_000 * TAO - 1),
    )
    assert ledger.produce_block().emission == TAO
    assert ledger.produce_block().emission == block_emission(10_500_000 * TAO - 1 + TAO) == TAO // 2


def test_issuance_stops_below_the_cap(ledger: Ledger) -> None:
    from chain.emission import TOTAL_SUPPLY_RAO

    alice = Keypair.generate()
    near = TOTAL_SUPPLY_RAO - 50
    ledger.conn.execute("UPDATE state SET total_issuance = ?, pending_emission = ?", (near, near))
    ledger.advance(30)
    issuance, _ = ledger.issuance()
    assert issuance <= TOTAL_SUPPLY_RAO and ledger.produce_block().emission == 0
    with pytest.raises(errors.InvalidCall, match="cap"):
        ledger.submit_call(alice, "faucet", {"amount": TOTAL_SUPPLY_RAO - issuance + 1})
