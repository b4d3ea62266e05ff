"""Our `Identity` as the wallet the bittensor SDK signs with.

``client.execute(intent, wallet)`` accepts anything wallet-shaped
(`bittensor.signing.KeyedWallet`: ``coldkey``, ``coldkeypub`` and ``hotkey``
attributes, each keypair-like) and picks the key the intent names: hotkey-signed
intents (``SetWeights``, ``Commitments.set_commitment``) take ``wallet.hotkey``,
coldkey-signed ones (``BurnedRegister``, ``AddStake``, ``RemoveStake``, ``Transfer``)
take ``wallet.coldkey``. A key there must be an SDK signer: ``ss58_address``,
``public_key``, ``crypto_type`` (0 ed25519, 1 sr25519) and ``sign(payload)``.

Where our keys come from:
- a Bittensor wallet (`chain.wallet`): the `SigningKey` carries the SDK's own sr25519
  keypair as ``.sdk_keypair``, used as is;
- a tensormine Ed25519 key (`chain.keys.Keypair`): wrapped in `Ed25519Signer`
  (substrate accounts may be ed25519; the chain checks the signature by crypto type);
- anything else cannot sign extrinsics and raises `WalletError`.
"""

from __future__ import annotations

from typing import Any

from bittensor.sp_core import CRYPTO_ED25519, CRYPTO_SR25519, ss58_decode
from bittensor.sp_core import Keypair as SdkKeypair

from chain.errors import WalletError
from chain.interface import Identity, SigningKey
from chain.keys import Keypair as Ed25519Keypair


class Ed25519Signer:
    """A tensormine Ed25519 key in the shape the SDK's signer protocol asks for."""

    crypto_type = CRYPTO_ED25519

    def __init__(self, key: Ed25519Keypair) -> None:
        self._key = key

    @property
    def ss58_address(self) -> str:
        return self._key.address

    @property
    def public_key(self) -> bytes:
        return self._key.public_key

    def sign(self, payload: bytes) -> bytes:
        return self._key.sign(payload)


class MissingColdkey:
    """Stands in for a coldkey that is not unlocked: public parts only, and signing
    raises `WalletError` naming what to configure."""

    crypto_type = CRYPTO_SR25519

    def __init__(self, address: str) -> None:
        self.ss58_address = address
        self.public_key = bytes(ss58_decode(address))

    def sign(self, payload: bytes) -> bytes:
        raise WalletError(
            f"the coldkey {self.ss58_address} is not unlocked: set the password in the "
            "variable chain.wallet.password_env names to stake, register or transfer"
        )


def sdk_signer(key: SigningKey) -> Any:
    """The SDK signer behind one of our keys (see the module docstring)."""
    keypair = getattr(key, "sdk_keypair", None)
    if keypair is not None:
        return keypair
    if isinstance(key, Ed25519Keypair):
        return Ed25519Signer(key)
    raise WalletError(
        f"{type(key).__name__} {key.address} cannot sign subtensor extrinsics: load a "
        "Bittensor wallet (chain.wallet) or use a tensormine Ed25519 key"
    )


def public_only(address: str, crypto_type: int = CRYPTO_SR25519) -> Any:
    """A keypair holding only `address`'s public key (what ``coldkeypub`` is)."""
    return SdkKeypair(
        ss58_address=address,
        public_key=bytes(ss58_decode(address)),
        crypto_type=crypto_type,
        ss58_format=42,
    )


class IdentityWallet:
    """An `Identity` as a `bittensor.KeyedWallet`. Attribute access never raises
    (the SDK probes the attributes with ``isinstance``); a missing coldkey fails only
    when something asks it to sign."""

    def __init__(self, identity: Identity) -> None:
        self._identity = identity
        self._hotkey = sdk_signer(identity.hotkey)
        self._coldkey: Any = (
            MissingColdkey(identity.coldkey_address)
            if identity.coldkey is None
            else sdk_signer(identity.coldkey)
        )

    @property
    def hotkey(self) -> Any:
        return self._hotkey

    @property
    def coldkey(self) -> Any:
        return self._coldkey

    @property
    def coldkeypub(self) -> Any:
        return public_only(self._identity.coldkey_address, int(self._coldkey.crypto_type))

    @property
    def has_coldkey(self) -> bool:
        return self._identity.coldkey is not None

    def __repr__(self) -> str:
        return f"IdentityWallet(hotkey={self._identity.address})"
