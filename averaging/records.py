"""Owner-bound, schema-checked DHT records of the averagers (every node runs this validator).

hivemind's averagers write two kinds of records, both with the writer's peer id as subkey:
group declarations (key ``<prefix>.0b<bits>``, value ``True``/``False`` = looking for a
group or not, expiry = when the group should start; see hivemind/averaging/key_manager.py)
and state-sharing declarations (key ``<prefix>.all_averagers``, value the priority, a
number, or None). Plain hivemind lets any node write any value under any peer's subkey, so
a rogue node could mark a victim "not looking" until far in the future and keep it out of
every group, or hide its state.

`PeerRecordValidator` makes every record whose subkey is binary (hivemind's form of a
peer id) belong to that peer: the node that stores it wraps the value in an envelope signed
by its libp2p key (`sign_value`, in the DHT's own process, so hivemind's key manager and
averager need no change), every node refuses a record whose signature does not verify
under the peer id in the subkey (`averaging.identity.verify_peer`) or whose value is not
one of the declarations' types (bool, None, or a finite number), and readers get the bare
value back (`strip_value`). The signature covers the key, the subkey, the value and the
expiry, so nobody can move, alter or prolong another peer's declaration.

hivemind's own `RSASignatureValidator` would bind a record to an RSA key named by an
``[owner:…]`` marker inside the subkey; that key is not the peer id (so a rogue could still
take a victim's peer id with a marker of its own), and the marker changes the subkey bytes
that hivemind's key manager reads back as a peer id (`PeerID(subkey)`), which would mean
re-implementing its matchmaking reads. Its `SchemaValidator` checks fixed key names only,
while group keys change with every window; validators see key hashes, never key names, so
this one recognizes the averagers' records by their binary subkey instead. Records under
other subkeys (our identity records use hotkey strings) pass through untouched; a binary
subkey that is not a peer id is refused.
"""

from __future__ import annotations

import logging
import math
from typing import Any

import msgpack
from hivemind.dht.protocol import DHTProtocol
from hivemind.dht.validation import DHTRecord, RecordValidatorBase
from hivemind.p2p import PeerID
from hivemind.utils.serializer import MSGPackSerializer

from averaging.identity import PROOF_DOMAIN, PeerKey, inline_public, verify_peer

logger = logging.getLogger(__name__)

_MAX_ENVELOPE = 2048  # an RSA envelope: 256-byte signature, 298-byte key, the value
_PURPOSE = b"dht-record\n"


def _record_message(key: bytes, subkey: bytes, value: bytes, expiration: float) -> bytes:
    body: bytes = msgpack.packb([key, subkey, value, float(expiration)], use_bin_type=True)
    return PROOF_DOMAIN + _PURPOSE + body


def _peer_subkey(subkey: bytes) -> bytes | None:
    """The subkey as bytes if it is a binary one (a peer's), else None (not our business)."""
    if subkey in DHTProtocol.RESERVED_SUBKEYS:
        return None
    try:
        decoded = MSGPackSerializer.loads(subkey)
    except (ValueError, TypeError, msgpack.UnpackException):
        return None
    return decoded if isinstance(decoded, bytes) else None


def _is_declaration(value: Any) -> bool:
    """A group declaration (bool) or a state priority (None or a finite number)."""
    if value is None or isinstance(value, bool):
        return True
    return isinstance(value, int | float) and math.isfinite(value)


def _open(value: bytes) -> tuple[bytes, bytes, bytes | None] | None:
    """(inner value, signature, public key or None) from an envelope, or None."""
    if len(value) > _MAX_ENVELOPE:
        return None
    try:
        envelope = MSGPackSerializer.loads(value)
    except (ValueError, TypeError, msgpack.UnpackException):
        return None
    if not isinstance(envelope, dict) or not {"v", "sig"} <= set(envelope) <= {"v", "sig", "pk"}:
        return None
    inner, sig, public = envelope["v"], envelope["sig"], envelope.get("pk")
    if not isinstance(inner, bytes) or not isinstance(sig, bytes):
        return None
    if public is not None and not isinstance(public, bytes):
        return None
    return inner, sig, public


class PeerRecordValidator(RecordValidatorBase):  # type: ignore[misc]
    """See the module docstring. `key` signs this node's own records; None: validate only."""

    def __init__(self, key: PeerKey | None) -> None:
        self.key = key
        self._own = key.peer_id.to_bytes() if key is not None else None

    def validate(self, record: DHTRecord) -> bool:
        peer = _peer_subkey(record.subkey)
        if peer is None:
            return True
        opened = _open(record.value)
        if opened is None or not math.isfinite(record.expiration_time):
            logger.debug("refused a peer record: not a signed envelope")
            return False
        inner, sig, public = opened
        message = _record_message(record.key, record.subkey, inner, record.expiration_time)
        if not verify_peer(PeerID(peer), message, sig, public):
            logger.debug("refused a peer record: not signed by %s", PeerID(peer))
            return False
        try:
            value = MSGPackSerializer.loads(inner)
        except (ValueError, TypeError, msgpack.UnpackException):
            return False
        if not _is_declaration(value):
            logger.debug("refused a peer record: value %r is no declaration", value)
            return False
        return True

    def sign_value(self, record: DHTRecord) -> bytes:
        if self.key is None or _peer_subkey(record.subkey) != self._own:
            return bytes(record.value)
        message = _record_message(record.key, record.subkey, record.value, record.expiration_time)
        envelope: dict[str, bytes] = {"v": record.value, "sig": self.key.sign(message)}
        if inline_public(self.key.peer_id) is None:
            envelope["pk"] = self.key.public
        signed: bytes = MSGPackSerializer.dumps(envelope)
        return signed

    def strip_value(self, record: DHTRecord) -> bytes:
        opened = _open(record.value) if _peer_subkey(record.subkey) is not None else None
        return bytes(record.value) if opened is None else opened[0]

    @property
    def priority(self) -> int:
        # Checked before (and stripped for) validators that read the bare value.
        return 10

    def merge_with(self, other: RecordValidatorBase) -> bool:
        return False
