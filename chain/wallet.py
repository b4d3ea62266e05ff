"""Bittensor wallets as signing identities: the keys `btcli` made, loaded into an `Identity`.

    identity = load_wallet(cfg.chain.wallet)              # chain.interface.Identity
    sig = identity.hotkey.sign(message)                   # sr25519, by the wallet's hotkey
    chain.keys.verify(identity.address, message, sig)     # True: the project's one verifier
    await client.execute(intent, IdentityWallet(identity))  # the SDK signs with the same keys

    identity = local_identity(keys_dir, "alice")          # our Ed25519 key file, one for both

**The layout** (`btcli wallet create`, `WalletConfig` names the three parts):

    <path>/<name>/coldkey              the coldkey, encrypted with a password (NaCl)
    <path>/<name>/coldkeypub.txt       its public half: the coldkey address, never secret
    <path>/<name>/hotkeys/<hotkey>     the hotkey, plaintext JSON (secretPhrase, secretSeed…)

**What is read.** The hotkey always: it signs everything peers check (manifests, proofs,
DHT identity records, weights and commitments on the chain) and btcli keeps it
unencrypted so that a miner or validator can run unattended. The coldkey only when the
environment variable `WalletConfig.password_env` holds its password: then it is
decrypted here once (Argon2, a few seconds, by design) and `Identity.coldkey` can sign
the writes that move funds (staking, transfers). Otherwise `Identity.coldkey` is None,
its address comes from ``coldkeypub.txt``, and a write that needs it fails. A miner's
machine usually holds no coldkey at all, which is the safe way to run one.

**File modes.** btcli writes every key file owner-only: the SDK's `Keyfile._write_data`
(`bittensor/keyfiles.py`) creates it 0600 and `fchmod`s it to 0600 "regardless of the
caller's umask", in folders made 0700. It does not check the mode on reading; we do, as
`chain.keys.load_key` does for our own key files: a hotkey or coldkey file that grants
its group or others any permission is refused (`chmod 600` fixes it). The public
``*pub.txt`` files may have any mode.

**Errors.** Every problem is a `chain.errors.WalletError` with a one-line message naming
the cause and the file: a missing wallet, hotkey or coldkeypub file, a key file others can
read, a wrong password, a file that is not a key file (or holds no private key, or a
coldkey that does not match its coldkeypub.txt). `chain.keys.KeyFileError`, our own key
files' error, is a `WalletError` too, so callers catch both at one root.

**The SDK's view.** `Sr25519Key.sdk_keypair` is the SDK's own keypair object (a
`bittensor.Keypair`, from the Rust `bittensor_core`). `IdentityWallet(identity)`
(`chain.bittensor.signing`) puts an identity's keys in the shape every SDK ``wallet``
parameter accepts (`bittensor.signing.KeyedWallet`), taking each wallet key's
`sdk_keypair` as it is, so `client.execute(intent, wallet)` signs hotkey intents with the
hotkey loaded here and coldkey intents with the coldkey unlocked here. Not a
`bittensor.Wallet`: the SDK would read that wallet's coldkey again itself, look for its
password in its own variables (``BT_WALLET_PASSWORD``) and otherwise prompt on the
terminal, which an unattended process must not do.
"""

from __future__ import annotations

import logging
import os
import stat
from pathlib import Path
from typing import Any

import bittensor_core  # type: ignore[import-untyped]  # the SDK's keys and keyfiles (Rust)

from chain.config import WalletConfig
from chain.errors import WalletError
from chain.interface import Identity
from chain.keys import load_key, ss58_encode, verify

logger = logging.getLogger(__name__)

_SCHEMES = {bittensor_core.CRYPTO_SR25519: "sr25519", bittensor_core.CRYPTO_ED25519: "ed25519"}
_MAX_KEY_FILE = 1 << 16  # a btcli key file is a few hundred bytes
_PROBE = b"tensormine/wallet-probe"


class Sr25519Key:
    """A Bittensor wallet key that signs: sr25519 as btcli makes keys (an ed25519 wallet
    key, ``--crypto-type ed25519``, works the same; `scheme` says which). A
    `chain.interface.SigningKey`: `address` is the SS58 address (prefix 42) and `sign`
    returns the 64-byte signature `chain.keys.verify` checks. sr25519 signatures are
    randomized, so signing one message twice gives two different valid signatures."""

    __slots__ = ("_address", "_keypair")

    def __init__(self, sdk_keypair: Any) -> None:
        self._keypair = sdk_keypair
        self._address = ss58_encode(bytes(sdk_keypair.public_key))

    @property
    def address(self) -> str:
        return self._address

    @property
    def scheme(self) -> str:
        """The signature scheme: "sr25519" or "ed25519"."""
        return _SCHEMES.get(self._keypair.crypto_type, f"crypto type {self._keypair.crypto_type}")

    @property
    def sdk_keypair(self) -> Any:
        """The SDK's keypair object (`bittensor.Keypair`), for SDK calls that take one."""
        return self._keypair

    def sign(self, message: bytes) -> bytes:
        return bytes(self._keypair.sign(message))

    def __repr__(self) -> str:  # never the secret
        return f"Sr25519Key({self._address}, {self.scheme})"


def wallet_dir(cfg: WalletConfig) -> Path:
    """``<path>/<name>``, with ``~`` expanded."""
    return cfg.path.expanduser() / cfg.name


