"""Store benchmarks: checkpoint save/load through the store against plain safetensors.

    .venv/bin/python benchmarks/bench_store.py                # ~1-2 minutes on 2 cores
    .venv/bin/python benchmarks/bench_store.py --mb 20 --repeat 1   # a quick look

Builds a Llama model of about `--mb` MB of float32 weights and prints, best of
`--repeat`, each against a baseline measured in the same run:

1. local save: `Store.publish_checkpoint` (save_pretrained with shards, tokenizer, model
   card, sha256 of every file, fsync, atomic rename, `latest` ref) against one
   `safetensors.torch.save_file` of the same state dict;
2. local load: `Store.pull_checkpoint` (copy, sha256 and header check of every file) and
   loading every shard with the checked loader, against `safetensors.torch.load_file`
   (both followed by a copy of every tensor, since load_file maps the file lazily), and
   the checked loader alone on the store's own files (the cost of the header check);
3. Hub push and pull of the same checkpoint against the loopback Hub of the test suite,
   through the real `huggingface_hub` client: once with every file uploaded inline
   ("regular", base64 in the commit body) and once with the weights uploaded by the LFS
   protocol (streamed PUTs, what the real Hub asks for large files).

Throughput is MB of weights per second (1 MB = 10^6 bytes). Writes go to `--dir` (a
temporary folder on the working disk by default); the page cache is warm for loads.
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from transformers import LlamaConfig, LlamaForCausalLM

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from store import Provenance, StoreConfig, open_store  # noqa: E402
from store.config import HubSection  # noqa: E402
from store.safetensors_check import load_safetensors  # noqa: E402
from tests.store.conftest import tiny_tokenizer  # noqa: E402
from tests.store.hub_server import FakeHub  # noqa: E402


def model_of(mb: int) -> LlamaForCausalLM:
    """A 2-layer Llama with about `mb` MB of float32 weights (width solved from the target:
    embeddings + head 2·V·h, each layer about 12·h² with an MLP of 8h/3)."""
    vocab, params = 8192, mb * 1e6 / 4
    hidden = (-2 * vocab + (4 * vocab**2 + 96 * params) ** 0.5) / 48
    hidden = max(64, round(hidden / 32) * 32)
    cfg = LlamaConfig(
        vocab_size=vocab,
        hidden_size=hidden,
        intermediate_size=hidden * 8 // 3 // 32 * 32,
        num_hidden_layers=2,
        num_attention_heads=hidden // 32,
        num_key_value_heads=hidden // 32,
    )
    torch.manual_seed(0)
    return LlamaForCausalLM(cfg)


def best_of(fn: Callable[[int], object], repeat: int) -> float:
    times = []
    for i in range(repeat):
        start = time.perf_counter()
        fn(i)
        times.append(time.perf_counter() - start)
    return min(times)


def row(name: str, seconds: float, megabytes: float, baseline: float | None = None) -> str:
    ratio = f"{seconds / baseline:6.2f}x" if baseline else "      -"
    return f"| {name:<44} | {seconds * 1000:9.0f} | {megabytes / seconds:8.0f} | {ratio} |"


def prov(window: int) -> Provenance:
    return Provenance(run_id="bench", window=window, metrics={"loss": 1.0})


def bench(mb: int, repeat: int, work: Path) -> list[str]:
    model = model_of(mb)
    tok = tiny_tokenizer()
    state = {k: v.contiguous() for k, v in model.state_dict().items()}
    size_mb = sum(t.numel() * t.element_size() for t in state.values()) / 1e6
    lines = [
        f"Model: Llama, {sum(p.numel() for p in model.parameters()) / 1e6:.1f} M parameters, "
        f"{size_mb:.1f} MB of float32 weights; store shards at 50 MB; best of {repeat}.",
        "",
        "| operation | ms | MB/s | vs baseline |",
        "| --- | ---: | ---: | ---: |",
    ]

    plain = work / "plain.safetensors"

    def save_synced(i: int) -> None:
        save_file(state, str(plain))
        with plain.open("rb") as fh:
            os.fsync(fh.fileno())

    def materialize(tensors: dict[str, torch.Tensor]) -> None:
        # load_file maps the file lazily; clone so that every byte is really read, as
        # any use of the weights would (the store's loads get the same treatment).
        for tensor in tensors.values():
            tensor.clone()

    base_save = best_of(lambda i: save_file(state, str(plain)), repeat)
    base_sync = best_of(save_synced, repeat)
    # Loads from the page cache take milliseconds: more repeats to get past the noise.
    fast = max(repeat, 10)
    base_load = best_of(lambda i: materialize(load_file(str(plain))), fast)

    local = open_store(StoreConfig(root=work / "local", max_shard_size="50MB"))
    window = iter(range(1, 1000))
    save = best_of(lambda i: local.publish_checkpoint(model, tok, prov(next(window))), repeat)

    def pull_and_load(i: int) -> None:
        pulled = local.pull_checkpoint(work / f"pulled-{i}", progress=False)
        for name in pulled.provenance.files:
            if name.endswith(".safetensors"):
                materialize(load_safetensors(pulled.path / name, max_header_bytes=1 << 24))

    load = best_of(pull_and_load, repeat)
    shards = sorted((work / "local" / "checkpoints" / "window-1").glob("*.safetensors"))
    checked = best_of(
        lambda i: [materialize(load_safetensors(p, max_header_bytes=1 << 24)) for p in shards],
        fast,
    )
    lines += [
        row("safetensors save_file (baseline)", base_save, size_mb),
        row("safetensors save_file + fsync", base_sync, size_mb, base_save),
        row("local publish_checkpoint", save, size_mb, base_save),
        row("safetensors load_file (baseline)", base_load, size_mb),
        row("checked load only (header check + load_file)", checked, size_mb, base_load),
        row("local pull_checkpoint + checked load", load, size_mb, base_load),
    ]

    for mode, threshold in (("regular", None), ("LFS", 10_000_000)):
        push, pull = bench_hub(model, tok, work / f"hub-{mode}", threshold, repeat)
        lines += [
            row(f"hub push ({mode} upload)", push, size_mb, base_save),
            row(f"hub pull ({mode})", pull, size_mb, base_load),
        ]
    return lines


def bench_hub(
    model: LlamaForCausalLM, tok: Any, work: Path, lfs_threshold: int | None, repeat: int
) -> tuple[float, float]:
    """(push, pull) seconds against a fresh loopback Hub."""
    hub = FakeHub(work / "blobs", lfs_threshold=lfs_threshold).start()
    try:
        cfg = StoreConfig(
            backend="hub",
            max_shard_size="50MB",
            cache_dir=work / "cache",
            hub=HubSection(checkpoint_repo="bench/model", endpoint=hub.url),
        )
        remote = open_store(cfg)
        window = iter(range(1, 1000))
        push = best_of(lambda i: remote.publish_checkpoint(model, tok, prov(next(window))), repeat)
        pull = best_of(
            lambda i: remote.pull_checkpoint(work / f"pulled-{i}", progress=False), repeat
        )
    finally:
        hub.stop()
    return push, pull


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mb", type=int, default=100, help="weights size in MB")
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--dir", type=Path, default=None, help="scratch folder")
    args = parser.parse_args()
    # The loopback Hub is reached through the real client; nothing leaves this machine.
    os.environ.update({"HF_HUB_DISABLE_XET": "1", "HF_HUB_OFFLINE": "0", "HF_TOKEN": "bench"})
    from huggingface_hub import constants

    constants.HF_HUB_DISABLE_XET = True
    constants.HF_HUB_OFFLINE = False
    torch.set_num_threads(max(1, os.cpu_count() or 1))
    print(
        f"bench_store on {platform.processor() or platform.machine()}, {os.cpu_count()} cores, "
        f"torch {torch.__version__}, python {platform.python_version()}"
    )
    with tempfile.TemporaryDirectory(prefix="bench-store-", dir=args.dir) as tmp:
        for line in bench(args.mb, args.repeat, Path(tmp)):
            print(line)


if __name__ == "__main__":
    main()
