"""The inner loop of DiLoCo (arXiv 2311.08105): H AdamW steps on one shard, via accelerate.

    stats = inner_loop(accelerator, model, names, pages, cfg.train)

`model` is the full causal LM (the forward pass needs every layer); only the parameters
in `names` (the miner's shard) are trainable, so AdamW's moments and the gradients cover
the shard alone. `pages` holds this window's assigned pages in the order the steps use
them: step h takes pages [h·B, (h+1)·B) of the global batch B = `cfg.batch_size`; with
several processes each takes its contiguous slice of that batch and accelerate wraps the
model in DDP, which averages the gradients, so the result does not depend on how many
processes a miner runs (up to float reduction order).

The schedule restarts every window because AdamW's moments do: linear warm-up for
`warmup_steps`, then cosine decay to `min_lr_ratio · lr` at step H.
"""

from __future__ import annotations

import contextlib
import logging
import math
import time
from collections.abc import Callable, Collection, Mapping, Sequence
from dataclasses import dataclass, field

import torch
from accelerate import Accelerator
from torch import nn

from train.config import TrainConfig
from train.moe import expert_usage
from train.trajectory import BoundaryHook, load_moments, read_moments

logger = logging.getLogger(__name__)


@dataclass
class StepStats:
    step: int
    loss: float
    lr: float
    grad_norm: float
    tokens: int  # tokens this step consumed on all processes
    seconds: float
    aux_loss: float | None = None  # mixture of experts: the load-balancing term (unweighted)


@dataclass
class InnerStats:
    steps: list[StepStats] = field(default_factory=list)
    # Mixture of experts: [layers, experts] share of routed token slots per expert, summed
    # over the steps of this process (`train.moe.expert_usage`); None for a dense model.
    usage_sum: torch.Tensor | None = None

    @property
    def expert_usage(self) -> torch.Tensor | None:
        """Each expert's share of its layer's routed token slots over the steps."""
        if self.usage_sum is None or not self.steps:
            return None
        return self.usage_sum / len(self.steps)

    @property
    def tokens(self) -> int:
        return sum(s.tokens for s in self.steps)

    @property
    def seconds(self) -> float:
        return sum(s.seconds for s in self.steps)

    @property
    def tokens_per_second(self) -> float:
        return self.tokens / self.seconds if self.seconds > 0 else 0.0

    @property
    def mean_loss(self) -> float:
        return sum(s.loss for s in self.steps) / max(1, len(self.steps))


def lr_at(step: int, cfg: TrainConfig) -> float:
    """Learning rate of inner step `step` (0-based) within a window."""
    if cfg.warmup_steps and step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    span = max(1, cfg.inner_steps - cfg.warmup_steps)
    progress = min(1.0, (step - cfg.warmup_steps) / span)
    floor = cfg.min_lr_ratio
    return cfg.lr * (floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * progress)))


