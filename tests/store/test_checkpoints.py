"""Checkpoints on both backends: publish per window, pull by window or revision, load with
`transformers`, and refuse anything that does not match its ``tensormine.json``."""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import pytest
from safetensors.torch import save_file
from transformers import AutoModelForCausalLM, AutoTokenizer

from store import NotFound, Rejected, Store, StoreConflict, StoreError, read_provenance
from store.checkpoint import PROVENANCE_FILE, verify_checkpoint_folder, write_checkpoint_folder
from store.hub import HubBackend
from store.local import LocalBackend
from tests.store.conftest import assert_same_weights, provenance, tiny_model, tiny_tokenizer
from tests.store.hub_server import FakeHub


def test_two_windows_publish_pull_and_load(store: Store, tmp_path: Path) -> None:
    m1, m2 = tiny_model(1), tiny_model(2)
    r1 = store.publish_checkpoint(m1, tiny_tokenizer(), provenance(1))
    r2 = store.publish_checkpoint(m2, tiny_tokenizer(), provenance(2))
    assert (r1.window, r1.revision, r2.revision) == (1, "window-1", "window-2")
    assert [r.window for r in store.list_checkpoints()] == [1, 2]
    assert store.resolve() == r2 == store.resolve(revision="latest")
    assert store.resolve(window=1) == r1 == store.resolve(revision="window-1")
    assert store.resolve(revision=r1.commit) == r1

    for ref, model in ((r1, m1), (r2, m2)):
        dest = tmp_path / f"pulled-{ref.window}"
        pulled = store.pull_checkpoint(dest, revision=ref.revision)
        assert pulled.ref == ref
        names = {p.name for p in dest.iterdir()}
        assert {"config.json", "generation_config.json", "tokenizer.json", PROVENANCE_FILE} <= names
        assert "model.safetensors.index.json" in names  # sharded above max_shard_size=40KB
        assert not any(n.startswith(".") for n in names)
        assert_same_weights(AutoModelForCausalLM.from_pretrained(dest), model)
        assert AutoTokenizer.from_pretrained(dest)("w1 w2")["input_ids"] == [4, 5]


def test_provenance_is_recorded(store: Store, tmp_path: Path) -> None:
    store.publish_checkpoint(tiny_model(1), tiny_tokenizer(), provenance(1))
    ref = store.publish_checkpoint(tiny_model(2), tiny_tokenizer(), provenance(2))
    prov = store.read_provenance(ref)
    assert prov.window == 2 and prov.run_id == "test-run" and prov.ledger_block == 102
    assert prov.parent_revision == "window-1"  # filled in from the latest revision
    assert [(c.uid, c.score, c.weight) for c in prov.contributors] == [(1, 0.7, 0.6), (2, 0.3, 0.4)]
    assert prov.metrics == {"loss": 3.8}
    assert prov.run_config == {"run": {"name": "test"}}
    assert set(prov.files) >= {"config.json", "README.md", "tokenizer.json"}
    pulled = store.pull_checkpoint(tmp_path / "p", window=2)
    assert read_provenance(pulled.path) == prov == pulled.provenance
    card = (pulled.path / "README.md").read_text()
    assert card.startswith("---\nlibrary_name: transformers") and "window 2" in card


def test_a_window_is_published_once_and_in_order(store: Store) -> None:
    store.publish_checkpoint(tiny_model(1), None, provenance(3))
    with pytest.raises(StoreConflict):
        store.publish_checkpoint(tiny_model(2), None, provenance(3))
    with pytest.raises(StoreConflict):
        store.publish_checkpoint(tiny_model(2), None, provenance(2))
    assert [r.window for r in store.list_checkpoints()] == [3]


def test_missing_windows_and_revisions(store: Store, tmp_path: Path) -> None:
    with pytest.raises(NotFound):
        store.resolve()
    assert store.latest() is None
    assert store.list_checkpoints() == []
    store.publish_checkpoint(tiny_model(1), None, provenance(1))
    with pytest.raises(NotFound):
        store.resolve(window=7)
    with pytest.raises(NotFound):
        store.pull_checkpoint(tmp_path / "x", revision="no-such-branch")
    assert not (tmp_path / "x").exists()


