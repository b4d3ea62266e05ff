"""The local backend: atomic publication under concurrent readers in other processes."""

from __future__ import annotations

import datetime as dt
import json
import os
import subprocess
import sys
import threading
from pathlib import Path

import pytest
import torch

from chain.keys import Keypair
from store import NotFound, Rejected, StoreConfig, StoreError, open_store
from store.checkpoint import write_checkpoint_folder
from store.local import LocalBackend
from tests.store.conftest import provenance, tiny_model, tiny_tokenizer

REPO = Path(__file__).resolve().parents[2]


def test_readers_in_other_processes_never_see_partial_writes(tmp_path: Path) -> None:
    root = tmp_path / "store"
    open_store(StoreConfig(root=root))
    folders = []
    for window in range(1, 7):
        folder = tmp_path / f"src-{window}"
        write_checkpoint_folder(
            tiny_model(window), tiny_tokenizer(), folder, provenance(window), max_shard_size="30KB"
        )
        folders.append(str(folder))
    done = tmp_path / "done"
    worker = [sys.executable, "-m", "tests.store.local_workers"]
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    readers = [
        subprocess.Popen(
            [*worker, "reader", str(root), str(done), str(tmp_path / f"scratch{i}")],
            stdout=subprocess.PIPE,
            env=env,
            cwd=REPO,
        )
        for i in range(2)
    ]
    writer = subprocess.run(
        [*worker, "writer", str(root), str(done), *folders], env=env, cwd=REPO, timeout=120
    )
    outcomes = [json.loads(proc.communicate(timeout=120)[0]) for proc in readers]
    assert writer.returncode == 0
    assert all(o["ok"] for o in outcomes), outcomes
    assert sum(o["pulls"] + o["loads"] for o in outcomes) > 0, outcomes
    store = open_store(StoreConfig(root=root), create=False)
    assert [r.window for r in store.list_checkpoints()] == list(range(1, 7))
    assert store.resolve().window == 6
    assert list((root / ".staging").iterdir()) == []


def test_leftover_staging_is_invisible(tmp_path: Path) -> None:
    store = open_store(StoreConfig(root=tmp_path / "s"))
    store.publish_checkpoint(tiny_model(1), None, provenance(1))
    crashed = tmp_path / "s" / ".staging" / "deadbeef"
    crashed.mkdir(parents=True)
    (crashed / "config.json").write_text("{")
    (tmp_path / "s" / "checkpoints" / "window-9.partial").mkdir()
    assert [r.window for r in store.list_checkpoints()] == [1]
    assert store.resolve().window == 1


def test_latest_only_moves_forward(tmp_path: Path) -> None:
    """Two publishers racing: the one with the lower window never moves `latest` back."""
    store = open_store(StoreConfig(root=tmp_path / "s"))
    backend = store.backend
    assert isinstance(backend, LocalBackend)
    for window in (5, 3):
        with backend.staging_dir() as folder:
            write_checkpoint_folder(
                tiny_model(window), None, folder, provenance(window), max_shard_size="1GB"
            )
            backend.commit_checkpoint(folder, window)
    assert store.resolve().window == 5
    assert [r.window for r in store.list_checkpoints()] == [3, 5]


def test_opening_folders_that_are_not_stores(tmp_path: Path) -> None:
    with pytest.raises(NotFound):
        open_store(StoreConfig(root=tmp_path / "absent"), create=False)
    busy = tmp_path / "busy"
    busy.mkdir()
    (busy / "something.txt").write_text("x")
    with pytest.raises(StoreError, match="not a tensormine store"):
        open_store(StoreConfig(root=busy))


def test_symlink_out_of_the_store_is_refused(tmp_path: Path, miner: Keypair) -> None:
    store = open_store(StoreConfig(root=tmp_path / "s"))
    ref = store.publish_contribution({"a": torch.ones(4)}, keypair=miner, uid=1, window=0, shard=0)
    manifest = store.read_manifest(ref)
    inside = tmp_path / "s" / ref.manifest_path.rsplit("/", 1)[0] / manifest.file
    outside = tmp_path / "outside.safetensors"
    inside.rename(outside)
    inside.symlink_to(outside)
    with pytest.raises(Rejected) as err:
        store.load_contribution(ref, hotkey=miner.address, uid=1, window=0, shard=0)
    assert err.value.reason == "path_escape"


def test_received_at_is_the_manifest_mtime(tmp_path: Path, miner: Keypair) -> None:
    store = open_store(StoreConfig(root=tmp_path / "s"))
    ref = store.publish_contribution({"a": torch.ones(4)}, keypair=miner, uid=1, window=0, shard=0)
    stamp = dt.datetime(2030, 1, 2, 3, 4, 5, tzinfo=dt.UTC)
    os.utime(tmp_path / "s" / ref.manifest_path, (stamp.timestamp(), stamp.timestamp()))
    [listed] = store.list_contributions(0, 0)
    assert listed.received_at == stamp


def test_contributions_from_several_miners_stores(tmp_path: Path) -> None:
    miners = [Keypair(bytes([i]) * 32) for i in (1, 2)]
    sources = []
    for i, kp in enumerate(miners):
        own = open_store(StoreConfig(root=tmp_path / f"miner{i}"))
        own.publish_contribution(
            {"a": torch.full((4,), float(i))}, keypair=kp, uid=i, window=3, shard=0
        )
        sources.append(own.contributions_location)
    validator = open_store(StoreConfig(root=tmp_path / "validator"))
    refs = validator.list_contributions(3, 0, sources=[*sources, str(tmp_path / "gone")])
    assert sorted(r.hotkey for r in refs) == sorted(kp.address for kp in miners)
    for ref in refs:
        i = next(j for j, kp in enumerate(miners) if kp.address == ref.hotkey)
        got = validator.load_contribution(ref, hotkey=ref.hotkey, uid=i, window=3, shard=0)
        assert torch.equal(got.tensors["a"], torch.full((4,), float(i)))
    assert validator.list_contributions(3, 0) == []


def test_many_processes_creating_one_store_at_once(tmp_path: Path) -> None:
    # Several miners start together on a fresh run folder: every one must open the store.
    root = tmp_path / "store"
    errors: list[BaseException] = []
    barrier = threading.Barrier(8)

    def create() -> None:
        barrier.wait()
        try:
            for _ in range(20):
                LocalBackend(root)
        except BaseException as exc:  # noqa: BLE001 - reported to the test below
            errors.append(exc)

    threads = [threading.Thread(target=create) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    assert (root / "store.json").is_file()
    # A foreign folder with content is still refused.
    other = tmp_path / "other"
    other.mkdir()
    (other / "notes.txt").write_text("hi")
    with pytest.raises(StoreError, match="not a tensormine store"):
        LocalBackend(other)
