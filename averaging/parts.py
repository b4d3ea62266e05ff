"""A shard's Δ cut into hivemind's parts and serialized once: what a miner commits to,
publishes, and sends into its group's all-reduce — the same bytes all three times.

    layout = part_layout(shapes, codec_for("int8"), part_size_bytes)   # [PartSpan, ...]
    blobs = encode_parts(tensors, layout, codec)          # one serialized part each
    digests = [part_digest(b) for b in blobs]             # in the signed manifest
    values = decode_parts(blobs, layout, shapes, "int8")  # what every reducer averages
    part_digest(message.SerializeToString(deterministic=True))   # a reducer's check

hivemind's `TensorPartContainer` cuts every tensor of the averaged list, in order, into
pieces of ``int(part_size_bytes / (element_size · codec ratio))`` values; a part never
spans two tensors, and which reducer gets which part depends on the group, but the parts
themselves do not. So a part's serialized bytes are a function of the committed Δ alone:
a member can commit to them before any group exists, every reducer of any group can check
the part it receives against that commitment, and the validators score exactly what the
parts decode to (`validation.admission`, scheme ``wire``). Serialization is protobuf with
``deterministic=True``: the bytes a reducer re-serializes from the message it parsed are
the bytes the sender committed to.

`part_layout` mirrors hivemind's private splitting code; `tests/averaging/test_parts.py`
compares it with a real `TensorPartContainer` so that a change there fails loudly.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from google.protobuf.message import DecodeError  # type: ignore[import-untyped]
from hivemind.compression import CompressionInfo
from hivemind.proto import runtime_pb2

from averaging.robust import aggregate
from averaging.settings import RobustConfig
from averaging.sparseloco import SparseLoCoError, SparseSpec, decode_bytes, encode
from averaging.wire import SPARSE_DTYPE_PREFIX, codec_for, decode_part
from common.errors import TensormineError

# What each wire codec's parts may say about themselves before they are decoded.
_ALLOWED: dict[str, tuple[int, tuple[str, ...]]] = {
    "none": (runtime_pb2.CompressionType.NONE, ("float32",)),
    "fp16": (runtime_pb2.CompressionType.FLOAT16, ("float32",)),
    "int8": (runtime_pb2.CompressionType.UNIFORM_8BIT, ("float32",)),
    "topk": (runtime_pb2.CompressionType.NONE, (SPARSE_DTYPE_PREFIX,)),
}


class PartError(TensormineError, ValueError):
    """Serialized parts that do not decode to the shard's tensors (named part and cause)."""


@dataclass(frozen=True)
class PartSpan:
    """Part k: values [start, stop) of the flattened tensor at `tensor` (template order)."""

    tensor: int
    start: int
    stop: int

    @property
    def size(self) -> int:
        return self.stop - self.start


def _part_values(dtype: torch.dtype, codec: Any, part_size_bytes: int) -> int:
    info = CompressionInfo.from_tensor(torch.empty(0, dtype=dtype))
    element = torch.empty((), dtype=dtype).element_size()
    return int(part_size_bytes / (element * codec.estimate_compression_ratio(info)))


def part_layout(
    shapes: Sequence[Sequence[int]], codec: Any, part_size_bytes: int
) -> list[PartSpan]:
    """The parts hivemind cuts fp32 tensors of these shapes into, in order."""
    spans = []
    for index, shape in enumerate(shapes):
        numel = 1
        for d in shape:
            numel *= int(d)
        step = _part_values(torch.float32, codec, part_size_bytes)
        if step < 1:
            raise ValueError(f"part_size_bytes {part_size_bytes} is too small for this codec")
        spans += [PartSpan(index, s, min(s + step, numel)) for s in range(0, numel, step)]
    return spans


def encode_parts(
    tensors: Sequence[torch.Tensor], layout: Sequence[PartSpan], codec: Any
) -> list[bytes]:
    """Each part of the fp32 `tensors` as the codec serializes it for the wire."""
    out = []
    infos = [CompressionInfo.from_tensor(t, key=i) for i, t in enumerate(tensors)]
    index_in_tensor: dict[int, int] = {}
    for span in layout:
        j = index_in_tensor.get(span.tensor, 0)
        index_in_tensor[span.tensor] = j + 1
        flat = tensors[span.tensor].detach().reshape(-1)[span.start : span.stop]
        info = infos[span.tensor].get_part(j, span.size)
        message = codec.compress(flat, info, False)
        out.append(message.SerializeToString(deterministic=True))
    return out


def part_digest(blob: bytes) -> str:
    """sha256 (hex) of one serialized part."""
    return hashlib.sha256(blob).hexdigest()


def message_digest(message: Any) -> str:
    """The digest of a part as a reducer received it (a parsed `runtime_pb2.Tensor`)."""
    return part_digest(message.SerializeToString(deterministic=True))


