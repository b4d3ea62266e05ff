"""Shards: units, the balancing rule against brute force, assignment, frozen parameters."""

from __future__ import annotations

import itertools
from collections import Counter

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from train.config import ModelConfig
from train.model import build_model
from train.shards import (
    apply_to_shard,
    holds_head,
    make_trainable,
    param_shapes,
    shard_for_miner,
    shard_map,
    shard_state,
    shard_units,
    trained_shards,
)

CFG = ModelConfig(
    vocab_size=512, hidden_size=64, intermediate_size=176, num_layers=6, num_heads=4,
    num_kv_heads=2, max_seq_len=32,
)  # fmt: skip


@pytest.fixture(scope="module")
def model() -> torch.nn.Module:
    return build_model(CFG, seed=0)


def synthetic(sizes: list[int]) -> dict[str, tuple[int, ...]]:
    """A Llama-named parameter mapping whose units have the given sizes."""
    shapes: dict[str, tuple[int, ...]] = {"model.embed_tokens.weight": (sizes[0],)}
    for i, size in enumerate(sizes[1:-1]):
        shapes[f"model.layers.{i}.mlp.up_proj.weight"] = (size,)
    shapes["lm_head.weight"] = (sizes[-1],)
    return shapes


def test_units_are_embeddings_layers_in_order_then_head(model: torch.nn.Module) -> None:
    names = [n for n, _ in model.named_parameters()]
    units = shard_units(reversed(names))  # input order does not matter
    assert units[0] == ["model.embed_tokens.weight"]
    assert units[-1] == ["lm_head.weight", "model.norm.weight"]
    assert len(units) == CFG.num_layers + 2
    for i, unit in enumerate(units[1:-1]):
        assert all(n.startswith(f"model.layers.{i}.") for n in unit)
        assert len(unit) == 9
    with pytest.raises(ValueError, match="no unit"):
        shard_units(["model.rotary_emb.weight"])


@pytest.mark.parametrize("shards", range(1, CFG.num_layers + 3))
def test_every_parameter_in_exactly_one_contiguous_shard(
    model: torch.nn.Module, shards: int
) -> None:
    groups = shard_map(model, shards)
    assert len(groups) == shards and all(groups)
    flat = [n for g in groups for n in g]
    assert sorted(flat) == sorted(n for n, _ in model.named_parameters())
    assert len(flat) == len(set(flat))
    units = shard_units(flat)
    assert flat == [n for u in units for n in u]  # groups follow the unit order
    # The same map from the model, its config, or shapes alone (what a validator has).
    assert groups == shard_map(param_shapes(CFG), shards) == shard_map(CFG, shards)
    sizes = [sum(model.get_parameter(n).numel() for n in g) for g in groups]
    largest_unit = max(sum(model.get_parameter(n).numel() for n in u) for u in units)
    assert max(sizes) <= sum(sizes) / shards + largest_unit


def test_shard_count_is_checked(model: torch.nn.Module) -> None:
    (whole,) = shard_map(model, 1)
    assert sorted(whole) == sorted(n for n, _ in model.named_parameters())
    with pytest.raises(ValueError, match="shards must be in"):
        shard_map(model, CFG.num_layers + 3)
    with pytest.raises(ValueError, match="shards must be in"):
        shard_map(model, 0)


@settings(max_examples=150, deadline=None)
@given(st.lists(st.integers(1, 60), min_size=2, max_size=8), st.integers(1, 8))
def test_balancing_rule_matches_brute_force(sizes: list[int], shards: int) -> None:
    shards = min(shards, len(sizes))
    groups = shard_map(synthetic(sizes), shards)
    got = [sum(synthetic(sizes)[n][0] for n in g) for g in groups]
    best: tuple[int, int] | None = None
    for cuts in itertools.combinations(range(1, len(sizes)), shards - 1):
        bounds = [0, *cuts, len(sizes)]
        split = [sum(sizes[a:b]) for a, b in itertools.pairwise(bounds)]
        key = (max(split), sum(s * s for s in split))
        best = key if best is None else min(best, key)
    assert (max(got), sum(s * s for s in got)) == best


def test_miner_assignment_is_balanced_and_rotates() -> None:
    miners = [42, 7, 19, 3, 88, 51, 23]
    for shards in (1, 2, 3, 4, 7):
        for window in range(10):
            counts = Counter(shard_for_miner(u, miners, window, shards) for u in miners)
            assert set(counts) <= set(range(shards))
            assert max(counts.values()) - min(counts.values()) <= 1
            assert sum(counts.values()) == len(miners)
            if shards <= len(miners):
                assert len(counts) == shards
        for uid in miners:  # every miner visits every shard over S windows
            assert {shard_for_miner(uid, miners, w, shards) for w in range(shards)} == set(
                range(shards)
            )
    # Sorted ranks: the list's order (and duplicates) do not matter.
    assert shard_for_miner(19, miners, 5, 3) == shard_for_miner(19, sorted(miners * 2), 5, 3)
    assert shard_for_miner(3, miners, 0, 4) == 0 and shard_for_miner(7, miners, 0, 4) == 1
    with pytest.raises(ValueError, match="not among"):
        shard_for_miner(5, miners, 0, 2)
    with pytest.raises(ValueError):
        shard_for_miner(7, miners, -1, 2)


