"""Mixture of experts (`train.moe`, ``arch: mixtral``): unfused experts compute what
transformers' fused Mixtral computes, checkpoints load in plain transformers, experts are
shards, the inner loop trains one expert group only and reports routing health."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from accelerate import Accelerator
from pydantic import ValidationError
from transformers import AutoModelForCausalLM

from averaging.compression import encode
from averaging.config import CompressionConfig
from chain.keys import Keypair
from store import Store, StoreConfig, open_store
from store.errors import Rejected
from store.manifest import Compression
from train.config import ModelConfig, TrainConfig
from train.inner import inner_loop
from train.model import build_model, model_fingerprint
from train.moe import expert_names, expert_usage
from train.shards import make_trainable, param_shapes, shard_map
from train.startup import load_checkpoint_weights
from validation.admission import payload_specs

MOE = ModelConfig(
    arch="mixtral", vocab_size=320, hidden_size=32, intermediate_size=48, num_layers=2,
    num_heads=4, num_kv_heads=2, max_seq_len=64, num_experts=4, experts_per_token=2,
)  # fmt: skip


def pages(n: int, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, MOE.vocab_size, (n, 24), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("shards", [1, 2, 3, 5])
def test_the_shard_map_covers_every_parameter_once(shards: int) -> None:
    shapes = param_shapes(MOE.model_copy(update={"shards": shards}))
    groups = shard_map(shapes, shards)
    flat = [n for g in groups for n in g]
    assert sorted(flat) == sorted(shapes) and len(flat) == len(set(flat))
    assert len(groups) == shards
    if shards == 1:
        return
    # Shard 0: everything that is no expert (routers included); then equal expert groups.
    assert not [n for n in groups[0] if ".mlp.experts." in n]
    assert {f"model.layers.{i}.mlp.gate.weight" for i in range(2)} <= set(groups[0])
    per = MOE.num_experts // (shards - 1)
    for g, group in enumerate(groups[1:]):
        experts = range(g * per, (g + 1) * per)
        assert group == sorted(n for j in experts for n in expert_names(list(shapes), j))
        assert len(group) == per * MOE.num_layers * 3  # w1, w2, w3 in every layer


def test_shards_must_split_the_experts_evenly() -> None:
    with pytest.raises(ValidationError, match="must divide num_experts"):
        ModelConfig.model_validate(MOE.model_dump() | {"shards": 4})
    with pytest.raises(ValidationError, match="experts_per_token"):
        ModelConfig.model_validate(MOE.model_dump() | {"experts_per_token": 5})
    with pytest.raises(ValueError, match="must divide the 4 experts"):
        shard_map(param_shapes(MOE), 4)


def test_a_checkpoint_loads_in_plain_transformers_and_generates(tmp_path: Path) -> None:
    model = build_model(MOE, seed=3).eval()
    ids = pages(2, seed=1)
    with torch.no_grad():
        ours = model(input_ids=ids).logits
    model.save_pretrained(tmp_path)
    plain = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    # transformers' own Mixtral, experts fused into 3-D tensors by its weight conversion.
    assert type(plain).__name__ == "MixtralForCausalLM"
    names = [n for n, _ in plain.named_parameters()]
    assert "model.layers.0.mlp.experts.gate_up_proj" in names
    with torch.no_grad():
        theirs = plain(input_ids=ids).logits
    torch.testing.assert_close(theirs, ours, rtol=0, atol=1e-6)
    out = plain.generate(ids[:, :5], max_new_tokens=6, do_sample=False)
    assert out.shape == (2, 11)
    # And back into a tensormine model under its own names, bit for bit.
    again = build_model(MOE, seed=99)
    again.load_state_dict(load_checkpoint_weights(tmp_path))
    assert model_fingerprint(again.state_dict()) == model_fingerprint(model.state_dict())


def test_a_miner_of_expert_k_changes_only_expert_ks_tensors() -> None:
    cfg = MOE.model_copy(update={"shards": 3})
    model = build_model(cfg, seed=0)
    groups = shard_map(model, 3)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    make_trainable(model, groups[2])  # experts 2 and 3
    train = TrainConfig(inner_steps=3, batch_size=4, warmup_steps=0, lr=1e-2)
    stats = inner_loop(Accelerator(cpu=True), model, groups[2], pages(12), train)
    moved = {n for n, p in model.named_parameters() if not torch.equal(p.detach(), before[n])}
    assert moved == set(groups[2])
    # Routing health came back with the stats: every step's aux loss, and per layer each
    # expert's share of the routed slots (rows sum to 1).
    assert all(s.aux_loss is not None and s.aux_loss > 0 for s in stats.steps)
    usage = stats.expert_usage
    assert usage is not None and usage.shape == (2, 4)
    torch.testing.assert_close(usage.sum(dim=1), torch.ones(2))


def test_the_shared_shard_trains_the_router_with_the_balancing_loss() -> None:
    model = build_model(MOE.model_copy(update={"shards": 2}), seed=0)
    groups = shard_map(model, 2)
    router = "model.layers.0.mlp.gate.weight"
    before = dict(model.named_parameters())[router].detach().clone()
    make_trainable(model, groups[0])
    inner_loop(
        Accelerator(cpu=True), model, groups[0], pages(4),
        TrainConfig(inner_steps=1, batch_size=4, warmup_steps=0, lr=1e-2),
    )  # fmt: skip
    assert not torch.equal(dict(model.named_parameters())[router].detach(), before)
    # The loss the inner loop minimizes is the LM loss plus coef × aux, transformers' own.
    model.eval()
    ids = pages(2, seed=5)
    with torch.no_grad():
        plain = model(input_ids=ids, labels=ids)
        routed = model(input_ids=ids, labels=ids, output_router_logits=True)
    expected = plain.loss + MOE.router_aux_loss_coef * routed.aux_loss
    torch.testing.assert_close(routed.loss, expected)


def test_expert_usage_by_hand() -> None:
    # 3 tokens, 4 experts, top-2: choices {0, 1}, {0, 2}, {3, 0}.
    logits = torch.tensor([[5.0, 4, 0, 0], [5.0, 0, 4, 0], [4.0, 0, 0, 5]])
    usage = expert_usage([logits, logits.flip(1)], top_k=2)
    assert usage[0].tolist() == pytest.approx([3 / 6, 1 / 6, 1 / 6, 1 / 6])
    assert usage[1].tolist() == pytest.approx([1 / 6, 1 / 6, 1 / 6, 3 / 6])


def test_a_delta_for_an_expert_shard_with_another_experts_tensors_is_refused_by_name(
    tmp_path: Path,
) -> None:
    shapes = param_shapes(MOE.model_copy(update={"shards": 5}))
    groups = shard_map(shapes, 5)
    shard_shapes = {n: shapes[n][0] for n in groups[1]}  # expert 0
    # Expert 1's tensors (right shapes, right count) sent as shard 1, which is expert 0's.
    wrong = {
        n.replace(".experts.0.", ".experts.1."): torch.ones(s) for n, s in shard_shapes.items()
    }
    store: Store = open_store(StoreConfig(root=tmp_path / "store"))
    miner = Keypair.generate()
    compression = CompressionConfig(scheme="int8")
    encoded = encode(wrong, compression)
    ref = store.publish_contribution(
        encoded.tensors, keypair=miner, uid=1, window=0, shard=1,
        compression=Compression(scheme="int8", params=encoded.params),
    )  # fmt: skip
    expected = payload_specs(shard_shapes, encoded.params)
    with pytest.raises(Rejected) as err:
        store.load_contribution(
            ref, hotkey=miner.address, uid=1, window=0, shard=1, expected=expected
        )
    assert err.value.reason == "name_mismatch"
    assert "experts.0" in err.value.detail and "experts.1" in err.value.detail
