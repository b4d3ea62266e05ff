"""The DiLoCo outer optimizer: Nesterov SGD on the averaged pseudo-gradient.

DiLoCo (Douillard et al., arXiv 2311.08105), Algorithm 1: each of the k workers starts
window w from θ_w (`θ^(t-1)` in the paper), takes H inner AdamW steps to θ_i, and sends
the pseudo-gradient ("outer gradient") Δ_i = θ_w − θ_i. The outer optimizer treats the
mean Δ = (1/k) Σ Δ_i as a gradient and takes one step of SGD with Nesterov momentum, which
is exactly `torch.optim.SGD(lr, momentum=μ, nesterov=True, dampening=0)` with grad = Δ:

    b ← μ·b + Δ                      (b = 0 before the first step)
    u = Δ + μ·b   (nesterov)   or   u = b   (plain momentum)
    θ_{w+1} = θ_w − lr·u

The paper's defaults are lr = 0.7, μ = 0.9 (`OuterConfig`).

    from averaging.outer import mean_delta, outer_step, save_outer_state, load_outer_state

    delta = mean_delta([delta_0, delta_1, delta_2])          # dicts name -> tensor
    theta, momentum = outer_step(theta, delta, momentum, cfg.outer)
    save_outer_state(path, momentum)                          # safetensors, never pickle
    momentum = load_outer_state(path, {n: t.shape for n, t in theta.items()})

Everything here works on plain `dict[str, Tensor]` (no model objects) and never mutates
its inputs: `outer_step` returns new tensors. A name missing from `momentum` starts at
b = 0, so the first step needs `momentum = {}`.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from averaging.config import OuterConfig
from common.errors import TensormineError

logger = logging.getLogger(__name__)

OUTER_STATE_FORMAT = "tensormine-outer-state/1"


class OuterStateError(TensormineError, ValueError):
    """An outer-optimizer state file or argument does not fit the model."""


def mean_delta(deltas: Sequence[Mapping[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """The mean pseudo-gradient Δ = (1/k) Σ Δ_i, in fp32; every Δ_i needs the same names."""
    if not deltas:
        raise ValueError("mean_delta needs at least one pseudo-gradient")
    names = set(deltas[0])
    for i, delta in enumerate(deltas):
        if set(delta) != names:
            raise ValueError(f"pseudo-gradient {i} has other names than pseudo-gradient 0")
    out: dict[str, torch.Tensor] = {}
    for name in deltas[0]:
        total = torch.zeros_like(deltas[0][name], dtype=torch.float32)
        for delta in deltas:
            if delta[name].shape != total.shape:
                raise ValueError(f"{name}: shapes differ between pseudo-gradients")
            total += delta[name].to(torch.float32)
        out[name] = total / len(deltas)
    return out


def outer_step(
    params: Mapping[str, torch.Tensor],
    delta: Mapping[str, torch.Tensor],
    momentum: Mapping[str, torch.Tensor],
    cfg: OuterConfig,
) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """One outer step: returns `(θ_{w+1}, b)`, new tensors; the inputs are left untouched.

    `params` is θ_w and `delta` the (mean) pseudo-gradient over the same names; `momentum`
    holds b for a subset of them (absent = 0). Arithmetic is fp32; θ_{w+1} gets each
    parameter's dtype back, b stays fp32.
    """
    if set(delta) != set(params):
        missing = sorted(set(params) - set(delta))[:5]
        extra = sorted(set(delta) - set(params))[:5]
        raise OuterStateError(
            f"pseudo-gradient names differ from the parameters': missing {missing}, "
            f"unexpected {extra}"
        )
    unknown = sorted(set(momentum) - set(params))
    if unknown:
        raise OuterStateError(f"momentum for names that are not parameters: {unknown[:5]}")
    mu = cfg.momentum
    new_params: dict[str, torch.Tensor] = {}
    new_momentum: dict[str, torch.Tensor] = {}
    for name, theta in params.items():
        grad = delta[name].to(device=theta.device, dtype=torch.float32)
        if grad.shape != theta.shape:
            raise OuterStateError(
                f"{name}: pseudo-gradient shape {tuple(grad.shape)} != {tuple(theta.shape)}"
            )
        if name in momentum:
            buf = momentum[name].to(device=theta.device, dtype=torch.float32)
            if buf.shape != theta.shape:
                raise OuterStateError(
                    f"{name}: momentum shape {tuple(buf.shape)} != {tuple(theta.shape)}"
                )
            # The same operations as torch.optim.SGD, so the results agree bit for bit.
            buf = buf.mul(mu).add_(grad)
        else:
            buf = grad.clone()
        update = grad.add(buf, alpha=mu) if cfg.nesterov else buf
        new_params[name] = theta.to(torch.float32).add(update, alpha=-cfg.lr).to(theta.dtype)
        new_momentum[name] = buf
    return new_params, new_momentum


def save_outer_state(path: str | Path, momentum: Mapping[str, torch.Tensor]) -> None:
    """Write the momentum buffers to `path` as safetensors (fp32), atomically."""
    path = Path(path)
    tensors = {n: t.detach().to("cpu", torch.float32).contiguous() for n, t in momentum.items()}
    tmp = path.with_name(f".{path.name}.partial")
    save_file(tensors, str(tmp), metadata={"format": OUTER_STATE_FORMAT})
    tmp.replace(path)
    logger.debug("saved outer state for %d tensors to %s", len(tensors), path)


def load_outer_state(
    path: str | Path, expected_shapes: Mapping[str, Sequence[int]]
) -> dict[str, torch.Tensor]:
    """Read momentum buffers saved by `save_outer_state`, checked against the model.

    Every stored name must be in `expected_shapes` with that shape (a subset is fine: a
    miner only holds momentum for the shards it trained), fp32 and finite; anything else
    raises `OuterStateError`. A missing file raises `FileNotFoundError`.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no outer state file")
    try:
        tensors = load_file(str(path))
    except (SafetensorError, OSError) as exc:
        raise OuterStateError(f"{path}: not a readable safetensors file: {exc}") from None
    unknown = sorted(set(tensors) - set(expected_shapes))
    if unknown:
        raise OuterStateError(f"{path}: tensors the model does not have: {unknown[:5]}")
    for name, tensor in tensors.items():
        expected = tuple(int(d) for d in expected_shapes[name])
        if tuple(tensor.shape) != expected:
            raise OuterStateError(
                f"{path}: {name} has shape {tuple(tensor.shape)}, the model's is {expected}"
            )
        if tensor.dtype != torch.float32:
            raise OuterStateError(f"{path}: {name} is {tensor.dtype}, expected torch.float32")
        if not bool(torch.isfinite(tensor).all()):
            raise OuterStateError(f"{path}: {name} holds non-finite values")
    return tensors
