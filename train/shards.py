"""Model shards: the parameters split into `S` contiguous groups of whole layers (or, for a
mixture of experts, the shared parameters and groups of experts).

    from train.shards import shard_map, shard_for_miner, make_trainable, shard_state

    shards = shard_map(model, cfg.model.shards)         # list of S lists of parameter names
    s = shard_for_miner(uid, miner_uids, window, cfg.model.shards)
    make_trainable(model, shards[s])                     # everything else is frozen
    theta_w = shard_state(model, shards[s])              # fp32 clones, for Δ = θ_w − θ
    ...                                                  # H inner steps
    apply_to_shard(model, shards[s], new_values)         # after the outer step

A validator that holds no model gets the same map from the config alone:
`shard_map(param_shapes(cfg.model), S)` (built on the `meta` device, no memory).

**Units.** The model is cut only between units, in this order: `[embed_tokens]`,
`[layer 0]`, …, `[layer L-1]`, `[final norm + lm_head]`; a unit is never split.

**Balancing rule.** The `L + 2` units are split into `S` non-empty contiguous groups that
(1) minimise the largest group's parameter count, then (2) among those, minimise the sum
of the squared group sizes (so the other groups are as even as they can be), with a
fixed tie-break (the last group starts as early as possible, recursively). The result is
a pure function of the units' sizes and `S`, so every process computes the same map; no
group exceeds `total / S + largest unit`. Names inside a group are sorted.

**Experts as shards** (``arch: mixtral``, `train.moe`). A mixture of experts is cut along
its experts instead: shard 0 holds every shared parameter (embeddings, attention, norms,
routers, head) and shards 1 … S − 1 hold equal contiguous groups of experts, each expert
with its tensors in every layer (shard g + 1 holds experts g·E/(S−1) … (g+1)·E/(S−1) − 1).
A miner of an expert shard keeps and moves only those experts' optimizer state and Δ;
the router that picks them is shared. S = 1 is the whole model, as for a dense one.

**Assignment.** `shard_for_miner` ranks the miner UIDs (sorted, so every process agrees)
and gives rank `r` the shard `(r + window) mod S`: each shard gets ⌊M/S⌋ or ⌈M/S⌉ of the
`M` miners, and every miner visits every shard over `S` consecutive windows. A mixture of
experts with more shards than miners keeps its shared shard trained every window
(`shard_for_miner`'s `shared`); the expert shards take turns.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import torch
from torch import nn

from train.config import ModelConfig
from train.model import build_model

logger = logging.getLogger(__name__)

ParamShapes = dict[str, tuple[tuple[int, ...], torch.dtype]]

_LAYER = re.compile(r"^model\.layers\.(\d+)\.")
_EXPERT = re.compile(r"^model\.layers\.\d+\.mlp\.experts\.(\d+)\.")
_EMBED_PREFIX = "model.embed_tokens."
_HEAD_PREFIXES = ("model.norm.", "lm_head.")


def param_shapes(cfg: ModelConfig) -> ParamShapes:
    """Every parameter's `(shape, dtype)` for `cfg`, in model order, without allocating."""
    model = build_model(cfg, seed=0, device="meta")
    return {name: (tuple(p.shape), p.dtype) for name, p in model.named_parameters()}


def _numel(value: Any) -> int:
    if isinstance(value, torch.Tensor):
        return value.numel()
    if isinstance(value, tuple) and len(value) == 2 and isinstance(value[1], torch.dtype):
        value = value[0]
    dims = [int(d) for d in value]
    if any(d < 0 for d in dims):
        raise ValueError(f"negative dimension in shape {dims}")
    count = 1
    for d in dims:
        count *= d
    return count


def _sizes(source: nn.Module | ModelConfig | Mapping[str, Any]) -> dict[str, int]:
    if isinstance(source, ModelConfig):
        source = param_shapes(source)
    if isinstance(source, nn.Module):
        return {name: p.numel() for name, p in source.named_parameters()}
    return {name: _numel(value) for name, value in source.items()}


def shard_units(names: Iterable[str]) -> list[list[str]]:
    """The names grouped into units: embeddings, each layer in order, final norm + head."""
    embed: list[str] = []
    head: list[str] = []
    layers: dict[int, list[str]] = {}
    for name in names:
        match = _LAYER.match(name)
        if match:
            layers.setdefault(int(match.group(1)), []).append(name)
        elif name.startswith(_EMBED_PREFIX):
            embed.append(name)
        elif name.startswith(_HEAD_PREFIXES):
            head.append(name)
        else:
            raise ValueError(f"parameter {name!r} belongs to no unit (not a Llama parameter?)")
    if sorted(layers) != list(range(len(layers))):
        raise ValueError(f"layer indices are not 0..L-1: {sorted(layers)}")
    units = [embed] + [layers[i] for i in range(len(layers))] + [head]
    return [sorted(u) for u in units if u]


