"""`tensormine pull` and `tensormine store ls` on a local store and on the loopback Hub."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from chain.keys import Keypair
from store import StoreConfig, open_store
from tensormine.cli import main
from tests.store.conftest import hub_config, provenance, tiny_model, tiny_tokenizer
from tests.store.hub_server import FakeHub

REPO = Path(__file__).resolve().parents[2]

# Loads each folder with transformers alone and prints its parameter checksum; fails if
# anything from this project was imported on the way.
LOADER = """
import json, sys
from transformers import AutoModelForCausalLM, AutoTokenizer
sums = []
for folder in sys.argv[1:]:
    model = AutoModelForCausalLM.from_pretrained(folder)
    AutoTokenizer.from_pretrained(folder)
    sums.append(sum(p.detach().double().sum().item() for p in model.parameters()))
ours = sorted(m for m in sys.modules if m.split(".")[0] in {"tensormine", "store", "chain"})
assert not ours, ours
print(json.dumps(sums))
"""


def checksum(model: torch.nn.Module) -> float:
    return sum(p.detach().double().sum().item() for p in model.parameters())


def local_store_with_two_windows(tmp_path: Path) -> Path:
    root = tmp_path / "store"
    store = open_store(StoreConfig(root=root, max_shard_size="40KB"))
    for window in (1, 2):
        store.publish_checkpoint(tiny_model(window), tiny_tokenizer(), provenance(window))
    store.publish_contribution(
        {"a": torch.ones(300)}, keypair=Keypair(bytes([4]) * 32), uid=4, window=2, shard=1
    )
    return root


def test_pull_from_local_and_hub_loads_without_tensormine(
    fake_hub: FakeHub, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    root = local_store_with_two_windows(tmp_path)
    hub = open_store(hub_config(tmp_path))
    hub.publish_checkpoint(tiny_model(1), tiny_tokenizer(), provenance(1))
    hub.publish_checkpoint(tiny_model(2), tiny_tokenizer(), provenance(2))

    assert main(["pull", str(root), "--window", "1", "--to", str(tmp_path / "a")]) == 0
    out = capsys.readouterr().out
    assert "pulled window 1 (window-1 @ " in out and f"from {root}" in out
    assert "loss 3.9000" in out and "contributors (2):" in out
    assert Keypair(bytes([1]) * 32).address in out and "score 0.7  weight 0.6" in out
    assert "sha256 verified" in out

    assert (
        main(["pull", "org/tiny-model", "--revision", "window-2", "--to", str(tmp_path / "b")]) == 0
    )
    out = capsys.readouterr().out
    assert "pulled window 2 (window-2 @ " in out and "from org/tiny-model" in out
    assert "parent window-1" in out and "ledger block 102" in out

    assert main(["pull", str(root), "--to", str(tmp_path / "c"), "--no-progress"]) == 0
    assert "pulled window 2" in capsys.readouterr().out

    done = subprocess.run(
        [
            sys.executable,
            "-c",
            LOADER,
            str(tmp_path / "a"),
            str(tmp_path / "b"),
            str(tmp_path / "c"),
        ],
        capture_output=True,
        text=True,
        cwd=tmp_path,  # not the repo: nothing of ours is importable by accident
        timeout=120,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    sums = json.loads(done.stdout.strip().splitlines()[-1])
    expected = [checksum(tiny_model(1)), checksum(tiny_model(2)), checksum(tiny_model(2))]
    assert sums == pytest.approx(expected, rel=1e-12)


def test_store_ls(fake_hub: FakeHub, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    root = local_store_with_two_windows(tmp_path)
    assert main(["store", "ls", str(root)]) == 0
    out = capsys.readouterr().out
    assert f"store {root}" in out
    lines = out.splitlines()
    row1 = next(line for line in lines if "window-1" in line)
    row2 = next(line for line in lines if "window-2" in line)
    assert "3.9000" in row1 and "(latest)" not in row1
    assert "3.8000" in row2 and row2.endswith("(latest)")
    assert "contributions (1):" in out
    contribution = next(line for line in lines if Keypair(bytes([4]) * 32).address in line)
    assert contribution.split()[:3] == ["2", "1", "4"]  # window, shard, uid

    assert main(["store", "ls", str(root), "--window", "1"]) == 0
    out = capsys.readouterr().out
    assert "window-1" in out and "window-2" not in out and "contributions (0):" in out

    # The store named by the run config, when SOURCE is left out.
    assert main(["store", "ls", "--set", f"store.root={root}"]) == 0
    assert "window-2" in capsys.readouterr().out

    hub = open_store(
        hub_config(tmp_path, contributions_repo="org/tiny-model", contributions_repo_type="model")
    )
    hub.publish_checkpoint(tiny_model(1), None, provenance(1))
    hub.publish_contribution(
        {"x": torch.zeros(3)}, keypair=Keypair(bytes([5]) * 32), uid=9, window=1, shard=0
    )
    assert main(["store", "ls", "hf://org/tiny-model"]) == 0
    out = capsys.readouterr().out
    assert "checkpoints (1):" in out and "window-1" in out and "contributions (1):" in out
    assert Keypair(bytes([5]) * 32).address in out


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["pull", "{root}", "--window", "7", "--to", "{tmp}/x"], "window-7"),
        (["pull", "{tmp}/absent/store", "--to", "{tmp}/x"], "not a Hub repo id"),
        (["pull", "{root}", "--to", "{root}"], "not an empty folder"),
        (
            ["pull", "{root}", "--revision", "abcdef123", "--to", "{tmp}/x"],
            "no checkpoint revision",
        ),
        (["store", "ls", "{tmp}"], "not a tensormine store"),
    ],
)
def test_expected_failures_are_one_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], argv: list[str], message: str
) -> None:
    root = local_store_with_two_windows(tmp_path)
    args = [a.format(root=root, tmp=tmp_path) for a in argv]
    capsys.readouterr()
    assert main(args) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"tensormine {args[0]}: error: ") and message in err
    assert not (tmp_path / "x").exists()


def test_a_tampered_store_fails_the_pull_with_the_reason(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    root = local_store_with_two_windows(tmp_path)
    config = root / "checkpoints" / "window-2" / "config.json"
    config.write_text(
        config.read_text().replace('"num_hidden_layers": 2', '"num_hidden_layers": 1')
    )
    capsys.readouterr()
    assert main(["pull", str(root), "--to", str(tmp_path / "x")]) == 2
    assert "sha256_mismatch: config.json" in capsys.readouterr().err
    assert not (tmp_path / "x").exists()


def test_window_and_revision_are_exclusive(tmp_path: Path) -> None:
    with pytest.raises(SystemExit) as exc:
        main(["pull", "x/y", "--window", "1", "--revision", "main", "--to", str(tmp_path)])
    assert exc.value.code == 2


def test_progress_bar_on_large_pulls(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    root = local_store_with_two_windows(tmp_path)
    store = open_store(StoreConfig(root=root, progress_min_bytes=0), create=False)
    store.pull_checkpoint(tmp_path / "quiet", progress=False)
    assert "pull window-2" not in capsys.readouterr().err
    store.pull_checkpoint(tmp_path / "loud", progress=True)
    err = capsys.readouterr().err
    assert "pull window-2" in err and "verify sha256" in err
