"""Hotkeys: Ed25519 key pairs, their SS58 addresses, key files, what gets signed, and
`verify`, which also accepts a Bittensor wallet's sr25519 signatures.

    kp = Keypair.generate()
    sig = kp.sign(signing_bytes({"call": "transfer", "nonce": 0}))
    verify(kp.address, signing_bytes({...}), sig)  # True

An address is the SS58 encoding of the 32-byte public key (network prefix 42, as on
Bittensor's chains), so it reads like a real hotkey (``5F...``) and carries a checksum
that catches typos. Key files are JSON holding the secret seed, written with mode 0600
into a key directory (``~/.tensormine/keys`` unless ``TENSORMINE_HOME`` says otherwise).
Everything signed is first turned into canonical JSON bytes by `signing_bytes`.

**Two schemes, one address.** A Bittensor wallet's keys (`chain.wallet`) are sr25519 and
ours are Ed25519; both are 32-byte public keys, and an SS58 address does not say which
scheme made it. `verify` accepts a signature that is valid under either scheme for the
address's key, and needs no scheme tag. Substrate's `MultiSignature` carries a tag, but
the signer picks it, so a verifier that honours it accepts either scheme for one
`AccountId32` exactly as this one does: the tag only spares the second check. A forger
must break Ed25519 or sr25519 for a key whose discrete log in the *other* group nobody
knows (the same 32 bytes read as a Ristretto point, or as an Edwards point), so
accepting both is as strong as the weaker scheme, ~128 bits. Tagless, signatures keep
64 bytes where formats pin that length (`averaging.dht.SignedIdentity`), and old
Ed25519 signatures verify as they always did. sr25519 is checked strictly: the SDK's
verifier also accepts a signature of ``<Bytes>message</Bytes>`` (how polkadot.js
wallets sign raw text) and `verify` refuses that, so a wallet's signature counts only for
the exact bytes it signed. A hotkey also signs real-chain extrinsics in the same
"substrate" context, so no message of ours may ever be an extrinsic's signing payload,
nor the reverse: what we sign is ASCII (`signing_bytes` escapes the rest), and a signing
payload is either the 32-byte blake2 hash of a long one (finding one that is ASCII JSON
is a preimage attack) or holds the genesis hash and a block hash, 64 bytes that are not
all ASCII (finney's genesis hash already is not).
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import bittensor_core  # type: ignore[import-untyped]  # the SDK's sr25519 (Rust sp-core)
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import (
    Ed25519PrivateKey,
    Ed25519PublicKey,
)

from chain.errors import WalletError

SS58_PREFIX = 42
_B58 = "123456789ABCDEFGHJKLMNPQRSTUVWXYZabcdefghijkmnopqrstuvwxyz"
_NAME = re.compile(r"^[A-Za-z0-9_.-]{1,64}$")
SIGNATURE_BYTES = 64  # Ed25519 and sr25519 alike


class KeyFileError(WalletError, ValueError):
    """A key file, key name or address is invalid (a `WalletError`, and a ValueError as
    it always was)."""


def _b58encode(data: bytes) -> str:
    num = int.from_bytes(data, "big")
    out = ""
    while num:
        num, rem = divmod(num, 58)
        out = _B58[rem] + out
    pad = len(data) - len(data.lstrip(b"\0"))
    return "1" * pad + out


def _b58decode(text: str) -> bytes:
    num = 0
    for ch in text:
        idx = _B58.find(ch)
        if idx < 0:
            raise KeyFileError(f"address {text!r}: {ch!r} is not a base58 character")
        num = num * 58 + idx
    pad = len(text) - len(text.lstrip("1"))
    body = num.to_bytes((num.bit_length() + 7) // 8, "big") if num else b""
    return b"\0" * pad + body


def _ss58_checksum(payload: bytes) -> bytes:
    return hashlib.blake2b(b"SS58PRE" + payload, digest_size=64).digest()[:2]


def ss58_encode(public_key: bytes, prefix: int = SS58_PREFIX) -> str:
    """SS58 address of a 32-byte public key (simple one-byte prefix form)."""
    if len(public_key) != 32:
        raise KeyFileError(f"a public key has 32 bytes, got {len(public_key)}")
    payload = bytes([prefix]) + public_key
    return _b58encode(payload + _ss58_checksum(payload))


def ss58_decode(address: str) -> bytes:
    """The 32-byte public key behind an address; raises `KeyFileError` on a bad address."""
    raw = _b58decode(address)
    if len(raw) != 35:
        raise KeyFileError(f"address {address!r} does not decode to a 32-byte key")
    payload, checksum = raw[:33], raw[33:]
    if payload[0] != SS58_PREFIX:
        raise KeyFileError(f"address {address!r} has network prefix {payload[0]}, not 42")
    if _ss58_checksum(payload) != checksum:
        raise KeyFileError(f"address {address!r} has a wrong checksum (typo?)")
    return payload[1:]


def is_address(address: str) -> bool:
    """Whether `address` is a well-formed SS58 address."""
    try:
        ss58_decode(address)
    except KeyFileError:
        return False
    return True


def signing_bytes(obj: Any) -> bytes:
    """Canonical JSON: sorted keys, no spaces, UTF-8; floats must be finite."""
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), allow_nan=False).encode()


@dataclass(frozen=True)
class Keypair:
    """An Ed25519 key pair; `address` is the hotkey as the ledger knows it."""

    seed: bytes

    def __post_init__(self) -> None:
        if len(self.seed) != 32:
            raise KeyFileError(f"an Ed25519 seed has 32 bytes, got {len(self.seed)}")

    @classmethod
    def generate(cls) -> Keypair:
        return cls(os.urandom(32))

    @property
    def _private(self) -> Ed25519PrivateKey:
        return Ed25519PrivateKey.from_private_bytes(self.seed)

    @property
    def public_key(self) -> bytes:
        return self._private.public_key().public_bytes(
            serialization.Encoding.Raw, serialization.PublicFormat.Raw
        )

    @property
    def address(self) -> str:
        return ss58_encode(self.public_key)

    def sign(self, message: bytes) -> bytes:
        return self._private.sign(message)

    def __repr__(self) -> str:  # never show the seed
        return f"Keypair({self.address})"


def verify(address: str, message: bytes, signature: bytes) -> bool:
    """True iff `signature` is `address`'s Ed25519 or sr25519 signature of exactly
    `message` (see "Two schemes, one address" above). Never raises."""
    try:
        public = ss58_decode(address)
    except KeyFileError:
        return False
    if len(signature) != SIGNATURE_BYTES:
        return False
    return _verify_ed25519(public, message, signature) or _verify_sr25519(
        address, message, signature
    )


def _verify_ed25519(public: bytes, message: bytes, signature: bytes) -> bool:
    try:
        Ed25519PublicKey.from_public_bytes(public).verify(signature, message)
    except (InvalidSignature, ValueError):
        return False
    return True


def _verify_sr25519(address: str, message: bytes, signature: bytes) -> bool:
    """sr25519 (schnorrkel, "substrate" context) through the SDK's own binding. It also
    accepts a signature of ``<Bytes>message</Bytes>``; such a signature verifies the
    wrapped message too, and one of `message` itself never does, which tells them apart."""
    sr25519 = bittensor_core.CRYPTO_SR25519
    try:
        if not bittensor_core.verify(message, signature, address, sr25519):
            return False
        wrapped = b"<Bytes>" + message + b"</Bytes>"
        return not bittensor_core.verify(wrapped, signature, address, sr25519)
    except (ValueError, TypeError):
        return False


def default_keys_dir() -> Path:
    """``$TENSORMINE_HOME/keys``, by default ``~/.tensormine/keys``."""
    home = os.environ.get("TENSORMINE_HOME")
    base = Path(home) if home else Path.home() / ".tensormine"
    return base / "keys"


def _key_path(keys_dir: Path, name: str) -> Path:
    if not _NAME.match(name):
        raise KeyFileError(f"key name {name!r}: use 1-64 letters, digits, '_', '.', '-'")
    return keys_dir / f"{name}.json"


def create_key(
    keys_dir: Path, name: str, *, overwrite: bool = False, seed: bytes | None = None
) -> Keypair:
    """Make a new key pair and write it to ``keys_dir/NAME.json`` with mode 0600.

    `seed` (32 bytes) gives the key pair of that Ed25519 seed instead of a fresh random
    one: for an existing key, or for reproducible tests."""
    path = _key_path(keys_dir, name)
    if path.exists() and not overwrite:
        raise KeyFileError(f"key {name!r} already exists at {path}; refusing to overwrite it")
    kp = Keypair.generate() if seed is None else Keypair(seed)
    keys_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
    body = json.dumps({"name": name, "address": kp.address, "ed25519_seed": kp.seed.hex()})
    tmp = path.with_suffix(".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as fh:
        fh.write(body + "\n")
        fh.flush()
        os.fsync(fh.fileno())
    tmp.replace(path)
    return kp


def load_key(keys_dir: Path, name: str) -> Keypair:
    """Read a key file; refuses files other users can read and files that do not add up."""
    path = _key_path(keys_dir, name)
    if not path.is_file():
        raise KeyFileError(
            f"no key named {name!r} in {keys_dir}; create it with `tensormine keys new {name}`"
        )
    mode = path.stat().st_mode & 0o777
    if mode & 0o077:
        raise KeyFileError(f"{path} has mode {mode:o}; a key file must be 0600 (chmod 600 {path})")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
        kp = Keypair(bytes.fromhex(data["ed25519_seed"]))
    except (ValueError, KeyError, TypeError) as exc:
        raise KeyFileError(f"{path} is not a tensormine key file: {exc}") from exc
    if data.get("address") != kp.address:
        raise KeyFileError(f"{path}: the stored address does not match the seed")
    return kp


def list_keys(keys_dir: Path) -> list[tuple[str, str]]:
    """(name, address) of every key file in `keys_dir`, sorted by name."""
    if not keys_dir.is_dir():
        return []
    out = []
    for path in sorted(keys_dir.glob("*.json")):
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
            out.append((str(data["name"]), str(data["address"])))
        except (ValueError, KeyError, TypeError):
            continue
    return out