def decode_parts(
    blobs: Sequence[bytes], layout: Sequence[PartSpan], wire: str, *, max_part_bytes: int
) -> list[torch.Tensor]:
    """The fp32 values of each serialized part; `PartError` for a part that does not parse,
    names another codec or dtype, is oversize, holds the wrong number of values or
    decodes to non-finite ones."""
    if len(blobs) != len(layout):
        raise PartError(f"{len(blobs)} parts, the shard has {len(layout)}")
    compression, dtypes = _ALLOWED[wire]
    out = []
    for k, (blob, span) in enumerate(zip(blobs, layout, strict=True)):
        if len(blob) > max_part_bytes:
            raise PartError(f"part {k} is {len(blob)} bytes, at most {max_part_bytes}")
        try:
            message = runtime_pb2.Tensor.FromString(blob)
        except DecodeError as exc:
            raise PartError(f"part {k} does not parse: {exc}") from None
        if message.compression != compression or not any(
            message.dtype.startswith(d) for d in dtypes
        ):
            raise PartError(
                f"part {k} is {runtime_pb2.CompressionType.Name(message.compression)} "
                f"{message.dtype!r}, the wire is {wire}"
            )
        try:
            value = decode_part(message).reshape(-1)
        except (ValueError, TypeError, RuntimeError) as exc:
            raise PartError(f"part {k} does not decode: {exc}") from None
        if value.numel() != span.size:
            raise PartError(f"part {k} holds {value.numel()} values, the layout {span.size}")
        if not bool(torch.isfinite(value).all()):
            raise PartError(f"part {k} decodes to non-finite values")
        out.append(value)
    return out


def assemble(
    values: Sequence[torch.Tensor], layout: Sequence[PartSpan], shapes: Mapping[str, Sequence[int]]
) -> dict[str, torch.Tensor]:
    """Tensors (names in `shapes`' order = the template order) from their parts' values."""
    names = list(shapes)
    flat = [torch.empty(int(torch.Size(tuple(shapes[n])).numel())) for n in names]
    for value, span in zip(values, layout, strict=True):
        flat[span.tensor][span.start : span.stop] = value
    return {n: f.reshape(tuple(shapes[n])) for n, f in zip(names, flat, strict=True)}


SPARSELOCO = "sparseloco"


def _spec(wire: str, sparse: SparseSpec | None) -> SparseSpec:
    if sparse is None:
        raise ValueError(f"the {wire} wire needs its SparseSpec (AveragingConfig.sparse_spec)")
    return sparse


def part_count(shapes: Sequence[Sequence[int]], wire: str, part_size_bytes: int) -> int:
    """How many parts a shard of these shapes is cut into on this wire: hivemind's parts
    for the all-reduced codecs, one message for the all-gathered sparseloco."""
    if wire == SPARSELOCO:
        return 1
    return len(part_layout(shapes, codec_for(wire), part_size_bytes))


def wire_parts(
    tensors: Mapping[str, torch.Tensor],
    wire: str,
    part_size_bytes: int,
    *,
    sparse: SparseSpec | None = None,
) -> tuple[list[bytes], dict[str, torch.Tensor]]:
    """(serialized parts, what they decode to) of fp32 `tensors` in their order. The
    sparseloco wire (`sparse` = its spec) makes one part, the shard's whole message,
    without error feedback (`averaging.group.ShardAverager.prepare` keeps that)."""
    if wire == SPARSELOCO:
        message = encode(tensors, _spec(wire, sparse))
        return [message.to_bytes()], {n: message.decoded[n] for n in tensors}
    codec = codec_for(wire)
    ordered = [t.detach().to("cpu", torch.float32).contiguous() for t in tensors.values()]
    layout = part_layout([tuple(t.shape) for t in ordered], codec, part_size_bytes)
    blobs = encode_parts(ordered, layout, codec)
    shapes = {n: tuple(t.shape) for n, t in tensors.items()}
    biggest = max(len(b) for b in blobs)
    values = decode_parts(blobs, layout, wire, max_part_bytes=biggest)
    return blobs, assemble(values, layout, shapes)


