"""libp2p identities: key files, peer ids, and proofs that a peer id's own key signed something.

    key = PeerKey.generate()                       # Ed25519, peer id "12D3KooW…"
    sig = key.sign(peer_message("ledger-commitment", {"hotkey": h, "peer_id": p, "run": r}))
    verify_peer(p, message, sig, public=None)       # True; RSA peer ids need `public`

A libp2p peer id is derived from its public key (libp2p spec, peer-ids.md): the protobuf
``PublicKey{key_type, data}`` is hashed into a multihash, the *identity* multihash when it
is at most 42 bytes (Ed25519: the peer id embeds the key) and SHA-256 otherwise (RSA:
hivemind's `PeerID.from_identity` computes exactly this). So a signature that verifies
under a public key hashing to a peer id was made by whoever holds that peer's private key,
the same key the p2p daemon authenticates every stream with.

New identity files hold Ed25519 keys (the p2p daemon, go-libp2p, reads them; a proof is
88 characters of base64 and needs no public key); RSA-2048 files written by hivemind or by
earlier versions keep working, with a proof that also carries the 298-byte public key.
Every signed message starts with `PROOF_DOMAIN` and a purpose, so a proof made for one
use can never pass for another, nor for anything libp2p itself signs.
"""

from __future__ import annotations

import base64
import binascii
import functools
import hashlib
from typing import Any

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import padding, rsa
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
from google.protobuf.message import DecodeError  # type: ignore[import-untyped]
from hivemind.p2p import PeerID
from hivemind.proto import crypto_pb2

from chain.keys import signing_bytes

PROOF_DOMAIN = b"tensormine/peer-proof/v1\n"
_IDENTITY_HASH, _SHA2_256 = 0x00, 0x12
_MAX_INLINE_KEY = 42  # libp2p: public keys up to 42 bytes are inlined in the peer id
_MIN_RSA_BITS = 2048


def peer_message(purpose: str, fields: dict[str, Any]) -> bytes:
    """Canonical bytes a peer key signs for `purpose` (JSON of `fields`, sorted keys)."""
    return PROOF_DOMAIN + purpose.encode() + b"\n" + signing_bytes(fields)


def peer_id_of_public(public: bytes) -> PeerID:
    """The peer id of a protobuf-encoded libp2p public key (libp2p's rule, see above)."""
    if len(public) <= _MAX_INLINE_KEY:
        return PeerID(bytes([_IDENTITY_HASH, len(public)]) + public)
    return PeerID(bytes([_SHA2_256, 32]) + hashlib.sha256(public).digest())


def inline_public(peer_id: PeerID | str) -> bytes | None:
    """The public key embedded in an identity-multihash peer id (Ed25519), else None."""
    try:
        raw = (
            peer_id.to_bytes()
            if isinstance(peer_id, PeerID)
            else PeerID.from_base58(peer_id).to_bytes()
        )
    except ValueError:
        return None
    if len(raw) >= 2 and raw[0] == _IDENTITY_HASH and raw[1] == len(raw) - 2:
        return bytes(raw[2:])
    return None


def _ed25519_raw(key: Ed25519PrivateKey | Ed25519PublicKey) -> bytes:
    if isinstance(key, Ed25519PrivateKey):
        return key.private_bytes(
            serialization.Encoding.Raw,
            serialization.PrivateFormat.Raw,
            serialization.NoEncryption(),
        )
    return key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)


