"""Bittensor wallets as signing identities: a real btcli wallet, made by the SDK's own
wallet API in a temporary folder (no network), loaded into an `Identity`; its hotkey's
sr25519 signatures pass `chain.keys.verify` (and so store manifests and the local
ledger), next to our Ed25519 keys; every unusable wallet is a one-line `WalletError`.

Unlocking or encrypting a coldkey costs the SDK's Argon2 (about 3 s here), so the wallet
is made once per module and unlocked once; each test works on its own copy.
"""

from __future__ import annotations

import dataclasses
import json
import re
import shutil
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import bittensor_core
import pytest

from chain.config import WalletConfig
from chain.errors import BadSignature, WalletError
from chain.extrinsics import sign_extrinsic
from chain.interface import Identity
from chain.keys import KeyFileError, Keypair, create_key, signing_bytes, verify
from chain.ledger import Ledger
from chain.replay import replay
from chain.wallet import Sr25519Key, load_wallet, local_identity

from .conftest import TAO

PASSWORD = "correct horse battery staple"
PASSWORD_ENV = "TM_TEST_COLDKEY_PASSWORD"
MESSAGE = signing_bytes({"call": "commit", "nonce": 3, "window": 12})
# Where the SDK and btcli would write caches and settings under ~ (grep BTCLI_ and
# BITTENSOR_ in the SDK); every test points them into its temporary folder.
SDK_PATH_VARS = (
    "BITTENSOR_RUNTIME_CACHE_DIR",
    "BTCLI_CONFIG",
    "BTCLI_ADDRESSES_PATH",
    "BTCLI_PROXIES_PATH",
    "BTCLI_MULTISIGS_PATH",
    "BTCLI_MULTISIG_CACHE",
    "BTCLI_SUBNET_NAMES_CACHE",
    "BTCLI_TOKEN_SYMBOLS_CACHE",
)
SDK_PASSWORD_VARS = ("BT_WALLET_PASSWORD", "BT_WALLET_PASSWORD_FILE", "BT_WALLET_PATH")


def isolate_sdk(mp: pytest.MonkeyPatch, home: Path) -> None:
    home.mkdir(parents=True, exist_ok=True)
    mp.setenv("HOME", str(home))
    for name in SDK_PATH_VARS:
        mp.setenv(name, str(home / name.lower()))
    for name in (*SDK_PASSWORD_VARS, PASSWORD_ENV):
        mp.delenv(name, raising=False)


@dataclass(frozen=True)
class Made:
    """A wallet as btcli leaves it: folder, and the addresses the SDK says it holds."""

    root: Path
    hotkey_address: str
    coldkey_address: str


@pytest.fixture(scope="module")
def made(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Made]:
    base = tmp_path_factory.mktemp("made")
    with pytest.MonkeyPatch.context() as mp:
        isolate_sdk(mp, base / "home")
        from bittensor.wallet import Wallet

        wallet = Wallet("miner", "h0", path=str(base / "wallets"))
        wallet.create_new_coldkey(coldkey_password=PASSWORD, suppress=True)
        wallet.create_new_hotkey(suppress=True)
        yield Made(base / "wallets", wallet.hotkeypub.ss58_address, wallet.coldkeypub.ss58_address)
        assert not any((base / "home").iterdir()), "the SDK wrote under ~"


