"""The Hub backend against the loopback Hub, through the real `huggingface_hub` client."""

from __future__ import annotations

import datetime as dt
from pathlib import Path

import pytest
import torch
from huggingface_hub import HfApi, hf_hub_download
from huggingface_hub import constants as hf_constants
from huggingface_hub.errors import RemoteEntryNotFoundError, RevisionNotFoundError
from transformers import AutoModelForCausalLM, AutoTokenizer

from chain.keys import Keypair
from store import NotFound, RemoteError, StoreConflict, open_source, open_store
from store.hub import HubBackend
from tests.store.conftest import (
    HUB_TOKEN,
    assert_same_weights,
    hub_config,
    provenance,
    tiny_model,
    tiny_tokenizer,
)
from tests.store.hub_server import FakeHub


def test_push_two_windows_pull_each_by_revision_and_load(fake_hub: FakeHub, tmp_path: Path) -> None:
    store = open_store(hub_config(tmp_path))
    models = {1: tiny_model(1), 2: tiny_model(2)}
    refs = {
        w: store.publish_checkpoint(m, tiny_tokenizer(), provenance(w)) for w, m in models.items()
    }
    repo = fake_hub.repo("org/tiny-model")
    assert repo.tags == {"window-1": refs[1].commit, "window-2": refs[2].commit}
    assert repo.branches["main"] == refs[2].commit

    for window, model in models.items():
        pulled = store.pull_checkpoint(tmp_path / f"w{window}", revision=f"window-{window}")
        assert pulled.provenance.window == window
        assert_same_weights(AutoModelForCausalLM.from_pretrained(pulled.path), model)
        # ... and straight from the Hub, with transformers and no tensormine code at all.
        direct = AutoModelForCausalLM.from_pretrained(
            "org/tiny-model", revision=f"window-{window}", cache_dir=tmp_path / "hf"
        )
        assert_same_weights(direct, model)
    tok = AutoTokenizer.from_pretrained("org/tiny-model", cache_dir=tmp_path / "hf")
    assert tok("w3")["input_ids"] == [6]
    assert_same_weights(
        AutoModelForCausalLM.from_pretrained("org/tiny-model", cache_dir=tmp_path / "hf"), models[2]
    )


def test_token_and_endpoint_come_from_the_environment(fake_hub: FakeHub, tmp_path: Path) -> None:
    store = open_store(hub_config(tmp_path))
    store.publish_checkpoint(tiny_model(1), None, provenance(1))
    store.pull_checkpoint(tmp_path / "p")
    api_calls = [(m, p, auth) for m, p, auth in fake_hub.requests if p != "/api/agent-harnesses"]
    assert api_calls
    assert {auth for _, _, auth in api_calls} == {f"Bearer {HUB_TOKEN}"}


