"""The hand-written safetensors header check: every lie is caught before the library runs."""

from __future__ import annotations

import json
import pickle
import struct
import zipfile
from collections.abc import Mapping
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors.torch import save_file

from store.errors import Rejected
from store.safetensors_check import (
    DTYPE_SIZES,
    TORCH_DTYPES,
    TensorSpec,
    check_safetensors,
    load_safetensors,
)

LIMIT = 1 << 20


def raw_file(path: Path, header: Mapping[str, object], data: bytes, *, pad: bytes = b"") -> Path:
    body = json.dumps(header).encode() + pad
    path.write_bytes(struct.pack("<Q", len(body)) + body + data)
    return path


def check(path: Path, **kw: int) -> None:
    check_safetensors(
        path, max_header_bytes=kw.get("max_header", LIMIT), max_file_bytes=kw.get("max_file")
    )


def test_valid_file_passes_and_loads_identically(tmp_path: Path) -> None:
    tensors = {
        "a": torch.randn(3, 4),
        "b": torch.arange(6, dtype=torch.int64).reshape(2, 3),
        "c": torch.zeros(0, 5, dtype=torch.bfloat16),
        "d": torch.tensor(True),
    }
    path = tmp_path / "x.safetensors"
    save_file(tensors, str(path), metadata={"scheme": "none"})
    header = check_safetensors(path, max_header_bytes=LIMIT)
    assert header.tensors == {k: TensorSpec.of(v) for k, v in tensors.items()}
    assert header.metadata == {"scheme": "none"}
    loaded = load_safetensors(path, max_header_bytes=LIMIT)
    for name, tensor in tensors.items():
        assert torch.equal(loaded[name], tensor)


def test_truncated_file(tmp_path: Path) -> None:
    path = tmp_path / "x.safetensors"
    save_file({"a": torch.randn(16)}, str(path))
    path.write_bytes(path.read_bytes()[:-5])
    with pytest.raises(Rejected) as err:
        check(path)
    assert err.value.reason == "bad_header"
    assert "need 64 data bytes" in err.value.detail


def test_truncated_inside_the_header(tmp_path: Path) -> None:
    path = tmp_path / "x.safetensors"
    save_file({"a": torch.randn(16)}, str(path))
    path.write_bytes(path.read_bytes()[:20])
    with pytest.raises(Rejected) as err:
        check(path)
    assert err.value.reason == "bad_header"


def test_shorter_than_the_length_prefix(tmp_path: Path) -> None:
    path = tmp_path / "x.safetensors"
    path.write_bytes(b"\x05\x00")
    with pytest.raises(Rejected) as err:
        check(path)
    assert err.value.reason == "not_safetensors"


def test_extra_bytes_after_the_last_tensor(tmp_path: Path) -> None:
    path = tmp_path / "x.safetensors"
    save_file({"a": torch.randn(4)}, str(path))
    path.write_bytes(path.read_bytes() + b"\x00" * 8)
    with pytest.raises(Rejected) as err:
        check(path)
    assert (err.value.reason, "bytes after the last tensor" in err.value.detail) == (
        "bad_header",
        True,
    )


