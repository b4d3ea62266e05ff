"""Signed extrinsics: the only way to change ledger state.

An extrinsic names a call, its arguments, the signer's address, the signer's next nonce
and the ledger's genesis hash (so it cannot be replayed on another ledger), and carries
the signer's Ed25519 signature over the canonical JSON of all of that:

    xt = sign_extrinsic(keypair, "transfer", {"dest": addr, "amount": 10**9}, nonce, genesis)
    ledger.submit(xt)

Arguments are validated by a strict schema per call before any state is read, so a
malformed call never reaches the runtime. Wire form is JSON (`to_json` / `from_json`);
`from_json` rejects NaN/Infinity literals, unknown fields and wrong types.
"""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass, field
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from chain.errors import BadSignature, InvalidCall
from chain.interface import SigningKey
from chain.keys import is_address, signing_bytes, verify

U16_MAX = 65535
I64_MAX = 2**63 - 1  # SQLite's INTEGER
MAX_COMMITMENT_BYTES = 1024
_SHA256_HEX = re.compile(r"[0-9a-f]{64}")
_SALT_HEX = re.compile(r"(?:[0-9a-f]{2}){16,64}")  # 16 to 64 bytes


class _Args(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True, frozen=True)


class NoArgs(_Args):
    pass


class AmountArgs(_Args):
    amount: int = Field(gt=0)


class TransferArgs(_Args):
    dest: str
    amount: int = Field(gt=0)

    @field_validator("dest")
    @classmethod
    def _address(cls, value: str) -> str:
        if not is_address(value):
            raise ValueError(f"{value!r} is not a valid SS58 address")
        return value


class WeightsArgs(_Args):
    uids: list[int]
    weights: list[int]


class WeightCommitArgs(_Args):
    """A validator's commitment to its next weights: `chain.commit_reveal.commit_hash` of
    (ledger, netuid, hotkey, uids, u16 weights, salt)."""

    commit_hash: str

    @field_validator("commit_hash")
    @classmethod
    def _sha256(cls, value: str) -> str:
        return _check_sha256(value)


class WeightRevealArgs(_Args):
    """The weights and salt behind an earlier `commit_weights`, exactly as hashed."""

    uids: list[int]
    weights: list[int]
    salt: str

    @field_validator("salt")
    @classmethod
    def _salt(cls, value: str) -> str:
        if _SALT_HEX.fullmatch(value) is None:
            raise ValueError(f"must be 16 to 64 random bytes as lowercase hex (got {value[:80]!r})")
        return value


class CommitArgs(_Args):
    data: str

    @field_validator("data")
    @classmethod
    def _size(cls, value: str) -> str:
        if len(value.encode()) > MAX_COMMITMENT_BYTES:
            raise ValueError(f"a commitment holds at most {MAX_COMMITMENT_BYTES} bytes")
        return value


class ContributionArgs(_Args):
    """A miner's commitment to its pseudo-gradient for training window `round`: the
    sha256 of the payload it will reveal in the store after the window's deadline."""

    round: int = Field(ge=0, le=I64_MAX)
    digest: str

    @field_validator("digest")
    @classmethod
    def _sha256(cls, value: str) -> str:
        return _check_sha256(value)


def _check_sha256(value: str) -> str:
    if _SHA256_HEX.fullmatch(value) is None:
        raise ValueError(
            f"must be a sha256 digest, 64 lowercase hex characters (got {value[:80]!r})"
        )
    return value


CALLS: dict[str, type[_Args]] = {
    "register": NoArgs,
    "add_stake": AmountArgs,
    "remove_stake": AmountArgs,
    "transfer": TransferArgs,
    "set_weights": WeightsArgs,
    "commit_weights": WeightCommitArgs,
    "reveal_weights": WeightRevealArgs,
    "faucet": AmountArgs,
    "commit": CommitArgs,
    "commit_contribution": ContributionArgs,
}


def parse_args(call: str, args: dict[str, Any]) -> _Args:
    """The call's arguments as its typed schema, or `InvalidCall` saying what is wrong."""
    schema = CALLS.get(call)
    if schema is None:
        raise InvalidCall(f"unknown call {call!r}; known calls: {', '.join(sorted(CALLS))}")
    try:
        return schema.model_validate(args)
    except ValidationError as exc:
        detail = "; ".join(
            f"{'.'.join(str(p) for p in e['loc']) or 'args'}: {e['msg']}" for e in exc.errors()
        )
        raise InvalidCall(f"{call}: {detail}") from None


@dataclass(frozen=True)
class Extrinsic:
    call: str
    args: dict[str, Any]
    signer: str
    nonce: int
    genesis: str
    signature: bytes = field(repr=False)

    def payload(self) -> bytes:
        """The bytes the signature covers."""
        return signing_bytes(
            {
                "call": self.call,
                "args": self.args,
                "signer": self.signer,
                "nonce": self.nonce,
                "genesis": self.genesis,
            }
        )

    @property
    def hash(self) -> str:
        return hashlib.sha256(self.payload() + self.signature).hexdigest()

    def check_signature(self) -> None:
        if not verify(self.signer, self.payload(), self.signature):
            raise BadSignature(f"extrinsic {self.call} from {self.signer}: bad signature")

    def to_json(self) -> str:
        return json.dumps(
            {
                "call": self.call,
                "args": self.args,
                "signer": self.signer,
                "nonce": self.nonce,
                "genesis": self.genesis,
                "signature": self.signature.hex(),
            },
            sort_keys=True,
            allow_nan=False,
        )

    @classmethod
    def from_json(cls, text: str) -> Extrinsic:
        def no_constants(name: str) -> None:
            raise InvalidCall(f"extrinsic JSON contains {name}, which is not a number")

        try:
            data = json.loads(text, parse_constant=no_constants)
        except json.JSONDecodeError as exc:
            raise InvalidCall(f"extrinsic is not valid JSON: {exc}") from exc
        if not isinstance(data, dict) or set(data) != {
            "call",
            "args",
            "signer",
            "nonce",
            "genesis",
            "signature",
        }:
            raise InvalidCall(
                "extrinsic must have exactly call, args, signer, nonce, genesis, signature"
            )
        call, args, signer, nonce = data["call"], data["args"], data["signer"], data["nonce"]
        if not (
            isinstance(call, str)
            and isinstance(args, dict)
            and isinstance(signer, str)
            and isinstance(nonce, int)
            and not isinstance(nonce, bool)
            and isinstance(data["genesis"], str)
            and isinstance(data["signature"], str)
        ):
            raise InvalidCall("extrinsic fields have the wrong types")
        try:
            signature = bytes.fromhex(data["signature"])
        except ValueError as exc:
            raise InvalidCall("signature is not hex") from exc
        return cls(call, args, signer, nonce, data["genesis"], signature)


def sign_extrinsic(
    keypair: SigningKey, call: str, args: dict[str, Any], nonce: int, genesis: str
) -> Extrinsic:
    """Build and sign an extrinsic; the arguments are schema-checked first."""
    parse_args(call, args)
    unsigned = Extrinsic(call, args, keypair.address, nonce, genesis, b"")
    return Extrinsic(call, args, keypair.address, nonce, genesis, keypair.sign(unsigned.payload()))
