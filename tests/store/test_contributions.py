"""Contributions on both backends: publish, list, verified load, and every rejection."""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import pickle
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import save_file

from chain.keys import Keypair, signing_bytes
from store import Compression, Rejected, Store, TensorSpec, expected_specs
from store.backend import ContributionRef
from tests.store.conftest import plant

UID, WINDOW, SHARD = 5, 12, 1


def shard_delta(seed: int = 0) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return {
        "model.layers.1.mlp.up_proj.weight": torch.randn(64, 32, generator=gen),
        "model.layers.1.mlp.down_proj.weight": torch.randn(32, 64, generator=gen),
        "model.layers.1.input_layernorm.weight": torch.randn(32, generator=gen),
    }


def only(store: Store, window: int, shard: int, hotkey: str) -> ContributionRef:
    refs = [r for r in store.list_contributions(window, shard) if r.hotkey == hotkey]
    assert len(refs) == 1, refs
    return refs[0]


def load(store: Store, ref: ContributionRef, kp: Keypair, **kw: Any) -> dict[str, torch.Tensor]:
    args: dict[str, Any] = {"hotkey": kp.address, "uid": UID, "window": WINDOW, "shard": SHARD}
    args.update(kw)
    return store.load_contribution(ref, **args).tensors


def reason_of(store: Store, ref: ContributionRef, kp: Keypair, **kw: Any) -> str:
    with pytest.raises(Rejected) as err:
        load(store, ref, kp, **kw)
    return err.value.reason


def signed(
    kp: Keypair, data: bytes, *, file: str | None = None, **fields: Any
) -> tuple[str, bytes]:
    """A correctly signed manifest for arbitrary bytes, as a dishonest miner would make."""
    sha = hashlib.sha256(data).hexdigest()
    name = file or f"{kp.address}-{sha[:16]}.safetensors"
    body: dict[str, Any] = {
        "format": "tensormine-contribution/1",
        "hotkey": kp.address,
        "uid": UID,
        "window": WINDOW,
        "shard": SHARD,
        "file": name,
        "size": len(data),
        "sha256": sha,
        "compression": {"scheme": "none", "params": {}},
        "tensors": {"a": {"dtype": "F32", "shape": [4]}},
        "created_at": "2024-01-01T00:00:00+00:00",
    }
    body.update(fields)
    body["signature"] = kp.sign(signing_bytes(body)).hex()
    return name, json.dumps(body).encode()


def safetensors_bytes(tmp_path: Path, tensors: dict[str, torch.Tensor]) -> bytes:
    path = tmp_path / "t.safetensors"
    save_file(tensors, str(path))
    return path.read_bytes()


def test_publish_list_and_verified_load(store: Store, miner: Keypair) -> None:
    delta = shard_delta()
    before = dt.datetime.now(dt.UTC)
    ref = store.publish_contribution(
        delta,
        keypair=miner,
        uid=UID,
        window=WINDOW,
        shard=SHARD,
        compression=Compression(scheme="none", params={"note": "raw"}),
    )
    assert (ref.window, ref.shard, ref.hotkey) == (WINDOW, SHARD, miner.address)
    listed = only(store, WINDOW, SHARD, miner.address)
    assert listed.received_at == ref.received_at
    assert before - dt.timedelta(seconds=2) <= listed.received_at <= dt.datetime.now(dt.UTC)

    got = store.load_contribution(
        listed,
        hotkey=miner.address,
        uid=UID,
        window=WINDOW,
        shard=SHARD,
        expected=expected_specs(delta),
    )
    assert got.tensors.keys() == delta.keys()
    for name, tensor in delta.items():
        assert torch.equal(got.tensors[name], tensor)
    assert got.manifest.compression.params == {"note": "raw"}
    assert got.manifest.uid == UID
    assert got.received_at == listed.received_at


