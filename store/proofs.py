"""The proof-of-work messages: a validator's challenge and a miner's answer, as stored.

    challenge = sign_message(Challenge(window=w, miner=m, validator=v, segments=(2,),
                                       block=b, block_hash=h), validator_keypair)
    store.put_files(folder, {name: message_bytes(challenge)}, message=...)
    challenge = parse_message(Challenge, data, signer=v)      # raises Rejected

    files = segment_tensors(state_at_start, params_at_end, names, starts_at_zero)
    answer = sign_message(Answer(window=w, miner=m, validator=v, segments=(...)), miner_kp)
    got = load_segment(path, names, shapes, starts_at_zero, max_bytes)   # untrusted

Both are small signed JSON documents (the signature is the signer's over the canonical
JSON of every other field, as for contribution manifests), living in the signer's own
store location (`store.layout.challenge_path`, `store.layout.answer_dir`). An answer
names one safetensors file per segment: the shard's state at the segment's start
(parameters ``start/<name>`` and AdamW's moments ``start/<name>::exp_avg`` /
``::exp_avg_sq``; absent for a segment from step 0, whose start is public) and the
parameters at its end (``end/<name>``), with the digest of the end's moments. Files are
checked against the tensors the *validator's* model says the shard has, before loading
(`load_segment`); nothing here trusts a shape, a dtype or a size that a peer wrote.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Literal, TypeVar

import torch
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from chain.interface import SigningKey
from chain.keys import is_address, signing_bytes, verify
from store.errors import Rejected, first_problem
from store.safetensors_check import TensorSpec, check_safetensors, load_safetensors

CHALLENGE_FORMAT: Literal["tensormine-challenge/1"] = "tensormine-challenge/1"
ANSWER_FORMAT: Literal["tensormine-answer/1"] = "tensormine-answer/1"
CHALLENGE_FILE = "challenge.json"
ANSWER_FILE = "answer.json"
_HEX64 = re.compile(r"^[0-9a-f]{64}$")
_SEGMENT_FILE = re.compile(r"^segment-(0|[1-9][0-9]{0,3})\.safetensors$")
MAX_MESSAGE_BYTES = 1 << 16
# Header of a segment file: names of 4 tensors per parameter, well under this.
HEADER_LIMIT = 16 << 20


class _Signed(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    window: int = Field(ge=0)
    miner: str
    validator: str
    signature: str = ""

    def body(self) -> dict[str, object]:
        body: dict[str, object] = self.model_dump(mode="json")
        body.pop("signature")
        return body


class Challenge(_Signed):
    """Validator → miner: recompute these segments of your trajectory of `window`.
    `block_hash` (of ledger block `block`, made after the window's deadline) seeded the
    choice together with the validator's secret."""

    format: Literal["tensormine-challenge/1"] = CHALLENGE_FORMAT
    segments: tuple[int, ...] = Field(min_length=1, max_length=64)
    block: int = Field(ge=0)
    block_hash: str


class SegmentAnswer(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    index: int = Field(ge=0)
    file: str
    size: int = Field(ge=0)
    end_moments: str = Field(description="sha256 of the moments at the segment's end")


class Answer(_Signed):
    """Miner → validator: the states of the challenged segments."""

    format: Literal["tensormine-answer/1"] = ANSWER_FORMAT
    segments: tuple[SegmentAnswer, ...] = Field(min_length=1, max_length=64)


M = TypeVar("M", bound=_Signed)


def sign_message(message: M, keypair: SigningKey) -> M:
    signature = keypair.sign(signing_bytes(message.body())).hex()
    return message.model_copy(update={"signature": signature})


def message_bytes(message: _Signed) -> bytes:
    return (message.model_dump_json(indent=2) + "\n").encode()


def parse_message(kind: type[M], data: bytes, *, signer: str) -> M:
    """A stored challenge or answer, checked: size, schema, addresses, digests, and that
    `signer` signed it. Raises `Rejected("bad_answer" | "bad_signature" | "too_large")`."""
    if len(data) > MAX_MESSAGE_BYTES:
        raise Rejected("too_large", f"{kind.__name__}: {len(data)} bytes > {MAX_MESSAGE_BYTES}")
    try:
        message = kind.model_validate_json(data)
    except ValidationError as exc:
        problem = first_problem(exc, kind.__name__)
        raise Rejected("bad_answer", f"{kind.__name__} {problem}") from None
    if not (is_address(message.miner) and is_address(message.validator)):
        raise Rejected("bad_answer", f"{kind.__name__}: miner or validator is not an address")
    if isinstance(message, Challenge) and not _HEX64.match(message.block_hash):
        raise Rejected("bad_answer", "challenge block_hash is not 64 hex digits")
    if isinstance(message, Answer):
        for seg in message.segments:
            if not _SEGMENT_FILE.match(seg.file):
                raise Rejected("bad_answer", f"answer names file {seg.file!r}")
            if not _HEX64.match(seg.end_moments):
                raise Rejected("bad_answer", "answer digests must be 64 lowercase hex digits")
    try:
        signature = bytes.fromhex(message.signature)
    except ValueError:
        signature = b""
    if not verify(signer, signing_bytes(message.body()), signature):
        raise Rejected("bad_signature", f"{kind.__name__} is not signed by {signer}")
    return message


def segment_file_name(index: int) -> str:
    return f"segment-{index}.safetensors"


def segment_specs(
    names: Sequence[str], shapes: Mapping[str, Sequence[int]], *, starts_at_zero: bool
) -> dict[str, TensorSpec]:
    """The exact tensors (fp32) a segment file must hold for a shard of `names`."""
    specs: dict[str, TensorSpec] = {}
    for name in names:
        shape = tuple(int(d) for d in shapes[name])
        if not starts_at_zero:
            specs[f"start/{name}"] = TensorSpec("F32", shape)
            specs[f"start/{name}::exp_avg"] = TensorSpec("F32", shape)
            specs[f"start/{name}::exp_avg_sq"] = TensorSpec("F32", shape)
        specs[f"end/{name}"] = TensorSpec("F32", shape)
    return specs


def segment_bytes(specs: Mapping[str, TensorSpec]) -> int:
    """The data bytes of a segment file with these tensors (its header comes on top)."""
    total = 0
    for spec in specs.values():
        n = 1
        for d in spec.shape:
            n *= d
        total += 4 * n
    return total


def segment_tensors(
    start: Mapping[str, torch.Tensor] | None,
    end_params: Mapping[str, torch.Tensor],
    names: Sequence[str],
) -> dict[str, torch.Tensor]:
    """What a miner writes for one segment: `start` (a kept state: parameters under their
    names, moments as ``name::kind``; None for a segment from step 0) and the end's
    parameters."""
    out: dict[str, torch.Tensor] = {}
    for name in names:
        if start is not None:
            out[f"start/{name}"] = start[name]
            out[f"start/{name}::exp_avg"] = start[f"{name}::exp_avg"]
            out[f"start/{name}::exp_avg_sq"] = start[f"{name}::exp_avg_sq"]
        out[f"end/{name}"] = end_params[name]
    return {k: v.detach().to("cpu", torch.float32).contiguous() for k, v in out.items()}


def load_segment(
    path: Path,
    names: Sequence[str],
    shapes: Mapping[str, Sequence[int]],
    *,
    starts_at_zero: bool,
) -> tuple[dict[str, torch.Tensor] | None, dict[str, torch.Tensor]]:
    """(start state or None, end parameters) of an untrusted segment file: its size and
    header are checked against `segment_specs` before a byte of data is read, and every
    value must be finite. Raises `Rejected` ("too_large", "name_mismatch", "dtype_mismatch",
    "shape_mismatch", "not_finite", or the safetensors check's own reasons)."""
    specs = segment_specs(names, shapes, starts_at_zero=starts_at_zero)
    limit = segment_bytes(specs) + HEADER_LIMIT + 8
    header = check_safetensors(path, max_header_bytes=HEADER_LIMIT, max_file_bytes=limit)
    got = header.tensors
    if set(got) != set(specs):
        extra, missing = sorted(set(got) - set(specs))[:3], sorted(set(specs) - set(got))[:3]
        raise Rejected(
            "name_mismatch",
            f"{path.name}: not the shard's tensors (extra {extra}, missing {missing})",
        )
    for name, spec in specs.items():
        if got[name].dtype != spec.dtype:
            raise Rejected("dtype_mismatch", f"{path.name}: {name} is {got[name].dtype}, not F32")
        if got[name].shape != spec.shape:
            raise Rejected(
                "shape_mismatch",
                f"{path.name}: {name} has shape {got[name].shape}, not {spec.shape}",
            )
    tensors = load_safetensors(path, max_header_bytes=HEADER_LIMIT, max_file_bytes=limit)
    for key, value in tensors.items():
        if not bool(torch.isfinite(value).all()):
            raise Rejected("not_finite", f"{path.name}: {key} has NaN or infinite values")
    end = {n: tensors[f"end/{n}"] for n in names}
    if starts_at_zero:
        return None, end
    start = {n: tensors[f"start/{n}"] for n in names}
    for n in names:
        for kind in ("exp_avg", "exp_avg_sq"):
            start[f"{n}::{kind}"] = tensors[f"start/{n}::{kind}"]
    return start, end
