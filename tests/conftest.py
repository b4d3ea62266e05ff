"""Fixtures for the whole suite: an isolated home for keys, no network, no leftovers."""

from __future__ import annotations

import os

# hivemind's default shared-memory mode starts a torch_shm_manager child that outlives
# tests; file descriptors inherited by its forked processes do the same job.
os.environ.setdefault("HIVEMIND_MEMORY_SHARING_STRATEGY", "file_descriptor")
from collections.abc import Iterator
from pathlib import Path

import psutil
import pytest


@pytest.fixture(autouse=True)
def _isolated_home(
    tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Keys and caches go to a temporary home, never the user's."""
    home = tmp_path_factory.mktemp("home")
    monkeypatch.setenv("TENSORMINE_HOME", str(home / "tensormine"))
    monkeypatch.setenv("HF_HOME", str(home / "hf"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("WANDB_MODE", "disabled")
    monkeypatch.setenv("WANDB_DIR", str(home / "wandb"))


@pytest.fixture(scope="session", autouse=True)
def _reap_children() -> Iterator[None]:
    """Kill any child process a test left behind, and fail loudly about it."""
    yield
    me = psutil.Process(os.getpid())
    leftovers = me.children(recursive=True)
    for child in leftovers:
        child.kill()
    psutil.wait_procs(leftovers, timeout=5)
    if leftovers:
        names = ", ".join(f"{c.pid}" for c in leftovers)
        pytest.fail(f"tests left child processes running: {names}", pytrace=False)


@pytest.fixture
def keys_dir(tmp_path: Path) -> Path:
    return tmp_path / "keys"