def reduce_parts(
    rows: Sequence[Mapping[str, torch.Tensor]],
    weights: Sequence[float],
    shapes: Mapping[str, Sequence[int]],
    wire: str,
    part_size_bytes: int,
    robust: RobustConfig,
) -> dict[str, torch.Tensor]:
    """What a group's reducers send back for these members' decoded parts, bit for bit:
    per part, the members' rows in the order given (a group orders them by hotkey) with
    their ledger `weights`, combined by `averaging.robust.aggregate`, encoded once with the
    wire codec and decoded. Anyone with the members' published parts, the pinned weights
    and the config can recompute a group's average this way.

    On the sparseloco wire every peer holds every member's whole message (an all-gather,
    `averaging.allgather`): the rows are combined over the whole shard at once, in fp32,
    and not encoded again."""
    if not rows or len(rows) != len(weights):
        raise ValueError("need one weight per row, and at least one row")
    names = list(shapes)
    if wire == SPARSELOCO:
        w64 = torch.tensor(list(weights), dtype=torch.float64)
        stack = torch.stack(
            [
                torch.cat([r[n].detach().to("cpu", torch.float32).reshape(-1) for n in names])
                for r in rows
            ]
        )
        whole = aggregate(stack, w64, robust).to(torch.float32)
        out, offset = {}, 0
        for n in names:
            size = int(torch.Size(tuple(shapes[n])).numel())
            out[n] = whole[offset : offset + size].reshape(tuple(shapes[n])).clone()
            offset += size
        return out
    codec = codec_for(wire)
    layout = part_layout([shapes[n] for n in names], codec, part_size_bytes)
    flats = [[r[n].detach().to("cpu", torch.float32).reshape(-1) for n in names] for r in rows]
    w = torch.tensor(list(weights), dtype=torch.float64)
    values = []
    for span in layout:
        stack = torch.stack([f[span.tensor][span.start : span.stop] for f in flats])
        value = aggregate(stack, w, robust)
        message = codec.compress(value, CompressionInfo.from_tensor(value), False)
        values.append(decode_part(message).reshape(-1))
    return assemble(values, layout, shapes)


# ---- a contribution whose payload is its wire parts -------------------------------------

WIRE_SCHEME = "wire"
PART_NAME = "part.{:05d}"


def payload_tensors(blobs: Sequence[bytes]) -> dict[str, torch.Tensor]:
    """The serialized parts as the tensors of a contribution file (one uint8 row each)."""
    return {
        PART_NAME.format(k): torch.frombuffer(bytearray(b), dtype=torch.uint8)
        for k, b in enumerate(blobs)
    }


def payload_params(
    blobs: Sequence[bytes], names: Sequence[str], wire: str, part_size_bytes: int
) -> dict[str, Any]:
    """The compression params of such a contribution: how to cut and decode it, and the
    sha256 of every part (what reducers check the parts they receive against)."""
    return {
        "scheme": WIRE_SCHEME,
        "wire": wire,
        "part_size_bytes": int(part_size_bytes),
        "names": list(names),
        "parts": [part_digest(b) for b in blobs],
    }


def decode_payload(
    tensors: Mapping[str, torch.Tensor],
    params: Mapping[str, Any],
    shapes: Mapping[str, Sequence[int]],
    *,
    wire: str,
    part_size_bytes: int,
    sparse: SparseSpec | None = None,
) -> dict[str, torch.Tensor]:
    """The Δ a wire-parts contribution holds, once its params are the run's (`wire`, part
    size, the shard's tensor names in order) and every part is the one its digest names;
    `PartError` saying what is off otherwise. (`sparse`: the run's spec on the sparseloco
    wire, whose one part is a message `averaging.sparseloco.decode_bytes` checks.)"""
    keys = {"scheme", "wire", "part_size_bytes", "names", "parts"}
    if set(params) != keys or params["scheme"] != WIRE_SCHEME:
        raise PartError(f"wire params must have exactly the keys {sorted(keys)}")
    if params["wire"] != wire or params["part_size_bytes"] != part_size_bytes:
        raise PartError(
            f"parts of {params['wire']!r} at {params['part_size_bytes']} bytes, "
            f"the run uses {wire!r} at {part_size_bytes}"
        )
    if params["names"] != list(shapes):
        raise PartError("the parts cut other tensors, or in another order, than the shard's")
    count = part_count([shapes[n] for n in shapes], wire, part_size_bytes)
    digests = params["parts"]
    expected = [PART_NAME.format(k) for k in range(count)]
    if sorted(tensors) != expected or not isinstance(digests, list) or len(digests) != count:
        raise PartError(f"the shard has {count} parts, named part.00000 on")
    blobs = []
    for k, name in enumerate(expected):
        t = tensors[name]
        if t.dtype != torch.uint8 or t.dim() != 1:
            raise PartError(f"{name} must be one row of bytes")
        blob = t.numpy().tobytes()
        if part_digest(blob) != digests[k]:
            raise PartError(f"{name} is not the part its digest names")
        blobs.append(blob)
    if wire == SPARSELOCO:
        try:
            got = decode_bytes(blobs[0], shapes, _spec(wire, sparse))
            return {n: got[n] for n in shapes}
        except SparseLoCoError as exc:
            raise PartError(f"part.00000: {exc}") from None
    codec = codec_for(wire)
    layout = part_layout([shapes[n] for n in shapes], codec, part_size_bytes)
    # A part is at most its values in fp32 plus the codec's header and lookup table.
    largest = max(span.size for span in layout) * 4 + 4096
    values = decode_parts(blobs, layout, wire, max_part_bytes=largest)
    return assemble(values, layout, shapes)
