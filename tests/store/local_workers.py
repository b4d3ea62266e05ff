"""Worker processes for `test_local`: one writer and several readers of one local store.

    python -m tests.store.local_workers writer ROOT DONE_FILE FOLDER...
    python -m tests.store.local_workers reader ROOT DONE_FILE SCRATCH

The writer publishes each checkpoint folder as the next window and re-publishes one
contribution several times per window (tensors all equal to a counter), then creates
DONE_FILE. A reader pulls `latest` and loads every listed contribution in a loop until
DONE_FILE exists (and once more after), and prints a JSON line: ``{"ok": true, ...}``
or ``{"ok": false, "error": ...}``. Kept apart from the test module so that the children
import only torch and `store`, not `transformers` and the fixtures.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch

from chain.keys import Keypair
from store import NotFound, Rejected, StoreConfig, open_store

SEED = bytes([3]) * 32
REPUBLISH = 5


def writer(root: Path, done: Path, folders: list[Path]) -> None:
    store = open_store(StoreConfig(root=root))
    kp = Keypair(SEED)
    try:
        for i, folder in enumerate(folders):
            store.publish_folder(folder)
            for k in range(REPUBLISH):
                value = float(i * REPUBLISH + k + 1)
                store.publish_contribution(
                    {"w": torch.full((256,), value), "b": torch.full((8,), value)},
                    keypair=kp,
                    uid=1,
                    window=0,
                    shard=0,
                )
    finally:
        done.touch()


def reader(root: Path, done: Path, scratch: Path) -> dict[str, object]:
    store = open_store(StoreConfig(root=root), create=False)
    kp = Keypair(SEED)
    pulls = loads = races = 0
    last_window = -1
    while True:
        finished = done.exists()  # read before the work, so the last pass sees the end
        try:
            pulled = store.pull_checkpoint(scratch / f"p{pulls}", progress=False)
            if pulled.provenance.window < last_window:
                raise AssertionError("latest moved backwards")
            last_window = pulled.provenance.window
            pulls += 1
        except NotFound:
            pass  # nothing published yet
        for ref in store.list_contributions(0, 0):
            try:
                got = store.load_contribution(ref, hotkey=kp.address, uid=1, window=0, shard=0)
            except Rejected as exc:
                # The manifest we read was replaced and its tensor file removed before
                # we opened it: the only race a reader can lose, and it loads nothing.
                if exc.reason != "not_found":
                    raise
                races += 1
                continue
            values = torch.unique(torch.cat([got.tensors["w"], got.tensors["b"]]))
            if values.numel() != 1:
                raise AssertionError(f"a reader saw a mix of contributions: {values.tolist()}")
            loads += 1
        if finished:
            return {"ok": True, "pulls": pulls, "loads": loads, "races": races, "last": last_window}


def main(argv: list[str]) -> int:
    role, root, done = argv[0], Path(argv[1]), Path(argv[2])
    if role == "writer":
        writer(root, done, [Path(p) for p in argv[3:]])
        return 0
    try:
        result = reader(root, done, Path(argv[3]))
    except Exception as exc:  # noqa: BLE001 - reported to the test, which fails on it
        result = {"ok": False, "error": f"{type(exc).__name__}: {exc}"}
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
