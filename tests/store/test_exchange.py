"""Small files exchanged between participants (`Store.put_files` / `Store.fetch_file`),
on both backends, and the ``proofs/`` paths of `store.layout` they are used with."""

from __future__ import annotations

from pathlib import Path

import pytest

from chain.keys import Keypair
from store import NotFound, Rejected, Store, StoreConfig, layout, open_store
from store.hub import HubBackend
from store.local import LocalBackend
from tests.store.conftest import hub_config
from tests.store.hub_server import FakeHub

MINER = Keypair(bytes([7]) * 32).address
VALIDATOR = Keypair(bytes([9]) * 32).address
LIMIT = 1 << 20


def other_store(store: Store, tmp_path: Path) -> Store:
    """A second participant with its own contributions location, on the same kind of backend."""
    if isinstance(store.backend, HubBackend):
        return open_store(hub_config(tmp_path, contributions_repo="validator/proofs"))
    return open_store(StoreConfig(backend="local", root=tmp_path / "other-store"))


def read(store: Store, location: str, path: str, max_bytes: int = LIMIT) -> bytes | None:
    got = store.fetch_file(location, path, max_bytes)
    return None if got is None else got.read_bytes()


def test_layout_paths() -> None:
    assert layout.PROOFS == "proofs"
    assert layout.challenge_path(12, MINER, VALIDATOR) == (
        f"proofs/window-12/challenges/{MINER}/{VALIDATOR}.json"
    )
    assert (
        layout.answer_dir(12, VALIDATOR, MINER) == f"proofs/window-12/answers/{VALIDATOR}/{MINER}"
    )
    assert layout.challenge_path(0, "a", "b") == "proofs/window-0/challenges/a/b.json"


@pytest.mark.parametrize("bad", ["..", ".hidden", "a/b", "", "x\\y", "a b", "/abs"])
def test_layout_refuses_bad_hotkeys(bad: str) -> None:
    with pytest.raises(Rejected) as exc:
        layout.challenge_path(1, bad, VALIDATOR)
    assert exc.value.reason == "path_escape"
    with pytest.raises(Rejected) as exc:
        layout.challenge_path(1, MINER, bad)
    assert exc.value.reason == "path_escape"
    with pytest.raises(Rejected) as exc:
        layout.answer_dir(1, bad, MINER)
    assert exc.value.reason == "path_escape"
    with pytest.raises(Rejected) as exc:
        layout.answer_dir(1, VALIDATOR, bad)
    assert exc.value.reason == "path_escape"


def test_layout_refuses_negative_windows() -> None:
    with pytest.raises(ValueError):
        layout.challenge_path(-1, MINER, VALIDATOR)
    with pytest.raises(ValueError):
        layout.answer_dir(-1, VALIDATOR, MINER)


def test_put_files_then_fetch_them_from_the_writer_and_from_another_participant(
    store: Store, tmp_path: Path
) -> None:
    tensors = tmp_path / "answer.safetensors"
    tensors.write_bytes(b"\x00\x01tensor bytes\xff" * 100)
    folder = layout.answer_dir(4, VALIDATOR, MINER)
    answer = b'{"window": 4, "ok": true}'
    store.put_files(
        folder, {"tensors.safetensors": tensors, "answer.json": answer}, message="answer 4"
    )
    challenge = layout.challenge_path(4, MINER, VALIDATOR)
    folder_of, name = challenge.rsplit("/", 1)
    store.put_files(folder_of, {name: b'{"seed": 1}'}, message="challenge 4")

    for reader in (store, other_store(store, tmp_path)):
        where = store.contributions_location
        assert read(reader, where, f"{folder}/answer.json") == answer
        assert read(reader, where, f"{folder}/tensors.safetensors") == tensors.read_bytes()
        assert read(reader, where, challenge) == b'{"seed": 1}'
    assert tensors.is_file()  # a source file is copied or uploaded, not taken away


def test_put_files_replaces_files_of_the_same_name(store: Store, tmp_path: Path) -> None:
    folder = layout.answer_dir(1, VALIDATOR, MINER)
    where = store.contributions_location
    store.put_files(folder, {"a.bin": b"first a", "answer.json": b"first"}, message="one")
    store.put_files(folder, {"answer.json": b"second"}, message="two")
    assert read(store, where, f"{folder}/answer.json") == b"second"
    assert read(store, where, f"{folder}/a.bin") == b"first a"  # untouched
    src = tmp_path / "third"
    src.write_bytes(b"third, from a file")
    store.put_files(folder, {"answer.json": src}, message="three")
    assert read(store, where, f"{folder}/answer.json") == b"third, from a file"


def test_missing_files_and_locations_are_none(store: Store, tmp_path: Path) -> None:
    where = store.contributions_location
    folder = layout.answer_dir(2, VALIDATOR, MINER)
    assert store.fetch_file(where, f"{folder}/answer.json", LIMIT) is None  # nothing stored yet
    store.put_files(folder, {"answer.json": b"{}"}, message="answer")
    assert store.fetch_file(where, f"{folder}/other.json", LIMIT) is None
    assert store.fetch_file(where, layout.challenge_path(2, MINER, VALIDATOR), LIMIT) is None
    assert store.fetch_file(where, folder, LIMIT) is None  # a folder is not a file
    nowhere = (
        "datasets/nobody/nothing"
        if isinstance(store.backend, HubBackend)
        else str(tmp_path / "no-store")
    )
    assert store.fetch_file(nowhere, f"{folder}/answer.json", LIMIT) is None


