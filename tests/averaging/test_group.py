"""The per-shard all-reduce with four real DHT peers, and the codecs it puts on the wire."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
import torch
from hivemind.averaging.partition import TensorPartContainer
from hivemind.compression import CompressionInfo, Float16Compression
from pydantic import ValidationError

from averaging.allreduce import LedgerAllReduceRunner
from averaging.averager import LedgerAverager
from averaging.config import CompressionConfig, TopKConfig
from averaging.dht import StaticDirectory, start_dht, visible_maddrs
from averaging.group import ShardAverager
from averaging.round import AveragingFailed, Role, group_prefix, window_bits
from averaging.settings import AveragingConfig, DHTConfig, RobustConfig
from averaging.weights import LedgerWeights
from averaging.wire import (
    SparseCodec,
    TopKSparsifier,
    Uniform8BitCodec,
    chunked_topk,
    codec_for,
    decode_part,
)
from chain.interface import is_epoch_block
from chain.keys import Keypair
from chain.ledger import Ledger
from tests.averaging.conftest import (
    FAST,
    RUN,
    Swarm,
    assert_all_equal,
    make,
    ok,
    random_delta,
    run_round,
    template,
    weighted,
)
from tests.chain.conftest import do, fast_config, subnet

# ---- four peers --------------------------------------------------------------------------


def test_four_peers_get_the_mean(swarm: Swarm, shutdown_later: list[ShardAverager]) -> None:
    avgs = make(swarm, shutdown_later, swarm.new_shard())
    deltas = [random_delta(i) for i in range(4)]
    results = ok(run_round(avgs, deltas, window=3, expected_peers=4))
    expected = weighted(deltas, [1, 1, 1, 1])
    for r in results:
        for name, tensor in expected.items():
            torch.testing.assert_close(r.tensors[name], tensor, rtol=1e-5, atol=1e-7)
        assert r.members == sorted(swarm.hotkeys)
        assert r.dropped == [] and r.aux == [] and r.attempts == 1
        assert r.bytes_sent > 0 and r.bytes_received > 0
    assert_all_equal(results)
    # A second window with the same averagers forms a new group.
    again = ok(run_round(avgs, deltas[::-1], window=4, expected_peers=4))
    torch.testing.assert_close(again[0].tensors["w"], expected["w"], rtol=1e-5, atol=1e-7)


class LiarRunner(LedgerAllReduceRunner):
    """Announces a huge weight for itself in every part it sends."""

    async def _generate_input_for_peer(self, peer_index: int) -> AsyncIterator[Any]:
        async for msg in super()._generate_input_for_peer(peer_index):
            msg.weight = 1e6
            yield msg


class LiarAverager(LedgerAverager):
    runner_class = LiarRunner


class LiarShard(ShardAverager):
    averager_class = LiarAverager


def test_weights_come_from_the_ledger_not_the_peer(
    swarm: Swarm, shutdown_later: list[ShardAverager]
) -> None:
    """Miner i staked i + 1 TAO: the average is Σ (i+1) Δ_i / 10 even though miner 3 claims
    weight 10⁶ in its messages."""
    shard = swarm.new_shard()
    avgs = make(swarm, shutdown_later, shard, range(3), source="stake")
    avgs += make(swarm, shutdown_later, shard, [3], source="stake", cls=LiarShard)
    deltas = [random_delta(10 + i) for i in range(4)]
    results = ok(run_round(avgs, deltas, window=0, expected_peers=4))
    expected = weighted(deltas, [1, 2, 3, 4])
    for r in results:
        for name, tensor in expected.items():
            torch.testing.assert_close(r.tensors[name], tensor, rtol=1e-5, atol=1e-7)


def test_trust_weights_from_a_ledger_epoch(
    swarm: Swarm, shutdown_later: list[ShardAverager], tmp_path: Path
) -> None:
    """The default weights are the members' trust after a real Yuma epoch: two validators
    (60 and 40 TAO) disagree on the four miners, so consensus clips some weights and the
    miners' trust differs. The average is Σ T_i Δ_i / Σ T_i; a registered miner with zero
    trust (no validator weighs it) still gets the floor. A round pinned to a block uses
    the trust of the last epoch up to it, though a later epoch has changed it since (as
    when one falls between the members' reads at a window's deadline)."""
    assert AveragingConfig().weights == "trust"
    cfg = fast_config(tmp_path / "trust.sqlite")
    with Ledger.create(cfg.db, cfg, Keypair.generate().address) as ledger:
        (v_a, v_b), (newcomer,) = subnet(ledger, 1, [60, 40])
        for kp in swarm.miners:
            do(ledger, kp, "register", {})
        uids = [ledger.uid_of(h) for h in swarm.hotkeys]
        do(ledger, v_a, "set_weights", {"uids": uids, "weights": [4, 3, 2, 1]})
        do(ledger, v_b, "set_weights", {"uids": uids, "weights": [1, 2, 3, 4]})
        while not is_epoch_block(epoch := ledger.produce_block().number, 1, cfg.tempo):
            pass
        trust = {n.hotkey: n.trust for n in ledger.neurons()}
        weights = [trust[h] for h in swarm.hotkeys]
        assert all(w > 0 for w in weights) and len(set(weights)) > 1, weights
        floor = AveragingConfig().weight_floor
        weight_of = LedgerWeights(cfg.db, AveragingConfig().weights, floor)
        assert trust[newcomer.address] == 0 and weight_of(newcomer.address) == floor
        assert [weight_of(h) for h in swarm.hotkeys] == weights
        # The validators agree now; the next epoch changes every miner's trust.
        do(ledger, v_a, "set_weights", {"uids": uids, "weights": [1, 1, 1, 1]})
        do(ledger, v_b, "set_weights", {"uids": uids, "weights": [1, 1, 1, 1]})
        while not is_epoch_block(ledger.produce_block().number, 1, cfg.tempo):
            pass
        assert [weight_of(h) for h in swarm.hotkeys] != weights
        pinned = weight_of.table(epoch + 1)
        assert [pinned[h] for h in swarm.hotkeys] == weights
        assert pinned[newcomer.address] == floor
        assert weight_of.table(0)[swarm.hotkeys[0]] == floor  # genesis: before any epoch

    shard = swarm.new_shard()
    table = StaticDirectory(swarm.directory().peers())
    avgs = [
        ShardAverager(
            swarm.dhts[i], RUN, shard, template(), config=FAST, directory=table, weight_of=weight_of
        )
        for i in range(4)
    ]
    shutdown_later.extend(avgs)
    deltas = [random_delta(30 + i) for i in range(4)]
    results = ok(run_round(avgs, deltas, window=0, expected_peers=4, weights=pinned))
    expected = weighted(deltas, weights)
    for r in results:
        for name, tensor in expected.items():
            torch.testing.assert_close(r.tensors[name], tensor, rtol=1e-5, atol=1e-7)


def test_fresh_subnet_averages_uniformly_with_trust(swarm: Swarm) -> None:
    """No epoch has weighed anyone: every member has zero trust, hence the floor."""
    weight_of = LedgerWeights(swarm.ledger_path, "trust", 1e-3)
    assert [weight_of(h) for h in swarm.hotkeys] == [1e-3] * 4
    assert weight_of(Keypair.generate().address) == 0.0  # not registered


def test_trimmed_mean_stays_in_the_honest_range(
    swarm: Swarm, shutdown_later: list[ShardAverager]
) -> None:
    """Miner 3 sends 10⁶ · Δ; with a 25 % trim every coordinate of the result lies between
    the smallest and the largest honest value."""
    config = FAST.model_copy(update={"robust": RobustConfig(kind="trimmed_mean", trim=0.25)})
    avgs = make(swarm, shutdown_later, swarm.new_shard(), config=config)
    deltas = [random_delta(20 + i) for i in range(4)]
    deltas[3] = {k: v * 1e6 for k, v in deltas[3].items()}
    results = ok(run_round(avgs, deltas, window=1, expected_peers=4))
    for name in deltas[0]:
        honest = torch.stack([d[name] for d in deltas[:3]])
        for r in results:
            assert bool((r.tensors[name] >= honest.min(0).values).all()), name
            assert bool((r.tensors[name] <= honest.max(0).values).all()), name
    assert_all_equal(results)


def test_centered_clip_stays_in_the_honest_ball(
    swarm: Swarm, shutdown_later: list[ShardAverager]
) -> None:
    """CenteredClip bounds the attacker in L2 (by iterations · τ · w / Σw per part), not per
    coordinate: the result is no farther from the honest mean than the honest Δ are."""
    config = FAST.model_copy(update={"robust": RobustConfig(kind="centered_clip")})
    avgs = make(swarm, shutdown_later, swarm.new_shard(), config=config)
    deltas = [random_delta(20 + i) for i in range(4)]
    deltas[3] = {k: v * 1e6 for k, v in deltas[3].items()}
    results = ok(run_round(avgs, deltas, window=1, expected_peers=4))
    honest_mean = weighted(deltas[:3], [1, 1, 1])
    for name in deltas[0]:
        radius = max((d[name] - honest_mean[name]).norm().item() for d in deltas[:3])
        for r in results:
            assert (r.tensors[name] - honest_mean[name]).norm().item() < radius, name
    assert_all_equal(results)


def test_aux_peer_receives_the_average(swarm: Swarm, shutdown_later: list[ShardAverager]) -> None:
    avgs = make(swarm, shutdown_later, swarm.new_shard(), roles={3: Role.AUX})
    deltas: list[dict[str, torch.Tensor] | None] = [random_delta(30 + i) for i in range(3)]
    deltas.append(None)
    results = ok(run_round(avgs, deltas, window=2, expected_peers=4))
    expected = weighted([d for d in deltas if d is not None], [1, 1, 1])
    assert_all_equal(results)
    torch.testing.assert_close(results[3].tensors["w"], expected["w"], rtol=1e-5, atol=1e-7)
    aux = results[3]
    assert aux.members == sorted(swarm.hotkeys[:3]) and aux.aux == [swarm.hotkeys[3]]
    # It uploads one placeholder per part, and downloads the whole average.
    assert aux.bytes_sent < results[0].bytes_sent / 20
    assert aux.bytes_received > 4 * sum(t.numel() for t in template().values()) * 0.7
    with pytest.raises(ValueError, match="no Δ"):
        avgs[3].average(5, deltas[0], timeout=2)


def test_codecs_on_the_wire(swarm: Swarm, shutdown_later: list[ShardAverager]) -> None:
    """fp16 halves the bytes of fp32; 8-bit and top-k go lower; all peers agree bit for bit."""
    tmpl = {"w": torch.zeros(128, 256)}
    gen = torch.Generator().manual_seed(5)
    deltas = [{"w": torch.randn(128, 256, generator=gen) * 0.01} for _ in range(4)]
    mean = weighted(deltas, [1, 1, 1, 1])["w"]
    sent: dict[str, float] = {}
    for wire in ("none", "fp16", "int8", "topk"):
        config = FAST.model_copy(
            update={"wire": wire, "part_size_bytes": 1 << 14, "topk_part_size_bytes": 1 << 14}
        )
        avgs = make(swarm, shutdown_later, swarm.new_shard(), config=config, tmpl=tmpl)
        results = ok(run_round(avgs, deltas, window=0, expected_peers=4))
        assert_all_equal(results)
        sent[wire] = sum(r.bytes_sent for r in results) / 4
        got = results[0].tensors["w"]
        if wire == "topk":
            # The mean of what each member sent: its chunked top-k in fp16 (first round, so
            # no residual yet), encoded once more by its reducer.
            sent_parts = [
                TopKSparsifier(config.topk.density, config.topk.chunk).sparsify(d)["w"]
                for d in deltas
            ]
            expected = torch.stack(sent_parts).mean(0).half().float()
            torch.testing.assert_close(got, expected, rtol=1e-3, atol=1e-6)
            # What was not sent is owed to the next round; it survives a save and restore.
            for avg, d, part in zip(avgs, deltas, sent_parts, strict=True):
                assert torch.equal(avg.wire_residual()["w"], d["w"] - part)
            saved = avgs[0].wire_residual()
            avgs[0].restore_wire_residual({"w": torch.ones(128, 256)})
            assert torch.equal(avgs[0].wire_residual()["w"], torch.ones(128, 256))
            avgs[0].restore_wire_residual(saved)
            assert torch.equal(avgs[0].wire_residual()["w"], deltas[0]["w"] - sent_parts[0])
            for bad, why in (
                ({"v": torch.zeros(128, 256)}, "no tensor 'v'"),
                ({"w": torch.zeros(256, 128)}, "shape"),
                ({"w": torch.full((128, 256), float("nan"))}, "finite fp32"),
                ({"w": torch.zeros(128, 256, dtype=torch.float64)}, "finite fp32"),
            ):
                with pytest.raises(ValueError, match=why):
                    avgs[0].restore_wire_residual(bad)
            assert torch.equal(avgs[0].wire_residual()["w"], saved["w"])
        else:
            relative = ((got - mean).norm() / mean.norm()).item()
            assert relative < {"none": 1e-6, "fp16": 1e-3, "int8": 0.1}[wire], wire
            assert avgs[0].wire_residual() == {}
        for avg in avgs:
            avg.shutdown()
    assert 0.45 < sent["fp16"] / sent["none"] < 0.55
    assert sent["int8"] < 0.35 * sent["none"]
    assert sent["topk"] < 0.2 * sent["none"]


# ---- admission --------------------------------------------------------------------------


def test_unregistered_peer_is_refused(swarm: Swarm, shutdown_later: list[ShardAverager]) -> None:
    """An intruder that admits itself (and knows everyone) cannot get into the group."""
    shard = swarm.new_shard()
    intruder_dht = start_dht(DHTConfig(initial_peers=visible_maddrs(swarm.dhts[0])))
    try:
        honest = make(swarm, shutdown_later, shard)
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
        deltas = [random_delta(40 + i) for i in range(5)]
        outcomes = run_round([*honest, intruder], deltas, window=0, timeout=4, expected_peers=5)
        results = ok(outcomes[:4])
        assert isinstance(outcomes[4], AveragingFailed)
        expected = weighted(deltas[:4], [1, 1, 1, 1])
        for r in results:
            assert r.members == sorted(swarm.hotkeys)
            torch.testing.assert_close(r.tensors["w"], expected["w"], rtol=1e-5, atol=1e-7)

        # With the ledger's directory the intruder does not even try.
        lost = ShardAverager(
            intruder_dht,
            RUN,
            shard + 1000,
            template(),
            config=FAST,
            directory=swarm.directory(),
            weight_of=lambda _hotkey: 1.0,
        )
        shutdown_later.append(lost)
        with pytest.raises(AveragingFailed, match="not tied to a registered hotkey"):
            lost.average(0, deltas[0], timeout=2)
    finally:
        for avg in shutdown_later:
            avg.shutdown()
        intruder_dht.shutdown()


def test_no_group_fails_cleanly(swarm: Swarm, shutdown_later: list[ShardAverager]) -> None:
    (alone,) = make(swarm, shutdown_later, swarm.new_shard(), [0])
    start = time.monotonic()
    with pytest.raises(AveragingFailed, match=r"could not find a group|no result"):
        alone.average(0, random_delta(0), timeout=2.5, expected_peers=2)
    assert time.monotonic() - start < 2.5 + 3.0


def test_ledger_weights(swarm: Swarm) -> None:
    stake = LedgerWeights(swarm.ledger_path, "stake", 1e-3)
    assert [stake(h) for h in swarm.hotkeys] == pytest.approx([1.0, 2.0, 3.0, 4.0])
    assert stake("5NotRegistered") == 0.0
    # Every registered hotkey's weight at once (what an unpinned round starting now uses).
    snapshot = stake.table()
    assert {h: snapshot[h] for h in swarm.hotkeys} == {h: stake(h) for h in swarm.hotkeys}
    assert LedgerWeights(swarm.chain, "uniform", 1e-3)(swarm.hotkeys[0]) == 1.0
    # No epoch has paid incentive yet: every member gets the floor.
    assert LedgerWeights(swarm.chain, "incentive", 0.5)(swarm.hotkeys[2]) == 0.5
    with pytest.raises(ValueError, match="floor"):
        LedgerWeights(swarm.chain, "stake", 0.0)


def test_group_names() -> None:
    assert group_prefix("demo-1", 3) == "demo-1_shard3"
    assert window_bits(5) == "101" and window_bits(0) == "0"
    with pytest.raises(ValueError):
        group_prefix("a.b", 0)
    with pytest.raises(ValueError):
        window_bits(-1)
    with pytest.raises(ValueError, match="request_timeout_s"):
        AveragingConfig(min_matchmaking_time_s=1.0, request_timeout_s=1.0)


# ---- codecs -----------------------------------------------------------------------------


def _info(t: torch.Tensor) -> CompressionInfo:
    return CompressionInfo.from_tensor(t)


def test_sparse_codec_round_trip_and_dense_fallback() -> None:
    x = torch.zeros(1000)
    x[[3, 500, 999]] = torch.tensor([0.5, -2.0, 1024.0])
    enc = SparseCodec().compress(x, _info(x))
    assert len(enc.buffer) == 5 + 3 * 6
    assert torch.equal(decode_part(enc), x)
    dense = torch.randn(7, 9)
    enc = SparseCodec().compress(dense, _info(dense))
    assert len(enc.buffer) == 5 + 63 * 2
    torch.testing.assert_close(decode_part(enc), dense.half().float())


def test_malformed_parts_are_refused() -> None:
    x = torch.zeros(100)
    x[7] = 1.0
    enc = SparseCodec().compress(x, _info(x))
    enc.buffer = enc.buffer[:-1]
    with pytest.raises(ValueError, match="malformed"):
        decode_part(enc)
    enc = SparseCodec().compress(x, _info(x))
    enc.size[:] = [5]
    with pytest.raises(ValueError):
        decode_part(enc)
    q = Uniform8BitCodec().compress(torch.randn(50), _info(torch.randn(50)))
    q.size[:] = [60]
    with pytest.raises(ValueError, match="malformed 8-bit"):
        decode_part(q)


def test_uniform8bit_codec_matches_hivemind_format() -> None:
    x = torch.randn(4096, generator=torch.Generator().manual_seed(1))
    enc = Uniform8BitCodec().compress(x, _info(x))
    assert enc.compression == codec_for("int8").compression_type
    assert len(enc.buffer) == 8 + 4 * 256 + 4096
    out = decode_part(enc)
    assert (out - x).abs().mean().item() < 0.02
    assert torch.equal(decode_part(Float16Compression().compress(x, _info(x))), x.half().float())


def test_chunked_topk_keeps_k_per_chunk() -> None:
    x = torch.randn(10, 100, generator=torch.Generator().manual_seed(2))
    kept = chunked_topk(x, density=0.05, chunk=100)
    assert [int((row != 0).sum()) for row in kept] == [5] * 10
    top = x.abs().topk(5, dim=1).values
    assert torch.equal(kept.abs().sort(dim=1).values[:, -5:], top.sort(dim=1).values)


def test_error_feedback_loses_nothing() -> None:
    """Σ over rounds of what was sent + the residual = Σ of the inputs (SparseLoCo)."""
    sparsifier = TopKSparsifier(density=0.1, chunk=50)
    gen = torch.Generator().manual_seed(3)
    inputs = [{"p": torch.randn(200, generator=gen)} for _ in range(5)]
    total_sent = torch.zeros(200)
    for delta in inputs:
        total_sent += sparsifier.sparsify(delta)["p"]
        sparsifier.commit()
    total_in = sum(d["p"] for d in inputs)
    torch.testing.assert_close(total_sent + sparsifier.residual["p"], total_in)
    residual = sparsifier.residual["p"].clone()
    sparsifier.sparsify(inputs[0])
    sparsifier.discard()
    assert torch.equal(sparsifier.residual["p"], residual)


def test_error_feedback_keeps_the_delivered_part_of_a_failed_round() -> None:
    """Values that reached the group's average take the new residual; the rest keep the
    old one, as if that part of the round had not happened."""
    sparsifier = TopKSparsifier(density=0.1, chunk=50)
    gen = torch.Generator().manual_seed(4)
    first, second = ({"p": torch.randn(200, generator=gen)} for _ in range(2))
    sparsifier.sparsify(first)
    sparsifier.commit()
    before = sparsifier.residual["p"].clone()
    sent = sparsifier.sparsify(second)["p"]
    pending = second["p"] + before - sent
    mask = torch.zeros(200, dtype=torch.bool)
    mask[:120] = True
    sparsifier.commit({"p": mask})
    torch.testing.assert_close(sparsifier.residual["p"][:120], pending[:120])
    assert torch.equal(sparsifier.residual["p"][120:], before[120:])
    # A first round that failed with part of it delivered: zeros where nothing was sent.
    fresh = TopKSparsifier(density=0.1, chunk=50)
    sent = fresh.sparsify(first)["p"]
    fresh.commit({"p": mask})
    torch.testing.assert_close(fresh.residual["p"][:120], (first["p"] - sent)[:120])
    assert not fresh.residual["p"][120:].any()


def test_topk_parts_have_their_own_size() -> None:
    """hivemind sizes top-k parts as if dense; the wire's own part size keeps them large
    (tiny model: 21 parts of 1 MiB instead of 161 of 128 KiB)."""
    assert AveragingConfig(wire="topk").wire_part_size_bytes == 1 << 20
    assert AveragingConfig(wire="fp16").wire_part_size_bytes == 1 << 17
    tensors = [torch.zeros(5_261_568)]
    for wire, parts in (("topk", 21), ("fp16", 81)):
        size = AveragingConfig(wire=wire).wire_part_size_bytes  # type: ignore[arg-type]
        container = TensorPartContainer(tensors, [1.0] * 4, codec_for(wire), size)
        assert sum(container.num_parts_by_peer) == parts, wire


def test_topk_settings_are_one_model_with_old_keys_accepted() -> None:
    for cfg in (
        AveragingConfig.model_validate({"topk_density": 0.05, "topk_chunk": 256}),
        AveragingConfig.model_validate({"topk": {"density": 0.05, "chunk": 256}}),
        CompressionConfig.model_validate({"topk_density": 0.05, "topk_chunk": 256}),
    ):
        assert cfg.topk == TopKConfig(density=0.05, chunk=256)
    for bad in ({"chunk": 16}, {"chunk": 1 << 21}, {"density": 0}):
        for model in (AveragingConfig, CompressionConfig):
            with pytest.raises(ValidationError):
                model.model_validate({"topk": bad})
    with pytest.raises(ValidationError, match="not both"):
        AveragingConfig.model_validate({"topk": {}, "topk_chunk": 256})
