"""The inner loop against closed forms and a hand-written reference loop."""

from __future__ import annotations

import math

import pytest
import torch
from accelerate import Accelerator
from transformers import LlamaConfig, LlamaForCausalLM

from train.config import TrainConfig
from train.inner import inner_loop, lr_at, mean_loss


def tiny(seed: int = 0) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    cfg = LlamaConfig(
        vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=32,
        tie_word_embeddings=False,
    )  # fmt: skip
    return LlamaForCausalLM(cfg)


def test_schedule_warmup_then_cosine() -> None:
    cfg = TrainConfig(inner_steps=10, warmup_steps=2, lr=1.0, min_lr_ratio=0.1)
    assert lr_at(0, cfg) == pytest.approx(0.5)
    assert lr_at(1, cfg) == pytest.approx(1.0)
    assert lr_at(2, cfg) == pytest.approx(1.0)  # cosine starts at the peak
    # Halfway through the decay: floor + (1 - floor)/2.
    assert lr_at(6, cfg) == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 0.5)))
    assert lr_at(10, cfg) == pytest.approx(0.1)


def test_only_the_shard_moves_and_matches_a_plain_loop() -> None:
    cfg = TrainConfig(inner_steps=4, batch_size=4, warmup_steps=1, lr=3e-3, grad_clip=1.0)
    pages = torch.randint(0, 64, (16, 16), generator=torch.Generator().manual_seed(1))
    shard = [n for n, _ in tiny().named_parameters() if n.startswith("model.layers.1.")]

    model = tiny()
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    for n, p in model.named_parameters():
        p.requires_grad_(n in shard)
    stats = inner_loop(Accelerator(cpu=True), model, shard, pages, cfg)
    for n, p in model.named_parameters():
        moved = not torch.equal(p.detach(), before[n])
        assert moved == (n in shard), n
        assert p.grad is None

    # An independent plain PyTorch loop with the same schedule gives the same weights.
    ref = tiny()
    for n, p in ref.named_parameters():
        p.requires_grad_(n in shard)
    params = [p for n, p in ref.named_parameters() if n in shard]
    decay = [p for p in params if p.ndim >= 2]
    rest = [p for p in params if p.ndim < 2]
    groups = [
        {"params": decay, "weight_decay": cfg.weight_decay},
        {"params": rest, "weight_decay": 0.0},
    ]
    opt = torch.optim.AdamW(groups, lr=cfg.lr, betas=(cfg.beta1, cfg.beta2))
    losses = []
    for step in range(cfg.inner_steps):
        for g in opt.param_groups:
            g["lr"] = lr_at(step, cfg)
        ids = pages[step * 4 : (step + 1) * 4].long()
        loss = ref(input_ids=ids, labels=ids).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip)
        opt.step()
        opt.zero_grad()
        losses.append(float(loss.detach()))
    for (n, p), (_, q) in zip(model.named_parameters(), ref.named_parameters(), strict=True):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6, msg=n)
    assert [s.loss for s in stats.steps] == pytest.approx(losses, rel=1e-5)
    assert stats.tokens == 4 * 4 * 16


def test_grad_accumulation_is_the_same_batch() -> None:
    pages = torch.randint(0, 64, (8, 16), generator=torch.Generator().manual_seed(2))
    names = [n for n, _ in tiny().named_parameters()]
    results = []
    for accum in (1, 2):
        model = tiny()
        cfg = TrainConfig(inner_steps=2, batch_size=4, grad_accum=accum, warmup_steps=0)
        inner_loop(Accelerator(cpu=True), model, names, pages, cfg)
        results.append([p.detach().clone() for p in model.parameters()])
    for a, b in zip(*results, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)


def test_loss_falls_on_repeated_data() -> None:
    pages = torch.randint(0, 64, (4, 16), generator=torch.Generator().manual_seed(3)).repeat(8, 1)
    model = tiny()
    names = [n for n, _ in model.named_parameters()]
    before = mean_loss(model, pages[:4])
    cfg = TrainConfig(inner_steps=8, batch_size=4, lr=1e-2, warmup_steps=1)
    inner_loop(Accelerator(cpu=True), model, names, pages, cfg)
    assert mean_loss(model, pages[:4]) < before - 0.5


def test_bad_input() -> None:
    model = tiny()
    names = [n for n, _ in model.named_parameters()]
    cfg = TrainConfig(inner_steps=4, batch_size=4)
    with pytest.raises(ValueError, match="need 16 pages"):
        inner_loop(Accelerator(cpu=True), model, names, torch.zeros(8, 16, dtype=torch.long), cfg)
    for n, p in model.named_parameters():
        p.requires_grad_(n != names[0])
    with pytest.raises(ValueError, match="trainable"):
        inner_loop(Accelerator(cpu=True), model, names, torch.zeros(16, 16, dtype=torch.long), cfg)
    with pytest.raises(ValueError, match="grad_accum"):
        bad = TrainConfig(inner_steps=1, batch_size=2, grad_accum=4)
        inner_loop(
            Accelerator(cpu=True), model, names[1:], torch.zeros(2, 16, dtype=torch.long), bad
        )
