"""Mixture of experts: a Mixtral whose experts are separate parameters, so they can be shards.

    from train.moe import is_moe, expert_usage
    model = build_model(cfg.model, seed)            # arch: mixtral -> MixtralForCausalLM
    out = model(input_ids=ids, labels=ids, output_router_logits=True)
    out.loss                                        # LM loss + router_aux_loss_coef · aux
    expert_usage(out.router_logits, top_k=2)        # [layers, experts] share of routed tokens

transformers 5 stores a Mixtral layer's experts fused, as two 3-D tensors
(``mlp.experts.gate_up_proj`` ``[E, 2I, H]`` and ``mlp.experts.down_proj`` ``[E, H, I]``).
Everything in tensormine that moves a shard — the shard map, Δ, compression, admission,
averaging, scoring — works on whole named tensors, so an expert must be its own tensors.
`UnfusedExperts` holds expert j as ``mlp.experts.j.w1`` / ``w3`` (gate, up: ``[I, H]``)
and ``w2`` (down: ``[H, I]``) — Mixtral's original checkpoint names — and computes exactly
what `MixtralExperts` computes (same routing, same per-expert loop). The router, attention,
norms and the loss, load-balancing term included, stay transformers' own.

A checkpoint written with ``save_pretrained`` therefore holds the per-expert tensors under
their original names, which transformers' own weight conversion for Mixtral merges into
the fused layout when it loads them: ``AutoModelForCausalLM.from_pretrained(folder)``
needs no tensormine code (`tests/train/test_moe.py` checks the logits agree).

**Routing health.** The inner loop asks for the router logits
(``output_router_logits=True``), so transformers adds ``router_aux_loss_coef`` times
the Switch-Transformer load-balancing loss to the training loss; evaluation and scoring
use the plain LM loss (the config keeps ``output_router_logits`` off). `expert_usage`
turns the router logits into each expert's share of the routed token slots, which the
miner logs per window.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import nn
from transformers import MixtralConfig

from train.config import ModelConfig


def is_moe(cfg: ModelConfig) -> bool:
    return cfg.arch == "mixtral"


def mixtral_config(cfg: ModelConfig, **common: Any) -> MixtralConfig:
    """The transformers `MixtralConfig` for `cfg` (`common`: the fields Llama shares)."""
    return MixtralConfig(
        num_local_experts=cfg.num_experts,
        num_experts_per_tok=cfg.experts_per_token,
        router_aux_loss_coef=cfg.router_aux_loss_coef,
        output_router_logits=False,
        router_jitter_noise=0.0,
        sliding_window=None,
        **common,
    )


class _Expert(nn.Module):
    """One SwiGLU expert, Mixtral's original layout: w1 gate, w3 up, w2 down."""

    def __init__(self, hidden: int, intermediate: int) -> None:
        super().__init__()
        self.w1 = nn.Linear(hidden, intermediate, bias=False)
        self.w3 = nn.Linear(hidden, intermediate, bias=False)
        self.w2 = nn.Linear(intermediate, hidden, bias=False)


class UnfusedExperts(nn.ModuleList):
    """`MixtralExperts`' computation over one module per expert (see the module doc)."""

    def __init__(self, config: MixtralConfig) -> None:
        if config.hidden_act != "silu":
            raise ValueError(f"unsupported expert activation {config.hidden_act!r}")
        super().__init__(
            _Expert(config.hidden_size, config.intermediate_size)
            for _ in range(config.num_local_experts)
        )
        self.act_fn = nn.SiLU()

    def forward(
        self, hidden_states: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor
    ) -> torch.Tensor:
        out = torch.zeros_like(hidden_states)
        for j, expert in enumerate(self):
            if not isinstance(expert, _Expert):
                continue
            token_idx, slot = torch.where(top_k_index == j)
            if token_idx.numel() == 0:
                if torch.is_grad_enabled() and expert.w1.weight.requires_grad:
                    # An expert no token chose still takes part in the graph (a zero
                    # gradient), or DDP would wait for its gradient forever.
                    out = out + 0.0 * sum(p.sum() for p in expert.parameters())
                continue
            x = hidden_states[token_idx]
            y = expert.w2(self.act_fn(expert.w1(x)) * expert.w3(x))
            y = y * top_k_weights[token_idx, slot, None]
            out.index_add_(0, token_idx, y.to(out.dtype))
        return out


def unfuse_experts(model: nn.Module, config: MixtralConfig) -> None:
    """Replace every layer's fused `mlp.experts` by `UnfusedExperts` (same device, no
    values: the caller initializes them)."""
    for layer in model.model.layers:  # type: ignore[union-attr]
        layer.mlp.experts = UnfusedExperts(config)


# `save_pretrained` writes a Mixtral layer's MoE block under its original prefix (it runs
# transformers' weight conversion backwards); the module is `mlp` in the model.
_SAVED_PREFIX, _MODEL_PREFIX = ".block_sparse_moe.", ".mlp."


def from_checkpoint_names(weights: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A `save_pretrained` folder's tensors under the model's parameter names."""
    return {k.replace(_SAVED_PREFIX, _MODEL_PREFIX): v for k, v in weights.items()}


def expert_names(names: Sequence[str], expert: int) -> list[str]:
    """The parameters of expert `expert`, in every layer."""
    marker = f".mlp.experts.{expert}."
    return sorted(n for n in names if marker in n)


def expert_usage(router_logits: Sequence[torch.Tensor], top_k: int) -> torch.Tensor:
    """``[layers, experts]``: each expert's share of a layer's routed token slots (rows sum
    to 1), from the per-layer router logits ``[tokens, experts]``."""
    rows = []
    for logits in router_logits:
        chosen = logits.detach().float().topk(top_k, dim=-1).indices.reshape(-1)
        counts = torch.bincount(chosen, minlength=logits.shape[-1]).float()
        rows.append(counts / counts.sum().clamp(min=1))
    return torch.stack(rows) if rows else torch.zeros(0, 0)
