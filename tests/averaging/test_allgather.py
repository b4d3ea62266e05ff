"""The sparseloco wire: SparseLoCo messages all-gathered over hivemind by four real peers."""

from __future__ import annotations

import concurrent.futures
import hashlib
import time
import typing
from typing import Any, ClassVar

import torch
from hivemind.p2p import P2PContext
from hivemind.proto import averaging_pb2

from averaging.allgather import GatherAverager
from averaging.config import SparseLoCoConfig
from averaging.group import ShardAverager
from averaging.parts import SPARSELOCO, part_digest, reduce_parts
from averaging.round import AverageResult, AveragingFailed, Binding, PreparedParts, Role
from averaging.sparseloco import ErrorFeedback, decode_bytes
from chain.keys import signing_bytes
from tests.averaging.conftest import (
    FAST,
    Swarm,
    assert_all_equal,
    make,
    ok,
    random_delta,
    run_round,
    template,
)
from tests.averaging.test_faults import _die

SPARSE = FAST.model_copy(
    update={"wire": "sparseloco", "sparseloco": SparseLoCoConfig(chunk=256, k=8, error_decay=0.9)}
)
SPEC = SPARSE.sparse_spec  # Rice-coded positions, the wire's default
assert SPEC is not None
SHAPES = {n: tuple(t.shape) for n, t in template().items()}


def expected_average(blobs: list[bytes]) -> dict[str, torch.Tensor]:
    """What every peer must end with: the members' messages decoded and averaged (equal
    weights: every member has the floor on this fresh ledger), in hotkey order."""
    rows = [decode_bytes(b, SHAPES, SPEC) for b in blobs]
    return reduce_parts(rows, [1.0] * len(rows), SHAPES, SPARSELOCO, 0, SPARSE.robust)


def messages(deltas: list[dict[str, torch.Tensor]], feedbacks: list[ErrorFeedback]) -> list[bytes]:
    """Each member's message as an independent sender would build it (and keep its buffer)."""
    out = []
    for delta, feedback in zip(deltas, feedbacks, strict=True):
        sent = feedback.compress(delta, SPEC)
        feedback.commit(sent)
        out.append(sent.message.to_bytes())
    return out


def by_hotkey(swarm: Swarm, blobs: list[bytes], members: list[int]) -> list[bytes]:
    return [b for _h, b in sorted((swarm.hotkeys[i], blobs[i]) for i in members)]


def test_four_peers_end_bit_identical_with_the_public_average(
    swarm: Swarm, shutdown_later: list[ShardAverager]
) -> None:
    avgs = make(swarm, shutdown_later, swarm.new_shard(), config=SPARSE)
    feedbacks = [ErrorFeedback(0.9) for _ in range(4)]
    for window in (3, 4):  # the second window sends Δ + 0.9 · what the first one dropped
        deltas = [random_delta(10 * window + i) for i in range(4)]
        blobs = messages(deltas, feedbacks)
        results = ok(run_round(avgs, deltas, window=window, expected_peers=4))
        assert_all_equal(results)
        expected = expected_average(by_hotkey(swarm, blobs, [0, 1, 2, 3]))
        for r in results:
            assert r.members == sorted(swarm.hotkeys) and r.dropped == []
            for name in SHAPES:
                assert torch.equal(r.tensors[name], expected[name])
            # Each peer downloads the three others' messages once (from their authors, or
            # from a peer that already holds one), plus a few bytes of framing each.
            size = len(blobs[0])
            assert 3 * size <= r.bytes_received <= 3 * size + 3 * 64
        assert sum(r.bytes_sent for r in results) == sum(r.bytes_received for r in results)
    for avg, feedback in zip(avgs, feedbacks, strict=True):
        for name, tensor in avg.wire_residual().items():
            assert torch.equal(tensor, feedback.residual[name])


def test_an_aux_peer_gets_the_same_average(
    swarm: Swarm, shutdown_later: list[ShardAverager]
) -> None:
    avgs = make(swarm, shutdown_later, swarm.new_shard(), config=SPARSE, roles={3: Role.AUX})
    deltas: list[dict[str, torch.Tensor] | None] = [random_delta(i) for i in range(3)] + [None]
    results = ok(run_round(avgs, deltas, window=2, expected_peers=4))
    assert_all_equal(results)
    assert results[3].aux == [swarm.hotkeys[3]] and results[3].members == sorted(swarm.hotkeys[:3])
    assert results[3].bytes_sent == 0 and results[3].bytes_received > 0


