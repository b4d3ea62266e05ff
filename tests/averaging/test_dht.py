"""DHT start-up, libp2p identity, discovery through the ledger, and the peer-id ↔ hotkey tie."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest
from hivemind.dht.routing import DHTID
from hivemind.dht.validation import DHTRecord
from hivemind.utils.serializer import MSGPackSerializer
from hivemind.utils.timed_storage import get_dht_time

from averaging.dht import (
    DHTStartError,
    IdentityRecordValidator,
    PeerDirectory,
    check_run_name,
    commitment_for,
    ensure_identity,
    fetch_identities,
    host_maddrs,
    identity_key,
    ledger_multiaddrs,
    parse_commitment,
    publish_identity,
    sign_identity,
    start_dht,
    visible_maddrs,
)
from averaging.settings import DHTConfig
from chain.keys import Keypair
from chain.ledger import Ledger
from tests.averaging.conftest import RUN, Swarm
from tests.chain.conftest import do, fast_config

DEAD_PEER = "12D3KooWMLN9GrCCQEnxwnZY21DKdxDRg64PZWyBt8SX9VDh8Ugf"


def test_identity_file_is_private_and_keeps_the_peer_id(tmp_path: Path) -> None:
    path = tmp_path / "identity" / "p2p.key"
    first = start_dht(DHTConfig(identity_path=path))
    try:
        peer = first.peer_id
    finally:
        first.shutdown()
    assert path.stat().st_mode & 0o777 == 0o600
    assert path.parent.stat().st_mode & 0o777 == 0o700
    again = start_dht(DHTConfig(identity_path=path))
    try:
        assert again.peer_id == peer
    finally:
        again.shutdown()
    assert ensure_identity(path) == peer


def test_identity_readable_by_others_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "p2p.key"
    ensure_identity(path)
    path.chmod(0o644)
    with pytest.raises(PermissionError, match="0600"):
        ensure_identity(path)


def test_newcomer_joins_through_ledger_commitments_alone(swarm: Swarm) -> None:
    """No bootstrap address in its config: the ledger's commitments are enough."""
    assert swarm.dhts[0].store("discovery-probe", "hello", get_dht_time() + 60)
    newcomer = start_dht(DHTConfig(), run=RUN, ledger=swarm.ledger)
    try:
        found = newcomer.get("discovery-probe", latest=True)
        assert found is not None and found.value == "hello"
    finally:
        newcomer.shutdown()
    loner = start_dht(DHTConfig(peers_from_ledger=False), ledger=swarm.ledger)
    try:
        assert loner.get("discovery-probe", latest=True) is None
    finally:
        loner.shutdown()


