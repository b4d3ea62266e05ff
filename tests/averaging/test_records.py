"""Averagers' DHT records belong to the peer named in their subkey and have a strict schema."""

from __future__ import annotations

import math

import pytest
from hivemind import DHT
from hivemind.dht.routing import DHTID
from hivemind.dht.validation import DHTRecord
from hivemind.proto import crypto_pb2
from hivemind.utils.crypto import RSAPrivateKey
from hivemind.utils.serializer import MSGPackSerializer
from hivemind.utils.timed_storage import get_dht_time

from averaging.dht import visible_maddrs
from averaging.identity import PeerKey
from averaging.records import PeerRecordValidator
from tests.averaging.conftest import Swarm

KEY = DHTID.generate(source="avgtest_shard7.0b101").to_bytes()


def rsa_key() -> PeerKey:
    data = crypto_pb2.PrivateKey(key_type=crypto_pb2.KeyType.RSA, data=RSAPrivateKey().to_bytes())
    return PeerKey(data.SerializeToString())


def signed(key: PeerKey, value: object, expires: float, subkey: bytes | None = None) -> DHTRecord:
    sub = MSGPackSerializer.dumps(subkey if subkey is not None else key.peer_id.to_bytes())
    bare = DHTRecord(KEY, sub, MSGPackSerializer.dumps(value), expires)
    return DHTRecord(KEY, sub, PeerRecordValidator(key).sign_value(bare), expires)


@pytest.mark.parametrize("make_key", [PeerKey.generate, rsa_key], ids=["ed25519", "rsa"])
def test_declarations_are_signed_by_their_peer(make_key: type[PeerKey]) -> None:
    key, other = make_key(), PeerKey.generate()
    reader = PeerRecordValidator(None)
    expires = get_dht_time() + 30
    for value in (True, False, None, 3.0, 7):
        record = signed(key, value, expires)
        assert reader.validate(record), value
        assert MSGPackSerializer.loads(reader.strip_value(record)) == value
    record = signed(key, True, expires)
    assert not reader.validate(DHTRecord(KEY, record.subkey, record.value, expires + 100))
    moved = DHTID.generate(source="avgtest_shard7.0b110").to_bytes()
    assert not reader.validate(DHTRecord(moved, record.subkey, record.value, expires))
    # Another peer's subkey: nobody signs it for us, and a copied envelope does not verify.
    victim = PeerKey.generate().peer_id.to_bytes()
    assert not reader.validate(signed(other, False, expires, subkey=victim))
    swapped = MSGPackSerializer.dumps(victim)
    assert not reader.validate(DHTRecord(KEY, swapped, record.value, expires))


def test_malformed_declarations_are_refused() -> None:
    key = PeerKey.generate()
    reader = PeerRecordValidator(None)
    expires = get_dht_time() + 30
    sub = MSGPackSerializer.dumps(key.peer_id.to_bytes())
    # Signed by the right key, but not a declaration: a string, a NaN, a list.
    for value in ("high", math.nan, math.inf, [1.0], {"x": 1}):
        assert not reader.validate(signed(key, value, expires)), value
    # Unsigned values, a binary subkey that is no peer id, a non-finite expiry.
    assert not reader.validate(DHTRecord(KEY, sub, MSGPackSerializer.dumps(True), expires))
    assert not reader.validate(DHTRecord(KEY, sub, b"\xc1", expires))
    assert not reader.validate(signed(key, True, expires, subkey=b"not a peer id"))
    assert not reader.validate(signed(key, True, math.inf))
    # Other records (string subkeys, plain values) are not this validator's business.
    assert reader.validate(DHTRecord(KEY, MSGPackSerializer.dumps("5Fhotkey"), b"junk", expires))
    assert reader.validate(DHTRecord(KEY, MSGPackSerializer.dumps(None), b"junk", expires))


def test_rogue_node_cannot_store_declarations(swarm: Swarm) -> None:
    """A plain hivemind node (no validator) joins and writes under our averagers' keys: a
    victim's group declaration set to "not looking" until far ahead, and malformed values
    in its own slots. Every honest node refuses them; the victim's declaration stands."""
    group_key, state_key = "avgtest_shard900.0b101", "avgtest_shard900.all_averagers"
    victim = swarm.dhts[1]
    expires = get_dht_time() + 30
    assert victim.store(group_key, True, expires, subkey=victim.peer_id.to_bytes())
    rogue = DHT(
        initial_peers=visible_maddrs(swarm.dhts[0]),
        host_maddrs=["/ip4/127.0.0.1/tcp/0"],
        start=True,
    )
    try:
        own = rogue.peer_id.to_bytes()
        rogue.store(group_key, False, expires + 3600, subkey=victim.peer_id.to_bytes())
        rogue.store(group_key, "yes", expires, subkey=own)
        rogue.store(state_key, "high", expires, subkey=own)
        assert rogue.store("avgtest_rogue_control", "x", expires)  # reaches honest nodes
        for dht in swarm.dhts:
            control = dht.get("avgtest_rogue_control", latest=True)
            assert control is not None and control.value == "x"
            found = dht.get(group_key, latest=True)
            assert found is not None
            assert {k: v.value for k, v in found.value.items()} == {victim.peer_id.to_bytes(): True}
            assert dht.get(state_key, latest=True) is None
    finally:
        rogue.shutdown()