def _min_max(weights: Sequence[int], groups: int) -> int:
    """The smallest possible largest-group sum over contiguous splits into `groups`."""
    n = len(weights)
    prefix = [0]
    for w in weights:
        prefix.append(prefix[-1] + w)
    inf = float("inf")
    best: list[float] = [0.0] + [inf] * n
    for s in range(1, groups + 1):
        nxt = [inf] * (n + 1)
        for i in range(s, n + 1):
            for j in range(s - 1, i):
                nxt[i] = min(nxt[i], max(best[j], prefix[i] - prefix[j]))
        best = nxt
    return int(best[n])


def _split(weights: Sequence[int], groups: int) -> list[int]:
    """Group start indices: min-max first, then min sum of squares (see the module doc)."""
    n = len(weights)
    cap = _min_max(weights, groups)
    prefix = [0]
    for w in weights:
        prefix.append(prefix[-1] + w)
    inf = float("inf")
    cost: list[list[float]] = [[inf] * (n + 1) for _ in range(groups + 1)]
    start: list[list[int]] = [[-1] * (n + 1) for _ in range(groups + 1)]
    cost[0][0] = 0.0
    for s in range(1, groups + 1):
        for i in range(s, n + 1):
            for j in range(s - 1, i):
                size = prefix[i] - prefix[j]
                if size > cap or cost[s - 1][j] == inf:
                    continue
                # Integer-valued floats below 2^53 stay exact for any realistic model.
                candidate = cost[s - 1][j] + float(size) * float(size)
                if candidate < cost[s][i]:
                    cost[s][i], start[s][i] = candidate, j
    starts: list[int] = []
    i = n
    for s in range(groups, 0, -1):
        i = start[s][i]
        starts.append(i)
    return starts[::-1]


def shard_map(source: nn.Module | ModelConfig | Mapping[str, Any], shards: int) -> list[list[str]]:
    """`shards` lists of parameter names: contiguous whole-layer groups balanced by size.

    `source` is the model, its `ModelConfig`, or a mapping of parameter name to shape,
    `(shape, dtype)` (as `param_shapes` gives) or tensor. Every parameter is in exactly
    one shard; `shards = 1` is the whole model.
    """
    sizes = _sizes(source)
    experts = _experts(sizes)
    if experts and shards > 1:
        return _expert_map(sizes, experts, shards)
    units = shard_units(sizes)
    if not 1 <= shards <= len(units):
        raise ValueError(f"shards must be in 1..{len(units)} (the model's units), got {shards}")
    weights = [sum(sizes[n] for n in unit) for unit in units]
    starts = [*_split(weights, shards), len(units)]
    result = [
        [name for unit in units[starts[k] : starts[k + 1]] for name in unit] for k in range(shards)
    ]
    logger.debug(
        "shard sizes for S=%d: %s", shards, [sum(sizes[n] for n in group) for group in result]
    )
    return result


def _experts(names: Iterable[str]) -> dict[int, list[str]]:
    """Expert index -> its parameters (every layer), for a model with unfused experts."""
    out: dict[int, list[str]] = {}
    for name in names:
        match = _EXPERT.match(name)
        if match:
            out.setdefault(int(match.group(1)), []).append(name)
    return out


def _expert_map(
    sizes: Mapping[str, int], experts: Mapping[int, list[str]], shards: int
) -> list[list[str]]:
    count = len(experts)
    if sorted(experts) != list(range(count)):
        raise ValueError(f"expert indices are not 0..E-1: {sorted(experts)}")
    groups = shards - 1
    if count % groups:
        raise ValueError(
            f"shards {shards}: the shared shard plus {groups} expert groups, which must "
            f"divide the {count} experts"
        )
    per = count // groups
    owned = {n for names in experts.values() for n in names}
    result = [sorted(n for n in sizes if n not in owned)]
    for g in range(groups):
        result.append(sorted(n for j in range(g * per, (g + 1) * per) for n in experts[j]))
    logger.debug(
        "expert shard sizes for S=%d: %s", shards, [sum(sizes[n] for n in grp) for grp in result]
    )
    return result


def shard_labels(cfg: ModelConfig) -> list[str]:
    """A short name per shard for reports and views: for a mixture of experts "shared" and
    "experts a–b"; for a dense model "shard k"."""
    if cfg.expert_shards:
        per = cfg.num_experts // (cfg.shards - 1)
        return ["shared"] + [
            f"expert {g * per}" if per == 1 else f"experts {g * per}–{(g + 1) * per - 1}"
            for g in range(cfg.shards - 1)
        ]
    return [f"shard {k}" for k in range(cfg.shards)]