@pytest.mark.parametrize(
    ("header", "data_len", "words"),
    [
        # offsets overlap: b starts inside a
        (
            {
                "a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]},
                "b": {"dtype": "F32", "shape": [2], "data_offsets": [4, 12]},
            },
            12,
            "overlaps",
        ),
        # a gap between tensors
        (
            {
                "a": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]},
                "b": {"dtype": "F32", "shape": [1], "data_offsets": [8, 12]},
            },
            12,
            "gap",
        ),
        # the span is not shape x itemsize
        ({"a": {"dtype": "F32", "shape": [3], "data_offsets": [0, 8]}}, 8, "needs 12 bytes"),
        # the data runs past the end of the file
        ({"a": {"dtype": "F64", "shape": [4], "data_offsets": [0, 32]}}, 16, "need 32 data bytes"),
        # an unknown dtype
        ({"a": {"dtype": "F4", "shape": [4], "data_offsets": [0, 2]}}, 2, "unknown dtype"),
        # negative / non-integer dimension
        ({"a": {"dtype": "U8", "shape": [-1], "data_offsets": [0, 0]}}, 0, "shape"),
        ({"a": {"dtype": "U8", "shape": [1.5], "data_offsets": [0, 1]}}, 1, "shape"),
        # malformed offsets, missing field, extra field
        ({"a": {"dtype": "U8", "shape": [1], "data_offsets": [0]}}, 1, "data_offsets"),
        ({"a": {"dtype": "U8", "shape": [1]}}, 1, "entry must have"),
        ({"a": {"dtype": "U8", "shape": [1], "data_offsets": [0, 1], "x": 1}}, 1, "entry must"),
        # metadata must map strings to strings
        (
            {"__metadata__": {"k": 1}, "a": {"dtype": "U8", "shape": [1], "data_offsets": [0, 1]}},
            1,
            "__metadata__",
        ),
    ],
)
def test_header_that_lies(
    tmp_path: Path, header: dict[str, object], data_len: int, words: str
) -> None:
    path = raw_file(tmp_path / "x.safetensors", header, b"\x00" * data_len)
    with pytest.raises(Rejected) as err:
        check(path)
    assert err.value.reason == "bad_header"
    assert words in err.value.detail


def test_the_library_would_accept_nothing_we_refuse(tmp_path: Path) -> None:
    """Sanity check of the premise: the overlap above is refused by us *before* loading."""
    header = {
        "a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]},
        "b": {"dtype": "F32", "shape": [2], "data_offsets": [4, 12]},
    }
    path = raw_file(tmp_path / "x.safetensors", header, b"\x00" * 12)
    with pytest.raises(Rejected):
        load_safetensors(path, max_header_bytes=LIMIT)


def test_oversized_header(tmp_path: Path) -> None:
    path = tmp_path / "x.safetensors"
    save_file({f"t{i}": torch.zeros(1) for i in range(200)}, str(path))
    with pytest.raises(Rejected) as err:
        check(path, max_header=1024)
    assert err.value.reason == "header_too_large"


def test_header_length_beyond_the_file(tmp_path: Path) -> None:
    path = tmp_path / "x.safetensors"
    path.write_bytes(struct.pack("<Q", 10_000) + b"{}")
    with pytest.raises(Rejected) as err:
        check(path)
    assert err.value.reason == "bad_header"


def test_huge_declared_header_is_refused_without_reading(tmp_path: Path) -> None:
    path = tmp_path / "x.safetensors"
    path.write_bytes(struct.pack("<Q", 2**63) + b"{}")
    with pytest.raises(Rejected) as err:
        check(path)
    assert err.value.reason == "header_too_large"


def test_pickle_where_safetensors_is_expected(tmp_path: Path) -> None:
    path = tmp_path / "x.safetensors"
    path.write_bytes(pickle.dumps({"a": [1, 2, 3]}, protocol=4))
    with pytest.raises(Rejected) as err:
        check(path)
    assert err.value.reason == "not_safetensors"
    assert "pickle" in err.value.detail


@pytest.mark.parametrize("first", [0x80, 0x03])  # 0x280 = 640: looks like a pickle opcode
def test_header_lengths_that_start_like_a_pickle_are_fine(tmp_path: Path, first: int) -> None:
    header = {"a": {"dtype": "U8", "shape": [2], "data_offsets": [0, 2]}}
    body_len = 0x0200 + first
    pad = b" " * (body_len - len(json.dumps(header)))
    path = raw_file(tmp_path / "x.safetensors", header, b"\x01\x02", pad=pad)
    assert path.read_bytes()[:2] == bytes([first, 0x02])
    assert load_safetensors(path, max_header_bytes=LIMIT)["a"].tolist() == [1, 2]


def test_torch_save_zip_where_safetensors_is_expected(tmp_path: Path) -> None:
    path = tmp_path / "x.safetensors"
    with zipfile.ZipFile(path, "w") as zf:
        zf.writestr("archive/data.pkl", b"\x80\x02}q\x00.")
    with pytest.raises(Rejected) as err:
        check(path)
    assert err.value.reason == "not_safetensors"
    assert "zip" in err.value.detail


