"""The model: a Llama-architecture causal LM built from `ModelConfig`, bit-identical everywhere.

    from tensormine.config import load_config
    from train.model import build_model, count_parameters, model_fingerprint

    cfg = load_config("configs/tiny.yaml")
    model = build_model(cfg.model, cfg.run.seed)          # transformers.LlamaForCausalLM
    count_parameters(model)                               # 5,261,568 for configs/tiny.yaml
    model_fingerprint(model.state_dict())                 # sha256 hex; equal ⇔ same weights

Every miner and validator builds window 0 on its own, so the same `(cfg, seed)` must give
the same bytes in every process, whatever the global RNG state, the thread count or the
order in which transformers creates modules. `build_model` therefore skips transformers'
own initialization and draws each parameter from a private `torch.Generator` seeded by a
hash of `(seed, parameter name)`: matrices ~ N(0, init_std²), RMSNorm weights = 1, biases
(none in Llama by default) = 0. Adding or removing a layer leaves the other parameters'
values unchanged.

The input embeddings and the LM head are separate tensors (`tie_word_embeddings=False`),
so they can be trained as separate shards (see `train.shards`).
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Mapping
from typing import Any

import torch
from torch import nn
from transformers import (
    LlamaConfig,
    LlamaForCausalLM,
    MixtralConfig,
    MixtralForCausalLM,
    PretrainedConfig,
    PreTrainedModel,
)

from train.config import ModelConfig
from train.moe import is_moe, mixtral_config, unfuse_experts

try:  # transformers >= 5
    from transformers.initialization import no_init_weights
except ImportError:  # transformers 4.x
    from transformers.modeling_utils import no_init_weights

logger = logging.getLogger(__name__)

_SEED_DOMAIN = "tensormine/init/v1"


def llama_config(
    cfg: ModelConfig,
    vocab_size: int | None = None,
    *,
    bos_token_id: int | None = None,
    eos_token_id: int | None = None,
    pad_token_id: int | None = None,
) -> PretrainedConfig:
    """The transformers config for `cfg` (no download): a `LlamaConfig`, or a
    `MixtralConfig` for ``arch: mixtral``; `vocab_size` overrides the cfg's.

    Token ids default to None (transformers' defaults 1/2 would name tokens that a trained
    BPE tokenizer may not have); pass the tokenizer's ids when saving a checkpoint.
    """
    common: dict[str, Any] = dict(
        vocab_size=cfg.vocab_size if vocab_size is None else vocab_size,
        hidden_size=cfg.hidden_size,
        intermediate_size=cfg.intermediate_size,
        num_hidden_layers=cfg.num_layers,
        num_attention_heads=cfg.num_heads,
        num_key_value_heads=cfg.num_kv_heads,
        max_position_embeddings=cfg.max_seq_len,
        rope_parameters={"rope_type": "default", "rope_theta": cfg.rope_theta},
        initializer_range=cfg.init_std,
        rms_norm_eps=1e-5,
        tie_word_embeddings=False,
        bos_token_id=bos_token_id,
        eos_token_id=eos_token_id,
        pad_token_id=pad_token_id,
    )
    if is_moe(cfg):
        return mixtral_config(cfg, **common)
    return LlamaConfig(**common, attention_bias=False, mlp_bias=False)


def _generator(seed: int, name: str) -> torch.Generator:
    digest = hashlib.sha256(f"{_SEED_DOMAIN}/{seed}/{name}".encode()).digest()
    return torch.Generator(device="cpu").manual_seed(int.from_bytes(digest[:8], "little") >> 1)


def init_parameters(model: nn.Module, std: float, seed: int) -> None:
    """Overwrite every parameter of `model` deterministically (see the module docstring)."""
    with torch.no_grad():
        for name, param in sorted(model.named_parameters(), key=lambda item: item[0]):
            if param.ndim >= 2:
                # Drawn on the CPU in fp32 so the values do not depend on the device's RNG.
                values = torch.empty(param.shape, dtype=torch.float32)
                values.normal_(0.0, std, generator=_generator(seed, name))
                param.copy_(values)
            elif "norm" in name.rpartition(".")[0].rpartition(".")[2]:
                param.fill_(1.0)
            else:
                param.zero_()


def _instantiate(config: PretrainedConfig) -> PreTrainedModel:
    if isinstance(config, MixtralConfig):
        model = MixtralForCausalLM(config)
        unfuse_experts(model, config)  # experts as separate tensors: they are shards
        return model
    return LlamaForCausalLM(config)


def build_model(
    cfg: ModelConfig, seed: int, *, device: str | torch.device = "cpu"
) -> PreTrainedModel:
    """A fresh fp32 `LlamaForCausalLM` (or `MixtralForCausalLM` with unfused experts,
    `train.moe`) for `cfg`, identical for the same `(cfg, seed)`.

    `device="meta"` builds the structure only (no memory, no values), for counting and
    shapes; any other device gets the weights drawn on the CPU, then moved there.
    """
    config = llama_config(cfg)
    if torch.device(device).type == "meta":
        with torch.device("meta"):
            return _instantiate(config)
    # transformers' own init would consume (and depend on) the global RNG; it is skipped
    # because every parameter is overwritten below anyway.
    with torch.random.fork_rng(devices=[]), no_init_weights():
        model = _instantiate(config)
    init_parameters(model, cfg.init_std, seed)
    model.train()
    logger.debug("built %s parameters (seed %d)", f"{count_parameters(model):,}", seed)
    nn.Module.to(model, device)  # in place; PreTrainedModel.to's wrapper confuses mypy
    return model


def count_parameters(model: nn.Module) -> int:
    """Number of distinct parameter values (a shared tensor counts once)."""
    return sum(p.numel() for p in model.parameters())


def model_fingerprint(state: Mapping[str, torch.Tensor]) -> str:
    """sha256 hex over names, dtypes, shapes and bytes, in sorted name order.

    Two processes hold the same model exactly when their state dicts' fingerprints agree;
    a dtype or shape change with the same bytes changes the fingerprint too.
    """
    digest = hashlib.sha256(b"tensormine-fingerprint/v1\n")
    for name in sorted(state):
        tensor = state[name].detach().to("cpu").contiguous()
        raw = tensor.reshape(-1).view(torch.uint8).numpy()
        # The header is length-delimited so that no two different states hash alike.
        header = f"{name}\0{str(tensor.dtype).removeprefix('torch.')}\0{list(tensor.shape)}\0"
        digest.update(f"{len(header)}:{header}{raw.nbytes}\n".encode())
        digest.update(raw.data)
    return digest.hexdigest()
