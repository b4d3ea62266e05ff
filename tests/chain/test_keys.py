from __future__ import annotations

import stat
from pathlib import Path

import pytest

from chain.keys import (
    KeyFileError,
    Keypair,
    create_key,
    list_keys,
    load_key,
    signing_bytes,
    ss58_decode,
    ss58_encode,
    verify,
)


def test_ss58_of_the_zero_key_is_substrates_well_known_address() -> None:
    # The all-zero public key with prefix 42 is a published Substrate constant.
    assert ss58_encode(bytes(32)) == "5C4hrfjw9DjXZTzV3MwzrrAr9P1MJhSrvWGWqi1eSuyUpnhM"
    assert ss58_decode("5C4hrfjw9DjXZTzV3MwzrrAr9P1MJhSrvWGWqi1eSuyUpnhM") == bytes(32)


def test_ss58_checksum_catches_a_typo() -> None:
    address = Keypair.generate().address
    typo = address[:-1] + ("A" if address[-1] != "A" else "B")
    with pytest.raises(KeyFileError, match=r"checksum|decode"):
        ss58_decode(typo)


def test_signature_binds_key_and_message() -> None:
    a, b = Keypair.generate(), Keypair.generate()
    msg = signing_bytes({"call": "transfer", "nonce": 1})
    sig = a.sign(msg)
    assert verify(a.address, msg, sig)
    assert not verify(b.address, msg, sig)
    assert not verify(a.address, signing_bytes({"call": "transfer", "nonce": 2}), sig)
    assert not verify("not-an-address", msg, sig)


def test_signing_bytes_is_canonical_and_refuses_nan() -> None:
    assert signing_bytes({"b": 1, "a": [1, 2]}) == b'{"a":[1,2],"b":1}'
    with pytest.raises(ValueError):
        signing_bytes({"x": float("nan")})


def test_key_files_are_private_and_round_trip(keys_dir: Path) -> None:
    kp = create_key(keys_dir, "alice")
    path = keys_dir / "alice.json"
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert load_key(keys_dir, "alice").address == kp.address
    assert list_keys(keys_dir) == [("alice", kp.address)]
    with pytest.raises(KeyFileError, match="already exists"):
        create_key(keys_dir, "alice")
    # From a given seed: that seed's key pair (RFC 8032's first test vector), and a seed
    # of the wrong length writes nothing.
    seed = bytes.fromhex("9d61b19deffd5a60ba844af492ec2cc44449c5697b326919703bac031cae7f60")
    dave = create_key(keys_dir, "dave", seed=seed)
    assert dave.public_key.hex() == (
        "d75a980182b10ab7d54bfed3c964073a0ee172f3daa62325af021a68f707511a"
    )
    assert load_key(keys_dir, "dave").address == dave.address
    with pytest.raises(KeyFileError, match="32 bytes"):
        create_key(keys_dir, "erin", seed=seed[:31])
    assert not (keys_dir / "erin.json").exists()


def test_key_file_readable_by_others_is_refused(keys_dir: Path) -> None:
    create_key(keys_dir, "bob")
    (keys_dir / "bob.json").chmod(0o644)
    with pytest.raises(KeyFileError, match="0600"):
        load_key(keys_dir, "bob")


def test_missing_and_bad_keys_say_what_to_do(keys_dir: Path) -> None:
    with pytest.raises(KeyFileError, match="tensormine keys new carol"):
        load_key(keys_dir, "carol")
    with pytest.raises(KeyFileError, match="key name"):
        create_key(keys_dir, "../escape")
    create_key(keys_dir, "dave")
    (keys_dir / "dave.json").write_text('{"name": "dave", "address": "x", "ed25519_seed": "00"}')
    with pytest.raises(KeyFileError):
        load_key(keys_dir, "dave")
