"""Parts: the layout mirrors hivemind's container, and parts round-trip and are checked."""

from __future__ import annotations

import pytest
import torch
from hivemind.averaging.partition import TensorPartContainer
from hivemind.compression import CompressionInfo

from averaging.parts import (
    SPARSELOCO,
    PartError,
    assemble,
    decode_parts,
    decode_payload,
    encode_parts,
    part_count,
    part_digest,
    part_layout,
    payload_params,
    payload_tensors,
    reduce_parts,
    wire_parts,
)
from averaging.settings import RobustConfig
from averaging.sparseloco import SparseSpec, decode_bytes
from averaging.wire import codec_for

SHAPES = [(300, 7), (5,), (1000,), (3, 3, 3)]


@pytest.mark.parametrize("wire", ["none", "fp16", "int8", "topk"])
@pytest.mark.parametrize("part_size", [1 << 10, 3000])
@pytest.mark.parametrize("fractions", [(1.0,), (1.0, 1.0, 1.0), (0.0, 1.0, 2.0)])
def test_layout_is_hiveminds_for_any_group(
    wire: str, part_size: int, fractions: tuple[float, ...]
) -> None:
    """Fails loudly when hivemind's `TensorPartContainer` (private splitting) changes: the
    parts and their serialized bytes must not depend on the group."""
    g = torch.Generator().manual_seed(0)
    tensors = [torch.randn(s, generator=g) for s in SHAPES]
    codec = codec_for(wire)
    container = TensorPartContainer(
        tensors, fractions, compression=codec, part_size_bytes=part_size
    )
    theirs = [
        part
        for peer in range(len(fractions))
        for part, _info in container._input_parts_by_peer[peer]
    ]
    layout = part_layout(SHAPES, codec, part_size)
    assert [p.numel() for p in theirs] == [s.size for s in layout]
    ours = encode_parts(tensors, layout, codec)
    sent = [
        codec.compress(part, info, False).SerializeToString(deterministic=True)
        for peer in range(len(fractions))
        for part, info in container._input_parts_by_peer[peer]
    ]
    assert ours == sent


def test_parts_round_trip_and_bad_parts_are_named() -> None:
    g = torch.Generator().manual_seed(1)
    tensors = {"a": torch.randn(300, 7, generator=g), "b": torch.randn(5, generator=g)}
    blobs, decoded = wire_parts(tensors, "fp16", 1 << 10)
    assert list(decoded) == ["a", "b"]
    for name, t in tensors.items():
        assert torch.equal(decoded[name], t.half().float())
    codec = codec_for("fp16")
    layout = part_layout([(300, 7), (5,)], codec, 1 << 10)
    values = decode_parts(blobs, layout, "fp16", max_part_bytes=1 << 12)
    assert torch.equal(assemble(values, layout, {"a": (300, 7), "b": (5,)})["a"], decoded["a"])
    assert len({part_digest(b) for b in blobs}) == len(blobs)
    with pytest.raises(PartError, match="parts, the shard has"):
        decode_parts(blobs[:-1], layout, "fp16", max_part_bytes=1 << 12)
    with pytest.raises(PartError, match=r"part 0 is .* bytes, at most"):
        decode_parts(blobs, layout, "fp16", max_part_bytes=10)
    with pytest.raises(PartError, match="does not parse"):
        decode_parts([b"\xff\xff\xff", *blobs[1:]], layout, "fp16", max_part_bytes=1 << 12)
    with pytest.raises(PartError, match="the wire is int8"):
        decode_parts(blobs, layout, "int8", max_part_bytes=1 << 12)
    swapped = [blobs[-1], *blobs[1:-1], blobs[0]]
    with pytest.raises(PartError, match="values, the layout"):
        decode_parts(swapped, layout, "fp16", max_part_bytes=1 << 12)
    bad = {"a": tensors["a"].clone(), "b": tensors["b"].clone()}
    bad["b"][0] = float("inf")
    inf_blobs, _ = wire_parts({"a": tensors["a"], "b": tensors["b"]}, "none", 1 << 10)
    layout32 = part_layout([(300, 7), (5,)], codec_for("none"), 1 << 10)
    poisoned = encode_parts([bad["a"], bad["b"]], layout32, codec_for("none"))
    assert poisoned[:-1] == inf_blobs[:-1]
    with pytest.raises(PartError, match="non-finite"):
        decode_parts(poisoned, layout32, "none", max_part_bytes=1 << 14)