@pytest.fixture
def wallets(made: Made, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """This test's own copy of the made wallet (modes kept), SDK isolated."""
    isolate_sdk(monkeypatch, tmp_path / "home")
    shutil.copytree(made.root, tmp_path / "wallets")
    return tmp_path / "wallets"


def config(root: Path, **changes: object) -> WalletConfig:
    fields: dict[str, object] = {
        "name": "miner",
        "hotkey": "h0",
        "path": root,
        "password_env": PASSWORD_ENV,
    }
    fields.update(changes)
    return WalletConfig.model_validate(fields)


@pytest.fixture(scope="module")
def unlocked(made: Made) -> Iterator[Identity]:
    """The made wallet loaded with its coldkey password (one Argon2 unlock)."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv(PASSWORD_ENV, PASSWORD)
        yield load_wallet(config(made.root))


# ---- signing and verifying -----------------------------------------------------------


def test_wallet_hotkey_signs_what_verify_accepts(wallets: Path, made: Made) -> None:
    identity = load_wallet(config(wallets))
    hotkey = identity.hotkey
    assert isinstance(hotkey, Sr25519Key) and hotkey.scheme == "sr25519"
    assert identity.address == made.hotkey_address
    assert identity.coldkey is None and identity.coldkey_address == made.coldkey_address
    assert "secret" not in repr(hotkey).lower()

    sig = hotkey.sign(MESSAGE)
    assert len(sig) == 64
    assert verify(identity.address, MESSAGE, sig)
    assert verify(identity.address, MESSAGE, hotkey.sign(MESSAGE))  # randomized, both valid
    assert not verify(identity.address, MESSAGE + b" ", sig)
    assert not verify(made.coldkey_address, MESSAGE, sig)
    assert not verify(Keypair.generate().address, MESSAGE, sig)
    assert not verify(identity.address, MESSAGE, sig[:63])
    assert not verify(identity.address, MESSAGE, bytes(64))


def test_coldkey_unlocks_with_the_password_in_its_variable(unlocked: Identity, made: Made) -> None:
    coldkey = unlocked.coldkey
    assert coldkey is not None and coldkey.address == made.coldkey_address
    assert unlocked.coldkey_address == made.coldkey_address
    assert unlocked.address == made.hotkey_address
    assert verify(coldkey.address, MESSAGE, coldkey.sign(MESSAGE))


def test_wrong_password_is_a_one_line_wallet_error(
    wallets: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv(PASSWORD_ENV, "not the password")
    with pytest.raises(WalletError, match=rf"wrong password for .*coldkey .*\${PASSWORD_ENV}"):
        load_wallet(config(wallets))


def test_ed25519_still_verifies_and_schemes_never_cross() -> None:
    seed = bytes(range(32))
    ed = Keypair(seed)
    sr = Sr25519Key(bittensor_core.Keypair.create_from_seed(seed, bittensor_core.CRYPTO_SR25519))
    assert ed.address != sr.address  # one seed, two schemes: two different keys
    ed_sig, sr_sig = ed.sign(MESSAGE), sr.sign(MESSAGE)
    assert verify(ed.address, MESSAGE, ed_sig)
    assert verify(sr.address, MESSAGE, sr_sig)
    assert not verify(ed.address, MESSAGE, sr_sig)  # sr25519 signature, Ed25519 key
    assert not verify(sr.address, MESSAGE, ed_sig)  # Ed25519 signature, sr25519 key
    # An ed25519 wallet key is plain Ed25519: the SDK's signature of our key's seed is ours.
    sdk_ed = Sr25519Key(
        bittensor_core.Keypair.create_from_seed(seed, bittensor_core.CRYPTO_ED25519)
    )
    assert sdk_ed.address == ed.address and sdk_ed.scheme == "ed25519"
    assert verify(ed.address, MESSAGE, sdk_ed.sign(MESSAGE))


def test_sr25519_counts_only_for_the_exact_bytes_signed() -> None:
    """The SDK's verifier also takes a signature of ``<Bytes>m</Bytes>`` for m (how
    polkadot.js signs raw text); ours does not."""
    sr25519 = bittensor_core.CRYPTO_SR25519
    sr = Sr25519Key(bittensor_core.Keypair.create_from_seed(bytes(32), sr25519))
    wrapped = sr.sign(b"<Bytes>" + MESSAGE + b"</Bytes>")
    assert bittensor_core.verify(MESSAGE, wrapped, sr.address, sr25519)
    assert not verify(sr.address, MESSAGE, wrapped)
    assert verify(sr.address, b"<Bytes>" + MESSAGE + b"</Bytes>", wrapped)


# ---- where the project verifies ------------------------------------------------------


def test_manifest_signed_by_a_wallet_hotkey_verifies(wallets: Path) -> None:
    from store.errors import Rejected
    from store.manifest import (
        Compression,
        build_manifest,
        check_signature,
        manifest_bytes,
        parse_manifest,
    )
    from store.safetensors_check import TensorSpec

    hotkey = load_wallet(config(wallets)).hotkey
    sha = "ab" * 32
    manifest = build_manifest(
        hotkey,
        uid=3,
        window=12,
        shard=1,
        file_name=f"{hotkey.address}-{sha[:16]}.safetensors",
        size=1234,
        sha256=sha,
        compression=Compression(scheme="topk", params={"k": 0.01}),
        tensors={"w": TensorSpec("F32", (4, 8))},
    )
    stored = manifest_bytes(manifest)
    check_signature(parse_manifest(stored), hotkey.address)
    body = json.loads(stored)
    body["window"] = 13
    with pytest.raises(Rejected) as err:
        check_signature(parse_manifest(json.dumps(body).encode()), hotkey.address)
    assert err.value.reason == "bad_signature"


def test_local_ledger_keeps_its_keys_and_accepts_a_wallet(wallets: Path, ledger: Ledger) -> None:
    hotkey = load_wallet(config(wallets)).hotkey
    local = Keypair.generate()
    hashes = []
    for key in (hotkey, local):
        for nonce, (call, args) in enumerate([("faucet", {"amount": 5 * TAO}), ("register", {})]):
            hashes.append(
                ledger.submit(sign_extrinsic(key, call, args, nonce, ledger.genesis_hash))
            )
    ledger.produce_block()
    for h in hashes:
        receipt = ledger.receipt(h)
        assert receipt is not None
        receipt.raise_for_status()
    assert ledger.uid_of(hotkey.address) is not None and ledger.uid_of(local.address) is not None

    args = {"dest": local.address, "amount": TAO}
    xt = sign_extrinsic(hotkey, "transfer", args, 2, ledger.genesis_hash)
    forged = dataclasses.replace(xt, args={**args, "amount": 2 * TAO})
    with pytest.raises(BadSignature):
        ledger.submit(forged)
    ledger.submit(xt)
    ledger.produce_block()
    assert ledger.account(hotkey.address).balance == 4 * TAO
    assert ledger.account(local.address).balance == 6 * TAO
    replay(ledger)  # re-verifies every signature from genesis


def test_the_sdk_signs_with_the_loaded_keys(unlocked: Identity) -> None:
    """`.sdk_keypair` is what `chain.bittensor` hands the SDK: the SDK's own signer."""
    from bittensor.signing import Signer, public_view, resolve_signer

    from chain.bittensor.signing import IdentityWallet

    hotkey = unlocked.hotkey
    assert isinstance(hotkey, Sr25519Key) and isinstance(hotkey.sdk_keypair, Signer)
    wallet = IdentityWallet(unlocked)
    for role, key in (("hotkey", hotkey), ("coldkey", unlocked.coldkey)):
        assert key is not None
        signer = resolve_signer(wallet, role)
        assert signer.ss58_address == key.address
        assert verify(key.address, MESSAGE, bytes(signer.sign(MESSAGE)))
    assert public_view(wallet, "coldkey").ss58_address == unlocked.coldkey_address