def make_optimizer(params: Sequence[nn.Parameter], cfg: TrainConfig) -> torch.optim.AdamW:
    """AdamW over the shard; no weight decay on vectors (norms), as is usual for LMs."""
    decay = [p for p in params if p.ndim >= 2]
    no_decay = [p for p in params if p.ndim < 2]
    groups = [
        {"params": decay, "weight_decay": cfg.weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]
    return torch.optim.AdamW(
        [g for g in groups if g["params"]], lr=cfg.lr, betas=(cfg.beta1, cfg.beta2)
    )


def process_slice(batch: int, accelerator: Accelerator) -> slice:
    """This process's contiguous part of a global batch of `batch` pages."""
    world, rank = accelerator.num_processes, accelerator.process_index
    if batch % world:
        raise ValueError(f"train.batch_size {batch} is not divisible by {world} processes")
    per = batch // world
    return slice(rank * per, (rank + 1) * per)


def inner_loop(
    accelerator: Accelerator,
    model: nn.Module,
    trainable: Sequence[str],
    pages: torch.Tensor,
    cfg: TrainConfig,
    *,
    on_step: Callable[[StepStats], None] | None = None,
    start_step: int = 0,
    stop_step: int | None = None,
    moments: Mapping[str, torch.Tensor] | None = None,
    boundaries: Collection[int] = (),
    on_boundary: BoundaryHook | None = None,
    release: bool = True,
) -> InnerStats:
    """Train `trainable` parameters for H steps on `pages` [H·B, seq_len]; returns stats.

    The caller has already frozen everything outside `trainable`. A part of the window
    runs steps [`start_step`, `stop_step`) from AdamW `moments` (``name::exp_avg`` and
    ``name::exp_avg_sq``, `train.trajectory`) as they were after `start_step` steps: what
    a validator recomputes of a miner's trajectory. After each step that ends at one of
    `boundaries`, `on_boundary(step, params, moments)` gets the shard's state there.
    With `release`, the accelerator forgets the model and optimizer at the end
    (`free_memory`, which also runs a full garbage collection: ~0.3 s in a big process);
    a caller that drops a single-use accelerator instead passes False.
    """
    stop = cfg.inner_steps if stop_step is None else stop_step
    if not 0 <= start_step < stop <= cfg.inner_steps:
        raise ValueError(f"steps [{start_step}, {stop}) are not within H = {cfg.inner_steps}")
    if (start_step > 0) != (moments is not None):
        raise ValueError("moments are given exactly when starting after step 0")
    needed = stop * cfg.batch_size
    if pages.ndim != 2 or pages.shape[0] < needed:
        raise ValueError(
            f"need {needed} pages for {cfg.inner_steps} steps, got {tuple(pages.shape)}"
        )
    by_name = dict(model.named_parameters())
    params = [by_name[n] for n in trainable]
    if any(not p.requires_grad for p in params):
        raise ValueError("every parameter of the shard must be trainable")
    optimizer = make_optimizer(params, cfg)
    shard = dict(zip(trainable, params, strict=True))
    if moments is not None:
        load_moments(optimizer, shard, moments, start_step)
    wrapped, optimizer = accelerator.prepare(model, optimizer)
    wrapped.train()
    mine = process_slice(cfg.batch_size, accelerator)
    micro = (mine.stop - mine.start) // cfg.grad_accum
    if micro == 0:
        raise ValueError(
            f"train.batch_size {cfg.batch_size} over {accelerator.num_processes} processes "
            f"is smaller than train.grad_accum {cfg.grad_accum}"
        )
    stats = InnerStats()
    device = accelerator.device
    # A mixture of experts returns its router logits, and transformers adds the weighted
    # load-balancing loss to `.loss` (`train.moe`); evaluation elsewhere stays plain LM loss.
    moe = getattr(getattr(model, "config", None), "model_type", None) == "mixtral"
    extra = {"output_router_logits": True} if moe else {}
    top_k = int(getattr(getattr(model, "config", None), "num_experts_per_tok", 1))
    try:
        for step in range(start_step, stop):
            started = time.perf_counter()
            lr = lr_at(step, cfg)
            for group in optimizer.param_groups:
                group["lr"] = lr
            batch = pages[step * cfg.batch_size : (step + 1) * cfg.batch_size][mine]
            total = torch.zeros((), device=device)
            aux = torch.zeros((), device=device)
            for k in range(cfg.grad_accum):
                ids = batch[k * micro : (k + 1) * micro].to(device, dtype=torch.long)
                # DDP syncs gradients only on the last micro-batch of the step.
                with (
                    accelerator.no_sync(wrapped)
                    if k < cfg.grad_accum - 1
                    else contextlib.nullcontext()
                ):
                    with accelerator.autocast():
                        out = wrapped(input_ids=ids, labels=ids, **extra)
                        loss = out.loss / cfg.grad_accum
                    accelerator.backward(loss)
                total += loss.detach()
                if moe:
                    aux += out.aux_loss.detach() / cfg.grad_accum
                    usage = expert_usage(out.router_logits, top_k)
                    part = usage / cfg.grad_accum
                    stats.usage_sum = part if stats.usage_sum is None else stats.usage_sum + part
            norm = accelerator.clip_grad_norm_(params, cfg.grad_clip)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            mean_loss = accelerator.reduce(total, reduction="mean")
            stat = StepStats(
                step=step,
                loss=float(mean_loss),
                lr=lr,
                grad_norm=float(norm) if norm is not None else float("nan"),
                tokens=cfg.batch_size * pages.shape[1],
                seconds=time.perf_counter() - started,
                aux_loss=float(accelerator.reduce(aux, reduction="mean")) if moe else None,
            )
            stats.steps.append(stat)
            if not math.isfinite(stat.loss):
                raise FloatingPointError(
                    f"inner step {step}: loss is {stat.loss}; lower train.lr ({cfg.lr})"
                )
            if on_step is not None:
                on_step(stat)
            if on_boundary is not None and step + 1 in boundaries:
                on_boundary(step + 1, shard, read_moments(optimizer, shard))
    finally:
        # Forget the DDP wrapper and optimizer so the next window can pick another shard.
        if release:
            accelerator.free_memory()
    return stats


@torch.no_grad()
def mean_loss(
    model: nn.Module, pages: torch.Tensor, *, batch: int = 8, device: torch.device | None = None
) -> float:
    """Mean next-token loss of `model` over `pages` (every page weighs the same)."""
    was_training = model.training
    model.eval()
    device = device or next(model.parameters()).device
    total, count = 0.0, 0
    for start in range(0, pages.shape[0], batch):
        ids = pages[start : start + batch].to(device, dtype=torch.long)
        loss = model(input_ids=ids, labels=ids).loss
        total += float(loss) * ids.shape[0]
        count += ids.shape[0]
    model.train(was_training)
    return total / max(1, count)