def test_pull_refuses_a_non_empty_destination(store: Store, tmp_path: Path) -> None:
    store.publish_checkpoint(tiny_model(1), None, provenance(1))
    dest = tmp_path / "busy"
    dest.mkdir()
    (dest / "keep.txt").write_text("mine")
    with pytest.raises(StoreError, match="not an empty folder"):
        store.pull_checkpoint(dest)
    assert (dest / "keep.txt").read_text() == "mine"
    (dest / "keep.txt").unlink()
    assert store.pull_checkpoint(dest).path == dest  # an empty folder is fine


def tamper(store: Store, hub: FakeHub | None, revision: str, name: str, data: bytes) -> None:
    """Change a published file behind the store's back (a bad disk, a bad mirror)."""
    backend = store.backend
    if isinstance(backend, LocalBackend):
        (backend.root / "checkpoints" / revision / name).write_bytes(data)
    else:
        assert isinstance(backend, HubBackend) and hub is not None
        hub.tamper(str(backend.checkpoint_repo), name, data)
        # Files of a commit are immutable on the Hub, so the client trusts its cache;
        # the tampered bytes reach a client that has not seen the commit yet.
        shutil.rmtree(str(store.cfg.cache_dir), ignore_errors=True)


@pytest.fixture
def hub_or_none(store: Store, request: pytest.FixtureRequest) -> FakeHub | None:
    return request.getfixturevalue("fake_hub") if isinstance(store.backend, HubBackend) else None


def test_a_changed_file_fails_the_pull_and_leaves_nothing(
    store: Store, hub_or_none: FakeHub | None, tmp_path: Path
) -> None:
    store.publish_checkpoint(tiny_model(1), tiny_tokenizer(), provenance(1))
    config = json.loads(store.backend.read_checkpoint_file(store.resolve(), "config.json", 1 << 20))
    config["num_hidden_layers"] = 1
    body = json.dumps(config, indent=2).encode()
    tamper(store, hub_or_none, "window-1", "config.json", body)
    with pytest.raises(Rejected) as err:
        store.pull_checkpoint(tmp_path / "p")
    assert err.value.reason in ("sha256_mismatch", "size_mismatch")
    assert not (tmp_path / "p").exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".p.partial")]


def test_weights_with_a_lying_header_fail_the_pull(
    store: Store, hub_or_none: FakeHub | None, tmp_path: Path
) -> None:
    ref = store.publish_checkpoint(tiny_model(1), None, provenance(1))
    prov = store.read_provenance(ref)
    shard = next(n for n in prov.files if n.endswith(".safetensors"))
    good = store.backend.read_checkpoint_file(ref, shard, 1 << 30)
    header_len = int.from_bytes(good[:8], "little")
    header = json.loads(good[8 : 8 + header_len])
    first = next(k for k in header if k != "__metadata__")
    header[first]["data_offsets"][1] += 4  # claims 4 more bytes than its shape needs
    new_header = json.dumps(header, separators=(",", ":")).encode()
    lying = len(new_header).to_bytes(8, "little") + new_header + good[8 + header_len :]
    tamper(store, hub_or_none, "window-1", shard, lying)
    # ... and the provenance vouches for the lying file, so only the header check can tell.
    body = json.loads(store.backend.read_checkpoint_file(ref, PROVENANCE_FILE, 1 << 20))
    body["files"][shard] = {"sha256": hashlib.sha256(lying).hexdigest(), "size": len(lying)}
    tamper(store, hub_or_none, "window-1", PROVENANCE_FILE, json.dumps(body).encode())
    with pytest.raises(Rejected) as err:
        store.pull_checkpoint(tmp_path / "p")
    assert err.value.reason == "bad_header"
    assert not (tmp_path / "p").exists()


