"""A validator under `averaging.overlap`: θ_{w+1} steps window w − 1's average.

Miners publish their wire parts (int8) in-process; no group meets, so the validator
rebuilds each average from the admitted parts, as it does for a group it missed. The
checkpoint of w+1 must be outer(θ_w, average of w − 1) — named with window w − 1's
contributors — and `tensormine verify` must recompute it bit for bit; a validator that
starts (or restarts) without window w − 1's inputs reads them back from the store.
"""

from __future__ import annotations

import signal
import subprocess
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager

import torch

from averaging.outer import outer_step
from averaging.parts import reduce_parts
from tests.validation.conftest import Subnet
from train.windows import start_block, window_of
from validation.validator import Validator
from validation.verify import IDENTICAL, verify_window

Factory = Callable[..., Subnet]
OVERLAP = {
    "averaging.enabled": True,
    "averaging.wire": "int8",
    "averaging.overlap": "delayed",
    "validation.own_data_pairs": 0,
    "validation.heldout_rival_pages": 0,
    "averaging.state_timeout_s": 1,  # no miner offers its state here
}


@contextmanager
def producing(net: Subnet) -> Iterator[None]:
    """Blocks made by a `chain run` process meanwhile: a validator's seat commits its DHT
    address on the ledger when it starts and waits for the block that takes it."""
    proc = subprocess.Popen(
        [sys.executable, "-m", "tensormine.cli", "chain", "run", "--db", str(net.cfg.chain.db)],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    try:
        yield
    finally:
        proc.send_signal(signal.SIGINT)
        proc.wait(timeout=20)


def seated_validator(net: Subnet) -> Validator:
    with producing(net):
        validator = net.validator()
    net._pages_owner = validator  # type: ignore[attr-defined]  # `mine` reads its pages
    return validator


def test_the_published_model_lands_the_previous_windows_average(subnet_factory: Factory) -> None:
    net = subnet_factory(["honest", "honest-b"], key_seed="overlap", **OVERLAP)
    validator = seated_validator(net)
    try:
        check_overlap(net, validator)
    finally:
        validator.close()


def check_overlap(net: Subnet, validator: Validator) -> None:
    uids = {net.uid("honest"), net.uid("honest-b")}
    # The blocks made while the seat joined are past; nobody committed to any window yet.
    w = window_of(net.ledger.block_number(), net.cfg.window) + 1
    # The run's first window: nothing of w − 1 to land, θ_{w+1} = θ_w.
    net.mine(w)
    net.to_deadline(w)
    theta_w = net.theta(w)
    report = validator.process_window(w)
    assert report.published == f"window-{w + 1}" and report.averaged_window == w - 1
    assert report.admitted == 2 and report.sources == {}, [
        (m.reason, m.detail) for m in report.miners
    ]
    theta_1 = net.theta(w + 1)
    assert all(torch.equal(theta_1[n], theta_w[n]) for n in theta_w)
    first = {a.hotkey: a for a in validator.last_admitted.values()}

    # The next window lands the first one's average: θ_{w+2} = outer(θ_{w+1}, A_w), by
    # window w's members.
    net.mine(w + 1)
    net.to_deadline(w + 1)
    report = validator.process_window(w + 1)
    assert report.averaged_window == w and report.sources == {"shard0": "store"}
    names = validator.shards[0]
    rows = [first[h].delta for h in sorted(first)]
    # The members' ledger weights pinned at window w's start (the floor: no trust yet).
    floor = net.cfg.averaging.weight_floor
    pinned = validator.group_weights.table(start_block(w, net.cfg.window))
    weights = [pinned.get(h, floor) for h in sorted(first)]
    average = reduce_parts(
        rows, weights, validator.shapes[0], "int8",
        net.cfg.averaging.wire_part_size_bytes, net.cfg.averaging.robust,
    )  # fmt: skip
    expected, _ = outer_step({n: theta_1[n] for n in names}, average, {}, net.cfg.outer)
    theta_2 = net.theta(w + 2)
    assert all(torch.equal(theta_2[n], expected[n]) for n in names)
    assert any(not torch.equal(theta_2[n], theta_1[n]) for n in names)
    prov = net.store.read_provenance(net.store.resolve(window=w + 2))
    assert {c.uid for c in prov.contributors} == uids
    assert {c.hotkey for c in prov.contributors} == set(first)
    result = verify_window(net.cfg, w + 1)
    assert result.verdict == IDENTICAL and not result.problems, result.lines()
    validator.close()

    # A validator that never scored window w + 1 reads its contributions back to land them.
    net.mine(w + 2)
    net.to_deadline(w + 2)
    fresh = seated_validator(net)
    try:
        report = fresh.process_window(w + 2)
    finally:
        fresh.close()
    assert report.averaged_window == w + 1 and report.sources == {"shard0": "store"}
    result = verify_window(net.cfg, w + 2)
    assert result.verdict == IDENTICAL and not result.problems, result.lines()
    assert result.contributors == 2
