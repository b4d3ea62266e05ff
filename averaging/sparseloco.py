"""The SparseLoCo codec: chunked top-k, 2-bit values, packed indices, sender error feedback.

    spec = SparseSpec(chunk=4096, k=64)                    # 64 of every 4,096 values
    feedback = ErrorFeedback(beta=0.95)
    sent = feedback.compress(delta, spec)                  # Encoded: payload + decoded values
    blob = sent.payload.to_bytes()                         # safetensors; commit to its sha256
    delta_hat = decode_bytes(blob, shapes, spec)           # a peer, with its own shapes
    feedback.commit(sent)                                  # once the values went out

SparseLoCo (Sarfi et al., arXiv 2508.15706) sends each pseudo-gradient as the top-k of an
error-feedback buffer, ``e ← β·e + Δ``, ``q = Q(top-k(e))``, ``e ← e − q``: what the
message drops, top-k or quantization alike, stays in the buffer and goes out later, and the
buffer's decay β plays the part of DiLoCo's outer momentum. Its wire, which this module
reproduces from the paper's description (not from its code):

- **Chunks.** Each tensor's flattened values are cut into chunks of `chunk` values (the
  last one may be shorter; chunks never span tensors). A full chunk keeps its `k` values
  of largest magnitude, a short one of ``L`` values keeps ``⌈k·L/chunk⌉`` (at least 1).
- **Indices** are positions within the chunk, strictly ascending (one encoding per set, so
  equal messages have equal bytes). The paper packs each in ``b = ⌈log₂ chunk⌉`` bits (12
  for 4,096), most significant bit first, all of a shard's indices in one bit string
  (``positions="packed"``). ``positions="rice"`` (the wire's default here) sends the gaps
  between them instead, Rice-coded: see "Rice-coded positions" below.
- **Values** are 2 bits: a sign bit and a level bit. Each chunk carries two magnitudes
  (float16): ``lo``, the mean magnitude of the lower half of its kept values by rank, and
  ``hi`` of the upper half; a value decodes to ``±lo`` or ``±hi``. Codes are packed four
  to a byte, the first code in the two lowest bits.

So a full chunk costs ``k·(b + 2) + 32`` bits packed: 928 bits for 4,096 values at k = 64,
i.e. 0.2266 bits per parameter, 141× fewer than fp32.

**Rice-coded positions.** 64 ascending positions out of 4,096 carry at most
``log₂ C(4096, 64) ≈ 476`` bits of information, 7.4 a position, not 12. The gaps
``g₀ = p₀``, ``gⱼ = pⱼ − pⱼ₋₁ − 1`` have a mean near ``chunk/k``; a Rice code with parameter
``r`` sends ``g >> r`` in unary and ``g mod 2ʳ`` in ``r`` bits, about 7.5 bits a position at
``r = 5`` or 6 — ~640 bits a chunk with the values and levels, 0.156 bits per parameter
(≥ 100× fewer bytes than fp32 DiLoCo's all-reduce at n = 4; see RESULTS.md). The `idx`
tensor is then ``[r][remainders][unary]``: one byte ``r``, the ``count·r`` remainder bits
packed like the fixed-width indices, and the quotients as a bit string in which ``q``
zeros and a one stand for ``q`` (so no trailing byte may be all padding). Remainders and
quotients in separate strings make decoding a few vectorized passes instead of a bit-serial
loop. ``r`` is the one in ``[0, b]`` that minimizes the bits (ties to the smaller) and a
receiver checks that it is: one message, one encoding, so equal messages still have equal
digests. Lossless: a receiver decodes the same positions either way.

A shard's message is three tensors, whatever its number of parameters: ``idx`` (uint8; of
fixed length when packed, of a bounded one when Rice-coded), ``val`` (uint8) and ``lvl``
(float16, ``[chunks, 2]``), written as safetensors with the spec in its metadata. Tensor
names are taken in sorted order, so sender and receiver need only agree on the set of names
and shapes, which the receiver takes from its own model, never from the message.

`decode` treats a message as hostile and refuses, by name, before any value is used: a
blob over the size the shapes allow, one that is not safetensors (truncated), metadata
that disagrees with the receiver's spec, a tensor missing, extra, of the wrong dtype or of
the wrong size (a header that lies), indices past the end of their chunk, repeated or out
of order, bits set past the last code, and levels that are not finite, negative or
``lo > hi``; for Rice-coded positions also a parameter out of range or not the minimizing
one, a quotient string with the wrong number of codes or trailing padding, and positions
past their chunk. Every failure is a `SparseLoCoError`.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Literal

import numpy as np
import torch
from safetensors import SafetensorError
from safetensors.torch import load as load_safetensors

from common.errors import TensormineError

FORMAT = "tensormine-sparseloco/1"
IDX, VAL, LVL = "idx", "val", "lvl"
FP16_MAX = float(torch.finfo(torch.float16).max)
_ST_DTYPES = {torch.uint8: "U8", torch.float16: "F16"}
# safetensors' JSON header for three tensors and our metadata stays well under this.
HEADER_ALLOWANCE = 1024


class SparseLoCoError(TensormineError, ValueError):
    """A message that cannot be encoded, or one that is malformed (named in the text)."""


@dataclass(frozen=True)
class SparseSpec:
    """`k` of every `chunk` values (SparseLoCo: 64 of 4,096)."""

    chunk: int = 4096
    k: int = 64
    positions: Literal["packed", "rice"] = "packed"

    def __post_init__(self) -> None:
        if not 2 <= self.chunk <= 1 << 16:
            raise SparseLoCoError(f"chunk must be in [2, 65536], got {self.chunk}")
        if not 1 <= self.k <= self.chunk:
            raise SparseLoCoError(f"k must be in [1, chunk], got {self.k}")
        if self.positions not in ("packed", "rice"):
            raise SparseLoCoError(f"positions must be packed or rice, got {self.positions!r}")

    @property
    def index_bits(self) -> int:
        return max(1, (self.chunk - 1).bit_length())

    @property
    def density(self) -> float:
        return self.k / self.chunk

    def kept(self, length: int) -> int:
        """Values kept in a chunk of `length` values (≥ 1)."""
        return max(1, min(length, math.ceil(self.k * length / self.chunk)))


@dataclass(frozen=True)
class Layout:
    """Where every chunk of a shard lies, for given shapes and spec (both sides compute it)."""

    names: tuple[str, ...]
    shapes: tuple[tuple[int, ...], ...]
    lengths: np.ndarray  # values per chunk, all tensors in name order
    kept: np.ndarray  # kept values per chunk
    starts: np.ndarray  # flat offset of each chunk in the concatenated vector

    @property
    def chunks(self) -> int:
        return int(self.lengths.size)

    @property
    def total_kept(self) -> int:
        return int(self.kept.sum())

    @property
    def numel(self) -> int:
        return int(self.lengths.sum())


def layout(shapes: Mapping[str, Sequence[int]], spec: SparseSpec) -> Layout:
    names = tuple(sorted(shapes))
    dims = tuple(tuple(int(d) for d in shapes[n]) for n in names)
    lengths: list[int] = []
    for shape in dims:
        numel = math.prod(shape)
        full, tail = divmod(numel, spec.chunk)
        lengths += [spec.chunk] * full + ([tail] if tail else [])
    arr = np.asarray(lengths, dtype=np.int64)
    kept = np.asarray([spec.kept(n) for n in lengths], dtype=np.int64)
    starts = np.concatenate([[0], np.cumsum(arr)[:-1]]).astype(np.int64)
    return Layout(names, dims, arr, kept, starts)


def sizes(lay: Layout, spec: SparseSpec) -> dict[str, tuple[torch.dtype, tuple[int, ...]]]:
    """The dtype and shape of each of the message's three tensors; for Rice-coded
    positions, the largest `idx` a well-formed message can have (`rice.max_bytes`)."""
    k = lay.total_kept
    idx = -(-k * spec.index_bits // 8) if spec.positions == "packed" else rice_max_bytes(k, spec)
    return {
        IDX: (torch.uint8, (idx,)),
        VAL: (torch.uint8, (-(-k // 4),)),
        LVL: (torch.float16, (lay.chunks, 2)),
    }


def max_message_bytes(shapes: Mapping[str, Sequence[int]], spec: SparseSpec) -> int:
    """The largest blob a well-formed message for these shapes can be: its tensors' bytes
    and a bounded safetensors header. Anything longer is refused before it is parsed."""
    want = sizes(layout(shapes, spec), spec)
    return HEADER_ALLOWANCE + sum(
        math.prod(shape) * torch.empty((), dtype=dtype).element_size()
        for dtype, shape in want.values()
    )


# ---- bit packing ------------------------------------------------------------------------


def pack_bits(values: np.ndarray, bits: int) -> np.ndarray:
    """Unsigned integers < 2**bits as one bit string, each most significant bit first,
    zero-padded to whole bytes."""
    v = np.asarray(values, dtype=np.uint32)
    if v.size and int(v.max()) >= 1 << bits:
        raise SparseLoCoError(f"a value does not fit in {bits} bits")
    shifts = np.arange(bits - 1, -1, -1, dtype=np.uint32)
    return np.packbits(((v[:, None] >> shifts) & 1).astype(np.uint8).reshape(-1))


def unpack_bits(packed: np.ndarray, count: int, bits: int, what: str) -> np.ndarray:
    """The `count` integers `pack_bits` wrote; padding bits must be zero."""
    flat = np.unpackbits(np.asarray(packed, dtype=np.uint8))
    if flat.size < count * bits:
        raise SparseLoCoError(f"{what}: {flat.size} bits hold fewer than {count} values")
    if flat[count * bits :].any():
        raise SparseLoCoError(f"{what}: bits set past the last value")
    weights = (1 << np.arange(bits - 1, -1, -1, dtype=np.int64)).astype(np.int64)
    result: np.ndarray = flat[: count * bits].reshape(count, bits).astype(np.int64) @ weights
    return result


def pack_codes(codes: np.ndarray) -> np.ndarray:
    """2-bit codes, four to a byte, the first in the two lowest bits."""
    c = np.asarray(codes, dtype=np.uint8)
    padded = np.zeros(-(-c.size // 4) * 4, dtype=np.uint8)
    padded[: c.size] = c
    q = padded.reshape(-1, 4)
    packed: np.ndarray = q[:, 0] | (q[:, 1] << 2) | (q[:, 2] << 4) | (q[:, 3] << 6)
    return packed.astype(np.uint8)


def _pack_positions(positions: np.ndarray, lay: Layout, spec: SparseSpec) -> np.ndarray:
    if spec.positions == "packed":
        return pack_bits(positions, spec.index_bits).copy()
    return rice_encode(_gaps(positions, lay.kept), spec.index_bits)


def _gaps(positions: np.ndarray, kept: np.ndarray) -> np.ndarray:
    """Ascending positions per chunk (`kept[c]` of them in chunk c) as gaps: the first
    position itself, then the distance to the previous one less one."""
    p = np.asarray(positions, dtype=np.int64)
    gaps = np.diff(p, prepend=np.int64(-1)) - 1
    firsts = np.cumsum(kept) - kept
    gaps[firsts[kept > 0]] = p[firsts[kept > 0]]
    return gaps


def rice_cost(gaps: np.ndarray, r: int) -> int:
    """Bits of the Rice code of these gaps with parameter r (unary quotient + r bits)."""
    return int(gaps.size * (r + 1) + int((gaps >> r).sum()))


def rice_parameter(gaps: np.ndarray, max_r: int) -> int:
    """The r in [0, max_r] with the fewest bits, the smallest on a tie."""
    costs = [rice_cost(gaps, r) for r in range(max_r + 1)]
    return int(np.argmin(costs))


def rice_max_bytes(count: int, spec: SparseSpec) -> int:
    """The longest Rice-coded `idx` for `count` positions: the chosen r never costs more
    than r = b (every quotient 0: b + 1 bits a position), plus the r byte and each
    string's padding."""
    return 1 + -(-count * (spec.index_bits + 1) // 8) + 2


def rice_encode(gaps: np.ndarray, max_r: int) -> np.ndarray:
    """``[r][remainders, r bits each][quotients: q zeros then a one]`` as bytes."""
    g = np.asarray(gaps, dtype=np.int64)
    r = rice_parameter(g, max_r)
    remainders = pack_bits(g & ((1 << r) - 1), r) if r else np.zeros(0, np.uint8)
    q = g >> r
    unary = np.zeros(int(q.sum()) + g.size, dtype=np.uint8)
    unary[np.cumsum(q + 1) - 1] = 1
    return np.concatenate([np.asarray([r], np.uint8), remainders, np.packbits(unary)])


def rice_decode(idx: np.ndarray, count: int, max_r: int) -> np.ndarray:
    """The `count` gaps `rice_encode` wrote, from untrusted bytes; `SparseLoCoError`
    naming what is wrong."""
    data = np.asarray(idx, dtype=np.uint8)
    if data.size < 1:
        raise SparseLoCoError(f"{IDX}: empty, no Rice parameter")
    r = int(data[0])
    if r > max_r:
        raise SparseLoCoError(f"{IDX}: Rice parameter {r} out of range [0, {max_r}]")
    rem_bytes = -(-count * r // 8)
    if data.size < 1 + rem_bytes:
        raise SparseLoCoError(f"{IDX}: truncated in the remainders")
    rem = (
        unpack_bits(data[1 : 1 + rem_bytes], count, r, IDX)
        if r
        else np.zeros(count, dtype=np.int64)
    )
    unary = data[1 + rem_bytes :]
    ones = np.flatnonzero(np.unpackbits(unary))
    if ones.size != count:
        raise SparseLoCoError(f"{IDX}: {ones.size} Rice quotients, expected {count}")
    if unary.size != (-(-(int(ones[-1]) + 1) // 8) if count else 0):
        raise SparseLoCoError(f"{IDX}: the quotients end before their last byte")
    q = np.diff(ones, prepend=np.int64(-1)) - 1
    gaps: np.ndarray = (q << r) | rem
    if count and r != rice_parameter(gaps, max_r):
        raise SparseLoCoError(f"{IDX}: Rice parameter {r} is not the minimizing one")
    return gaps


def _positions_from_gaps(gaps: np.ndarray, kept: np.ndarray) -> np.ndarray:
    """Inverse of `_gaps`: running sums of (gap + 1) restarted at each chunk, less one."""
    steps = np.asarray(gaps, dtype=np.int64) + 1
    running = np.cumsum(steps)
    firsts = np.cumsum(kept) - kept
    base = np.zeros(kept.size, dtype=np.int64)
    live = kept > 0
    base[live] = running[firsts[live]] - steps[firsts[live]]
    result: np.ndarray = running - np.repeat(base, kept) - 1
    return result


def unpack_codes(packed: np.ndarray, count: int) -> np.ndarray:
    b = np.asarray(packed, dtype=np.uint8)
    codes = np.stack([(b >> s) & 3 for s in (0, 2, 4, 6)], axis=1).reshape(-1)
    if codes[count:].any():
        raise SparseLoCoError(f"{VAL}: bits set past the last code")
    result: np.ndarray = codes[:count]
    return result


# ---- encoding -----------------------------------------------------------------------------


def _metadata(spec: SparseSpec) -> dict[str, str]:
    """The message's safetensors metadata. Packed messages keep the paper-wire format's
    keys (so their bytes are what they were); Rice-coded ones say so."""
    meta = {"format": FORMAT, "chunk": str(spec.chunk), "k": str(spec.k)}
    if spec.positions != "packed":
        meta["positions"] = spec.positions
    return meta


@dataclass(frozen=True)
class Message:
    """One shard's message: the three tensors, and the values they decode to."""

    tensors: dict[str, torch.Tensor]
    decoded: dict[str, torch.Tensor]
    spec: SparseSpec

    def to_bytes(self) -> bytes:
        """The message as a safetensors file, written canonically (sorted JSON keys,
        tensors in name order): equal messages have equal bytes, so equal digests.
        (The safetensors library orders its metadata by a per-process hash seed.)"""
        meta = _metadata(self.spec)
        header: dict[str, object] = {"__metadata__": meta}
        data, offset = [], 0
        for name in sorted(self.tensors):
            t = self.tensors[name].contiguous()
            raw = t.view(torch.uint8).numpy().tobytes() if t.numel() else b""
            header[name] = {
                "dtype": _ST_DTYPES[t.dtype],
                "shape": list(t.shape),
                "data_offsets": [offset, offset + len(raw)],
            }
            data.append(raw)
            offset += len(raw)
        text = json.dumps(header, sort_keys=True, separators=(",", ":")).encode()
        text += b" " * (-len(text) % 8)  # safetensors aligns the data to 8 bytes
        return len(text).to_bytes(8, "little") + text + b"".join(data)

    @property
    def nbytes(self) -> int:
        """The tensors' bytes (the blob adds safetensors' header, ~200 bytes)."""
        return sum(t.numel() * t.element_size() for t in self.tensors.values())


def _select(rows: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per row: ascending positions of its k largest magnitudes, their 2-bit codes, and the
    row's two levels (lo, hi) as float16."""
    pos = rows.abs().topk(k, dim=1).indices.sort(dim=1).values
    vals = rows.gather(1, pos)
    mags = vals.abs()
    order = mags.argsort(dim=1, stable=True)
    rank = torch.empty_like(order).scatter_(1, order, torch.arange(k).expand_as(order).contiguous())
    half = k // 2
    upper = rank >= half
    sorted_mags = mags.gather(1, order)
    hi = sorted_mags[:, half:].mean(dim=1)
    lo = sorted_mags[:, :half].mean(dim=1) if half else hi
    levels = torch.stack([lo, hi], dim=1).clamp(max=FP16_MAX).to(torch.float16)
    codes = (vals < 0).to(torch.uint8) | (upper.to(torch.uint8) << 1)
    return pos, codes, levels


def encode(values: Mapping[str, torch.Tensor], spec: SparseSpec) -> Message:
    """The message for these (finite) values; `Message.decoded` is what every receiver
    will decode, to the bit."""
    shapes = {n: tuple(t.shape) for n, t in values.items()}
    lay = layout(shapes, spec)
    positions, codes, levels, chunk_of = [], [], [], []
    chunk_no = 0
    for name in lay.names:
        flat = values[name].detach().to("cpu", torch.float32).reshape(-1)
        if not bool(torch.isfinite(flat).all()):
            raise SparseLoCoError(f"{name}: non-finite values cannot be encoded")
        full, tail = divmod(flat.numel(), spec.chunk)
        pieces = []
        if full:
            pieces.append((flat[: full * spec.chunk].view(full, spec.chunk), spec.k))
        if tail:
            pieces.append((flat[full * spec.chunk :].view(1, tail), spec.kept(tail)))
        for rows, k in pieces:
            pos, code, lvl = _select(rows, k)
            positions.append(pos.reshape(-1))
            codes.append(code.reshape(-1))
            levels.append(lvl)
            chunk_of.append(torch.arange(chunk_no, chunk_no + rows.shape[0]).repeat_interleave(k))
            chunk_no += rows.shape[0]
    pos_all = torch.cat(positions).numpy() if positions else np.zeros(0, np.int64)
    code_all = torch.cat(codes).numpy() if codes else np.zeros(0, np.uint8)
    lvl_all = torch.cat(levels) if levels else torch.zeros(0, 2, dtype=torch.float16)
    tensors = {
        IDX: torch.from_numpy(_pack_positions(pos_all, lay, spec)),
        VAL: torch.from_numpy(pack_codes(code_all).copy()),
        LVL: lvl_all.contiguous(),
    }
    chunk_ids = torch.cat(chunk_of).numpy() if chunk_of else np.zeros(0, np.int64)
    decoded = _expand(lay, chunk_ids, pos_all, code_all, lvl_all.to(torch.float32))
    return Message(tensors, decoded, spec)


def _expand(
    lay: Layout,
    chunk_ids: np.ndarray,
    positions: np.ndarray,
    codes: np.ndarray,
    levels: torch.Tensor,
) -> dict[str, torch.Tensor]:
    """Dense fp32 tensors from (chunk, position, code) triples and the chunks' levels."""
    chunk_t = torch.from_numpy(np.asarray(chunk_ids, dtype=np.int64))
    code_t = torch.from_numpy(np.asarray(codes, dtype=np.int64))
    sign = 1.0 - 2.0 * (code_t & 1).to(torch.float32)
    value = sign * levels[chunk_t, code_t >> 1] if chunk_t.numel() else torch.zeros(0)
    where = torch.from_numpy(lay.starts[chunk_ids] + np.asarray(positions, dtype=np.int64))
    flat = torch.zeros(lay.numel, dtype=torch.float32)
    flat[where] = value
    out, offset = {}, 0
    for name, shape in zip(lay.names, lay.shapes, strict=True):
        n = math.prod(shape)
        out[name] = flat[offset : offset + n].reshape(shape).clone()
        offset += n
    return out


# ---- decoding -----------------------------------------------------------------------------


def decode(
    tensors: Mapping[str, torch.Tensor],
    shapes: Mapping[str, Sequence[int]],
    spec: SparseSpec,
) -> dict[str, torch.Tensor]:
    """Dense fp32 tensors, shaped by the caller's `shapes`, from an untrusted message's
    tensors. Raises `SparseLoCoError` naming what is wrong."""
    lay = layout(shapes, spec)
    want = sizes(lay, spec)
    if set(tensors) != set(want):
        raise SparseLoCoError(f"message tensors {sorted(tensors)}, expected {sorted(want)}")
    for key, (dtype, shape) in want.items():
        t = tensors[key]
        if t.dtype != dtype:
            raise SparseLoCoError(f"{key}: dtype {t.dtype}, expected {dtype}")
        if key == IDX and spec.positions == "rice":
            if t.dim() != 1 or t.numel() > shape[0]:
                raise SparseLoCoError(
                    f"{key}: shape {tuple(t.shape)}, expected one row of at most {shape[0]} bytes"
                )
        elif tuple(t.shape) != shape:
            raise SparseLoCoError(
                f"{key}: shape {tuple(t.shape)}, expected {shape} (wrong chunk count or sizes)"
            )
    levels = tensors[LVL].to(torch.float32)
    if not bool(torch.isfinite(levels).all()):
        raise SparseLoCoError(f"{LVL}: levels must be finite")
    if bool((levels < 0).any()) or bool((levels[:, 0] > levels[:, 1]).any()):
        raise SparseLoCoError(f"{LVL}: levels must satisfy 0 ≤ lo ≤ hi")
    count = lay.total_kept
    if spec.positions == "packed":
        positions = unpack_bits(tensors[IDX].numpy(), count, spec.index_bits, IDX)
    else:
        gaps = rice_decode(tensors[IDX].numpy(), count, spec.index_bits)
        positions = _positions_from_gaps(gaps, lay.kept)
    codes = unpack_codes(tensors[VAL].numpy(), count)
    chunk_ids = np.repeat(np.arange(lay.chunks, dtype=np.int64), lay.kept)
    if count and bool((positions >= lay.lengths[chunk_ids]).any()):
        raise SparseLoCoError(f"{IDX}: an index lies past the end of its chunk")
    same = chunk_ids[1:] == chunk_ids[:-1]
    if count > 1 and bool((positions[1:][same] <= positions[:-1][same]).any()):
        raise SparseLoCoError(f"{IDX}: indices within a chunk are repeated or out of order")
    return _expand(lay, chunk_ids, positions, codes, levels)


def _header(blob: bytes) -> dict[str, object]:
    if len(blob) < 8:
        raise SparseLoCoError("message truncated: shorter than its length prefix")
    n = int.from_bytes(blob[:8], "little")
    if n > HEADER_ALLOWANCE or 8 + n > len(blob):
        raise SparseLoCoError(f"message truncated or its header length ({n}) lies")
    try:
        header = json.loads(blob[8 : 8 + n])
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise SparseLoCoError(f"message header is not JSON: {exc}") from None
    if not isinstance(header, dict):
        raise SparseLoCoError("message header is not a JSON object")
    return header


def decode_bytes(
    blob: bytes, shapes: Mapping[str, Sequence[int]], spec: SparseSpec
) -> dict[str, torch.Tensor]:
    """`decode` of a serialized message, after its size and metadata are checked."""
    limit = max_message_bytes(shapes, spec)
    if len(blob) > limit:
        raise SparseLoCoError(f"message oversize: {len(blob)} bytes, at most {limit}")
    meta = _header(blob).get("__metadata__")
    expected = _metadata(spec)
    if meta != expected:
        raise SparseLoCoError(f"message metadata {meta!r}, expected {expected}")
    try:
        tensors = load_safetensors(blob)
    except (SafetensorError, ValueError, RuntimeError) as exc:
        raise SparseLoCoError(f"message truncated or not safetensors: {exc}") from None
    return decode(tensors, shapes, spec)


# ---- error feedback -----------------------------------------------------------------------


@dataclass(frozen=True)
class Sent:
    """What `ErrorFeedback.compress` produced: the message, and the buffer it leaves."""

    message: Message
    residual: dict[str, torch.Tensor]


class ErrorFeedback:
    """The sender's buffer ``e``: ``e ← β·e + Δ``, send ``q = Q(top-k(e))``, ``e ← e − q``.

    `compress` leaves the buffer alone until `commit(sent)`: a round that never sent the
    message (or a crash before it) loses nothing. ``q + e_new = Δ + β·e_old`` up to fp32
    rounding, whatever the codec dropped."""

    def __init__(self, beta: float) -> None:
        if not 0 <= beta <= 1:
            raise SparseLoCoError(f"beta must be in [0, 1], got {beta}")
        self.beta = beta
        self.residual: dict[str, torch.Tensor] = {}

    def compress(self, delta: Mapping[str, torch.Tensor], spec: SparseSpec) -> Sent:
        extra = sorted(set(self.residual) - set(delta))
        if extra:
            raise SparseLoCoError(f"the buffer holds tensors the Δ lacks: {extra[:5]}")
        buffer = {}
        for name, d in delta.items():
            d32 = d.detach().to("cpu", torch.float32)
            old = self.residual.get(name)
            if old is not None and old.shape != d32.shape:
                raise SparseLoCoError(f"{name}: buffer shape {tuple(old.shape)} ≠ Δ's")
            buffer[name] = d32 if old is None else self.beta * old + d32
        message = encode(buffer, spec)
        return Sent(message, {n: buffer[n] - message.decoded[n] for n in buffer})

    def commit(self, sent: Sent) -> None:
        self.residual = {n: t.clone() for n, t in sent.residual.items()}