def test_listing_filters_by_window_and_shard(store: Store, miner: Keypair) -> None:
    other = Keypair(bytes([9]) * 32)
    for kp, window, shard in [(miner, 1, 0), (miner, 1, 1), (other, 1, 1), (miner, 2, 0)]:
        store.publish_contribution(shard_delta(), keypair=kp, uid=1, window=window, shard=shard)
    assert len(store.list_contributions()) == 4
    assert len(store.list_contributions(1)) == 3
    assert {r.hotkey for r in store.list_contributions(1, 1)} == {miner.address, other.address}
    assert [(r.window, r.shard) for r in store.list_contributions(2)] == [(2, 0)]
    assert store.list_contributions(3) == []
    assert store.list_contributions(None, 0) == [
        r for r in store.list_contributions() if r.shard == 0
    ]


def test_republishing_replaces_the_contribution(store: Store, miner: Keypair) -> None:
    store.publish_contribution(shard_delta(1), keypair=miner, uid=UID, window=WINDOW, shard=SHARD)
    first = store.read_manifest(only(store, WINDOW, SHARD, miner.address))
    store.publish_contribution(shard_delta(2), keypair=miner, uid=UID, window=WINDOW, shard=SHARD)
    ref = only(store, WINDOW, SHARD, miner.address)
    second = store.read_manifest(ref)
    assert second.sha256 != first.sha256
    got = load(store, ref, miner)
    assert torch.equal(
        got["model.layers.1.input_layernorm.weight"],
        shard_delta(2)["model.layers.1.input_layernorm.weight"],
    )
    # The replaced tensor file is gone: a manifest naming it now finds nothing.
    name, body = first.file, first.model_dump_json().encode()
    plant(store, WINDOW, SHARD, {f"{miner.address}.json": body})
    assert reason_of(store, only(store, WINDOW, SHARD, miner.address), miner) == "not_found", name


def test_no_contributions_anywhere(store: Store) -> None:
    assert store.list_contributions() == []
    assert store.list_contributions(5, 0) == []


# ---- rejections: every check, on both backends ------------------------------------------
@pytest.fixture
def published(store: Store, miner: Keypair) -> ContributionRef:
    return store.publish_contribution(
        shard_delta(), keypair=miner, uid=UID, window=WINDOW, shard=SHARD
    )


def stored_files(store: Store, ref: ContributionRef) -> tuple[bytes, str, bytes]:
    """(manifest bytes, tensor file name, tensor bytes) as stored."""
    manifest = store.read_manifest(ref)
    backend = store.backend
    data = backend.contribution_file(ref, manifest.file, 1 << 30).read_bytes()
    return backend.read_manifest(ref, 1 << 20), manifest.file, data


def test_unexpected_hotkey_for_the_uid(
    store: Store, published: ContributionRef, miner: Keypair
) -> None:
    assert reason_of(store, published, miner, hotkey=Keypair.generate().address) == "wrong_hotkey"


def test_wrong_uid(store: Store, published: ContributionRef, miner: Keypair) -> None:
    assert reason_of(store, published, miner, uid=UID + 1) == "wrong_uid"


def test_tampered_manifest_breaks_the_signature(
    store: Store, published: ContributionRef, miner: Keypair
) -> None:
    body, _, _ = stored_files(store, published)
    manifest = json.loads(body)
    manifest["compression"]["params"] = {"k": 999}
    plant(store, WINDOW, SHARD, {f"{miner.address}.json": json.dumps(manifest).encode()})
    assert reason_of(store, only(store, WINDOW, SHARD, miner.address), miner) == "bad_signature"


def test_missing_signature(store: Store, published: ContributionRef, miner: Keypair) -> None:
    body, _, _ = stored_files(store, published)
    manifest = json.loads(body) | {"signature": ""}
    plant(store, WINDOW, SHARD, {f"{miner.address}.json": json.dumps(manifest).encode()})
    assert reason_of(store, only(store, WINDOW, SHARD, miner.address), miner) == "bad_signature"


def test_replayed_contribution_of_another_window(store: Store, miner: Keypair) -> None:
    old = store.publish_contribution(
        shard_delta(), keypair=miner, uid=UID, window=WINDOW - 1, shard=SHARD
    )
    body, name, data = stored_files(store, old)
    plant(store, WINDOW, SHARD, {f"{miner.address}.json": body, name: data})
    assert reason_of(store, only(store, WINDOW, SHARD, miner.address), miner) == "wrong_window"