class PeerKey:
    """A libp2p private key as the p2p daemon reads it (protobuf ``PrivateKey`` bytes)."""

    def __init__(self, data: bytes) -> None:
        try:
            message = crypto_pb2.PrivateKey.FromString(data)
        except DecodeError as exc:
            raise ValueError(f"not a libp2p private key: {exc}") from exc
        self.data = bytes(data)
        self.key_type = int(message.key_type)
        self._raw = bytes(message.data)
        public = self._private().public_key()
        if isinstance(public, Ed25519PublicKey):
            if len(self._raw) == 64 and self._raw[32:] != _ed25519_raw(public):
                raise ValueError("Ed25519 key file: the stored public half does not match")
            proto = crypto_pb2.PublicKey(
                key_type=crypto_pb2.KeyType.Ed25519, data=_ed25519_raw(public)
            )
        else:
            der = public.public_bytes(
                serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
            )
            proto = crypto_pb2.PublicKey(key_type=crypto_pb2.KeyType.RSA, data=der)
        self.public = proto.SerializeToString()
        self.peer_id = peer_id_of_public(self.public)

    @classmethod
    def generate(cls) -> PeerKey:
        """A new Ed25519 key, in go-libp2p's layout (32-byte seed, then the public key)."""
        private = Ed25519PrivateKey.generate()
        raw = _ed25519_raw(private) + _ed25519_raw(private.public_key())
        return cls(
            crypto_pb2.PrivateKey(key_type=crypto_pb2.KeyType.Ed25519, data=raw).SerializeToString()
        )

    def _private(self) -> Ed25519PrivateKey | rsa.RSAPrivateKey:
        return _load_private(self.key_type, self._raw)

    @property
    def embeds_public(self) -> bool:
        """Whether the peer id itself carries the public key (no need to send it)."""
        return len(self.public) <= _MAX_INLINE_KEY

    def sign(self, message: bytes) -> bytes:
        private = self._private()
        if isinstance(private, Ed25519PrivateKey):
            return private.sign(message)
        return private.sign(message, padding.PKCS1v15(), hashes.SHA256())

    def __getstate__(self) -> dict[str, Any]:
        return {"data": self.data}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__init__(state["data"])  # type: ignore[misc]

    def __repr__(self) -> str:
        return f"PeerKey({self.peer_id})"


@functools.lru_cache(maxsize=8)
def _load_private(key_type: int, raw: bytes) -> Ed25519PrivateKey | rsa.RSAPrivateKey:
    if key_type == crypto_pb2.KeyType.Ed25519:
        if len(raw) not in (32, 64):
            raise ValueError(f"an Ed25519 key has 32 or 64 bytes, got {len(raw)}")
        return Ed25519PrivateKey.from_private_bytes(raw[:32])
    if key_type == crypto_pb2.KeyType.RSA:
        private = serialization.load_der_private_key(raw, password=None)
        if not isinstance(private, rsa.RSAPrivateKey) or private.key_size < _MIN_RSA_BITS:
            raise ValueError("an RSA identity must be an RSA key of at least 2048 bits")
        return private
    raise ValueError(f"unsupported libp2p key type {key_type} (Ed25519 or RSA only)")


def verify_peer(
    peer_id: PeerID | str, message: bytes, signature: bytes, public: bytes | None = None
) -> bool:
    """Whether `signature` over `message` was made by the key behind `peer_id`.

    `public` is the protobuf public key; it may be left out when the peer id embeds it.
    """
    try:
        peer = peer_id if isinstance(peer_id, PeerID) else PeerID.from_base58(peer_id)
    except ValueError:
        return False
    public = public if public is not None else inline_public(peer)
    if public is None or peer_id_of_public(public) != peer:
        return False
    try:
        proto = crypto_pb2.PublicKey.FromString(public)
        if proto.key_type == crypto_pb2.KeyType.Ed25519:
            Ed25519PublicKey.from_public_bytes(bytes(proto.data)).verify(signature, message)
            return True
        if proto.key_type == crypto_pb2.KeyType.RSA:
            key = serialization.load_der_public_key(bytes(proto.data))
            if not isinstance(key, rsa.RSAPublicKey) or key.key_size < _MIN_RSA_BITS:
                return False
            key.verify(signature, message, padding.PKCS1v15(), hashes.SHA256())
            return True
    except (InvalidSignature, DecodeError, ValueError, TypeError):
        return False
    return False


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def unb64(text: str) -> bytes:
    """Strict base64 decoding; ValueError on anything else."""
    try:
        return base64.b64decode(text.encode(), validate=True)
    except (binascii.Error, UnicodeEncodeError) as exc:
        raise ValueError(f"not base64: {exc}") from exc
