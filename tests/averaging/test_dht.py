"""DHT start-up, libp2p identity, discovery through the ledger, and the peer-id ↔ hotkey tie."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import pytest
from hivemind.dht.routing import DHTID
from hivemind.dht.validation import DHTRecord
from hivemind.p2p import PeerID
from hivemind.proto import crypto_pb2
from hivemind.utils.crypto import RSAPrivateKey
from hivemind.utils.serializer import MSGPackSerializer
from hivemind.utils.timed_storage import get_dht_time

from averaging.dht import (
    DHTStartError,
    IdentityClaim,
    IdentityRecordValidator,
    PeerDirectory,
    PeerProof,
    check_run_name,
    commitment_for,
    commitment_message,
    committed_peer,
    ensure_identity,
    fetch_identities,
    host_maddrs,
    identity_key,
    ledger_multiaddrs,
    load_identity,
    parse_commitment,
    publish_identity,
    sign_identity,
    start_dht,
    visible_maddrs,
)
from averaging.identity import PeerKey, b64
from averaging.settings import DHTConfig
from chain.keys import Keypair
from chain.ledger import Ledger
from chain.local import LocalChain
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


def test_new_identities_are_ed25519_and_old_rsa_files_keep_their_peer_id(tmp_path: Path) -> None:
    new = load_identity(tmp_path / "new.key")
    assert new.key_type == crypto_pb2.KeyType.Ed25519 and new.embeds_public
    assert new.peer_id.to_base58().startswith("12D3KooW")
    # An RSA file as hivemind (and earlier versions of this module) wrote it.
    old = tmp_path / "old.key"
    data = crypto_pb2.PrivateKey(
        key_type=crypto_pb2.KeyType.RSA, data=RSAPrivateKey().to_bytes()
    ).SerializeToString()
    old.write_bytes(data)
    old.chmod(0o600)
    key = load_identity(old)
    assert key.peer_id == PeerID.from_identity(data) and not key.embeds_public
    message = commitment_message(key.peer_id.to_base58(), "5F" + "x" * 46, RUN)
    proof = PeerProof.make(key, message)
    assert proof.key is not None and proof.verifies(key.peer_id.to_base58(), message)
    dht = start_dht(DHTConfig(), identity_path=old)
    try:
        assert dht.peer_id == key.peer_id
        cfg = fast_config(tmp_path / "ledger.sqlite")
        with Ledger.create(cfg.db, cfg, Keypair.generate().address) as ledger:
            text = commitment_for(dht, LocalChain(ledger), "5F" + "x" * 46, run=RUN)
        # One address and an RSA proof leave room for other keys (~120 bytes of them).
        assert len(text) < 900, len(text)
    finally:
        dht.shutdown()


def test_newcomer_joins_through_ledger_commitments_alone(swarm: Swarm) -> None:
    """No bootstrap address in its config: the ledger's commitments are enough."""
    assert swarm.dhts[0].store("discovery-probe", "hello", get_dht_time() + 60)
    newcomer = start_dht(DHTConfig(), run=RUN, ledger=swarm.chain)
    try:
        found = newcomer.get("discovery-probe", latest=True)
        assert found is not None and found.value == "hello"
    finally:
        newcomer.shutdown()
    loner = start_dht(DHTConfig(peers_from_ledger=False), ledger=swarm.chain)
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
        assert ledger_multiaddrs(LocalChain(ledger)) == [dead]
        with caplog.at_level(logging.WARNING, logger="averaging.dht"):
            dht = start_dht(DHTConfig(bootstrap_attempts=1), ledger=LocalChain(ledger))
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
        text = commitment_for(dht, swarm.chain, kp.address, run=RUN)
        body = json.loads(text)
        assert body.pop("dht_proof").keys() == {"sig"}  # Ed25519: the peer id holds the key
        assert body == {"store": "hub:abc", "dht": visible_maddrs(dht)}
        # Room for another key of ~120 bytes (e.g. a list of contributions).
        assert len(text.encode()) < 1024 - 400, len(text)
        with pytest.raises(ValueError, match="no multiaddr"):
            commitment_for(
                dht,
                swarm.chain,
                kp.address,
                run=RUN,
                maddrs=[f"/ip4/1.2.3.4/tcp/1/p2p/{DEAD_PEER}"],
            )
        with pytest.raises(ValueError, match="cannot prove"):
            commitment_for(dht, swarm.chain, kp.address, run=RUN, key=PeerKey.generate())
    finally:
        do(swarm.ledger, kp, "commit", {"data": original})


