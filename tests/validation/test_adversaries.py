"""Real trained Δ of several honest miners next to colluding copiers, a tiny free rider and a
miner that also trains on the public held-out split; then `tensormine pull` of θ_{w+1}."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM

from averaging.compression import encode
from store.manifest import Compression
from tensormine.cli import main as cli_main
from tests.validation.conftest import Subnet
from train.adversary import make_adversarial_delta
from train.cheats import backdate, peek_contributions
from train.windows import deadline, start_block
from validation.report import MinerRow
from validation.scoring import find_copies, flatten

Factory = Callable[..., Subnet]
HONEST = [f"honest-{i}" for i in range(4)]
COPIERS = [f"copier-{i}" for i in range(3)]


def test_colluders_free_riders_and_heldout_trainers_earn_nothing(
    subnet_factory: Factory, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    names = [*HONEST, *COPIERS, "free_rider", "heldout"]
    # E of 32 pages and 16 generic pages: the held-out check's noise shrinks with both.
    # One flagged window costs the credit here (the default forgives the first of a run of
    # flags, `scoring.heldout_outcome`): this test measures what the check detects.
    # The checks are statistical, so the keys (and with them the validator's secret and
    # every miner's pages) come from a fixed seed and the run is the same every time. With
    # random keys this test failed on noise in 4 of 22 runs over three windows and in 3 of
    # 26 over four: the held-out trainer slipped through 2 windows, an honest miner failed
    # the own-data check (or, once, was flagged by the held-out check in window 1), or the
    # copies' noise hid them from the copy check in window 4.
    net = subnet_factory(
        names,
        key_seed="adversaries",
        **{
            "validation.heldout_pages": 32,
            "validation.heldout_rival_pages": 16,
            "validation.heldout_rival_strikes": 1,
        },
    )
    net.tiny = 0.01  # the free rider trains, then publishes 1 % of its Δ
    uid = {name: net.uid(name) for name in names}
    validator = net.validator()
    reports = []
    caught = copies_found = 0
    credited = dict.fromkeys(HONEST, 0)

    def brief(rows: list[MinerRow]) -> list[tuple[object, ...]]:
        keys = ("uid", "verdict", "loss_delta", "own_t", "copy_of", "heldout_ratio", "heldout_t")
        return [tuple(getattr(r, k) for k in keys) for r in rows]

    # Four windows: more evidence per miner than three (a single window's verdict is noisy).
    for window in (1, 2, 3, 4):
        net.mine(window)
        net.to_deadline(window)
        reports.append(validator.process_window(window))
        rows = {r.uid: r for r in reports[-1].miners}
        # Honest miners trained from one θ_w are not copies of one another (real Δ) ...
        for name in HONEST:
            assert rows[uid[name]].copy_of is None, (window, name, rows[uid[name]])
        # ... while copies of the last honest Δ are found, however many collude, and earn
        # nothing. As training goes on the honest Δs align, what is left of honest-3's Δ
        # beyond their shared direction shrinks, and the copies' 30 % noise can push their
        # residual cosine under the threshold (seen in window 4, about one run in 14):
        # then the own-data check refuses them (they did not train on their pages).
        for name in COPIERS:
            row = rows[uid[name]]
            assert row.score == 0.0 and row.verdict in ("copy", "own_data"), (window, name, row)
            assert row.verdict != "copy" or row.copy_of == uid["honest-3"], (window, name, row)
        found = sum(rows[uid[name]].verdict == "copy" for name in COPIERS)
        copies_found += found
        if window < 4:
            assert found == len(COPIERS), (window, brief(reports[-1].miners))
        if found < len(COPIERS):
            continue
        # On the same real Δ: 1, 2 or 3 copiers among the 4 honest ones.
        deltas = {a.uid: flatten(a.delta) for a in validator.last_admitted.values()}
        for k in (1, 2):
            rows_k = [deltas[uid[n]] for n in HONEST + COPIERS[:k]]
            found = find_copies(rows_k, validator.vcfg.copy_threshold)
            assert {i: v.original for i, v in found.items()} == {4 + j: 3 for j in range(k)}
        heldout = rows[uid["heldout"]]
        caught += heldout.verdict in ("heldout_trained", "own_data")
        assert heldout.verdict != "heldout_trained" or heldout.score == 0.0
        for name in HONEST:
            credited[name] += rows[uid[name]].score > 0 or rows[uid[name]].verdict == "no_gain"
            assert rows[uid[name]].verdict not in ("copy", "heldout_trained"), (window, name)
    validator.close()
    # The held-out trainer (half its pages from the public held-out split) is refused
    # credit in most windows (the checks are statistical: in trials it slipped through
    # in about 1 window of 8, mostly the first, where from θ_0 every page gains alike).
    assert caught >= 2, [brief(r.miners) for r in reports]
    assert copies_found >= 3 * len(COPIERS), copies_found
    # The own-data check is statistical: an honest miner may fail it in a window (t < 1.5
    # about once in 30 of its windows here), never in most.
    assert min(credited.values()) >= 3, credited

    final = {r.uid: r for r in reports[-1].miners}
    honest_weights = [final[uid[n]].weight for n in HONEST]
    # Together the honest miners hold nearly all the weight. One of them may hold less: a
    # failed own-data check zeroes its score for a window in which the others' scores grew
    # (seen: 0.054 after window 3, back to 0.147 after window 4).
    assert sum(honest_weights) > 0.8 and min(honest_weights) > 0.1, honest_weights
    # A free rider's score is its (tiny) loss delta: ~1 % of an honest one's weight.
    assert final[uid["free_rider"]].weight < 0.05 * min(honest_weights)
    for name in COPIERS:
        assert final[uid[name]].weight == 0.0, name
    assert final[uid["heldout"]].weight < min(honest_weights)

    # The validator's θ_4 is fetched with `tensormine pull` and loads with transformers.
    target = tmp_path / "pulled"
    store_root = str(net.cfg.store.root)
    assert cli_main(["pull", store_root, "--window", "4", "--to", str(target)]) == 0
    assert "pulled window 4" in capsys.readouterr().out
    model = AutoModelForCausalLM.from_pretrained(str(target))
    assert model.config.num_hidden_layers == net.cfg.model.num_layers


def test_mixers_find_nothing_and_backdaters_are_late(subnet_factory: Factory) -> None:
    """Commit before reveal: while commitments are open no Δ of the window is readable
    (a mixer has nothing to mix in), and a copy taken once one is revealed can only be
    committed late, whatever its files' times say; the miner it copied keeps its score."""
    net = subnet_factory(["honest", "mixer", "backdater"])
    validator = net.validator()
    window = 1
    net.to_block(start_block(window, net.cfg.window))
    honest = net.miners["honest"]
    g = torch.Generator().manual_seed(1)
    delta = {n: 1e-3 * torch.randn(s, generator=g) for n, s in validator.shapes[0].items()}
    encoded = encode(delta, net.cfg.compression, None)
    how = Compression(scheme=net.cfg.compression.scheme, params=encoded.params)
    prepared = net.store.prepare_contribution(
        encoded.tensors, keypair=honest, uid=net.uid("honest"), window=window, shard=0,
        compression=how,
    )  # fmt: skip
    net.commit(honest, window, prepared.digest)
    head = net.ledger.block_number()
    mixer, backdater = net.miners["mixer"].address, net.miners["backdater"].address
    assert (
        peek_contributions(net.store, net.chain, window, 0, delta, mixer, until=head, poll_s=0.01)
        == []
    )
    assert make_adversarial_delta("mixer", delta, None, g).keys() == delta.keys()
    net.to_block(deadline(window, net.cfg.window))
    net.store.reveal_contribution(prepared)
    found = peek_contributions(
        net.store, net.chain, window, 0, delta, backdater, until=head, poll_s=0.01
    )
    assert len(found) == 1  # readable only now, after the deadline
    copy = make_adversarial_delta("backdater", delta, found[0], g)
    net.publish(net.miners["backdater"], net.uid("backdater"), window, 0, copy)
    ref = next(r for r in net.store.list_contributions(window) if r.hotkey == backdater)
    assert backdate(net.store, ref, net.chain, start_block(window, net.cfg.window))
    net.to_deadline(window)
    report = validator.process_window(window)
    validator.close()
    rows = {r.uid: r for r in report.miners}
    assert rows[net.uid("backdater")].reason == "late"
    assert rows[net.uid("mixer")].reason == "missing"
    assert rows[net.uid("honest")].status == "scored" and rows[net.uid("honest")].copy_of is None


def test_a_replay_of_the_last_windows_delta_earns_nothing(subnet_factory: Factory) -> None:
    """Commit before reveal rules out copying within a window, not replaying: a Δ that
    points the way a Δ of the last window did (rescaled here) is named as that one's copy."""
    net = subnet_factory(["honest", "replayer"], key_seed="replay")
    validator = net.validator()
    net.mine(1, ["honest"])
    old = {n: t.clone() for n, t in net.deltas["honest"].items()}
    net.to_deadline(1)
    validator.process_window(1)
    net.mine(2, ["honest"])
    net.publish(
        net.miners["replayer"], net.uid("replayer"), 2, 0, {n: 1.7 * t for n, t in old.items()}
    )
    net.to_deadline(2)
    report = validator.process_window(2)
    validator.close()
    rows = {r.uid: r for r in report.miners}
    replay = rows[net.uid("replayer")]
    assert replay.copy_of == net.uid("honest") and replay.score == 0.0
    assert replay.copy_cosine is not None and replay.copy_cosine > 0.99
    assert rows[net.uid("honest")].copy_of is None