def load_wallet(cfg: WalletConfig) -> Identity:
    """The wallet's hotkey, and its coldkey when ``$password_env`` unlocks it, as an
    `Identity`; `WalletError` (one line, naming the file) when they cannot be used."""
    folder = wallet_dir(cfg)
    if not folder.is_dir():
        raise WalletError(
            f"no wallet {cfg.name!r}: {folder} is not a folder; create one with "
            f"`btcli wallet create -w {cfg.name} -H {cfg.hotkey} --wallet-path {cfg.path}`"
        )
    hotkey_path = folder / "hotkeys" / cfg.hotkey
    if not hotkey_path.exists():
        raise WalletError(
            f"no hotkey {cfg.hotkey!r} in wallet {cfg.name!r}: {hotkey_path} does not exist; "
            f"create it with `btcli wallet new-hotkey -w {cfg.name} -H {cfg.hotkey} "
            f"--wallet-path {cfg.path}`"
        )
    hotkey = _load_key(hotkey_path)

    pub_path = folder / "coldkeypub.txt"
    coldkey_address = _read_address(pub_path) if pub_path.exists() else None
    password = os.environ.get(cfg.password_env) or None
    coldkey = None
    if password is not None:
        coldkey_path = folder / "coldkey"
        if not coldkey_path.exists():
            raise WalletError(
                f"${cfg.password_env} is set but wallet {cfg.name!r} has no coldkey: "
                f"{coldkey_path} does not exist (unset it to run with the hotkey alone)"
            )
        coldkey = _load_key(coldkey_path, password=password, password_env=cfg.password_env)
        if coldkey_address is not None and coldkey.address != coldkey_address:
            raise WalletError(
                f"{coldkey_path} holds {coldkey.address}, but {pub_path} says {coldkey_address}"
            )
        coldkey_address = coldkey.address
    if coldkey_address is None:
        raise WalletError(
            f"wallet {cfg.name!r} has no coldkey address: {pub_path} does not exist; "
            f"restore it with `btcli wallet regen-coldkeypub -w {cfg.name} "
            f"--wallet-path {cfg.path}`"
        )
    logger.info(
        "wallet %s: hotkey %s (%s), coldkey %s (%s)",
        cfg.name,
        hotkey.address,
        hotkey.scheme,
        coldkey_address,
        "unlocked" if coldkey is not None else "address only",
    )
    return Identity(hotkey=hotkey, coldkey=coldkey, coldkey_address=coldkey_address)


def local_identity(keys_dir: Path, name: str) -> Identity:
    """Our own Ed25519 key file ``keys_dir/NAME.json`` (`chain.keys.load_key`) as hotkey
    and coldkey in one, as the local ledger's accounts are; `KeyFileError` otherwise."""
    return Identity.single(load_key(keys_dir, name))


# ---- reading key files ---------------------------------------------------------------


def _one_line(exc: BaseException) -> str:
    return " ".join(str(exc).split()) or type(exc).__name__


def _read(path: Path, *, private: bool) -> bytes:
    """The bytes of a key file; a private one must be owner-only (see the module doc)."""
    try:
        st = path.stat()
        if not stat.S_ISREG(st.st_mode):
            raise WalletError(f"{path} is not a key file (not a regular file)")
        mode = st.st_mode & 0o777
        if private and mode & 0o077:
            raise WalletError(
                f"{path} has mode {mode:o}; a wallet key file must be its owner's alone, "
                f"0600 as btcli writes it (chmod 600 {path})"
            )
        if st.st_size > _MAX_KEY_FILE:
            raise WalletError(f"{path} is not a key file ({st.st_size} bytes)")
        return path.read_bytes()
    except OSError as exc:
        raise WalletError(f"cannot read {path}: {exc.strerror or _one_line(exc)}") from None


def _parse(path: Path, data: bytes) -> Any:
    try:
        keypair = bittensor_core.deserialize_keypair_from_keyfile_data(data)
    except (bittensor_core.KeyfileError, ValueError, TypeError) as exc:
        raise WalletError(f"{path} is not a Bittensor key file: {_one_line(exc)}") from None
    if keypair.crypto_type not in _SCHEMES:
        raise WalletError(f"{path} holds a crypto type {keypair.crypto_type} key")
    return keypair


def _load_key(path: Path, *, password: str | None = None, password_env: str = "") -> Sr25519Key:
    """A private key file, decrypted with `password` (read from `password_env`) when it
    is encrypted, checked by signing a probe that `chain.keys.verify` must accept under
    the key's address."""
    data = _read(path, private=True)
    if bittensor_core.keyfile_data_is_encrypted(data):
        if password is None:  # only a hotkey is read without one
            raise WalletError(
                f"{path} is encrypted; tensormine runs with the hotkey unencrypted, as btcli "
                "writes it"
            )
        try:
            data = bytes(bittensor_core.decrypt_keyfile_data(data, password))
        except bittensor_core.WrongPasswordError:
            raise WalletError(f"wrong password for {path} (from ${password_env})") from None
        except (bittensor_core.KeyfileError, ValueError) as exc:
            raise WalletError(f"{path} does not decrypt: {_one_line(exc)}") from None
    key = Sr25519Key(_parse(path, data))
    try:
        probe = key.sign(_PROBE)
    except ValueError:  # a public-only file in the private key's place
        raise WalletError(f"{path} holds no private key (a public key file?)") from None
    if not verify(key.address, _PROBE, probe):
        raise WalletError(f"{path}: the key's signature does not verify under its address")
    return key


def _read_address(path: Path) -> str:
    """The address in a public key file (coldkeypub.txt), re-encoded with prefix 42."""
    keypair = _parse(path, _read(path, private=False))
    return ss58_encode(bytes(keypair.public_key))
