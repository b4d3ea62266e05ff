"""Proof of work against a real ledger and store: honest miners pass every spot check,
each cheat of `tests.validation.work` fails its checks and earns nothing."""

from __future__ import annotations

import time
from collections.abc import Callable

import numpy as np
import pytest
import torch

from store.proofs import Answer, Challenge, SegmentAnswer, sign_message
from tests.validation.conftest import Subnet
from tests.validation.work import POW_BEHAVIOURS
from train.overlap import start_for
from train.pages import assigned_pages
from train.windows import deadline
from validation.admission import Admitted
from validation.proof_of_work import Issued

Factory = Callable[..., Subnet]
CHEATS = ("scaled2", "scaled4", "unassigned", "fabricator", "silent")
EXPECTED = {
    "scaled2": "recompute",
    "scaled4": "recompute",
    "unassigned": "recompute",
    "fabricator": "state_mismatch",
    "silent": "unanswered",
}
WORK = {
    "train.pow_segments": 4,
    "validation.pow_checks": 4,  # every segment: a cheat is caught in every window
    "validation.pow_answer_s": 3,  # the silent miner is waited for this long
    # The statistical checks are tested elsewhere; off here, they leave the loss delta.
    "validation.own_data_pairs": 0,
    "validation.heldout_rival_pages": 0,
}


@pytest.mark.parametrize(("seed", "windows"), [("work-a", 2), ("work-b", 1), ("work-c", 1)])
def test_honest_miners_pass_and_every_cheat_fails(
    subnet_factory: Factory, seed: str, windows: int
) -> None:
    net = subnet_factory(list(POW_BEHAVIOURS), key_seed=seed, **WORK)
    uids = {name: net.uid(name) for name in POW_BEHAVIOURS}
    validator = net.validator()
    for window in range(1, windows + 1):
        net.mine(window)
        net.to_deadline(window)
        report = validator.process_window(window)
        rows = {r.uid: r for r in report.miners}
        for name in ("honest", "honest1t"):
            row = rows[uids[name]]
            assert row.pow == "pass", (name, row.pow, row.pow_detail)
            # Proof of work gates, usefulness ranks: a pass keeps the loss-delta score.
            assert row.score == row.loss_delta and row.score > 0, row
        for name in CHEATS:
            row = rows[uids[name]]
            assert row.pow == f"fail: {EXPECTED[name]}", (name, row.pow, row.pow_detail)
            assert row.score == 0.0 and row.ema == 0.0 and row.weight == 0.0
    validator.close()


def test_expert_miners_with_affinity_are_recomputed_on_their_affine_pages(
    subnet_factory: Factory,
) -> None:
    """A mixture of experts with `data.expert_affinity`: a miner of an expert shard trains
    on pages drawn mostly from its group's topics, and the validator's recomputation takes
    the same pages (it passes); one that trains on other pages fails. Its own-data gap is
    measured, but proof of work decides (`scoring.OWN_POW`)."""
    moe = {
        "model.arch": "mixtral", "model.num_experts": 4, "model.experts_per_token": 2,
        "model.intermediate_size": 88, "model.shards": 3, "data.expert_affinity": 0.75,
    }  # fmt: skip
    # The own-data pairs on: an expert group's is measured but proof of work decides.
    work = {**WORK, "validation.own_data_pairs": 8}
    net = subnet_factory(["honest", "honest1t", "unassigned"], key_seed="affine", **work, **moe)
    validator = net.validator()
    assert sorted(validator.affinities) == [1, 2]
    for window in (1, 2):
        net.mine(window)
        net.to_deadline(window)
        roster = validator.roster(window)
        report = validator.process_window(window)
        rows = {r.uid: r for r in report.miners}
        experts = 0
        for name in ("honest", "honest1t"):
            uid = net.uid(name)
            shard = roster.shard_of(uid)
            assert rows[uid].pow == "pass", (name, shard, rows[uid].pow, rows[uid].pow_detail)
            assert (rows[uid].own_outcome == "pow") == (shard > 0), (shard, rows[uid])
            if shard > 0:
                assert rows[uid].own_t is not None and rows[uid].own_ok
                experts += 1
                affinity = validator.affinities[shard]
                order = assigned_pages(
                    net.miners[name].address, window, net.cfg.run.seed,
                    validator.pages.train.shape[0], net.cfg.train.pages_per_window, affinity,
                )  # fmt: skip
                assert np.isin(order, affinity.pool).sum() == affinity.split(order.size)
        assert experts >= 1  # with 3 miners and S = 3 some honest miner holds experts
        cheat = rows[net.uid("unassigned")]
        assert cheat.pow == "fail: recompute" and cheat.score == 0.0, cheat
    validator.close()


