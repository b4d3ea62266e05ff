"""Check a safetensors file byte by byte before any library trusts it, then load it.

    header = check_safetensors(path, max_header_bytes=16 << 20, max_file_bytes=1 << 30)
    tensors = load_safetensors(path, max_header_bytes=16 << 20, max_file_bytes=1 << 30)

A safetensors file is ``u64 little-endian N`` + ``N bytes of JSON header`` + data. The
header maps each tensor name to ``{"dtype", "shape", "data_offsets": [start, end]}``
relative to the start of the data. Files from miners are untrusted, so this module parses
the header itself and refuses, with a `Rejected` error, anything the spec does not allow:
a header longer than the limit or than the file, JSON that is not an object (or repeats a
key), an unknown dtype, a shape whose element count times the dtype's size is not the
byte span, spans that overlap, leave gaps, start anywhere but 0 or end anywhere but the
end of the file (truncated files and appended bytes both fail this). Pickles, zip
archives (``torch.save``) and files named ``.bin``/``.pt`` are told apart and named as
such. Only a file that passes is handed to `safetensors.torch.load_file`; nothing here
ever unpickles.
"""

from __future__ import annotations

import io
import json
import math
import struct
from dataclasses import dataclass
from pathlib import Path, PurePath
from typing import Any, BinaryIO

import torch

from store.errors import Rejected

# Bytes per element of every dtype the safetensors format defines at a whole byte size.
DTYPE_SIZES: dict[str, int] = {
    "BOOL": 1,
    "U8": 1,
    "I8": 1,
    "F8_E5M2": 1,
    "F8_E4M3": 1,
    "I16": 2,
    "U16": 2,
    "F16": 2,
    "BF16": 2,
    "I32": 4,
    "U32": 4,
    "F32": 4,
    "I64": 8,
    "U64": 8,
    "F64": 8,
}

TORCH_DTYPES: dict[torch.dtype, str] = {
    torch.bool: "BOOL",
    torch.uint8: "U8",
    torch.int8: "I8",
    torch.float8_e5m2: "F8_E5M2",
    torch.float8_e4m3fn: "F8_E4M3",
    torch.int16: "I16",
    torch.uint16: "U16",
    torch.float16: "F16",
    torch.bfloat16: "BF16",
    torch.int32: "I32",
    torch.uint32: "U32",
    torch.float32: "F32",
    torch.int64: "I64",
    torch.uint64: "U64",
    torch.float64: "F64",
}

# Extensions of pickle-based formats that must never stand where safetensors is expected.
PICKLE_SUFFIXES = frozenset({".bin", ".pt", ".pth", ".pkl", ".pickle", ".ckpt", ".joblib"})


@dataclass(frozen=True)
class TensorSpec:
    """Name-independent description of a tensor: safetensors dtype string and shape."""

    dtype: str
    shape: tuple[int, ...]

    @classmethod
    def of(cls, tensor: torch.Tensor) -> TensorSpec:
        if tensor.dtype not in TORCH_DTYPES:
            raise ValueError(f"dtype {tensor.dtype} cannot be stored in safetensors")
        return cls(TORCH_DTYPES[tensor.dtype], tuple(int(d) for d in tensor.shape))

    def to_json(self) -> dict[str, Any]:
        return {"dtype": self.dtype, "shape": list(self.shape)}


@dataclass(frozen=True)
class SafetensorsHeader:
    """What a checked header says: tensors by name, free-form metadata, where data starts."""

    tensors: dict[str, TensorSpec]
    metadata: dict[str, str]
    data_start: int
    file_size: int


def _sniff_format(head: bytes) -> str | None:
    """A human name for well-known non-safetensors formats, from the first bytes."""
    if head.startswith(b"PK\x03\x04"):
        return "a zip archive (torch.save format), which holds pickles"
    if head[:1] == b"\x80" and len(head) > 1 and 2 <= head[1] <= 5:
        return "a pickle"
    if head.startswith(b"\x93NUMPY"):
        return "a NumPy .npy file"
    return None


def _no_duplicate_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in pairs:
        if key in out:
            raise ValueError(f"key {key!r} appears twice")
        out[key] = value
    return out


def _parse_entry(name: str, entry: Any) -> tuple[TensorSpec, int, int]:
    if not isinstance(entry, dict) or set(entry) != {"dtype", "shape", "data_offsets"}:
        raise Rejected("bad_header", f"tensor {name!r}: entry must have dtype, shape, data_offsets")
    dtype, shape, offsets = entry["dtype"], entry["shape"], entry["data_offsets"]
    if not isinstance(dtype, str) or dtype not in DTYPE_SIZES:
        raise Rejected("bad_header", f"tensor {name!r}: unknown dtype {dtype!r}")
    if not isinstance(shape, list) or not all(
        isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in shape
    ):
        raise Rejected("bad_header", f"tensor {name!r}: shape {shape!r} is not a list of sizes")
    if (
        not isinstance(offsets, list)
        or len(offsets) != 2
        or not all(isinstance(o, int) and not isinstance(o, bool) and o >= 0 for o in offsets)
    ):
        raise Rejected("bad_header", f"tensor {name!r}: data_offsets {offsets!r} malformed")
    start, end = offsets
    expected = math.prod(shape) * DTYPE_SIZES[dtype]
    if end - start != expected:
        raise Rejected(
            "bad_header",
            f"tensor {name!r}: {dtype}{shape} needs {expected} bytes, offsets span {end - start}",
        )
    return TensorSpec(dtype, tuple(shape)), start, end


