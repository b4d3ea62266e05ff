"""Store fixtures: tiny Llama models and tokenizers, stores of both kinds, a loopback Hub.

`fake_hub` starts `hub_server.FakeHub` on 127.0.0.1 and points the real
`huggingface_hub` client at it: ``HF_ENDPOINT``/``HF_TOKEN`` in the environment (what the
store reads), plus the client's import-time constants (endpoint, offline flag, Xet) so
that `transformers` loading straight from the fake Hub goes there too. Each test gets a
fresh ``HF_HOME`` from the suite's root conftest and its own download cache.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from huggingface_hub import constants as hf_constants
from huggingface_hub.utils import _http as hf_http
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

from chain.keys import Keypair
from store import Contributor, Provenance, Store, StoreConfig, open_store
from store.config import HubSection
from tests.store.hub_server import FakeHub

HUB_TOKEN = "hf_test_token_123"


def tiny_model(seed: int = 0, *, layers: int = 2) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    cfg = LlamaConfig(
        vocab_size=64,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=layers,
        num_attention_heads=2,
        num_key_value_heads=2,
    )
    return LlamaForCausalLM(cfg)


def tiny_tokenizer() -> PreTrainedTokenizerFast:
    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2, **{f"w{i}": i + 3 for i in range(61)}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(  # type: ignore[no-untyped-call]
        tokenizer_object=tok, unk_token="<unk>", bos_token="<s>", eos_token="</s>"
    )


def provenance(window: int, **changes: object) -> Provenance:
    base: dict[str, object] = {
        "run_id": "test-run",
        "window": window,
        "ledger_block": 100 + window,
        "contributors": [
            Contributor(uid=1, hotkey=Keypair(bytes([1]) * 32).address, score=0.7, weight=0.6),
            Contributor(uid=2, hotkey=Keypair(bytes([2]) * 32).address, score=0.3, weight=0.4),
        ],
        "metrics": {"loss": 4.0 - window / 10},
        "run_config": {"run": {"name": "test"}},
    }
    base.update(changes)
    return Provenance.model_validate(base)


def assert_same_weights(a: torch.nn.Module, b: torch.nn.Module) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for name in sa:
        assert torch.equal(sa[name], sb[name]), name


@pytest.fixture
def fake_hub(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[FakeHub]:
    hub = FakeHub(tmp_path / "hub-blobs").start()
    monkeypatch.setenv("HF_ENDPOINT", hub.url)
    monkeypatch.setenv("HF_TOKEN", HUB_TOKEN)
    monkeypatch.setenv("HF_HUB_DISABLE_XET", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    monkeypatch.setenv("HF_HUB_DISABLE_TELEMETRY", "1")
    # huggingface_hub reads these once, at import; the store itself reads the env vars.
    monkeypatch.setattr(hf_constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(hf_constants, "HF_HUB_DISABLE_XET", True)
    monkeypatch.setattr(hf_constants, "ENDPOINT", hub.url)
    monkeypatch.setattr(
        hf_constants,
        "HUGGINGFACE_CO_URL_TEMPLATE",
        hub.url + "/{repo_id}/resolve/{revision}/{filename}",
    )
    monkeypatch.setattr(hf_constants, "HF_HUB_CACHE", str(tmp_path / "hf-cache"))
    yield hub
    hub.stop()
    hf_http.close_session()  # no keep-alive connection to a stopped server survives the test
    assert not hub.unhandled, (
        f"the client called routes the fake Hub does not know: {hub.unhandled}"
    )


def hub_config(tmp_path: Path, **hub: object) -> StoreConfig:
    section: dict[str, object] = {
        "checkpoint_repo": "org/tiny-model",
        "contributions_repo": "miner/contributions",
        "backoff_s": 0.01,
        "max_backoff_s": 0.05,
    }
    section.update(hub)
    return StoreConfig(
        backend="hub",
        cache_dir=tmp_path / "store-cache",
        max_shard_size="40KB",
        hub=HubSection.model_validate(section),
    )


def local_config(tmp_path: Path) -> StoreConfig:
    return StoreConfig(backend="local", root=tmp_path / "store", max_shard_size="40KB")


@pytest.fixture(params=["local", "hub"])
def store(request: pytest.FixtureRequest, tmp_path: Path) -> Store:
    """The same tests run against both backends."""
    if request.param == "hub":
        request.getfixturevalue("fake_hub")
        return open_store(hub_config(tmp_path))
    return open_store(local_config(tmp_path))


@pytest.fixture
def miner() -> Keypair:
    return Keypair(bytes([7]) * 32)


@pytest.fixture(autouse=True)
def _no_stray_env(monkeypatch: pytest.MonkeyPatch) -> None:
    """Tests that do not use the fake Hub must not reach a real one by accident."""
    if "HF_ENDPOINT" not in os.environ:
        monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9")


def plant(store: Store, window: int, shard: int, files: dict[str, bytes]) -> None:
    """Put raw files into a store's contribution folder, as a malicious miner could:
    straight into the folder (local) or with a plain Hub commit (hub)."""
    from huggingface_hub import CommitOperationAdd, HfApi

    from store import layout
    from store.hub import HubBackend
    from store.local import LocalBackend

    folder = layout.contribution_dir(window, shard)
    backend = store.backend
    if isinstance(backend, LocalBackend):
        for name, data in files.items():
            path = backend.root / folder / name
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(data)
        return
    assert isinstance(backend, HubBackend)
    repo = str(backend.contributions_repo)
    api = HfApi(endpoint=backend.endpoint, token=HUB_TOKEN)
    api.create_repo(repo, repo_type=backend.contributions_repo_type, exist_ok=True)
    api.create_commit(
        repo,
        [CommitOperationAdd(f"{folder}/{name}", data) for name, data in files.items()],
        commit_message="planted",
        repo_type=backend.contributions_repo_type,
    )