def test_a_sparseloco_contribution_is_one_part_checked_and_decoded_as_peers_do() -> None:
    spec = SparseSpec(chunk=256, k=8)
    g = torch.Generator().manual_seed(2)
    tensors = {"a": torch.randn(300, 7, generator=g), "b": torch.randn(5, generator=g)}
    shapes = {n: tuple(t.shape) for n, t in tensors.items()}
    blobs, decoded = wire_parts(tensors, SPARSELOCO, 1 << 10, sparse=spec)
    assert len(blobs) == 1 == part_count(list(shapes.values()), SPARSELOCO, 1 << 10)
    assert list(decoded) == ["a", "b"]
    params = payload_params(blobs, list(shapes), SPARSELOCO, 1 << 10)
    got = decode_payload(
        payload_tensors(blobs), params, shapes, wire=SPARSELOCO, part_size_bytes=1 << 10,
        sparse=spec,
    )  # fmt: skip
    assert list(got) == ["a", "b"] and all(torch.equal(got[n], decoded[n]) for n in shapes)
    # What the group computes from the messages is what the validators recompute.
    average = reduce_parts([got, got], [1.0, 3.0], shapes, SPARSELOCO, 0, RobustConfig())
    assert all(torch.equal(average[n], decode_bytes(blobs[0], shapes, spec)[n]) for n in shapes)
    # A message that is not its digest's, or that is malformed, is refused by name.
    with pytest.raises(PartError, match="not the part its digest names"):
        decode_payload(
            payload_tensors([blobs[0][:-1] + b"\x01"]), params, shapes, wire=SPARSELOCO,
            part_size_bytes=1 << 10, sparse=spec,
        )  # fmt: skip
    bad = blobs[0][:40]
    with pytest.raises(PartError, match=r"part\.00000: message truncated"):
        decode_payload(
            payload_tensors([bad]), payload_params([bad], list(shapes), SPARSELOCO, 1 << 10),
            shapes, wire=SPARSELOCO, part_size_bytes=1 << 10, sparse=spec,
        )  # fmt: skip
    with pytest.raises(ValueError, match="needs its SparseSpec"):
        wire_parts(tensors, SPARSELOCO, 1 << 10)


@pytest.mark.parametrize("wire", ["int8", "fp16", SPARSELOCO])
@pytest.mark.parametrize("kind", ["mean", "trimmed_mean", "centered_clip"])
def test_a_group_average_does_not_depend_on_the_thread_count(wire: str, kind: str) -> None:
    """`reduce_parts` is what reducers send and what validators and `tensormine verify`
    recompute, each on its own machine: the bits must not depend on how many threads
    torch uses there (a float32 mean over a part did: one 8-bit bin off in 1,202 values
    of a live run's window, between a miner and `verify`)."""
    g = torch.Generator().manual_seed(7)
    shapes = {"big": (3, 350_001), "small": (17,)}
    rows = [
        {n: 1e-3 * torch.randn(s, generator=g) + 1e-4 * i for n, s in shapes.items()}
        for i in range(3)
    ]
    robust = RobustConfig(kind=kind)  # type: ignore[arg-type]
    threads = torch.get_num_threads()
    got = []
    try:
        for n in (1, 4):
            torch.set_num_threads(n)
            got.append(reduce_parts(rows, [1.0, 0.5, 2.0], shapes, wire, 1 << 22, robust))
    finally:
        torch.set_num_threads(threads)
    for name in shapes:
        assert torch.equal(got[0][name], got[1][name]), (name, (got[0][name] != got[1][name]).sum())


def test_the_8bit_codec_does_not_depend_on_the_thread_count() -> None:
    """The 8-bit wire's bins come from the part's mean and spread: computed with torch's
    threaded float32 reductions, one part in ten of these had its bins moved (2,865 values
    one bin off) between 1 and 4 threads."""
    codec = codec_for("int8")
    threads = torch.get_num_threads()
    try:
        for seed in range(10):
            x = 1e-3 * torch.randn(262_144, generator=torch.Generator().manual_seed(seed)) + 3e-4
            got = []
            for n in (1, 4):
                torch.set_num_threads(n)
                got.append(bytes(codec.compress(x, CompressionInfo.from_tensor(x), False).buffer))
            assert got[0] == got[1], seed
    finally:
        torch.set_num_threads(threads)