def test_layer_shards_without_the_head_are_judged_by_proof_of_work(
    subnet_factory: Factory,
) -> None:
    """A dense model in two layer shards: the own-data gap is measured for both, but only
    the shard with the LM head is judged by it; the other one's verdict is proof of
    work's (`train.shards.holds_head`), so its honest miner is paid."""
    work = {**WORK, "validation.own_data_pairs": 8, "model.shards": 2}
    net = subnet_factory(["honest", "honest1t"], key_seed="layers", **work)
    validator = net.validator()
    head = [s for s, names in enumerate(validator.shards) if "lm_head.weight" in names]
    assert head == [1]
    net.mine(1)
    net.to_deadline(1)
    roster = validator.roster(1)
    rows = {r.uid: r for r in validator.process_window(1).miners}
    validator.close()
    shards = {
        roster.shard_of(net.uid(name)): rows[net.uid(name)] for name in ("honest", "honest1t")
    }
    assert sorted(shards) == [0, 1]
    assert shards[0].own_outcome == "pow" and shards[0].own_t is not None, shards[0]
    assert shards[0].pow == "pass" and shards[0].score > 0, shards[0]
    assert shards[1].own_outcome != "pow" and shards[1].own_t is not None, shards[1]


def test_answers_for_another_window_or_other_segments_are_refused(
    subnet_factory: Factory,
) -> None:
    net = subnet_factory(["honest"], key_seed="answers", **WORK)
    validator = net.validator()
    kp, me = net.miners["honest"], validator.keypair.address
    admitted = Admitted(
        uid=net.uid("honest"), hotkey=kp.address, shard=0, delta={}, committed_block=0, nbytes=0
    )
    challenge = Challenge(
        window=2, miner=kp.address, validator=me, segments=(1,), block=1, block_hash="0" * 64
    )
    seg = SegmentAnswer(index=1, file="segment-1.safetensors", size=0, end_moments="0" * 64)
    for window, segments, reason in ((3, (seg,), "wrong_window"), (2, (seg, seg), "bad_answer")):
        answer = sign_message(
            Answer(window=window, miner=kp.address, validator=me, segments=segments), kp
        )
        verdict = validator.checker._check(2, Issued(admitted, challenge), answer, {})
        assert not verdict.ok and verdict.reason == reason, verdict
    validator.close()


def test_an_eager_miner_is_checked_from_its_own_start(subnet_factory: Factory) -> None:
    """With `averaging.overlap: eager` a miner trains window w from θ_w with its own Δ of
    w − 1 stepped in (`train.overlap.start_for`): checked from that start its trajectory
    passes; checked from θ_w, as if it had started there, it does not."""
    net = subnet_factory(["honest"], key_seed="eager", **WORK)
    validator = net.validator()
    window = 1
    theta = net.theta(window)
    names = validator.shards[0]
    g = torch.Generator().manual_seed(5)
    earlier = {n: 2e-2 * torch.randn(theta[n].shape, generator=g) for n in names}
    start = dict(start_for(theta, earlier, {}, net.cfg.outer))
    assert any(not torch.equal(start[n], theta[n]) for n in names)
    net.starts["honest"] = start
    net.mine(window)
    net.to_deadline(window)
    _, _, admitted, refused = validator.admit(window, validator.roster(window))
    assert len(admitted) == 1 and not refused, refused
    due = net.ledger.block(deadline(window, net.cfg.window))
    assert due is not None
    issued = validator.checker.issue(window, admitted, block=due.number, block_hash=due.hash)
    until = time.monotonic() + 20
    uid = admitted[0].uid
    ours = validator.checker.settle(window, issued, theta, until=until, start_of=lambda a: start)
    assert ours[uid].ok, ours[uid]
    naive = validator.checker.settle(window, issued, theta, until=until)
    assert not naive[uid].ok and naive[uid].reason in ("recompute", "end_mismatch"), naive[uid]
    validator.close()