class _Stingy(GatherAverager):
    """Serves its own message to one peer only; the others must get it from that peer."""

    served: ClassVar[set[bytes]] = set()

    async def rpc_tm_fetch(
        self, request: averaging_pb2.AveragingData, context: P2PContext
    ) -> typing.AsyncIterator[averaging_pb2.AveragingData]:
        digest = bytes(request.group_id)
        if digest == self.tm_own:
            if digest in self.served:
                return
            self.served.add(digest)
        async for message in super().rpc_tm_fetch(request, context):
            yield message


class _DiesWhenAsked(GatherAverager):
    """Killed (SIGKILL) the moment a peer asks for its message: nobody ever gets it."""

    async def rpc_tm_fetch(
        self, request: averaging_pb2.AveragingData, context: P2PContext
    ) -> typing.AsyncIterator[averaging_pb2.AveragingData]:
        if bytes(request.group_id) == self.tm_own:
            _die()
        async for message in super().rpc_tm_fetch(request, context):
            yield message


def with_gather(cls: type[GatherAverager]) -> type[ShardAverager]:
    return type(f"{cls.__name__}Shard", (ShardAverager,), {"gather_class": cls})


def test_a_message_its_author_serves_once_reaches_everyone_through_a_relay(
    swarm: Swarm, shutdown_later: list[ShardAverager]
) -> None:
    shard = swarm.new_shard()
    avgs = make(swarm, shutdown_later, shard, range(3), config=SPARSE)
    avgs += make(swarm, shutdown_later, shard, [3], config=SPARSE, cls=with_gather(_Stingy))
    deltas = [random_delta(40 + i) for i in range(4)]
    results = ok(run_round(avgs, deltas, window=1, expected_peers=4))
    assert_all_equal(results)
    for r in results:
        assert r.members == sorted(swarm.hotkeys)
    blobs = messages(deltas, [ErrorFeedback(0.9) for _ in range(4)])
    expected = expected_average(by_hotkey(swarm, blobs, [0, 1, 2, 3]))
    assert all(torch.equal(results[0].tensors[n], expected[n]) for n in SHAPES)
    # The stingy peer uploaded its message once; a relay carried it to the third peer.
    assert results[3].bytes_sent < 2 * len(blobs[3])


def test_a_member_killed_before_anyone_has_its_message_is_left_out_by_all(
    swarm: Swarm, shutdown_later: list[ShardAverager]
) -> None:
    shard = swarm.new_shard()
    avgs = make(swarm, shutdown_later, shard, range(3), config=SPARSE)
    avgs += make(swarm, shutdown_later, shard, [3], config=SPARSE, cls=with_gather(_DiesWhenAsked))
    deltas = [random_delta(50 + i) for i in range(4)]
    start = time.monotonic()
    outcomes = run_round(avgs, deltas, window=1, timeouts=[8, 8, 8, 3], expected_peers=4)
    results = ok(outcomes[:3])
    assert_all_equal(results)
    assert isinstance(outcomes[3], AveragingFailed)
    blobs = messages(deltas, [ErrorFeedback(0.9) for _ in range(4)])
    expected = expected_average(by_hotkey(swarm, blobs, [0, 1, 2]))
    for r in results:
        assert r.members == sorted(swarm.hotkeys[:3]) and r.dropped == [swarm.hotkeys[3]]
        assert all(torch.equal(r.tensors[n], expected[n]) for n in SHAPES)
    assert time.monotonic() - start < 8 + 2 * SPARSE.sender_timeout_s + 10


def test_a_malformed_message_is_left_out_by_every_peer(
    swarm: Swarm, shutdown_later: list[ShardAverager]
) -> None:
    avgs = make(swarm, shutdown_later, swarm.new_shard(), config=SPARSE)
    deltas = [random_delta(70 + i) for i in range(4)]
    junk = PreparedParts([b"\x08" + bytes(200)], deltas[3], deltas[3])
    start_at = time.time() + FAST.min_matchmaking_time_s + 0.5

    def one(i: int) -> AverageResult | AveragingFailed:
        try:
            return avgs[i].average(
                5, None if i == 3 else deltas[i], timeout=8.0, start_at=start_at,
                expected_peers=4, prepared=junk if i == 3 else None,
            )  # fmt: skip
        except AveragingFailed as exc:
            return exc

    with concurrent.futures.ThreadPoolExecutor(4) as pool:
        results = ok([f.result(timeout=60) for f in [pool.submit(one, i) for i in range(4)]])
    assert_all_equal(results)
    for r in results:
        assert r.members == sorted(swarm.hotkeys[:3]) and r.dropped == [swarm.hotkeys[3]]