def write_folder(tmp_path: Path, window: int) -> Path:
    folder = tmp_path / f"ckpt-{window}"
    write_checkpoint_folder(
        tiny_model(window), tiny_tokenizer(), folder, provenance(window), max_shard_size="1GB"
    )
    return folder


def edit_provenance(folder: Path, edit: dict[str, object], extra: dict[str, bytes]) -> Path:
    prov = json.loads((folder / PROVENANCE_FILE).read_text())
    prov["files"].update(edit)
    (folder / PROVENANCE_FILE).write_text(json.dumps(prov))
    for name, data in extra.items():
        (folder / name).write_bytes(data)
    return folder


def test_publish_folder_checks_before_publishing(store: Store, tmp_path: Path) -> None:
    folder = write_folder(tmp_path, 1)
    ref = store.publish_folder(folder)
    assert ref.window == 1
    assert_same_weights(
        AutoModelForCausalLM.from_pretrained(store.pull_checkpoint(tmp_path / "p").path),
        tiny_model(1),
    )
    bad = write_folder(tmp_path, 2)
    (bad / "pytorch_model.bin").write_bytes(b"\x80\x04pickle")
    with pytest.raises(Rejected) as err:
        store.publish_folder(bad)
    assert err.value.reason == "not_safetensors"
    assert [r.window for r in store.list_checkpoints()] == [1]


@pytest.mark.parametrize(
    ("edit", "extra", "reason"),
    [
        (
            {"pytorch_model.bin": {"sha256": "0" * 64, "size": 6}},
            {"pytorch_model.bin": b"pickle"},
            "not_safetensors",
        ),
        ({"../escape.json": {"sha256": "0" * 64, "size": 2}}, {}, "path_escape"),
        ({"/etc/passwd": {"sha256": "0" * 64, "size": 2}}, {}, "path_escape"),
        ({"config.json": {"sha256": "0" * 64, "size": 10}}, {}, "size_mismatch"),
        ({"extra.txt": {"sha256": "0" * 64, "size": 2}}, {}, "not_found"),
    ],
)
def test_bad_provenance_file_lists(
    tmp_path: Path, edit: dict[str, object], extra: dict[str, bytes], reason: str
) -> None:
    folder = edit_provenance(write_folder(tmp_path, 1), edit, extra)
    with pytest.raises(Rejected) as err:
        verify_checkpoint_folder(folder, max_file_bytes=1 << 30, max_header_bytes=1 << 20)
    assert err.value.reason == reason


def test_unlisted_files_are_refused(tmp_path: Path) -> None:
    folder = write_folder(tmp_path, 1)
    (folder / "notes.txt").write_text("not in tensormine.json")
    with pytest.raises(Rejected) as err:
        verify_checkpoint_folder(folder, max_file_bytes=1 << 30, max_header_bytes=1 << 20)
    assert err.value.reason == "bad_manifest"


def test_weights_over_the_file_limit(tmp_path: Path) -> None:
    folder = write_folder(tmp_path, 1)
    with pytest.raises(Rejected) as err:
        verify_checkpoint_folder(folder, max_file_bytes=10_000, max_header_bytes=1 << 20)
    assert err.value.reason == "too_large"


def test_pull_refuses_oversized_files_before_downloading(store: Store, tmp_path: Path) -> None:
    store.publish_checkpoint(tiny_model(1), None, provenance(1))
    strict = Store(
        store.backend, store.cfg.model_copy(update={"max_checkpoint_file_bytes": 10_000})
    )
    with pytest.raises(Rejected) as err:
        strict.pull_checkpoint(tmp_path / "p")
    assert err.value.reason == "too_large"


def test_a_folder_of_pickles_is_not_a_checkpoint(tmp_path: Path) -> None:
    folder = tmp_path / "ck"
    folder.mkdir()
    save_file({"a": tiny_model(0).lm_head.weight.detach()}, str(folder / "model.safetensors"))
    with pytest.raises(Rejected) as err:
        read_provenance(folder)
    assert err.value.reason == "not_found"
