"""Proof-of-work messages and segment files: what a validator refuses, and by which name."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from chain.keys import Keypair
from store.errors import Rejected
from store.proofs import (
    Answer,
    Challenge,
    SegmentAnswer,
    load_segment,
    message_bytes,
    parse_message,
    segment_tensors,
    sign_message,
)

NAMES = ["a.weight", "b.bias"]
SHAPES = {"a.weight": (3, 4), "b.bias": (5,)}


def state() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    out = {n: torch.randn(SHAPES[n], generator=g) for n in NAMES}
    for n in NAMES:
        out[f"{n}::exp_avg"] = torch.randn(SHAPES[n], generator=g)
        out[f"{n}::exp_avg_sq"] = torch.rand(SHAPES[n], generator=g)
    return out


def write(tmp_path: Path, tensors: dict[str, torch.Tensor]) -> Path:
    path = tmp_path / "segment-1.safetensors"
    save_file(tensors, str(path))
    return path


def test_a_segment_file_round_trips(tmp_path: Path) -> None:
    s, e = state(), state()
    path = write(tmp_path, segment_tensors(s, e, NAMES))
    start, end = load_segment(path, NAMES, SHAPES, starts_at_zero=False)
    assert start is not None
    assert all(torch.equal(start[k], s[k]) for k in s)
    assert all(torch.equal(end[n], e[n]) for n in NAMES)
    path = write(tmp_path, segment_tensors(None, e, NAMES))
    assert load_segment(path, NAMES, SHAPES, starts_at_zero=True)[0] is None


@pytest.mark.parametrize(
    ("break_it", "reason"),
    [
        (lambda t: {**t, "end/a.weight": torch.zeros(4, 3)}, "shape_mismatch"),
        (lambda t: {**t, "end/b.bias": torch.zeros(5, dtype=torch.float16)}, "dtype_mismatch"),
        (lambda t: {**t, "end/b.bias": torch.tensor([0.0, 1.0, float("nan"), 0.0, 0.0])},
         "not_finite"),
        (lambda t: {k: v for k, v in t.items() if k != "end/b.bias"}, "name_mismatch"),
        (lambda t: {**t, "extra": torch.zeros(1)}, "name_mismatch"),
        # Over the shard's bytes plus the 16 MiB header allowance: refused before reading.
        (lambda t: {**t, "end/a.weight": torch.zeros(3, 1_500_000)}, "too_large"),
    ],
)  # fmt: skip
def test_bad_segment_files_are_refused_by_name(
    tmp_path: Path, break_it: object, reason: str
) -> None:
    tensors = segment_tensors(state(), state(), NAMES)
    path = write(tmp_path, break_it(tensors))  # type: ignore[operator]
    with pytest.raises(Rejected) as got:
        load_segment(path, NAMES, SHAPES, starts_at_zero=False)
    assert got.value.reason == reason


def test_messages_are_signed_and_checked() -> None:
    miner, validator = Keypair.generate(), Keypair.generate()
    challenge = sign_message(
        Challenge(window=3, miner=miner.address, validator=validator.address, segments=(1,),
                  block=57, block_hash="ab" * 32),
        validator,
    )  # fmt: skip
    data = message_bytes(challenge)
    assert parse_message(Challenge, data, signer=validator.address) == challenge
    with pytest.raises(Rejected) as got:
        parse_message(Challenge, data, signer=miner.address)
    assert got.value.reason == "bad_signature"
    forged = challenge.model_copy(update={"segments": (0, 1, 2, 3)})
    with pytest.raises(Rejected) as got:
        parse_message(Challenge, message_bytes(forged), signer=validator.address)
    assert got.value.reason == "bad_signature"
    answer = sign_message(
        Answer(window=3, miner=miner.address, validator=validator.address, segments=(
            SegmentAnswer(index=1, file="../x.safetensors", size=1,
                          end_moments="0" * 64),)),
        miner,
    )  # fmt: skip
    with pytest.raises(Rejected) as got:
        parse_message(Answer, message_bytes(answer), signer=miner.address)
    assert got.value.reason == "bad_answer"
    with pytest.raises(Rejected) as got:
        parse_message(Answer, b"x" * (1 << 17), signer=miner.address)
    assert got.value.reason == "too_large"
    with pytest.raises(Rejected) as got:
        parse_message(Answer, b'{"window": 3}', signer=miner.address)
    assert got.value.reason == "bad_answer"