def test_config_endpoint_wins_over_the_environment(
    fake_hub: FakeHub, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9")  # nothing listens there
    store = open_store(hub_config(tmp_path, endpoint=fake_hub.url))
    assert store.publish_checkpoint(tiny_model(1), None, provenance(1)).window == 1


def test_retries_5xx_and_429_then_succeeds(fake_hub: FakeHub, tmp_path: Path) -> None:
    store = open_store(hub_config(tmp_path))
    fake_hub.fail("POST", r"/api/repos/create$", status=502, times=1)
    fake_hub.fail("POST", r"/commit/main$", status=503, times=2)
    fake_hub.fail("POST", r"/tag/", status=429, times=1, retry_after=1)
    ref = store.publish_checkpoint(tiny_model(1), None, provenance(1))
    assert fake_hub.count("POST", r"/commit/main$") == 3
    assert fake_hub.count("POST", r"/tag/") == 2
    assert len(fake_hub.repo("org/tiny-model").commits) == 2  # initial + exactly one window
    fake_hub.fail("HEAD", r"/resolve/", status=500, times=2)
    fake_hub.fail("GET", r"/resolve/", status=504, times=1)
    assert store.pull_checkpoint(tmp_path / "p", window=1).ref == ref


def test_retries_are_bounded(fake_hub: FakeHub, tmp_path: Path) -> None:
    store = open_store(hub_config(tmp_path, max_retries=3))
    fake_hub.fail("POST", r"/commit/main$", status=503, times=100)
    with pytest.raises(RemoteError, match="still failing after 4 attempts"):
        store.publish_checkpoint(tiny_model(1), None, provenance(1))
    assert fake_hub.count("POST", r"/commit/main$") == 4
    assert store.list_checkpoints() == []


def test_client_errors_are_not_retried(fake_hub: FakeHub, tmp_path: Path) -> None:
    store = open_store(hub_config(tmp_path))
    fake_hub.fail("POST", r"/commit/main$", status=403, times=1)
    with pytest.raises(RemoteError, match="HTTP 403"):
        store.publish_checkpoint(tiny_model(1), None, provenance(1))
    assert fake_hub.count("POST", r"/commit/main$") == 1


def test_a_publish_that_died_before_tagging_is_finished_by_the_next(
    fake_hub: FakeHub, tmp_path: Path
) -> None:
    store = open_store(hub_config(tmp_path, max_retries=1))
    fake_hub.fail("POST", r"/tag/", status=500, times=2)
    with pytest.raises(RemoteError):
        store.publish_checkpoint(tiny_model(1), tiny_tokenizer(), provenance(1))
    assert store.list_checkpoints() == []  # committed to main, but not published
    ref = store.publish_checkpoint(tiny_model(1), tiny_tokenizer(), provenance(1))
    assert len(fake_hub.repo("org/tiny-model").commits) == 2  # no second commit
    assert [r.window for r in store.list_checkpoints()] == [1] and ref.commit
    with pytest.raises(StoreConflict):
        store.publish_checkpoint(tiny_model(1), None, provenance(1))


# The client's LFS upload passes a file object as `data=`, which its HTTP library deprecates.
@pytest.mark.filterwarnings("ignore:Use 'content=<...>':DeprecationWarning")
def test_large_files_go_through_lfs_and_stream(tmp_path: Path, fake_hub: FakeHub) -> None:
    fake_hub.lfs_threshold = 20_000  # the weight shards, not the JSON files
    store = open_store(hub_config(tmp_path))
    model = tiny_model(3)
    store.publish_checkpoint(model, tiny_tokenizer(), provenance(1))
    lfs_puts = fake_hub.count("PUT", r"^/__lfs/")
    assert lfs_puts >= 2
    blobs = [b for c in fake_hub.repo("org/tiny-model").commits.values() for b in c.files.values()]
    assert any(b.lfs for b in blobs)
    pulled = store.pull_checkpoint(tmp_path / "p")
    assert_same_weights(AutoModelForCausalLM.from_pretrained(pulled.path), model)


def test_missing_repos_and_revisions(fake_hub: FakeHub, tmp_path: Path) -> None:
    store = open_store(hub_config(tmp_path, checkpoint_repo="org/absent"))
    assert store.list_checkpoints() == []
    assert store.latest() is None
    assert store.list_contributions(1) == []
    with pytest.raises(NotFound):
        store.pull_checkpoint(tmp_path / "p", revision="main")
    store = open_store(hub_config(tmp_path))
    store.publish_checkpoint(tiny_model(1), None, provenance(1))
    with pytest.raises(NotFound):
        store.pull_checkpoint(tmp_path / "p", revision="no-such-branch")
    with pytest.raises(NotFound):
        store.resolve(window=5)


def test_contributions_in_each_miners_own_repo(fake_hub: FakeHub, tmp_path: Path) -> None:
    when = dt.datetime(2031, 5, 6, 7, 8, 9, 123000, tzinfo=dt.UTC)
    fake_hub.now = lambda: when
    miners = [Keypair(bytes([i]) * 32) for i in (1, 2)]
    locations = []
    for i, kp in enumerate(miners):
        own = open_store(hub_config(tmp_path, contributions_repo=f"miner-{i}/deltas"))
        own.publish_contribution(
            {"a": torch.full((4,), float(i))}, keypair=kp, uid=i, window=3, shard=0
        )
        locations.append(own.contributions_location)
    assert locations == ["datasets/miner-0/deltas", "datasets/miner-1/deltas"]
    validator = open_store(hub_config(tmp_path, contributions_repo="validator/none"))
    refs = validator.list_contributions(3, 0, sources=[*locations, "datasets/nobody/nothing"])
    assert sorted(r.hotkey for r in refs) == sorted(kp.address for kp in miners)
    assert {r.received_at for r in refs} == {when}
    for ref in refs:
        i = next(j for j, kp in enumerate(miners) if kp.address == ref.hotkey)
        got = validator.load_contribution(ref, hotkey=ref.hotkey, uid=i, window=3, shard=0)
        assert torch.equal(got.tensors["a"], torch.full((4,), float(i)))


def test_contributions_in_a_model_repo(fake_hub: FakeHub, tmp_path: Path, miner: Keypair) -> None:
    store = open_store(hub_config(tmp_path, contributions_repo_type="model"))
    store.publish_contribution({"a": torch.ones(2)}, keypair=miner, uid=0, window=0, shard=0)
    assert ("model", "miner/contributions") in fake_hub.repos
    [ref] = store.list_contributions(0)
    assert ref.source == "miner/contributions"
    store.load_contribution(ref, hotkey=miner.address, uid=0, window=0, shard=0)


def test_open_source_reads_hub_repo_ids(fake_hub: FakeHub, tmp_path: Path) -> None:
    store = open_store(hub_config(tmp_path))
    store.publish_checkpoint(tiny_model(1), None, provenance(1))
    for source in ("org/tiny-model", "hf://org/tiny-model", "hf://models/org/tiny-model"):
        other = open_source(source)
        assert isinstance(other.backend, HubBackend)
        assert other.resolve().window == 1
    with pytest.raises(NotFound):
        open_source("not a repo id")


def test_offline_mode_is_a_clear_error(
    fake_hub: FakeHub, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(hf_constants, "HF_HUB_OFFLINE", True)
    store = open_store(hub_config(tmp_path))
    with pytest.raises(RemoteError, match="HF_HUB_OFFLINE"):
        store.publish_checkpoint(tiny_model(1), None, provenance(1))


# ---- the fixture itself speaks the protocol the client expects --------------------------
def test_fake_hub_protocol(fake_hub: FakeHub, tmp_path: Path) -> None:
    api = HfApi(endpoint=fake_hub.url, token=HUB_TOKEN)
    url = api.create_repo("org/proto")
    assert api.create_repo("org/proto", exist_ok=True) == url  # a 409 that carries the url
    api.upload_folder(repo_id="org/proto", folder_path=_folder(tmp_path), commit_message="files")
    files = api.list_repo_files("org/proto")
    assert sorted(files) == [".gitattributes", "a/b/c.txt", "top.txt"]
    shallow = {e.path for e in api.list_repo_tree("org/proto")}
    assert shallow == {".gitattributes", "a", "top.txt"}
    deep = {e.path for e in api.list_repo_tree("org/proto", recursive=True)}
    assert deep == {".gitattributes", "a", "a/b", "a/b/c.txt", "top.txt"}
    api.create_branch("org/proto", branch="dev")
    api.create_tag("org/proto", tag="v1")
    refs = api.list_repo_refs("org/proto")
    assert {b.name for b in refs.branches} == {"main", "dev"} and [t.name for t in refs.tags] == [
        "v1"
    ]
    assert [c.title for c in api.list_repo_commits("org/proto")] == ["files", "initial commit"]
    with pytest.raises(RevisionNotFoundError):
        api.repo_info("org/proto", revision="nope")
    with pytest.raises(RemoteEntryNotFoundError):
        hf_hub_download("org/proto", "missing.txt", endpoint=fake_hub.url, cache_dir=tmp_path / "c")
    got = hf_hub_download(
        "org/proto", "a/b/c.txt", revision="v1", endpoint=fake_hub.url, cache_dir=tmp_path / "c"
    )
    assert Path(got).read_text() == "deep"


def _folder(tmp_path: Path) -> Path:
    root = tmp_path / "upload"
    (root / "a" / "b").mkdir(parents=True)
    (root / "a" / "b" / "c.txt").write_text("deep")
    (root / "top.txt").write_text("top")
    return root