def test_manifest_of_another_shard(store: Store, miner: Keypair) -> None:
    other = store.publish_contribution(
        shard_delta(), keypair=miner, uid=UID, window=WINDOW, shard=SHARD + 1
    )
    body, name, data = stored_files(store, other)
    plant(store, WINDOW, SHARD, {f"{miner.address}.json": body, name: data})
    assert reason_of(store, only(store, WINDOW, SHARD, miner.address), miner) == "wrong_shard"


def test_manifest_of_another_hotkey_under_this_hotkeys_name(store: Store, miner: Keypair) -> None:
    thief = Keypair.generate()
    ref = store.publish_contribution(
        shard_delta(), keypair=thief, uid=UID, window=WINDOW, shard=SHARD
    )
    body, name, data = stored_files(store, ref)
    plant(store, WINDOW, SHARD, {f"{miner.address}.json": body, name: data})
    assert reason_of(store, only(store, WINDOW, SHARD, miner.address), miner) == "wrong_hotkey"


def test_sha256_mismatch(store: Store, published: ContributionRef, miner: Keypair) -> None:
    _, name, data = stored_files(store, published)
    corrupt = bytearray(data)
    corrupt[-1] ^= 0xFF
    plant(store, WINDOW, SHARD, {name: bytes(corrupt)})
    assert reason_of(store, only(store, WINDOW, SHARD, miner.address), miner) == "sha256_mismatch"


def test_size_mismatch(store: Store, published: ContributionRef, miner: Keypair) -> None:
    _, name, data = stored_files(store, published)
    plant(store, WINDOW, SHARD, {name: data + b"\x00" * 4})
    assert reason_of(store, only(store, WINDOW, SHARD, miner.address), miner) == "size_mismatch"


@pytest.mark.parametrize(
    ("mutate", "reason"),
    [
        (
            lambda s: {**s, "model.layers.1.input_layernorm.weight": TensorSpec("F32", (64,))},
            "shape_mismatch",
        ),
        (
            lambda s: {**s, "model.layers.1.input_layernorm.weight": TensorSpec("BF16", (32,))},
            "dtype_mismatch",
        ),
        (lambda s: {k: v for k, v in s.items() if "down_proj" not in k}, "name_mismatch"),
        (lambda s: {**s, "model.layers.1.extra.weight": TensorSpec("F32", (1,))}, "name_mismatch"),
    ],
)
def test_tensors_that_do_not_match_the_models_shard(
    store: Store, published: ContributionRef, miner: Keypair, mutate: Any, reason: str
) -> None:
    expected = mutate(expected_specs(shard_delta()))
    assert reason_of(store, published, miner, expected=expected) == reason


def test_file_over_the_size_limit(store: Store, published: ContributionRef, miner: Keypair) -> None:
    strict = Store(store.backend, store.cfg.model_copy(update={"max_contribution_bytes": 1000}))
    assert reason_of(strict, published, miner) == "too_large"


def test_lying_manifest_size_over_the_limit_is_refused_before_fetching(
    store: Store, miner: Keypair, tmp_path: Path
) -> None:
    data = safetensors_bytes(tmp_path, {"a": torch.zeros(4)})
    name, body = signed(miner, data, size=10**12)
    plant(store, WINDOW, SHARD, {f"{miner.address}.json": body, name: data})
    assert reason_of(store, only(store, WINDOW, SHARD, miner.address), miner) == "too_large"


def test_actual_file_over_the_limit_is_refused_before_fetching(
    store: Store, miner: Keypair, tmp_path: Path
) -> None:
    data = safetensors_bytes(tmp_path, {"a": torch.zeros(4096)})
    name, body = signed(miner, data, size=100)  # the manifest lies low; the file is 16 kB
    plant(store, WINDOW, SHARD, {f"{miner.address}.json": body, name: data})
    strict = Store(store.backend, store.cfg.model_copy(update={"max_contribution_bytes": 1000}))
    assert reason_of(strict, only(strict, WINDOW, SHARD, miner.address), miner) == "too_large"