def holds_head(names: Iterable[str]) -> bool:
    """Whether a shard of these parameter names holds the LM head (`lm_head.*`; the
    embeddings are a tensor of their own, `train.model`). Only such a shard's Δ shows the
    validator's own-data check clearly that its miner trained on its pages: a Δ of
    experts alone moves the loss of pages it saw barely more than that of pages it did
    not, and one of inner layers only somewhat (benchmarks/RESULTS.md, "Experts as
    shards against dense": median own-data t at 8 pairs ≈ 1 for expert groups, 1.3–2.4
    for inner-layer shards with a damped outer step and under 0.7 without, 2.2–2.5 for the
    head's shard, 2.8–3.2 for an MoE's shared shard)."""
    return any(name.startswith("lm_head.") for name in names)


def is_expert_shard(cfg: ModelConfig, shard: int) -> bool:
    """Whether `shard` holds experts alone (shards 1 … S − 1 of a sharded mixture)."""
    return cfg.expert_shards and shard > 0


def shard_for_miner(
    uid: int, miner_uids: Sequence[int], window: int, shards: int, *, shared: bool = False
) -> int:
    """The shard miner `uid` trains in `window`: `(rank of uid among miner_uids + window) mod S`.

    With `shared` (`ModelConfig.expert_shards`: the shared parameters of a mixture of
    experts, which every expert's tokens pass through) and 2 ≤ `M` < S miners, shard 0 is
    never left out.
    Windows come in blocks of `M`; in window `b·M + p` rank `p` trains shard 0 and the
    other ranks, in order after it (j = 0 … M − 2), take shards `1 + (j + b·(M − 1)) mod
    (S − 1)`: `M − 1` distinct expert shards, the next `M − 1` in the next block. So each
    expert shard is trained in (M − 1)/(S − 1) of the windows and every miner visits every
    shard. (A lone miner still rotates over all shards: it would never train an expert.)
    """
    if shards < 1:
        raise ValueError(f"shards must be at least 1, got {shards}")
    if window < 0:
        raise ValueError(f"window must be non-negative, got {window}")
    ranked = sorted(set(miner_uids))
    try:
        rank = ranked.index(uid)
    except ValueError:
        raise ValueError(f"UID {uid} is not among the {len(ranked)} miners") from None
    miners = len(ranked)
    if not shared or shards <= miners or miners < 2:
        return (rank + window) % shards
    block, lead = divmod(window, miners)
    if rank == lead:
        return 0
    return 1 + ((rank - lead - 1) % miners + block * (miners - 1)) % (shards - 1)


def trained_shards(
    miner_uids: Sequence[int], window: int, shards: int, *, shared: bool = False
) -> set[int]:
    """The shards some miner trains in `window` (all of them unless S > miners)."""
    return {
        shard_for_miner(uid, miner_uids, window, shards, shared=shared) for uid in set(miner_uids)
    }


def _params(model: nn.Module, names: Sequence[str]) -> dict[str, nn.Parameter]:
    by_name = dict(model.named_parameters())
    missing = [n for n in names if n not in by_name]
    if missing:
        raise KeyError(
            f"not parameters of the model: {missing[:5]}{' …' if len(missing) > 5 else ''}"
        )
    if len(set(names)) != len(names):
        raise ValueError("shard names repeat")
    return by_name


def make_trainable(model: nn.Module, names: Sequence[str]) -> None:
    """`requires_grad` for the shard's parameters only; frozen ones also lose any `.grad`."""
    by_name = _params(model, names)
    wanted = set(names)
    for name, param in by_name.items():
        param.requires_grad_(name in wanted)
        if name not in wanted:
            param.grad = None


def shard_state(model: nn.Module, names: Sequence[str]) -> dict[str, torch.Tensor]:
    """Detached fp32 copies of the shard's parameters, on the parameters' device."""
    by_name = _params(model, names)
    return {n: by_name[n].detach().to(dtype=torch.float32, copy=True) for n in names}


def apply_to_shard(
    model: nn.Module, names: Sequence[str], tensors: Mapping[str, torch.Tensor]
) -> None:
    """Load `tensors` into the shard's parameters (cast to their dtype and device).

    Raises ValueError, before changing anything, when the names differ from the shard's,
    a shape differs, a tensor is not floating point or holds a non-finite value.
    """
    by_name = _params(model, names)
    if set(tensors) != set(names):
        missing = sorted(set(names) - set(tensors))[:5]
        extra = sorted(set(tensors) - set(names))[:5]
        raise ValueError(f"tensors do not match the shard: missing {missing}, unexpected {extra}")
    for name in names:
        value, param = tensors[name], by_name[name]
        if tuple(value.shape) != tuple(param.shape):
            raise ValueError(f"{name}: shape {tuple(value.shape)}, expected {tuple(param.shape)}")
        if not value.is_floating_point():
            raise ValueError(f"{name}: dtype {value.dtype} is not floating point")
        if not bool(torch.isfinite(value).all()):
            raise ValueError(f"{name}: holds non-finite values")
    with torch.no_grad():
        for name in names:
            by_name[name].copy_(tensors[name].to(by_name[name].device, by_name[name].dtype))