def test_a_file_over_the_limit_is_refused_before_it_is_read(
    store: Store, request: pytest.FixtureRequest
) -> None:
    folder = layout.answer_dir(3, VALIDATOR, MINER)
    path = f"{folder}/tensors.safetensors"
    store.put_files(folder, {"tensors.safetensors": b"x" * 100}, message="answer")
    downloads = 0
    if isinstance(store.backend, HubBackend):
        hub: FakeHub = request.getfixturevalue("fake_hub")
        downloads = hub.count("GET", r"/resolve/")
    with pytest.raises(Rejected) as exc:
        store.fetch_file(store.contributions_location, path, 99)
    assert exc.value.reason == "too_large"
    if isinstance(store.backend, HubBackend):
        assert hub.count("GET", r"/resolve/") == downloads  # refused on its size alone
    assert read(store, store.contributions_location, path, 100) == b"x" * 100


@pytest.mark.parametrize(
    ("folder", "name"),
    [
        ("proofs/x", ".."),
        ("proofs/x", "a/b"),
        ("proofs/x", ".hidden"),
        ("proofs/x", ""),
        ("/abs/folder", "a.json"),
        ("../outside", "a.json"),
        ("proofs/../../outside", "a.json"),
        ("refs", "latest"),
        ("checkpoints/window-1", "model.safetensors"),
    ],
)
def test_bad_names_are_refused_and_nothing_is_written(store: Store, folder: str, name: str) -> None:
    with pytest.raises(Rejected) as exc:
        # The good file comes first: a bad name later must stop the write before it.
        store.put_files(folder, {"good.json": b"{}", name: b"bad"}, message="bad")
    assert exc.value.reason == "path_escape"
    if not folder.startswith(("/", "..")) and ".." not in folder:
        assert store.fetch_file(store.contributions_location, f"{folder}/good.json", LIMIT) is None


@pytest.mark.parametrize("path", ["../x.json", "/etc/passwd", "proofs/../../x", ""])
def test_fetch_refuses_paths_that_leave_the_location(store: Store, path: str) -> None:
    with pytest.raises(Rejected) as exc:
        store.fetch_file(store.contributions_location, path, LIMIT)
    assert exc.value.reason == "path_escape"


def test_a_missing_source_file_writes_nothing(store: Store, tmp_path: Path) -> None:
    folder = layout.answer_dir(5, VALIDATOR, MINER)
    with pytest.raises(NotFound):
        store.put_files(
            folder, {"a.json": b"{}", "b.safetensors": tmp_path / "absent"}, message="x"
        )
    assert store.fetch_file(store.contributions_location, f"{folder}/a.json", LIMIT) is None


def test_no_files_is_a_caller_error(store: Store) -> None:
    with pytest.raises(ValueError):
        store.put_files("proofs/x", {}, message="nothing")


# ---- backend specifics ---------------------------------------------------------------------
def test_local_files_are_read_in_place(tmp_path: Path) -> None:
    store = open_store(StoreConfig(backend="local", root=tmp_path / "store"))
    folder = layout.answer_dir(1, VALIDATOR, MINER)
    store.put_files(folder, {"answer.json": b"{}"}, message="answer")
    got = store.fetch_file(store.contributions_location, f"{folder}/answer.json", LIMIT)
    assert got == (tmp_path / "store" / folder / "answer.json").resolve()
    assert not list((tmp_path / "store" / folder).glob(".tmp-*"))  # no temp file left


def test_local_symlinks_cannot_lead_out_of_the_store(tmp_path: Path) -> None:
    store = open_store(StoreConfig(backend="local", root=tmp_path / "store"))
    assert isinstance(store.backend, LocalBackend)
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "secret.json").write_bytes(b"secret")
    (tmp_path / "store" / "proofs").symlink_to(outside, target_is_directory=True)
    with pytest.raises(Rejected) as exc:
        store.put_files("proofs/window-1", {"a.json": b"{}"}, message="escape")
    assert exc.value.reason == "path_escape"
    assert sorted(p.name for p in outside.iterdir()) == ["secret.json"]
    with pytest.raises(Rejected) as exc:
        store.fetch_file(store.contributions_location, "proofs/secret.json", LIMIT)
    assert exc.value.reason == "path_escape"


def test_local_files_are_written_in_the_order_given(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from store import fsio

    store = open_store(StoreConfig(backend="local", root=tmp_path / "store"))
    written: list[str] = []

    def record_write(path: Path, data: bytes) -> None:
        written.append(path.name)
        fsio.write_atomic(path, data)

    def record_copy(src: Path, dst: Path) -> None:
        written.append(dst.name)
        fsio.copy_atomic(src, dst)

    monkeypatch.setattr("store.local.write_atomic", record_write)
    monkeypatch.setattr("store.local.copy_atomic", record_copy)
    src = tmp_path / "t"
    src.write_bytes(b"tensors")
    files: dict[str, bytes | Path] = {"z.safetensors": src, "a.bin": b"a", "answer.json": b"{}"}
    store.put_files("proofs/order", files, message="order")
    assert written == ["z.safetensors", "a.bin", "answer.json"]


def test_hub_puts_all_files_in_one_commit_on_main(fake_hub: FakeHub, tmp_path: Path) -> None:
    store = open_store(hub_config(tmp_path))
    folder = layout.answer_dir(6, VALIDATOR, MINER)
    src = tmp_path / "t.safetensors"
    src.write_bytes(b"tensors")
    store.put_files(folder, {"t.safetensors": src, "answer.json": b"{}"}, message="answer 6")
    repo = fake_hub.repo("miner/contributions", "dataset")
    head = repo.commits[repo.branches["main"]]
    assert head.title == "answer 6"
    assert {f"{folder}/t.safetensors", f"{folder}/answer.json"} <= set(head.files)
    assert head.parent is not None
    assert not {p for p in repo.commits[head.parent].files if p.startswith("proofs/")}
