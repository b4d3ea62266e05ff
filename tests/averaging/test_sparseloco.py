"""The SparseLoCo codec (`averaging.sparseloco`): closed forms, bytes, error feedback, and
every malformed message refused by name."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from safetensors.torch import save as save_safetensors

from averaging.sparseloco import (
    FORMAT,
    IDX,
    LVL,
    VAL,
    ErrorFeedback,
    SparseLoCoError,
    SparseSpec,
    decode,
    decode_bytes,
    encode,
    max_message_bytes,
    pack_bits,
    pack_codes,
    unpack_bits,
    unpack_codes,
)

SPEC = SparseSpec(chunk=4096, k=64)
SMALL = SparseSpec(chunk=8, k=2)


def randn(*shape: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


def blob_of(tensors: dict[str, torch.Tensor], spec: SparseSpec = SMALL, **meta: str) -> bytes:
    metadata = {"format": FORMAT, "chunk": str(spec.chunk), "k": str(spec.k)} | meta
    return bytes(save_safetensors(tensors, metadata=metadata))


# ---- closed forms -------------------------------------------------------------------------


@pytest.mark.parametrize("bits", [1, 3, 7, 12, 16])
def test_pack_bits_round_trip_is_bit_exact(bits: int) -> None:
    rng = np.random.default_rng(bits)
    for count in (0, 1, 5, 8, 1001):
        values = rng.integers(0, 1 << bits, size=count)
        packed = pack_bits(values, bits)
        assert packed.dtype == np.uint8 and packed.size == math.ceil(count * bits / 8)
        assert np.array_equal(unpack_bits(packed, count, bits, "x"), values)


def test_pack_bits_is_msb_first_and_codes_low_bits_first() -> None:
    # 1 = 001, 5 = 101 in 3 bits: 001101 + 00 padding = 0b00110100.
    assert pack_bits(np.array([1, 5]), 3).tolist() == [0b00110100]
    assert pack_bits(np.array([0xABC]), 12).tolist() == [0xAB, 0xC0]
    assert pack_codes(np.array([1, 2, 3, 0, 3])).tolist() == [0b00111001, 0b00000011]
    assert unpack_codes(np.array([0b00111001, 3], dtype=np.uint8), 5).tolist() == [1, 2, 3, 0, 3]
    with pytest.raises(SparseLoCoError, match="fit in 3 bits"):
        pack_bits(np.array([8]), 3)


def test_a_chunk_by_hand() -> None:
    x = torch.tensor([0.0, 5.0, -1.0, 0.0, 0.0, -7.0, 2.0, 0.0])
    message = encode({"w": x}, SMALL)
    # Keeps 5 (position 1) and -7 (position 5); lo = 5 (lower half), hi = 7.
    assert message.tensors[IDX].tolist() == [0b00110100]
    # position 1: sign 0, lower level -> code 0; position 5: sign 1, upper level -> code 3.
    assert message.tensors[VAL].tolist() == [0b00001100]
    assert message.tensors[LVL].tolist() == [[5.0, 7.0]]
    assert message.decoded["w"].tolist() == [0, 5, 0, 0, 0, -7, 0, 0]


def test_levels_are_half_means_and_values_decode_to_them() -> None:
    x = torch.tensor([1.0, -2.0, 3.0, -4.0, 0.1, 0.2, 0.3, 0.4])
    message = encode({"w": x}, SparseSpec(chunk=8, k=4))
    # Kept: 1, -2, 3, -4; lower half {1, 2} -> 1.5, upper {3, 4} -> 3.5.
    assert message.tensors[LVL].tolist() == [[1.5, 3.5]]
    assert message.decoded["w"].tolist() == [1.5, -1.5, 3.5, -3.5, 0, 0, 0, 0]


def test_round_trip_through_bytes_is_bit_exact() -> None:
    values = {"a": randn(64, 300), "b": randn(100, seed=1), "c": randn(4097, seed=2)}
    shapes = {n: tuple(t.shape) for n, t in values.items()}
    message = encode(values, SPEC)
    # Written canonically: the same values give the same bytes, hence the same digest.
    assert encode(values, SPEC).to_bytes() == message.to_bytes()
    for got in (
        decode(message.tensors, shapes, SPEC),
        decode_bytes(message.to_bytes(), shapes, SPEC),
    ):
        for name in values:
            assert torch.equal(got[name], message.decoded[name])


def test_density_and_bytes_as_configured() -> None:
    # 10 full chunks of 4,096 and one tensor of 100 values: ⌈64·100/4096⌉ = 2 kept.
    values = {"a": randn(10, 4096), "b": randn(100, seed=1)}
    message = encode(values, SPEC)
    nonzero = message.decoded["a"].reshape(10, 4096).ne(0).sum(dim=1)
    assert nonzero.tolist() == [64] * 10
    assert int(message.decoded["b"].ne(0).sum()) == 2
    kept, chunks = 10 * 64 + 2, 11
    assert message.tensors[IDX].numel() == math.ceil(kept * 12 / 8)
    assert message.tensors[VAL].numel() == math.ceil(kept / 4)
    assert message.tensors[LVL].shape == (chunks, 2)
    assert message.nbytes == math.ceil(kept * 12 / 8) + math.ceil(kept / 4) + 4 * chunks
    # A full chunk: 64 × (12 + 2) + 32 bits = 928 bits per 4,096 values.
    big = encode({"w": randn(256, 4096)}, SPEC)
    assert big.nbytes * 8 / (256 * 4096) == pytest.approx(928 / 4096)
    blob = big.to_bytes()
    assert len(blob) - big.nbytes < 300  # safetensors' header
    assert len(blob) <= max_message_bytes({"w": (256, 4096)}, SPEC)


def test_the_kept_values_are_the_largest_of_each_chunk() -> None:
    x = randn(4, 4096)
    message = encode({"w": x}, SPEC)
    kept = message.decoded["w"].ne(0)
    for row in range(4):
        threshold = x[row].abs().topk(64).values[-1]
        assert torch.equal(kept[row], x[row].abs() >= threshold)
        # Each kept value has the sign of the original.
        assert bool((message.decoded["w"][row][kept[row]].sign() == x[row][kept[row]].sign()).all())


def test_error_feedback_conserves_mass() -> None:
    for beta in (1.0, 0.95, 0.0):
        feedback = ErrorFeedback(beta)
        total_sent = torch.zeros(3, 4096)
        total_in = torch.zeros(3, 4096)
        for step in range(5):
            delta = {"w": randn(3, 4096, seed=step)}
            old = feedback.residual.get("w", torch.zeros(3, 4096))
            sent = feedback.compress(delta, SPEC)
            # Nothing changes until commit.
            assert torch.equal(feedback.residual.get("w", torch.zeros(3, 4096)), old)
            feedback.commit(sent)
            q, e = sent.message.decoded["w"], feedback.residual["w"]
            torch.testing.assert_close(q + e, delta["w"] + beta * old, rtol=0, atol=1e-6)
            total_sent += q
            total_in = beta * total_in + delta["w"] if beta != 1.0 else total_in + delta["w"]
        if beta == 1.0:  # Σ sent + e_T = Σ Δ: nothing is lost, only delayed.
            torch.testing.assert_close(
                total_sent + feedback.residual["w"], total_in, atol=1e-5, rtol=0
            )


def test_error_feedback_refuses_a_buffer_for_other_tensors() -> None:
    feedback = ErrorFeedback(0.9)
    feedback.commit(feedback.compress({"a": randn(10)}, SMALL))
    with pytest.raises(SparseLoCoError, match="buffer holds tensors"):
        feedback.compress({"b": randn(10)}, SMALL)
    with pytest.raises(SparseLoCoError, match="beta"):
        ErrorFeedback(1.5)


def test_non_finite_values_cannot_be_encoded() -> None:
    with pytest.raises(SparseLoCoError, match="non-finite"):
        encode({"w": torch.tensor([1.0, float("nan")])}, SMALL)


# ---- malformed messages ---------------------------------------------------------------------

SHAPES = {"w": (12,)}  # one full chunk of 8 (k = 2) and a tail of 4 (k = 1): 3 values


def good() -> dict[str, torch.Tensor]:
    return dict(encode({"w": torch.arange(1.0, 13.0)}, SMALL).tensors)


def test_a_good_message_decodes() -> None:
    got = decode_bytes(blob_of(good()), SHAPES, SMALL)
    assert got["w"].tolist() == [0, 0, 0, 0, 0, 0, 7, 8, 0, 0, 0, 12]


def indices(*positions: int) -> torch.Tensor:
    return torch.from_numpy(pack_bits(np.array(positions), 3).copy())


@pytest.mark.parametrize(
    ("mutate", "match"),
    [
        (lambda t: t | {IDX: indices(6, 7, 5)}, "past the end of its chunk"),  # tail has 4
        (lambda t: t | {IDX: indices(6, 6, 1)}, "repeated or out of order"),
        (lambda t: t | {IDX: indices(7, 6, 1)}, "repeated or out of order"),
        (lambda t: t | {LVL: torch.zeros(3, 2, dtype=torch.float16)}, "wrong chunk count"),
        (lambda t: t | {LVL: torch.tensor([[1, float("nan")], [1, 2]]).half()}, "finite"),
        (lambda t: t | {LVL: torch.tensor([[1, float("inf")], [1, 2]]).half()}, "finite"),
        (lambda t: t | {LVL: torch.tensor([[-1, 1], [1, 2]]).half()}, "0 ≤ lo ≤ hi"),
        (lambda t: t | {LVL: torch.tensor([[3, 1], [1, 2]]).half()}, "0 ≤ lo ≤ hi"),
        (lambda t: t | {LVL: t[LVL].float()}, "dtype"),
        (lambda t: t | {IDX: torch.zeros(5, dtype=torch.uint8)}, "shape"),
        (lambda t: {k: v for k, v in t.items() if k != VAL}, "message tensors"),
        (lambda t: t | {"extra": torch.zeros(1)}, "message tensors"),
        (
            lambda t: t | {IDX: indices(6, 7, 1) | torch.tensor([0, 1], dtype=torch.uint8)},
            "bits set",
        ),
        (lambda t: t | {VAL: torch.tensor([0b11000000], dtype=torch.uint8)}, "past the last code"),
    ],
)
def test_malformed_tensors_are_refused_by_name(mutate, match) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(SparseLoCoError, match=match):
        decode_bytes(blob_of(mutate(good())), SHAPES, SMALL)


def test_a_truncated_message_is_refused() -> None:
    blob = blob_of(good())
    for cut in (0, 4, 8, 20, len(blob) - 1):
        with pytest.raises(SparseLoCoError, match="truncated"):
            decode_bytes(blob[:cut], SHAPES, SMALL)


def test_a_header_that_lies_about_sizes_is_refused() -> None:
    blob = bytearray(blob_of(good()))
    header_len = int.from_bytes(blob[:8], "little")
    header = blob[8 : 8 + header_len].decode()
    # Claim the idx tensor is longer than the bytes that follow.
    lying = header.replace('"shape":[2]', '"shape":[200]', 1)
    assert lying != header
    bad = bytes(blob[:8]) + lying.encode() + bytes(blob[8 + header_len :])
    bad = len(lying).to_bytes(8, "little") + bad[8:]
    with pytest.raises(SparseLoCoError, match=r"truncated or not safetensors|shape"):
        decode_bytes(bad, SHAPES, SMALL)
    huge = (1 << 40).to_bytes(8, "little") + bytes(blob[8:])
    with pytest.raises(SparseLoCoError, match="header length"):
        decode_bytes(huge, SHAPES, SMALL)


def test_other_metadata_and_oversize_are_refused() -> None:
    with pytest.raises(SparseLoCoError, match="metadata"):
        decode_bytes(blob_of(good(), k="3"), SHAPES, SMALL)
    with pytest.raises(SparseLoCoError, match="metadata"):
        decode_bytes(blob_of(good(), format="other/1"), SHAPES, SMALL)
    padded = blob_of(good() | {"pad": torch.zeros(4096, dtype=torch.uint8)})
    with pytest.raises(SparseLoCoError, match="oversize"):
        decode_bytes(padded, SHAPES, SMALL)
    with pytest.raises(SparseLoCoError, match="not JSON"):
        decode_bytes(b"\x10" + bytes(40), SHAPES, SMALL)


def test_spec_bounds() -> None:
    assert SPEC.index_bits == 12 and SparseSpec(chunk=4097, k=1).index_bits == 13
    for chunk, k in ((1, 1), (8, 0), (8, 9)):
        with pytest.raises(SparseLoCoError):
            SparseSpec(chunk=chunk, k=k)