def _adam_state_bytes(shards: int, index: int) -> int:
    model = build_model(CFG, seed=0)
    names = shard_map(model, shards)[index]
    make_trainable(model, names)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-3)
    ids = torch.randint(0, CFG.vocab_size, (2, 16), generator=torch.Generator().manual_seed(0))
    model(input_ids=ids, labels=ids).loss.backward()
    for name, p in model.named_parameters():
        assert (p.grad is not None) == (name in names), name  # frozen: no .grad
    opt.step()
    return sum(
        t.numel() * t.element_size()
        for state in opt.state.values()
        for key, t in state.items()
        if key in ("exp_avg", "exp_avg_sq")
    )


def test_optimizer_state_shrinks_by_about_the_shard_count() -> None:
    full = _adam_state_bytes(1, 0)
    parts = [_adam_state_bytes(4, k) for k in range(4)]
    assert sum(parts) == full
    units = shard_units(param_shapes(CFG))
    shapes = param_shapes(CFG)
    largest = max(sum(torch.Size(shapes[n][0]).numel() for n in u) for u in units)
    total = sum(torch.Size(s).numel() for s, _ in shapes.values())
    for part in parts:
        assert abs(part / full - 0.25) <= largest / total, (parts, full)


def test_shard_state_and_apply_round_trip(model: torch.nn.Module) -> None:
    names = shard_map(model, 3)[1]
    state = shard_state(model, names)
    assert set(state) == set(names)
    for name, t in state.items():
        p = model.get_parameter(name)
        assert t.dtype == torch.float32 and not t.requires_grad
        assert torch.equal(t, p.detach()) and t.data_ptr() != p.data_ptr()
    doubled = {n: t * 2 for n, t in state.items()}
    apply_to_shard(model, names, doubled)
    for name in names:
        assert torch.equal(model.get_parameter(name).detach(), doubled[name])
    apply_to_shard(model, names, state)
    assert torch.equal(model.get_parameter(names[0]).detach(), state[names[0]])


@pytest.mark.parametrize("fault", ["missing", "extra", "shape", "int", "nan"])
def test_apply_rejects_bad_tensors_without_changing_anything(
    model: torch.nn.Module, fault: str
) -> None:
    names = shard_map(model, 3)[2]
    before = shard_state(model, names)
    bad = {n: t + 1 for n, t in before.items()}
    first = names[0]
    if fault == "missing":
        del bad[first]
    elif fault == "extra":
        bad["model.layers.0.mlp.up_proj.weight"] = torch.zeros(CFG.intermediate_size, 64)
    elif fault == "shape":
        bad[first] = bad[first].reshape(1, -1)
    elif fault == "int":
        bad[first] = bad[first].to(torch.int64)
    else:
        bad[first][0] = float("nan")
    with pytest.raises(ValueError):
        apply_to_shard(model, names, bad)
    for name in names:
        assert torch.equal(model.get_parameter(name).detach(), before[name]), name


def test_make_trainable_rejects_unknown_names(model: torch.nn.Module) -> None:
    with pytest.raises(KeyError):
        make_trainable(model, ["model.layers.99.mlp.up_proj.weight"])


def test_only_the_last_layer_shard_or_the_shared_shard_holds_the_head(
    model: torch.nn.Module,
) -> None:
    """The own-data check trusts only shards with the LM head (`holds_head`): the last of
    a dense model's layer shards, the shared shard of a mixture of experts."""
    for shards in (1, 2, 4):
        held = [holds_head(names) for names in shard_map(model, shards)]
        assert held == [False] * (shards - 1) + [True], shards
    moe = CFG.model_copy(
        update={"arch": "mixtral", "num_experts": 4, "experts_per_token": 2, "shards": 3}
    )
    assert [holds_head(names) for names in shard_map(moe, 3)] == [True, False, False]


def test_trained_shards_are_those_some_miner_holds() -> None:
    # Ranks 0, 1, 2 (UIDs 2, 5, 9) take shards (r + w) mod S.
    assert trained_shards([5, 9, 2], window=1, shards=5) == {1, 2, 3}
    assert trained_shards([5, 9, 2], window=4, shards=5) == {4, 0, 1}
    assert trained_shards([5, 9, 2, 7], window=0, shards=2) == {0, 1}


def test_an_moe_keeps_its_shared_shard_trained_with_fewer_miners_than_shards() -> None:
    for n_miners in (2, 3, 4, 6):
        miners = [10 * i + 3 for i in range(n_miners)]
        for shards in range(n_miners + 1, n_miners + 5):
            experts = shards - 1
            seen: Counter[int] = Counter()
            for window in range(experts * n_miners):
                got = [shard_for_miner(u, miners, window, shards, shared=True) for u in miners]
                # Shard 0 every window, by one miner; the others on distinct expert shards.
                assert got.count(0) == 1 and len(set(got)) == n_miners, (window, got)
                assert trained_shards(miners, window, shards, shared=True) == set(got)
                seen.update(got)
            # Expert shards take equal turns: (M − 1)/(S − 1) of the windows each.
            windows = experts * n_miners
            assert {seen[k] for k in range(1, shards)} == {windows * (n_miners - 1) // experts}
            for uid in miners:  # and every miner visits every shard
                visits = {
                    shard_for_miner(uid, miners, w, shards, shared=True) for w in range(windows)
                }
                assert visits == set(range(shards))
    # Enough miners, or a lone one: the plain rotation.
    for window in range(6):
        for uid in (3, 13, 23):
            plain = shard_for_miner(uid, [3, 13, 23], window, 3)
            assert shard_for_miner(uid, [3, 13, 23], window, 3, shared=True) == plain
        assert shard_for_miner(3, [3], window, 5, shared=True) == window % 5