def body(hotkey: str, shard: int, blob: bytes) -> dict[str, Any]:
    return {
        "hotkey": hotkey,
        "window": 9,
        "shard": shard,
        "compression": {"scheme": "wire", "params": {"parts": [part_digest(blob)]}},
    }


def test_a_bound_round_leaves_out_and_names_a_message_other_than_the_committed_one(
    swarm: Swarm, shutdown_later: list[ShardAverager]
) -> None:
    shard = swarm.new_shard()
    avgs = make(swarm, shutdown_later, shard, config=SPARSE, roles={3: Role.AUX})
    prepared = [avgs[i].prepare(random_delta(80 + i)) for i in range(3)]
    honest = [body(swarm.hotkeys[i], shard, prepared[i].blobs[0]) for i in range(3)]
    # Member 2 commits to one message and serves another.
    other = avgs[2].prepare(random_delta(99))
    table = {h["hotkey"]: hashlib.sha256(signing_bytes(h)).hexdigest() for h in honest}
    sent = [prepared[0], prepared[1], other]
    start_at = time.time() + FAST.min_matchmaking_time_s + 0.5

    def one(i: int) -> AverageResult | AveragingFailed:
        binding = Binding(honest[i] if i < 3 else None, lambda: table)
        try:
            return avgs[i].average(
                9, None, timeout=8.0, start_at=start_at, expected_peers=4,
                role=Role.MEMBER if i < 3 else Role.AUX, prepared=sent[i] if i < 3 else None,
                binding=binding,
            )  # fmt: skip
        except AveragingFailed as exc:
            return exc

    with concurrent.futures.ThreadPoolExecutor(4) as pool:
        results = ok([f.result(timeout=60) for f in [pool.submit(one, i) for i in range(4)]])
    assert_all_equal(results)
    expected = expected_average(
        [b for _h, b in sorted((swarm.hotkeys[i], prepared[i].blobs[0]) for i in (0, 1))]
    )
    for r in results:
        assert r.members == sorted(swarm.hotkeys[:2])
        assert r.mismatched == {swarm.hotkeys[2]: [0]}
        assert all(torch.equal(r.tensors[n], expected[n]) for n in SHAPES)


def test_a_restarted_member_keeps_its_error_feedback(
    swarm: Swarm, shutdown_later: list[ShardAverager]
) -> None:
    shard = swarm.new_shard()
    (first,) = make(swarm, shutdown_later, shard, [0], config=SPARSE)
    first.prepare(random_delta(1))
    saved = first.wire_residual()
    assert saved and any(bool(t.ne(0).any()) for t in saved.values())
    after = first.prepare(random_delta(2))
    first.shutdown()
    (again,) = make(swarm, shutdown_later, shard, [0], config=SPARSE)
    again.restore_wire_residual(saved)
    assert again.prepare(random_delta(2)).blobs == after.blobs


def test_a_large_message_reaches_the_averager_and_the_peers(
    swarm: Swarm, shutdown_later: list[ShardAverager]
) -> None:
    # 6.3 M values: a 123 KB message, more than hivemind's control pipe carries whole.
    big = {"w": torch.zeros(2048, 3072)}
    config = SPARSE.model_copy(update={"sparseloco": SparseLoCoConfig()})
    avgs = make(swarm, shutdown_later, swarm.new_shard(), range(2), config=config, tmpl=big)
    gen = torch.Generator().manual_seed(5)
    deltas = [{"w": torch.randn(2048, 3072, generator=gen)} for _ in range(2)]
    results = ok(run_round(avgs, deltas, window=1, expected_peers=2))
    assert_all_equal(results)
    assert results[0].members == sorted(swarm.hotkeys[:2])
    assert results[0].bytes_received > 100_000