def test_identity_records_are_signed_and_validated(swarm: Swarm) -> None:
    signed = publish_identity(swarm.dhts[1], swarm.miners[1], RUN, ttl=120)
    claims = fetch_identities(swarm.dhts[2], RUN)
    assert claims[swarm.hotkeys[1]].peer_id == swarm.dhts[1].peer_id.to_base58()

    # Every node runs the validator: a forged record is stored nowhere.
    thief = Keypair.generate()
    forged = signed.model_dump(exclude_none=True) | {"signature": thief.sign(b"x").hex()}
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

    peer = PeerKey.generate()
    mine = sign_identity(thief, peer, RUN, expires + 10).model_dump(exclude_none=True)
    assert validator.validate(record(mine, thief.address))
    assert not validator.validate(record(mine, swarm.hotkeys[0]))  # subkey is not the signer
    assert not validator.validate(record(mine, thief.address, expires + 100))  # outlives it
    other_run = sign_identity(thief, peer, "elsewhere", expires + 10).model_dump(exclude_none=True)
    assert not validator.validate(record(other_run, thief.address))
    assert not validator.validate(record(mine | {"extra": 1}, thief.address))
    assert not validator.validate(record(mine | {"peer_id": "Qm0000"}, thief.address))
    assert not validator.validate(DHTRecord(key_id, b"\xc1", b"\xc1", expires))
    # The hotkey signed it, but not the peer: no proof, or a proof by another key.
    assert not validator.validate(record(_without(mine, "peer_proof"), thief.address))
    stolen = mine | {"peer_id": DEAD_PEER}
    stolen_claim = IdentityClaim.model_validate(_without(stolen, "signature", "peer_proof"))
    stolen["signature"] = thief.sign(stolen_claim.message()).hex()
    assert not validator.validate(record(stolen, thief.address))
    # Records under other keys are not this validator's business.
    other = DHTRecord(DHTID.generate(source="x").to_bytes(), b"", b"junk", expires)
    assert validator.validate(other)


def _without(body: dict[str, Any], *keys: str) -> dict[str, Any]:
    return {k: v for k, v in body.items() if k not in keys}


def test_directory_admits_registered_hotkeys_only(swarm: Swarm) -> None:
    """Ledger commitments and DHT records both tie peers; unregistered hotkeys drop."""
    run = RUN
    directory = PeerDirectory(swarm.chain, run=run, dht=swarm.dhts[0])
    base = {
        d.peer_id.to_base58(): kp.address for d, kp in zip(swarm.dhts, swarm.miners, strict=True)
    }
    assert directory.peers() == base
    # Proofs name the run: the same commitments tie nothing in another run.
    assert PeerDirectory(swarm.chain, run="elsewhere").peers() == {}

    # A registered hotkey without a commitment, tied by a DHT record only.
    late, late_peer = Keypair.generate(), PeerKey.generate()
    do(swarm.ledger, late, "register", {})
    expires = get_dht_time() + 30
    assert swarm.dhts[2].store(
        identity_key(run),
        sign_identity(late, late_peer, run, expires).model_dump(exclude_none=True),
        expires,
        subkey=late.address,
    )
    # An unregistered hotkey's record counts for nothing.
    stranger = Keypair.generate()
    swarm.dhts[2].store(
        identity_key(run),
        sign_identity(stranger, PeerKey.generate(), run, expires).model_dump(exclude_none=True),
        expires,
        subkey=stranger.address,
    )
    late_id = late_peer.peer_id.to_base58()
    assert directory.peers() == base | {late_id: late.address}
    # A directory without the DHT sees the ledger only.
    assert PeerDirectory(swarm.ledger_path, run=run).peers() == base