def check_safetensors(
    path: Path, *, max_header_bytes: int, max_file_bytes: int | None = None
) -> SafetensorsHeader:
    """Validate `path` as a well-formed safetensors file; raise `Rejected` otherwise.

    Reads only the first ``8 + N`` bytes; the data itself is not read.
    """
    _check_name(path.name)
    try:
        size = path.stat().st_size
    except FileNotFoundError:
        raise Rejected("not_found", f"{path.name}: no such file") from None
    if max_file_bytes is not None and size > max_file_bytes:
        raise Rejected("too_large", f"{path.name}: {size} bytes, limit {max_file_bytes}")
    with path.open("rb") as fh:
        return _check_stream(fh, size, path.name, max_header_bytes)


def check_safetensors_bytes(
    data: bytes, *, name: str, max_header_bytes: int, max_file_bytes: int | None = None
) -> SafetensorsHeader:
    """`check_safetensors` for a file already read into memory (`name` is its file name)."""
    _check_name(name)
    if max_file_bytes is not None and len(data) > max_file_bytes:
        raise Rejected("too_large", f"{name}: {len(data)} bytes, limit {max_file_bytes}")
    return _check_stream(io.BytesIO(data), len(data), name, max_header_bytes)


def _check_name(name: str) -> None:
    suffix = PurePath(name).suffix.lower()
    if suffix in PICKLE_SUFFIXES:
        raise Rejected("not_safetensors", f"{name}: {suffix} files hold pickles")
    if suffix != ".safetensors":
        raise Rejected("not_safetensors", f"{name}: expected a .safetensors file")


def _check_stream(fh: BinaryIO, size: int, label: str, max_header_bytes: int) -> SafetensorsHeader:
    """The header checks, reading the first ``8 + N`` bytes of `fh` (`size` bytes long)."""
    head = fh.read(8)
    # The first bytes of a pickle or zip can also be a valid header length, so
    # other formats are only named once the bytes failed to parse as safetensors.
    sniffed = _sniff_format(head)
    if len(head) < 8:
        raise Rejected("not_safetensors", f"{label}: {size} bytes, too short")
    (n,) = struct.unpack("<Q", head)
    if n > max_header_bytes:
        if sniffed:
            raise Rejected("not_safetensors", f"{label} is {sniffed}, not safetensors")
        raise Rejected(
            "header_too_large", f"{label}: header of {n} bytes, limit {max_header_bytes}"
        )
    if 8 + n > size:
        if sniffed:
            raise Rejected("not_safetensors", f"{label} is {sniffed}, not safetensors")
        raise Rejected(
            "bad_header", f"{label}: header claims {n} bytes, file has {size - 8} after it"
        )
    raw = fh.read(n)
    what = f"is {sniffed}, not safetensors" if sniffed else "has no JSON header"
    if not raw.startswith(b"{"):
        raise Rejected("not_safetensors", f"{label} {what}")
    try:
        header = json.loads(raw.decode("utf-8"), object_pairs_hook=_no_duplicate_keys)
    except (UnicodeDecodeError, ValueError) as exc:
        raise Rejected("not_safetensors", f"{label} {what}: {exc}") from None
    if not isinstance(header, dict):
        raise Rejected("not_safetensors", f"{label}: header is not a JSON object")
    metadata = header.pop("__metadata__", {})
    if not isinstance(metadata, dict) or not all(
        isinstance(k, str) and isinstance(v, str) for k, v in metadata.items()
    ):
        raise Rejected("bad_header", f"{label}: __metadata__ must map strings to strings")

    tensors: dict[str, TensorSpec] = {}
    spans: list[tuple[int, int, str]] = []
    for name, entry in header.items():
        spec, start, end = _parse_entry(name, entry)
        tensors[name] = spec
        spans.append((start, end, name))

    data_size = size - 8 - n
    cursor = 0
    for start, end, name in sorted(spans):
        if start != cursor:
            what = "overlaps the previous tensor" if start < cursor else "leaves a gap before it"
            raise Rejected("bad_header", f"{label}: tensor {name!r} at {start} {what}")
        cursor = end
    if cursor > data_size:
        raise Rejected(
            "bad_header", f"{label}: tensors need {cursor} data bytes, file has {data_size}"
        )
    if cursor < data_size:
        raise Rejected("bad_header", f"{label}: {data_size - cursor} bytes after the last tensor")
    return SafetensorsHeader(tensors=tensors, metadata=metadata, data_start=8 + n, file_size=size)


def load_safetensors_bytes(
    data: bytes, *, name: str, max_header_bytes: int, max_file_bytes: int | None = None
) -> dict[str, torch.Tensor]:
    """`check_safetensors_bytes`, then every tensor of `data` on the CPU."""
    check_safetensors_bytes(
        data, name=name, max_header_bytes=max_header_bytes, max_file_bytes=max_file_bytes
    )
    from safetensors import SafetensorError
    from safetensors.torch import load

    try:
        loaded: dict[str, torch.Tensor] = load(data)
    except SafetensorError as exc:
        raise Rejected("bad_header", f"{name}: {exc}") from None
    return loaded


def load_safetensors(
    path: Path, *, max_header_bytes: int, max_file_bytes: int | None = None
) -> dict[str, torch.Tensor]:
    """`check_safetensors`, then load every tensor on the CPU."""
    check_safetensors(path, max_header_bytes=max_header_bytes, max_file_bytes=max_file_bytes)
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        loaded: dict[str, torch.Tensor] = load_file(str(path), device="cpu")
    except SafetensorError as exc:
        # Only reachable when the file changed after the check; never trust it.
        raise Rejected("bad_header", f"{path.name}: {exc}") from None
    return loaded
