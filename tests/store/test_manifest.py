"""Contribution manifests: what the hotkey signs, and every way a manifest can be bad."""

from __future__ import annotations

import json
from typing import Any

import pytest

from chain.keys import Keypair, signing_bytes
from store.errors import Rejected
from store.manifest import (
    Compression,
    build_manifest,
    check_signature,
    manifest_bytes,
    parse_manifest,
)
from store.safetensors_check import TensorSpec

SHA = "ab" * 32


def make(kp: Keypair, **changes: Any) -> bytes:
    manifest = build_manifest(
        kp,
        uid=3,
        window=12,
        shard=1,
        file_name=f"{kp.address}-{SHA[:16]}.safetensors",
        size=1234,
        sha256=SHA,
        compression=Compression(scheme="topk", params={"k": 0.01, "seed": 7}),
        tensors={"w": TensorSpec("F32", (4, 8)), "idx": TensorSpec("I64", (16,))},
    )
    body = json.loads(manifest_bytes(manifest))
    body.update(changes)
    return json.dumps(body).encode()


def resign(body: dict[str, Any], kp: Keypair) -> bytes:
    """Sign arbitrary fields (bypassing build_manifest's own checks), as an attacker can."""
    body = {k: v for k, v in body.items() if k != "signature"}
    body["signature"] = kp.sign(signing_bytes(body)).hex()
    return json.dumps(body).encode()


def test_round_trip_verifies() -> None:
    kp = Keypair.generate()
    manifest = parse_manifest(make(kp))
    check_signature(manifest, kp.address)
    assert manifest.compression.params == {"k": 0.01, "seed": 7}
    assert manifest.tensor_specs()["w"] == TensorSpec("F32", (4, 8))


@pytest.mark.parametrize(
    "change",
    [
        {"window": 13},
        {"shard": 0},
        {"uid": 4},
        {"sha256": "cd" * 32},
        {"size": 1235},
        {"compression": {"scheme": "none", "params": {}}},
        {
            "tensors": {
                "w": {"dtype": "F32", "shape": [4, 9]},
                "idx": {"dtype": "I64", "shape": [16]},
            }
        },
    ],
)
def test_any_changed_field_breaks_the_signature(change: dict[str, Any]) -> None:
    kp = Keypair.generate()
    manifest = parse_manifest(make(kp, **change))
    with pytest.raises(Rejected) as err:
        check_signature(manifest, kp.address)
    assert err.value.reason == "bad_signature"


def test_missing_signature() -> None:
    kp = Keypair.generate()
    manifest = parse_manifest(make(kp, signature=""))
    with pytest.raises(Rejected) as err:
        check_signature(manifest)
    assert (err.value.reason, err.value.detail) == ("bad_signature", "manifest is not signed")


def test_signature_that_is_not_hex() -> None:
    kp = Keypair.generate()
    with pytest.raises(Rejected) as err:
        check_signature(parse_manifest(make(kp, signature="zz")))
    assert err.value.reason == "bad_signature"


def test_signed_by_another_key_claiming_the_hotkey() -> None:
    victim, attacker = Keypair.generate(), Keypair.generate()
    body = json.loads(make(victim))
    forged = resign(body, attacker)  # hotkey field still says victim
    with pytest.raises(Rejected) as err:
        check_signature(parse_manifest(forged), victim.address)
    assert err.value.reason == "bad_signature"


def test_valid_signature_by_an_unexpected_hotkey() -> None:
    kp = Keypair.generate()
    with pytest.raises(Rejected) as err:
        check_signature(parse_manifest(make(kp)), Keypair.generate().address)
    assert err.value.reason == "wrong_hotkey"


@pytest.mark.parametrize(
    ("file_name", "reason"),
    [
        ("../../etc/passwd.safetensors", "path_escape"),
        ("sub/dir.safetensors", "path_escape"),
        ("..", "path_escape"),
        (".hidden.safetensors", "path_escape"),
        ("C:\\x.safetensors", "path_escape"),
        ("delta.bin", "not_safetensors"),
        ("delta.pt", "not_safetensors"),
        ("delta.npy", "not_safetensors"),
        ("we ird.safetensors", "bad_manifest"),
    ],
)
def test_file_names_that_are_not_plain_safetensors(file_name: str, reason: str) -> None:
    kp = Keypair.generate()
    body = resign(json.loads(make(kp)) | {"file": file_name}, kp)
    with pytest.raises(Rejected) as err:
        parse_manifest(body)
    assert err.value.reason == reason


@pytest.mark.parametrize(
    "body",
    [
        b"not json",
        b"[]",
        b'{"hotkey": "x"}',
        json.dumps({"unknown": 1}).encode(),
    ],
)
def test_malformed_manifests(body: bytes) -> None:
    with pytest.raises(Rejected) as err:
        parse_manifest(body)
    assert err.value.reason == "bad_manifest"


def test_extra_fields_are_refused() -> None:
    kp = Keypair.generate()
    body = resign(json.loads(make(kp)) | {"note": "unsigned extras are not allowed"}, kp)
    with pytest.raises(Rejected) as err:
        parse_manifest(body)
    assert err.value.reason == "bad_manifest"


def test_hotkey_must_be_an_address() -> None:
    kp = Keypair.generate()
    with pytest.raises(Rejected) as err:
        parse_manifest(make(kp, hotkey="not-an-address"))
    assert err.value.reason == "bad_manifest"


def test_unknown_rejection_reason_is_a_programming_error() -> None:
    with pytest.raises(ValueError, match="unknown rejection reason"):
        Rejected("nope", "x")  # type: ignore[arg-type]
