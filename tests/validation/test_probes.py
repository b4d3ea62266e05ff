"""Pages the validator draws, per-page losses, the in-place patch, the saved state."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from chain.keys import Keypair
from tensormine.config import load_config
from train.adversary import BEHAVIOURS, make_adversarial_delta, training_pages, training_rows
from train.inner import mean_loss
from train.model import build_model, model_fingerprint
from train.pages import assigned_pages
from train.shards import shard_map, shard_state
from validation.probes import (
    heldout_sample,
    own_data_pages,
    page_losses,
    patched_shard,
    read_secret_file,
    validator_secret,
)
from validation.scoring import cosine_matrix, flatten
from validation.state import StateError, ValidatorState, load_state, save_state

SMALL = [
    "model.hidden_size=32", "model.intermediate_size=64", "model.num_layers=2",
    "model.num_heads=2", "model.num_kv_heads=2", "model.vocab_size=300", "model.shards=2",
]  # fmt: skip


def test_secrets_differ_per_validator_and_never_equal_the_seed(tmp_path: Path) -> None:
    a, b = Keypair.generate(), Keypair.generate()
    sa, sb = validator_secret(a.seed), validator_secret(b.seed)
    assert sa != sb and sa != a.seed and validator_secret(a.seed) == sa
    ea, eb = heldout_sample(sa, 3, 500, 16), heldout_sample(sb, 3, 500, 16)
    assert set(ea.tolist()) != set(eb.tolist())
    assert set(heldout_sample(sa, 4, 500, 16).tolist()) != set(ea.tolist())
    path = tmp_path / "secret"
    path.write_text("ab" * 16)
    assert read_secret_file(path) == bytes([0xAB]) * 16
    path.write_text("abc")
    with pytest.raises(ValueError, match="hex"):
        read_secret_file(path)


def test_own_data_pages_pair_assigned_pages_with_unassigned_neighbours() -> None:
    secret, hotkey, n, per = b"s" * 32, "5Hotkey", 1000, 32
    assignment = assigned_pages(hotkey, 5, 0, n, per)
    steps = [0, 1, 2]
    assigned, control = own_data_pages(secret, hotkey, 5, 0, n, per, 8, batch_size=4, steps=steps)
    assert len(assigned) == len(control) == 8
    assert set(assigned.tolist()) <= set(assignment[:12].tolist())  # pages of steps 0–2
    assert not set(control.tolist()) & set(assignment.tolist())
    assert all(abs(int(a) - int(c)) == 1 for a, c in zip(assigned, control, strict=True))
    again = own_data_pages(secret, hotkey, 5, 0, n, per, 8, batch_size=4, steps=steps)
    assert all(np.array_equal(x, y) for x, y in zip(again, (assigned, control), strict=True))
    other = own_data_pages(b"t" * 32, hotkey, 5, 0, n, per, 8, batch_size=4, steps=steps)
    assert not np.array_equal(other[0], assigned)
    # Both neighbours assigned: the control comes from the unassigned pages instead.
    _, dense_c = own_data_pages(secret, hotkey, 0, 0, 40, 38, 10)
    assert not set(dense_c.tolist()) & set(assigned_pages(hotkey, 0, 0, 40, 38).tolist())
    assert own_data_pages(secret, hotkey, 5, 0, n, per, 0)[0].size == 0


def test_page_losses_and_the_in_place_patch() -> None:
    cfg = load_config(None, SMALL)
    model = build_model(cfg.model, 0)
    ids = torch.randint(0, 300, (6, 16), generator=torch.Generator().manual_seed(0))
    losses = page_losses(model, ids, batch=4)
    assert losses.shape == (6,)
    assert float(losses.mean()) == pytest.approx(mean_loss(model, ids, batch=3), rel=1e-5)
    names = shard_map(model, 2)[1]
    theta = shard_state(model, names)
    before = model_fingerprint(model.state_dict())
    delta = {n: torch.full_like(t, 0.01) for n, t in theta.items()}
    with patched_shard(model, names, theta, delta, lr=0.5):
        params = dict(model.named_parameters())
        for n in names:
            assert torch.allclose(params[n].detach(), theta[n] - 0.005)
        patched = page_losses(model, ids)
    assert not torch.equal(patched, losses)
    assert model_fingerprint(model.state_dict()) == before  # restored bit for bit


def test_state_round_trip_and_shape_check(tmp_path: Path) -> None:
    cfg = load_config(None, SMALL)
    model = build_model(cfg.model, 0)
    theta = model.state_dict()
    shapes = {k: tuple(v.shape) for k, v in theta.items()}
    assert load_state(tmp_path, shapes) is None
    name = next(iter(shapes))
    state = ValidatorState(window=4, ema={3: 0.25, 7: 0.0}, hotkeys={3: "a", 7: "b"})
    save_state(tmp_path, state, theta, {name: torch.ones(shapes[name])})
    state.window, state.ema = 5, {3: 0.5}
    save_state(tmp_path, state, theta, {})
    (tmp_path / ".window-9.partial").mkdir()  # a save killed halfway is ignored
    loaded = load_state(tmp_path, shapes)
    assert loaded is not None
    assert loaded.state.window == 5 and loaded.state.ema == {3: 0.5}
    assert loaded.state.hotkeys == {3: "a", 7: "b"} and loaded.momentum == {}
    assert model_fingerprint(loaded.theta) == model_fingerprint(theta)
    assert [p.name for p in tmp_path.glob("window-*")] == ["window-5"]
    with pytest.raises(StateError, match="does not fit"):
        load_state(tmp_path, {**shapes, name: (1, 2)})


def test_adversarial_deltas() -> None:
    g = torch.Generator().manual_seed(0)
    honest = {"a": torch.randn(40, 50, generator=g), "b": torch.randn(50, generator=g)}
    other = {"a": torch.randn(40, 50, generator=g), "b": torch.randn(50, generator=g)}
    rng = torch.Generator().manual_seed(1)
    assert all(torch.equal(t, honest[n]) for n, t in
               make_adversarial_delta("honest", honest, None, rng).items())  # fmt: skip
    free = make_adversarial_delta("free_rider", honest, None, rng)
    assert all(float(t.abs().max()) == 0.0 for t in free.values())
    noise = make_adversarial_delta("noise", honest, None, rng)
    for n, t in noise.items():
        assert float(t.norm()) == pytest.approx(float(honest[n].norm()), rel=1e-5)
    assert abs(float(cosine_matrix(torch.stack([flatten(noise), flatten(honest)]))[0, 1])) < 0.2
    copy = make_adversarial_delta("copier", honest, other, rng)
    cos = float(cosine_matrix(torch.stack([flatten(copy), flatten(other)]))[0, 1])
    assert cos == pytest.approx(1 / (1 + 0.3**2) ** 0.5, abs=0.01)  # the noise's cost
    with pytest.raises(ValueError, match="copier needs"):
        make_adversarial_delta("copier", honest, None, rng)
    with pytest.raises(ValueError, match="unknown behaviour"):
        make_adversarial_delta("lazy", honest, None, rng)
    assert set(BEHAVIOURS) == {
        "honest", "free_rider", "noise", "copier", "wrong_data", "heldout", "mixer", "backdater",
        "poisoner",
    }  # fmt: skip
    # A mixer adds the others' mean to its own (its own alone when it could read none);
    # a backdater publishes an exact copy.
    mixed = make_adversarial_delta("mixer", honest, other, rng)
    assert all(torch.equal(mixed[n], honest[n] + other[n]) for n in honest)
    alone = make_adversarial_delta("mixer", honest, None, rng)
    assert all(torch.equal(alone[n], honest[n]) for n in honest)
    copied = make_adversarial_delta("backdater", honest, other, rng)
    assert all(torch.equal(copied[n], other[n]) for n in honest)
    wrong = training_pages("wrong_data", "5Key", 2, 0, 500, 32)
    assert len(wrong) == 32
    assert not set(wrong.tolist()) & set(assigned_pages("5Key", 2, 0, 500, 32).tolist())
    assert np.array_equal(
        training_pages("honest", "5Key", 2, 0, 500, 32), assigned_pages("5Key", 2, 0, 500, 32)
    )
    # `heldout` trains every other step-page on a public held-out page instead (or all).
    train = np.arange(500)[:, None] * np.ones((1, 4), dtype=np.int64)
    heldout = -1 - np.arange(60)[:, None] * np.ones((1, 4), dtype=np.int64)
    rows = training_rows("heldout", "5Key", 2, 0, train, heldout, 32)
    mine = assigned_pages("5Key", 2, 0, 500, 32)
    assert np.array_equal(rows[0::2, 0], mine[0::2]) and (rows[1::2] < 0).all()
    assert (training_rows("heldout", "5Key", 2, 0, train, heldout, 32, heldout_share=1.0) < 0).all()
    assert np.array_equal(training_rows("honest", "5Key", 2, 0, train, heldout, 32)[:, 0], mine)
    assert np.array_equal(make_adversarial_delta("heldout", honest, None, rng)["b"], honest["b"])


def test_own_data_strikes_survive_a_restart(tmp_path: Path) -> None:
    state = ValidatorState(
        window=4, ema={3: 0.5}, hotkeys={3: "a"}, own_strikes={3: 1}, heldout_flags={3: 2}
    )
    save_state(tmp_path, state, {}, {})
    loaded = load_state(tmp_path, {})
    assert loaded is not None and loaded.state.own_strikes == {3: 1}
    assert loaded.state.heldout_flags == {3: 2}
    # A snapshot written before strikes existed loads with none.
    body = state.to_json()
    del body["own_strikes"], body["heldout_flags"]
    old = ValidatorState.from_json(body)
    assert old.own_strikes == {} and old.heldout_flags == {}