@pytest.mark.parametrize("name", ["pytorch_model.bin", "delta.pt", "x.pth", "x.ckpt", "x.pkl"])
def test_pickle_formats_refused_by_name(tmp_path: Path, name: str) -> None:
    path = tmp_path / name
    save_file({"a": torch.zeros(1)}, str(path))  # even with safetensors bytes inside
    with pytest.raises(Rejected) as err:
        check(path)
    assert err.value.reason == "not_safetensors"


def test_header_that_is_not_json(tmp_path: Path) -> None:
    path = tmp_path / "x.safetensors"
    body = b"{not json at all"
    path.write_bytes(struct.pack("<Q", len(body)) + body)
    with pytest.raises(Rejected) as err:
        check(path)
    assert err.value.reason == "not_safetensors"


def test_duplicate_tensor_names(tmp_path: Path) -> None:
    entry = '{"dtype":"U8","shape":[1],"data_offsets":[0,1]}'
    body = f'{{"a":{entry},"a":{entry}}}'.encode()
    path = tmp_path / "x.safetensors"
    path.write_bytes(struct.pack("<Q", len(body)) + body + b"\x00")
    with pytest.raises(Rejected) as err:
        check(path)
    assert "twice" in err.value.detail


def test_file_over_the_size_limit(tmp_path: Path) -> None:
    path = tmp_path / "x.safetensors"
    save_file({"a": torch.zeros(1000)}, str(path))
    with pytest.raises(Rejected) as err:
        check(path, max_file=1000)
    assert err.value.reason == "too_large"


def test_header_padding_with_spaces_is_allowed(tmp_path: Path) -> None:
    header = {"a": {"dtype": "U8", "shape": [2], "data_offsets": [0, 2]}}
    path = raw_file(tmp_path / "x.safetensors", header, b"\x01\x02", pad=b"   ")
    assert load_safetensors(path, max_header_bytes=LIMIT)["a"].tolist() == [1, 2]


def test_every_dtype_has_a_size_and_a_torch_twin() -> None:
    assert set(TORCH_DTYPES.values()) == set(DTYPE_SIZES)
    for torch_dtype, name in TORCH_DTYPES.items():
        assert torch.empty(0, dtype=torch_dtype).element_size() == DTYPE_SIZES[name]


_DTYPES = [torch.float32, torch.float16, torch.bfloat16, torch.int64, torch.uint8, torch.bool]


@settings(
    max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(
    shapes=st.lists(st.lists(st.integers(0, 4), max_size=3), min_size=1, max_size=5),
    dtypes=st.lists(st.sampled_from(_DTYPES), min_size=5, max_size=5),
)
def test_anything_safetensors_writes_passes(
    tmp_path: Path, shapes: list[list[int]], dtypes: list[torch.dtype]
) -> None:
    tensors = {f"t{i}": torch.zeros(shape, dtype=dtypes[i]) for i, shape in enumerate(shapes)}
    path = tmp_path / "p.safetensors"
    save_file(tensors, str(path))
    header = check_safetensors(path, max_header_bytes=LIMIT)
    assert header.tensors == {k: TensorSpec.of(v) for k, v in tensors.items()}


@settings(
    max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(position=st.integers(0, 200), value=st.integers(0, 255), cut=st.integers(0, 40))
def test_corrupted_files_are_rejected_or_exact(
    tmp_path: Path, position: int, value: int, cut: int
) -> None:
    """Flip one byte and/or cut the tail: the check either refuses with `Rejected` or the
    file still loads to tensors whose byte count matches the file exactly."""
    path = tmp_path / "c.safetensors"
    save_file({"a": torch.arange(8, dtype=torch.float32), "b": torch.ones(2, 3)}, str(path))
    raw = bytearray(path.read_bytes())
    raw[position % len(raw)] = value
    path.write_bytes(bytes(raw[: len(raw) - cut]))
    try:
        header = check_safetensors(path, max_header_bytes=LIMIT)
    except Rejected:
        return
    loaded = load_safetensors(path, max_header_bytes=LIMIT)
    assert set(loaded) == set(header.tensors)
    data = sum(t.numel() * t.element_size() for t in loaded.values())
    assert header.data_start + data == path.stat().st_size
