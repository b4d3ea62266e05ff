"""Rice-coded positions on the SparseLoCo wire (`averaging.sparseloco`, positions="rice"):
closed forms, equality with the packed coding, the information bound, and every malformed
position string refused by name before a value is used."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from safetensors.torch import save as save_safetensors

from averaging.config import CompressionConfig, SparseLoCoConfig
from averaging.settings import AveragingConfig
from averaging.sparseloco import (
    FORMAT,
    IDX,
    SparseLoCoError,
    SparseSpec,
    decode_bytes,
    encode,
    layout,
    max_message_bytes,
    rice_cost,
    rice_decode,
    rice_encode,
    rice_max_bytes,
    rice_parameter,
)

RICE = SparseSpec(chunk=4096, k=64, positions="rice")
PACKED = SparseSpec(chunk=4096, k=64)
SMALL = SparseSpec(chunk=16, k=3, positions="rice")  # index_bits 4
SHAPES = {"w": (16,)}


def randn(*shape: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


def test_a_rice_code_by_hand() -> None:
    # gaps 2, 0, 5; bits for r = 0..4: 10, 9, 10, 12, 15, so r = 1.
    gaps = np.array([2, 0, 5])
    assert [rice_cost(gaps, r) for r in range(5)] == [10, 9, 10, 12, 15]
    assert rice_parameter(gaps, 4) == 1
    # [r = 1][remainders 0,0,1 -> 001 padded][quotients 1,0,2 -> 01 1 001 padded]
    code = rice_encode(gaps, 4)
    assert code.tolist() == [1, 0b00100000, 0b01100100]
    assert rice_decode(code, 3, 4).tolist() == [2, 0, 5]


def test_positions_by_hand_through_a_message() -> None:
    x = torch.zeros(16)
    x[[2, 3, 9]] = torch.tensor([5.0, -6.0, 7.0])
    message = encode({"w": x}, SMALL)
    # positions 2, 3, 9 are the gaps 2, 0, 5 of the example above.
    assert message.tensors[IDX].tolist() == [1, 0b00100000, 0b01100100]
    got = decode_bytes(message.to_bytes(), SHAPES, SMALL)
    assert torch.equal(got["w"], message.decoded["w"])
    assert got["w"].nonzero().flatten().tolist() == [2, 3, 9]


@pytest.mark.parametrize("seed", range(4))
def test_rice_decodes_to_what_packed_decodes(seed: int) -> None:
    # Several tensors, short tail chunks, and a tensor smaller than one chunk.
    values = {"a": randn(3, 4096 + 100, seed=seed), "b": randn(700, seed=seed + 10)}
    values["c"] = randn(2, 3, seed=seed + 20) * 1e-3
    shapes = {n: tuple(t.shape) for n, t in values.items()}
    rice, packed = encode(values, RICE), encode(values, PACKED)
    got = decode_bytes(rice.to_bytes(), shapes, RICE)
    for name in values:
        assert torch.equal(rice.decoded[name], packed.decoded[name])
        assert torch.equal(got[name], packed.decoded[name])
    assert rice.tensors[IDX].numel() <= rice_max_bytes(layout(shapes, RICE).total_kept, RICE)
    assert len(rice.to_bytes()) <= max_message_bytes(shapes, RICE)


def test_bytes_against_the_packed_coding_and_the_information_bound() -> None:
    values = {"w": randn(64, 4096, seed=7)}
    rice, packed = encode(values, RICE), encode(values, PACKED)
    chunks, numel = 64, 64 * 4096
    bound_bits = chunks * math.log2(math.comb(4096, 64))  # any coding of the position sets
    rice_bits = 8 * rice.tensors[IDX].numel()
    assert packed.tensors[IDX].numel() == chunks * 64 * 12 // 8
    assert bound_bits <= rice_bits <= 1.03 * bound_bits + 8 * 3
    # With the 2-bit values and two fp16 levels: under 0.16 bits a parameter (packed 0.227).
    per_param = 8 * rice.nbytes / numel
    assert 0.150 < per_param < 0.160
    assert 8 * packed.nbytes / numel == pytest.approx(928 / 4096)


def test_equal_messages_have_equal_bytes() -> None:
    values = {"w": randn(5, 4096, seed=3)}
    assert encode(values, RICE).to_bytes() == encode(values, RICE).to_bytes()


# ---- refused, by name ---------------------------------------------------------------------


def blob(idx: list[int], **meta: str) -> bytes:
    """A message for SHAPES under SMALL whose positions string is `idx`, the rest valid."""
    x = torch.zeros(16)
    x[[2, 3, 9]] = torch.tensor([5.0, -6.0, 7.0])
    tensors = dict(encode({"w": x}, SMALL).tensors)
    tensors[IDX] = torch.tensor(idx, dtype=torch.uint8)
    metadata = {"format": FORMAT, "chunk": "16", "k": "3", "positions": "rice"} | meta
    return bytes(save_safetensors(tensors, metadata=metadata))


def test_the_good_string_decodes() -> None:
    got = decode_bytes(blob([1, 0b00100000, 0b01100100]), SHAPES, SMALL)
    assert got["w"].nonzero().flatten().tolist() == [2, 3, 9]


@pytest.mark.parametrize(
    ("idx", "match"),
    [
        ([], "empty"),
        ([5, 0, 0b11100000], "out of range"),  # r ≤ index_bits = 4
        ([1], "truncated in the remainders"),
        ([1, 0b00100000, 0b01100000], "2 Rice quotients, expected 3"),
        ([1, 0b00100000, 0b01101100], "4 Rice quotients, expected 3"),
        ([1, 0b00100000, 0b01100100, 0], "end before their last byte"),  # a padding byte
        ([1, 0b00100001, 0b01100100], "bits set past the last value"),  # remainder padding
        # Gaps 2, 0, 5 as r = 0: decodable, but r = 1 codes them in fewer bits.
        ([0, 0b00110000, 0b01000000], "not the minimizing one"),
        # Gaps 2, 0, 13 (r = 2, theirs): positions 2, 3, 17 in a chunk of 16.
        ([2, 0b10000100, 0b11000100], "past the end of its chunk"),
    ],
)
def test_malformed_positions_are_refused_by_name(idx: list[int], match: str) -> None:
    with pytest.raises(SparseLoCoError, match=match):
        decode_bytes(blob(idx), SHAPES, SMALL)


def test_an_oversize_or_two_dimensional_string_is_refused() -> None:
    limit = rice_max_bytes(3, SMALL)
    with pytest.raises(SparseLoCoError, match=f"at most {limit} bytes"):
        decode_bytes(blob([1, 0b00100000, 0b01100100] + [0] * limit), SHAPES, SMALL)
    x = torch.zeros(16)
    x[[2, 3, 9]] = 1.0
    tensors = dict(encode({"w": x}, SMALL).tensors)
    tensors[IDX] = tensors[IDX].reshape(1, -1)
    meta = {"format": FORMAT, "chunk": "16", "k": "3", "positions": "rice"}
    with pytest.raises(SparseLoCoError, match="one row"):
        decode_bytes(bytes(save_safetensors(tensors, metadata=meta)), SHAPES, SMALL)


def test_a_message_of_the_other_coding_is_refused_by_its_metadata() -> None:
    x = torch.zeros(16)
    x[[2, 3, 9]] = 1.0
    packed = encode({"w": x}, SparseSpec(chunk=16, k=3)).to_bytes()
    with pytest.raises(SparseLoCoError, match="metadata"):
        decode_bytes(packed, SHAPES, SMALL)
    with pytest.raises(SparseLoCoError, match="metadata"):
        decode_bytes(encode({"w": x}, SMALL).to_bytes(), SHAPES, SparseSpec(chunk=16, k=3))


def test_the_wire_rices_and_publications_pack() -> None:
    assert SparseLoCoConfig().positions == "rice"
    spec = AveragingConfig(wire="sparseloco").sparse_spec
    assert spec is not None and spec.positions == "rice"
    assert CompressionConfig(scheme="sparseloco", sparseloco={"k": 32}).sparseloco.positions == (
        "packed"
    )
    with pytest.raises(ValueError, match="must be packed"):
        CompressionConfig(scheme="sparseloco", sparseloco={"positions": "rice"})
    with pytest.raises(SparseLoCoError, match="packed or rice"):
        SparseSpec(positions="huffman")  # type: ignore[arg-type]