def test_manifest_path_escaping_the_store(store: Store, miner: Keypair, tmp_path: Path) -> None:
    data = safetensors_bytes(tmp_path, {"a": torch.zeros(4)})
    _, body = signed(miner, data, file="../../../checkpoints/window-1/model.safetensors")
    plant(store, WINDOW, SHARD, {f"{miner.address}.json": body})
    assert reason_of(store, only(store, WINDOW, SHARD, miner.address), miner) == "path_escape"


def test_manifest_naming_a_pickle(store: Store, miner: Keypair) -> None:
    data = pickle.dumps({"a": 1})
    name, body = signed(miner, data, file="delta.bin")
    plant(store, WINDOW, SHARD, {f"{miner.address}.json": body, name: data})
    assert reason_of(store, only(store, WINDOW, SHARD, miner.address), miner) == "not_safetensors"


def test_pickle_bytes_behind_a_safetensors_name(store: Store, miner: Keypair) -> None:
    data = pickle.dumps({"a": torch.zeros(4)})
    name, body = signed(miner, data)
    plant(store, WINDOW, SHARD, {f"{miner.address}.json": body, name: data})
    assert reason_of(store, only(store, WINDOW, SHARD, miner.address), miner) == "not_safetensors"


def test_truncated_safetensors_signed_as_is(store: Store, miner: Keypair, tmp_path: Path) -> None:
    data = safetensors_bytes(tmp_path, {"a": torch.zeros(4)})[:-3]
    name, body = signed(miner, data)
    plant(store, WINDOW, SHARD, {f"{miner.address}.json": body, name: data})
    assert reason_of(store, only(store, WINDOW, SHARD, miner.address), miner) == "bad_header"


def test_manifest_listing_other_tensors_than_the_file(
    store: Store, miner: Keypair, tmp_path: Path
) -> None:
    data = safetensors_bytes(tmp_path, {"a": torch.zeros(4)})
    name, body = signed(miner, data, tensors={"a": {"dtype": "F32", "shape": [2, 2]}})
    plant(store, WINDOW, SHARD, {f"{miner.address}.json": body, name: data})
    assert reason_of(store, only(store, WINDOW, SHARD, miner.address), miner) == "manifest_mismatch"


def test_manifest_naming_a_missing_file(store: Store, miner: Keypair, tmp_path: Path) -> None:
    data = safetensors_bytes(tmp_path, {"a": torch.zeros(4)})
    _, body = signed(miner, data)
    plant(store, WINDOW, SHARD, {f"{miner.address}.json": body})
    assert reason_of(store, only(store, WINDOW, SHARD, miner.address), miner) == "not_found"


def test_garbage_manifest(store: Store, miner: Keypair) -> None:
    plant(store, WINDOW, SHARD, {f"{miner.address}.json": b"\x80\x04garbage"})
    assert reason_of(store, only(store, WINDOW, SHARD, miner.address), miner) == "bad_manifest"


def test_non_finite_values(store: Store, miner: Keypair) -> None:
    delta = shard_delta()
    delta["model.layers.1.input_layernorm.weight"][3] = float("nan")
    ref = store.publish_contribution(delta, keypair=miner, uid=UID, window=WINDOW, shard=SHARD)
    assert reason_of(store, ref, miner) == "not_finite"
    assert torch.isnan(
        load(store, ref, miner, require_finite=False)["model.layers.1.input_layernorm.weight"][3]
    )


def test_publishing_over_the_limit_fails_at_the_miner(store: Store, miner: Keypair) -> None:
    small = Store(store.backend, store.cfg.model_copy(update={"max_contribution_bytes": 100}))
    with pytest.raises(Rejected) as err:
        small.publish_contribution(
            shard_delta(), keypair=miner, uid=UID, window=WINDOW, shard=SHARD
        )
    assert err.value.reason == "too_large"
    assert store.list_contributions() == []