# ---- unusable wallets ----------------------------------------------------------------


def _chmod(path: Path, mode: int) -> Path:
    path.chmod(mode)
    return path


def _write(path: Path, data: bytes) -> Path:
    path.write_bytes(data)
    path.chmod(0o600)
    return path


def _unlink(path: Path) -> Path:
    path.unlink()
    return path


HOTKEY = Path("miner/hotkeys/h0")
PUB = Path("miner/coldkeypub.txt")
# case: (break the copy, returning the file the message must name; config changes; match)
BREAKS: dict[str, tuple[Callable[[Path], Path], dict[str, str], str]] = {
    "no wallet": (lambda w: w / "other", {"name": "other"}, r"no wallet 'other'"),
    "no hotkey": (lambda w: w / "miner/hotkeys/h9", {"hotkey": "h9"}, r"no hotkey 'h9'"),
    "hotkey readable by others": (lambda w: _chmod(w / HOTKEY, 0o644), {}, r"mode 644.*chmod 600"),
    "hotkey readable by its group": (lambda w: _chmod(w / HOTKEY, 0o640), {}, r"mode 640"),
    "corrupt hotkey": (
        lambda w: _write(w / HOTKEY, b"{not json\n\n"),
        {},
        r"is not a Bittensor key file",
    ),
    "public key in the hotkey's place": (
        lambda w: _write(w / HOTKEY, (w / "miner/hotkeys/h0pub.txt").read_bytes()),
        {},
        r"holds no private key",
    ),
    "encrypted hotkey": (
        lambda w: _write(w / HOTKEY, (w / "miner/coldkey").read_bytes()),
        {},
        r"is encrypted; tensormine runs with the hotkey unencrypted",
    ),
    "no coldkeypub": (lambda w: _unlink(w / PUB), {}, r"no coldkey address.*regen-coldkeypub"),
    "corrupt coldkeypub": (
        lambda w: _write(w / PUB, b"\x00\x01garbage"),
        {},
        r"is not a Bittensor key file",
    ),
}


@pytest.mark.parametrize("case", sorted(BREAKS))
def test_unusable_wallet_is_a_one_line_wallet_error(wallets: Path, case: str) -> None:
    breaks, changes, pattern = BREAKS[case]
    named = breaks(wallets)
    with pytest.raises(WalletError, match=pattern) as err:
        load_wallet(config(wallets, **changes))
    assert "\n" not in str(err.value)
    assert str(named) in str(err.value)


def test_coldkey_problems_surface_only_when_it_is_unlocked(
    wallets: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    coldkey = _chmod(wallets / "miner" / "coldkey", 0o644)
    load_wallet(config(wallets))  # no password: the coldkey file is not read
    monkeypatch.setenv(PASSWORD_ENV, PASSWORD)
    with pytest.raises(WalletError, match=rf"{re.escape(str(coldkey))} has mode 644"):
        load_wallet(config(wallets))
    coldkey.unlink()
    with pytest.raises(WalletError, match=rf"is set .* {re.escape(str(coldkey))} does not exist"):
        load_wallet(config(wallets))


def test_local_identity_and_key_file_errors_are_wallet_errors(tmp_path: Path) -> None:
    assert issubclass(KeyFileError, WalletError) and issubclass(KeyFileError, ValueError)
    kp = create_key(tmp_path, "alice")
    identity = local_identity(tmp_path, "alice")
    assert identity.hotkey == kp and identity.coldkey == kp
    assert identity.coldkey_address == kp.address
    with pytest.raises(WalletError, match="tensormine keys new bob"):
        local_identity(tmp_path, "bob")