def test_stale_ledger_peers_fall_back_to_a_new_dht(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    owner = Keypair.generate()
    cfg = fast_config(tmp_path / "ledger.sqlite")
    with Ledger.create(cfg.db, cfg, owner.address) as ledger:
        kp = Keypair.generate()
        do(ledger, kp, "register", {})
        dead = f"/ip4/127.0.0.1/tcp/9/p2p/{DEAD_PEER}"
        do(ledger, kp, "commit", {"data": json.dumps({"dht": [dead]})})
        assert ledger_multiaddrs(ledger) == [dead]
        with caplog.at_level(logging.WARNING, logger="averaging.dht"):
            dht = start_dht(DHTConfig(bootstrap_attempts=1), ledger=ledger)
        dht.shutdown()
        assert "starting a new DHT alone" in caplog.text
    with pytest.raises(DHTStartError):
        start_dht(DHTConfig(initial_peers=[dead], bootstrap_attempts=1))


def test_commitments_are_parsed_strictly(swarm: Swarm) -> None:
    data, _block = swarm.ledger.commitments()[swarm.hotkeys[0]]
    maddrs = parse_commitment(data)
    assert maddrs == visible_maddrs(swarm.dhts[0])
    good = f"/ip4/127.0.0.1/tcp/5/p2p/{DEAD_PEER}"
    other = f"/ip4/127.0.0.1/tcp/6/p2p/{swarm.dhts[1].peer_id.to_base58()}"
    for bad in (
        "not json",
        json.dumps({"store": "x"}),
        json.dumps({"dht": []}),
        json.dumps({"dht": "/ip4/127.0.0.1/tcp/5"}),
        json.dumps({"dht": ["/ip4/127.0.0.1/tcp/5"]}),
        json.dumps({"dht": [good, other]}),
        json.dumps({"dht": [good] * 9}),
    ):
        assert parse_commitment(bad) == [], bad
    assert parse_commitment(json.dumps({"dht": [good], "store": "x"})) == [good]


def test_commitment_keeps_other_keys(swarm: Swarm) -> None:
    kp, dht = swarm.miners[0], swarm.dhts[0]
    original, _ = swarm.ledger.commitments()[kp.address]
    try:
        do(swarm.ledger, kp, "commit", {"data": json.dumps({"store": "hub:abc", "dht": []})})
        text = commitment_for(dht, swarm.ledger, kp.address)
        assert json.loads(text) == {"store": "hub:abc", "dht": visible_maddrs(dht)}
        with pytest.raises(ValueError, match="no multiaddr"):
            commitment_for(
                dht, swarm.ledger, kp.address, maddrs=[f"/ip4/1.2.3.4/tcp/1/p2p/{DEAD_PEER}"]
            )
    finally:
        do(swarm.ledger, kp, "commit", {"data": original})


def test_identity_records_are_signed_and_validated(swarm: Swarm) -> None:
    signed = publish_identity(swarm.dhts[1], swarm.miners[1], RUN, ttl=120)
    claims = fetch_identities(swarm.dhts[2], RUN)
    assert claims[swarm.hotkeys[1]].peer_id == swarm.dhts[1].peer_id.to_base58()

    # Every node runs the validator: a forged record is stored nowhere.
    thief = Keypair.generate()
    forged = signed.model_dump() | {"signature": thief.sign(b"x").hex()}
    key = identity_key(RUN)
    expires = get_dht_time() + 60
    assert not swarm.dhts[3].store(key, forged, expires, subkey=swarm.hotkeys[1])

    validator = IdentityRecordValidator(RUN)
    key_id = DHTID.generate(source=key).to_bytes()

    def record(value: object, subkey: object, expiration: float = expires) -> DHTRecord:
        return DHTRecord(
            key_id,
            MSGPackSerializer.dumps(subkey),
            MSGPackSerializer.dumps(value),
            expiration,
        )

    mine = sign_identity(thief, DEAD_PEER, RUN, expires + 10).model_dump()
    assert validator.validate(record(mine, thief.address))
    assert not validator.validate(record(mine, swarm.hotkeys[0]))  # subkey is not the signer
    assert not validator.validate(record(mine, thief.address, expires + 100))  # outlives it
    other_run = sign_identity(thief, DEAD_PEER, "elsewhere", expires + 10).model_dump()
    assert not validator.validate(record(other_run, thief.address))
    assert not validator.validate(record(mine | {"extra": 1}, thief.address))
    assert not validator.validate(record(mine | {"peer_id": "Qm0000"}, thief.address))
    assert not validator.validate(DHTRecord(key_id, b"\xc1", b"\xc1", expires))
    # Records under other keys are not this validator's business.
    other = DHTRecord(DHTID.generate(source="x").to_bytes(), b"", b"junk", expires)
    assert validator.validate(other)


def test_directory_admits_registered_hotkeys_only(swarm: Swarm) -> None:
    """Ledger commitments and DHT records both tie peers; unregistered or contested ones drop."""
    run = "dirtest"
    directory = PeerDirectory(swarm.ledger, run=run, dht=swarm.dhts[0])
    base = {
        d.peer_id.to_base58(): kp.address for d, kp in zip(swarm.dhts, swarm.miners, strict=True)
    }
    assert directory.peers() == base

    # A registered hotkey without a commitment, tied by a DHT record only.
    late = Keypair.generate()
    do(swarm.ledger, late, "register", {})
    late_peer = "12D3KooWLatecomerLatecomerLatecomerLatecomerLate1"
    expires = get_dht_time() + 30
    swarm.dhts[2].store(
        identity_key(run),
        sign_identity(late, late_peer, run, expires).model_dump(),
        expires,
        subkey=late.address,
    )
    # An unregistered hotkey's record counts for nothing.
    stranger = Keypair.generate()
    swarm.dhts[2].store(
        identity_key(run),
        sign_identity(stranger, DEAD_PEER, run, expires).model_dump(),
        expires,
        subkey=stranger.address,
    )
    assert directory.peers() == base | {late_peer: late.address}

    # Miner 0 claims miner 1's peer id: neither claim is trusted any more.
    contested = swarm.dhts[1].peer_id.to_base58()
    swarm.dhts[2].store(
        identity_key(run),
        sign_identity(swarm.miners[0], contested, run, expires).model_dump(),
        expires,
        subkey=swarm.hotkeys[0],
    )
    peers = directory.peers()
    assert contested not in peers and peers[late_peer] == late.address
    # A directory without the DHT sees the ledger only.
    assert PeerDirectory(swarm.ledger_path, run=run).peers() == base


def test_names_and_addresses() -> None:
    assert check_run_name("run_1-a") == "run_1-a"
    for bad in ("", "a.b", "a b", "x" * 65):
        with pytest.raises(ValueError):
            check_run_name(bad)
    assert host_maddrs(DHTConfig(host="::1", port=7)) == ["/ip6/::1/tcp/7"]
    assert host_maddrs(DHTConfig()) == ["/ip4/127.0.0.1/tcp/0"]
