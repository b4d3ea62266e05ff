"""The model: presets' sizes, determinism across processes and RNG states, fingerprints."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM

from tensormine.config import load_config
from train.config import ModelConfig
from train.model import build_model, count_parameters, llama_config, model_fingerprint

ROOT = Path(__file__).resolve().parents[2]
SMALL = ModelConfig(
    vocab_size=300, hidden_size=32, intermediate_size=64, num_layers=2, num_heads=4,
    num_kv_heads=2, max_seq_len=32,
)  # fmt: skip


def closed_form_count(cfg: ModelConfig) -> int:
    """Parameters of an untied Llama, from the architecture alone."""
    h, v, i = cfg.hidden_size, cfg.vocab_size, cfg.intermediate_size
    kv = cfg.num_kv_heads * (h // cfg.num_heads)
    layer = h * h * 2 + h * kv * 2 + 3 * h * i + 2 * h  # q, o; k, v; gate, up, down; 2 norms
    return 2 * v * h + cfg.num_layers * layer + h


@pytest.mark.parametrize(
    ("preset", "expected"),
    [("tiny", 5_261_568), ("small", 134_105_856), ("1b", 1_100_048_384)],
)
def test_presets_load_and_have_the_documented_size(preset: str, expected: int) -> None:
    cfg = load_config(ROOT / "configs" / f"{preset}.yaml")
    assert cfg.run.name == preset
    assert cfg.data.seq_len <= cfg.model.max_seq_len
    meta = build_model(cfg.model, cfg.run.seed, device="meta")  # no memory for the big ones
    assert count_parameters(meta) == expected == closed_form_count(cfg.model)


def test_tiny_preset_builds_about_five_million_parameters() -> None:
    cfg = load_config(ROOT / "configs" / "tiny.yaml")
    model = build_model(cfg.model, cfg.run.seed)
    assert 4_500_000 < count_parameters(model) < 6_000_000
    ids = torch.randint(0, cfg.model.vocab_size, (2, 16))
    loss = model(input_ids=ids, labels=ids).loss
    # A fresh model predicts about uniformly: loss ≈ ln(vocab).
    assert abs(float(loss.detach()) - torch.log(torch.tensor(4096.0)).item()) < 0.5


def test_init_is_explicit_and_untied() -> None:
    model = build_model(SMALL, seed=3)
    params = {n: p.detach() for n, p in model.named_parameters()}
    assert params["lm_head.weight"].data_ptr() != params["model.embed_tokens.weight"].data_ptr()
    assert not model.config.tie_word_embeddings
    for name, p in params.items():
        if p.ndim == 1:
            assert torch.equal(p, torch.ones_like(p)), name
        else:
            assert abs(float(p.std()) - SMALL.init_std) < 0.2 * SMALL.init_std, name
            assert abs(float(p.mean())) < 0.1 * SMALL.init_std, name


def test_same_config_and_seed_give_the_same_bytes_whatever_the_global_rng() -> None:
    torch.manual_seed(1)
    a = build_model(SMALL, seed=7)
    torch.manual_seed(12345)
    torch.rand(100)
    b = build_model(SMALL, seed=7)
    assert model_fingerprint(a.state_dict()) == model_fingerprint(b.state_dict())
    assert model_fingerprint(build_model(SMALL, seed=8).state_dict()) != model_fingerprint(
        a.state_dict()
    )


def test_building_leaves_the_global_rng_alone() -> None:
    torch.manual_seed(0)
    expected = torch.rand(4)
    torch.manual_seed(0)
    build_model(SMALL, seed=0)
    assert torch.equal(torch.rand(4), expected)


def test_other_layers_do_not_change_when_a_layer_is_added() -> None:
    a = build_model(SMALL, seed=0).state_dict()
    b = build_model(SMALL.model_copy(update={"num_layers": 3}), seed=0).state_dict()
    for name, tensor in a.items():
        assert torch.equal(tensor, b[name]), name


def test_another_process_with_other_threads_builds_the_same_model() -> None:
    code = (
        "import torch; torch.set_num_threads(1); torch.manual_seed(99)\n"
        "from train.config import ModelConfig\n"
        "from train.model import build_model, model_fingerprint\n"
        f"cfg = ModelConfig.model_validate({SMALL.model_dump()!r})\n"
        "print(model_fingerprint(build_model(cfg, seed=5).state_dict()))\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True,
        timeout=120,
    )  # fmt: skip
    assert out.stdout.strip() == model_fingerprint(build_model(SMALL, seed=5).state_dict())


def test_fingerprint_covers_names_shapes_dtypes_and_bytes() -> None:
    base = {"a": torch.arange(6, dtype=torch.float32), "b": torch.ones(2, 2)}
    fp = model_fingerprint(base)
    assert fp == model_fingerprint({"b": torch.ones(2, 2), "a": torch.arange(6.0)})  # order
    assert len(fp) == 64
    variants = [
        {"a": base["a"], "c": base["b"]},  # a name
        {"a": base["a"].reshape(2, 3), "b": base["b"]},  # a shape, same bytes
        {"a": base["a"].view(torch.int32), "b": base["b"]},  # a dtype, same bytes
        {"a": base["a"], "b": base["b"] + 1e-7},  # a value
        {"a": base["a"]},  # a missing tensor
    ]
    assert len({fp, *(model_fingerprint(v) for v in variants)}) == 1 + len(variants)


def test_llama_config_and_save_load_with_transformers(tmp_path: Path) -> None:
    config = llama_config(SMALL, vocab_size=320, bos_token_id=1, eos_token_id=2, pad_token_id=0)
    assert config.vocab_size == 320 and config.num_key_value_heads == 2
    assert dict(config.rope_parameters or {})["rope_theta"] == SMALL.rope_theta
    assert config.initializer_range == SMALL.init_std and config.pad_token_id == 0
    model = build_model(SMALL, seed=1)
    model.save_pretrained(tmp_path)
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path)
    assert model_fingerprint(loaded.state_dict()) == model_fingerprint(model.state_dict())