def test_hijacking_a_peer_id_fails(swarm: Swarm) -> None:
    """A registered hotkey that claims another miner's peer id gets nothing, and the victim
    keeps its place: in its ledger commitment and in a DHT record alike."""
    directory = PeerDirectory(swarm.chain, run=RUN, dht=swarm.dhts[0])
    victim = swarm.dhts[1].peer_id.to_base58()
    thief = Keypair.generate()
    do(swarm.ledger, thief, "register", {})
    victim_text, _ = swarm.ledger.commitments()[swarm.hotkeys[1]]
    victim_body = json.loads(victim_text)

    # 1. The victim's own commitment copied, proof included: the proof names the victim.
    do(swarm.ledger, thief, "commit", {"data": victim_text})
    assert directory.peers()[victim] == swarm.hotkeys[1]
    assert committed_peer(victim_text, hotkey=thief.address, run=RUN) is None
    # 2. No proof at all (what the audit's attack committed).
    do(swarm.ledger, thief, "commit", {"data": json.dumps({"dht": victim_body["dht"]})})
    assert directory.peers()[victim] == swarm.hotkeys[1]
    # 3. A DHT record: the thief's hotkey signs, but only a proof by its own peer key.
    expires = get_dht_time() + 30
    fake = sign_identity(thief, PeerKey.generate(), RUN, expires).model_dump(exclude_none=True)
    fake["peer_id"] = victim
    claim = IdentityClaim.model_validate(_without(fake, "signature", "peer_proof"))
    fake["signature"] = thief.sign(claim.message()).hex()
    assert not swarm.dhts[2].store(identity_key(RUN), fake, expires, subkey=thief.address)
    peers = directory.peers()
    assert peers[victim] == swarm.hotkeys[1] and thief.address not in peers.values()


def test_commitment_proofs(swarm: Swarm) -> None:
    """A valid proof ties; a forged one, or one by another peer's key, does not."""
    kp, dht = swarm.miners[2], swarm.dhts[2]
    peer = dht.peer_id.to_base58()
    valid = commitment_for(dht, swarm.chain, kp.address, run=RUN)
    assert committed_peer(valid, hotkey=kp.address, run=RUN) == peer
    assert committed_peer(valid, hotkey=swarm.hotkeys[3], run=RUN) is None  # other hotkey
    assert committed_peer(valid, hotkey=kp.address, run="elsewhere") is None  # other run
    body = json.loads(valid)

    def with_proof(proof: dict[str, Any] | None) -> str:
        return json.dumps(
            _without(body, "dht_proof") | ({} if proof is None else {"dht_proof": proof})
        )

    message = commitment_message(peer, kp.address, RUN)
    other = PeerKey.generate()
    forged = {"sig": b64(bytes(64))}
    by_other_key = PeerProof.make(other, message).model_dump(exclude_none=True)
    # An RSA-style proof that carries a public key, but of another peer.
    with_wrong_key = {"sig": body["dht_proof"]["sig"], "key": b64(other.public)}
    for proof in (None, forged, by_other_key, with_wrong_key, {"sig": "not base64!"}):
        assert committed_peer(with_proof(proof), hotkey=kp.address, run=RUN) is None, proof
    # A proof for another peer id, with that peer's addresses: it proves that peer, not ours.
    addr = f"/ip4/127.0.0.1/tcp/9/p2p/{other.peer_id.to_base58()}"
    moved = json.dumps({"dht": [addr], "dht_proof": body["dht_proof"]})
    assert committed_peer(moved, hotkey=kp.address, run=RUN) is None


def test_names_and_addresses() -> None:
    assert check_run_name("run_1-a") == "run_1-a"
    for bad in ("", "a.b", "a b", "x" * 65):
        with pytest.raises(ValueError):
            check_run_name(bad)
    assert host_maddrs(DHTConfig(host="::1", port=7)) == ["/ip6/::1/tcp/7"]
    assert host_maddrs(DHTConfig()) == ["/ip4/127.0.0.1/tcp/0"]
