"""Roles chosen per round, and state downloads from registered peers only (real DHT peers)."""

from __future__ import annotations

import concurrent.futures
import time

import pytest
import torch
from hivemind.averaging.partition import AllreduceException

from averaging.dht import StaticDirectory, start_dht, visible_maddrs
from averaging.group import ShardAverager
from averaging.participant import commit_address
from averaging.round import AveragingFailed, Role
from averaging.settings import DHTConfig
from averaging.state import STATE_COUNT, STATE_METADATA, StateTruncated, unwrap_state
from chain.interface import Identity
from chain.local import LocalChain
from tests.averaging.conftest import (
    FAST,
    RUN,
    Swarm,
    assert_all_equal,
    make,
    random_delta,
    run_round,
    template,
    weighted,
)


def test_role_is_chosen_per_round(swarm: Swarm, shutdown_later: list[ShardAverager]) -> None:
    """The same averagers swap member and auxiliary roles between windows, as miners do
    when the shard assignment moves; each round averages exactly that round's members."""
    avgs = make(swarm, shutdown_later, swarm.new_shard())
    for window, aux in ((0, 3), (1, 0)):
        deltas = [None if i == aux else random_delta(60 + 10 * window + i) for i in range(4)]
        roles = [Role.AUX if i == aux else Role.MEMBER for i in range(4)]
        start_at = time.time() + FAST.min_matchmaking_time_s + 0.5
        with concurrent.futures.ThreadPoolExecutor(4) as pool:
            futures = [
                pool.submit(
                    a.average, window, d, timeout=8.0, start_at=start_at, role=r, expected_peers=4
                )
                for a, d, r in zip(avgs, deltas, roles, strict=True)
            ]
            results = [f.result(timeout=60) for f in futures]
        assert_all_equal(results)
        expected = weighted([d for d in deltas if d is not None], [1, 1, 1])
        torch.testing.assert_close(results[aux].tensors["w"], expected["w"], rtol=1e-5, atol=1e-7)
        assert results[aux].aux == [swarm.hotkeys[aux]]
        assert results[0].members == sorted(h for i, h in enumerate(swarm.hotkeys) if i != aux)


def _state(window: int, fill: float) -> tuple[dict[str, object], list[torch.Tensor]]:
    return {"window": window}, [torch.full((64, 32), fill), torch.arange(10.0) * fill]


def test_state_comes_from_the_newest_registered_peer(
    swarm: Swarm, shutdown_later: list[ShardAverager]
) -> None:
    shard = swarm.new_shard()
    avgs = make(swarm, shutdown_later, shard)
    avgs[0].share_state(5, lambda: _state(5, 1.5))
    avgs[1].share_state(3, lambda: _state(3, 2.5))
    with pytest.raises(ValueError, match="no state provider"):
        avgs[2].share_state(9)
    # An unregistered peer declaring a newer state is never asked.
    intruder_dht = start_dht(DHTConfig(initial_peers=visible_maddrs(swarm.dhts[0])))
    try:
        table = swarm.directory().peers() | {intruder_dht.peer_id.to_base58(): "intruder"}
        intruder = ShardAverager(
            intruder_dht,
            RUN,
            shard,
            template(),
            config=FAST,
            directory=StaticDirectory(table),
            weight_of=lambda _hotkey: 1.0,
        )
        shutdown_later.append(intruder)
        intruder.share_state(99, lambda: _state(99, -1.0))
        time.sleep(1.0)  # the declarations reach the DHT
        got = avgs[3].load_state_from_peers(timeout=10, max_bytes=1 << 20)
        assert got is not None
        assert got.hotkey == swarm.hotkeys[0] and got.metadata == {"window": 5}
        want = _state(5, 1.5)[1]
        assert len(got.tensors) == 2
        for a, b in zip(got.tensors, want, strict=True):
            assert torch.equal(a, b)
        # A peer that sends more than the budget is dropped; the next one is tried.
        small = avgs[3].load_state_from_peers(timeout=10, max_bytes=6000)
        assert small is None
        # A peer with nothing to share declines; asking it is not an error.
        avgs[0].share_state(7, lambda: None)
        time.sleep(1.0)
        fallback = avgs[3].load_state_from_peers(timeout=10, max_bytes=1 << 20)
        assert fallback is not None and fallback.metadata == {"window": 3}
        # Stopped sharing: nobody registered offers anything.
        avgs[0].stop_sharing_state()
        avgs[1].stop_sharing_state()
        time.sleep(1.0)
        assert avgs[3].load_state_from_peers(timeout=5, max_bytes=1 << 20) is None
    finally:
        for avg in shutdown_later:
            avg.shutdown()
        intruder_dht.shutdown()


def test_commit_is_skipped_when_the_ledger_has_it(swarm: Swarm) -> None:
    # The swarm committed every peer's address already; no extrinsic (and no block) needed.
    seat_chain = LocalChain(swarm.ledger, Identity.single(swarm.miners[0]))
    assert commit_address(seat_chain, swarm.dhts[0], run=RUN) is False


def test_aux_round_rejects_a_delta(swarm: Swarm, shutdown_later: list[ShardAverager]) -> None:
    (avg,) = make(swarm, shutdown_later, swarm.new_shard(), [0])
    with pytest.raises(ValueError, match="no Δ"):
        avg.average(0, random_delta(1), timeout=2, role=Role.AUX)
    (outcome,) = run_round([avg], [random_delta(2)], window=1, timeout=2, expected_peers=2)
    assert isinstance(outcome, AveragingFailed)


def test_a_state_stream_cut_short_is_told_from_a_whole_one() -> None:
    """The sender announces how many tensors follow; fewer is a cut-short stream (asked
    again), more or a malformed announcement is refused."""
    tensors = [torch.zeros(2), torch.ones(3)]
    envelope = {STATE_METADATA: {"window": 4}, STATE_COUNT: 2}
    assert unwrap_state(envelope, tensors) == ({"window": 4}, tensors)
    with pytest.raises(StateTruncated, match="1 of 2 tensors"):
        unwrap_state(envelope, tensors[:1])
    with pytest.raises(AllreduceException, match="3 tensors arrived, 2 announced"):
        unwrap_state(envelope, [*tensors, torch.ones(1)])
    for bad in ({"window": 4}, {STATE_METADATA: {}, STATE_COUNT: "2"}, [2], None):
        with pytest.raises(AllreduceException):
            unwrap_state(bad, tensors)
    with pytest.raises(AllreduceException, match="True"):
        unwrap_state({STATE_METADATA: {}, STATE_COUNT: True}, tensors)
