"""Bound rounds: every reducer checks each part against what its sender committed to."""

from __future__ import annotations

import concurrent.futures
import hashlib
import time
from typing import Any

import torch

from averaging.group import ShardAverager
from averaging.parts import part_digest, reduce_parts
from averaging.round import AverageResult, AveragingFailed, Binding, PreparedParts, Role
from chain.keys import signing_bytes
from tests.averaging.conftest import (
    FAST,
    Swarm,
    make,
    random_delta,
    run_round,
    template,
    weighted,
)

WINDOW = 9


def body(hotkey: str, shard: int, parts: PreparedParts) -> dict[str, Any]:
    """The part of a contribution manifest the reducers read (`store.manifest.commitment_body`)."""
    return {
        "hotkey": hotkey,
        "window": WINDOW,
        "shard": shard,
        "compression": {
            "scheme": "wire",
            "params": {"parts": [part_digest(b) for b in parts.blobs]},
        },
    }


def digest(b: dict[str, Any]) -> str:
    return hashlib.sha256(signing_bytes(b)).hexdigest()


def bound_round(
    avgs: list[ShardAverager],
    prepared: list[PreparedParts | None],
    bodies: list[dict[str, Any] | None],
    table: dict[str, str],
    *,
    ready_after: float = 0.0,
) -> list[AverageResult | AveragingFailed]:
    start_at = time.time() + FAST.min_matchmaking_time_s + 0.5
    opens = start_at + ready_after

    def one(avg: ShardAverager, parts: PreparedParts | None, b: dict[str, Any] | None) -> Any:
        binding = Binding(b, lambda: table if time.time() >= opens else None)
        try:
            return avg.average(
                WINDOW, None, timeout=8.0, start_at=start_at, expected_peers=len(avgs),
                role=Role.MEMBER if parts is not None else Role.AUX, prepared=parts,
                binding=binding if parts is not None else None,
            )  # fmt: skip
        except AveragingFailed as exc:
            return exc

    with concurrent.futures.ThreadPoolExecutor(len(avgs)) as pool:
        futures = [
            pool.submit(one, a, p, b) for a, p, b in zip(avgs, prepared, bodies, strict=True)
        ]
        return [f.result(timeout=60) for f in futures]


def test_a_poisoner_and_an_uncommitted_member_are_left_out_and_named(
    swarm: Swarm, shutdown_later: list[ShardAverager]
) -> None:
    """Peer 2 commits to its honest Δ and sends −10·Δ; peer 3 sends a Δ it never committed
    to. The honest members' average is theirs alone, every peer ends with the same bits,
    and every peer, the auxiliary one too, names the two and the parts they spoiled."""
    shard = swarm.new_shard()
    avgs = make(swarm, shutdown_later, shard, range(4))
    hotkeys = swarm.hotkeys
    deltas = [random_delta(i) for i in range(4)]
    prepared = [a.prepare(d) for a, d in zip(avgs, deltas, strict=True)]
    bodies = [body(h, shard, p) for h, p in zip(hotkeys, prepared, strict=True)]
    table = {h: digest(b) for h, b in zip(hotkeys[:3], bodies[:3], strict=True)}  # 3: none
    poisoned = {n: -10 * t for n, t in prepared[2].raw.items()}
    poison = PreparedParts(prepared[2].blobs, prepared[2].values, poisoned)
    sent = [prepared[0], prepared[1], poison, prepared[3]]
    results = bound_round(avgs, sent, bodies, table, ready_after=0.3)
    honest = [r for r in results[:2]]
    for r in honest:
        assert isinstance(r, AverageResult), r
        assert r.members == sorted(hotkeys[:2])
        assert set(r.mismatched) == {hotkeys[2], hotkeys[3]}
        n_parts = len(prepared[0].blobs)
        assert sorted(r.mismatched[hotkeys[3]]) == list(range(n_parts))
        assert sorted(r.mismatched[hotkeys[2]]) == list(range(n_parts))
        expected = weighted(deltas[:2], [1, 1])
        for name, t in expected.items():
            torch.testing.assert_close(r.tensors[name], t, rtol=1e-5, atol=1e-7)
    assert all(torch.equal(honest[0].tensors[n], honest[1].tensors[n]) for n in deltas[0])


def test_an_unbound_round_and_a_bound_one_agree(
    swarm: Swarm, shutdown_later: list[ShardAverager]
) -> None:
    """With everyone honest, binding changes nothing in the result (same bits as the
    unbound round of the same parts), an auxiliary peer gets it too, and anyone can
    recompute it bit for bit from the members' parts (8-bit wire: the codec's rounding
    happens the same way everywhere)."""
    shard = swarm.new_shard()
    config = FAST.model_copy(update={"wire": "int8"})
    avgs = make(swarm, shutdown_later, shard, range(4), roles={3: Role.AUX}, config=config)
    hotkeys = swarm.hotkeys
    deltas = [random_delta(10 + i) for i in range(3)]
    prepared = [a.prepare(d) for a, d in zip(avgs[:3], deltas, strict=True)]
    bodies: list[dict[str, Any] | None] = [
        body(h, shard, p) for h, p in zip(hotkeys[:3], prepared, strict=True)
    ]
    table = {h: digest(b) for h, b in zip(hotkeys[:3], bodies, strict=True) if b is not None}
    results = bound_round(avgs, [*prepared, None], [*bodies, None], table)
    assert all(isinstance(r, AverageResult) for r in results), results
    first = results[0]
    assert isinstance(first, AverageResult)
    assert first.members == sorted(hotkeys[:3]) and first.mismatched == {}
    for r in results[1:]:
        assert isinstance(r, AverageResult)
        assert all(torch.equal(r.tensors[n], first.tensors[n]) for n in first.tensors)
    order = sorted(range(3), key=lambda i: hotkeys[i])
    recomputed = reduce_parts(
        [prepared[i].values for i in order], [avgs[0].weight_of(hotkeys[i]) for i in order],
        {n: tuple(t.shape) for n, t in template().items()}, "int8",
        config.wire_part_size_bytes, config.robust,
    )  # fmt: skip
    assert all(torch.equal(recomputed[n], first.tensors[n]) for n in first.tensors)
    unbound = run_round(avgs, [p.raw for p in prepared] + [None], window=WINDOW + 1)
    again = unbound[3]
    assert isinstance(again, AverageResult), unbound
    assert all(torch.equal(again.tensors[n], first.tensors[n]) for n in first.tensors)
