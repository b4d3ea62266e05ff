"""What each peer announces in matchmaking (hivemind's "gathered" bytes), and the check
that binds a member's parts to its commitment on the ledger.

hivemind's gather blob is msgpack ``(bandwidth, mode, user data)``; our user data is
``{'role': 'member'|'aux', 'base'?, 'manifest'?, 'payload'?}``. The role says whether the peer
contributes a Δ (`averaging.round.Role`). `base` (hex, 8–64 digits) fingerprints the model
the peer starts the window from; every peer of the final group learns every other's, so
peers that started from different models find out (`averaging.participant.Participant.
in_step`). `manifest` is the body of the contribution manifest a member committed to on
the ledger; once its hash matches the ledger commitment, its part digests say which bytes
the reducers may accept from that member (`averaging.round.Binding`). `payload` (sha256,
hex) names the message a member of an all-gathered round serves (`averaging.allgather`):
peers fetch it by that digest, from the member or from anyone who already holds it.

Leaders refuse join requests whose metadata does not parse (`averaging.matchmaking`), and
an averager refuses a group with any malformed entry (`averaging.averager`).
"""

from __future__ import annotations

import hashlib
import math
import re
from dataclasses import dataclass
from typing import Any

import msgpack
from hivemind.utils.serializer import MSGPackSerializer

from averaging.round import Role
from chain.keys import signing_bytes

_BASE = re.compile(r"^[0-9a-f]{8,64}$")
_HEX64 = re.compile(r"^[0-9a-f]{64}$")


MAX_COMMITMENT_BODY = 1 << 20  # bytes of a gathered manifest body (msgpack)


@dataclass(frozen=True)
class Gathered:
    """What a peer announced in matchmaking."""

    bandwidth: float | None
    role: Role
    base: str | None
    manifest: dict[str, Any] | None  # the committed manifest body of a member's Δ
    payload: str | None = None  # sha256 (hex) of the message it serves (all-gathered wire)


def parse_gather(blob: bytes) -> Gathered:
    """A peer's matchmaking metadata; ValueError if malformed.

    `base` is an optional fingerprint of the model the peer starts the window from, so
    that every peer learns whether it is in step with the others; `manifest` the body of
    the contribution manifest a member committed to on the ledger (`store.manifest.
    commitment_body`), whose part digests bind what it sends (see `Binding`)."""
    if len(blob) > MAX_COMMITMENT_BODY + 4096:
        raise ValueError(f"gather data of {len(blob)} bytes")
    try:
        bandwidth, _mode, user = MSGPackSerializer.loads(blob)
        info = MSGPackSerializer.loads(user)
    except (ValueError, TypeError, msgpack.UnpackException) as exc:
        raise ValueError(f"undecodable gather data: {exc}") from exc
    if (
        not isinstance(info, dict)
        or not {"role"} <= set(info) <= {"role", "base", "manifest", "payload"}
        or info["role"] not in ("member", "aux")
    ):
        raise ValueError(
            "gather data must be {'role': 'member'|'aux', 'base'?, 'manifest'?, 'payload'?}, "
            f"got {info!r}"
        )
    base = info.get("base")
    if base is not None and not (isinstance(base, str) and _BASE.match(base)):
        raise ValueError(f"bad base fingerprint {base!r}")
    payload = info.get("payload")
    if payload is not None and not (isinstance(payload, str) and _HEX64.match(payload)):
        raise ValueError(f"bad payload digest {payload!r}")
    manifest = info.get("manifest")
    if manifest is not None and not isinstance(manifest, dict):
        raise ValueError("a gathered manifest must be an object")
    if bandwidth is not None and not (
        isinstance(bandwidth, int | float) and math.isfinite(bandwidth) and bandwidth >= 0
    ):
        raise ValueError(f"bad bandwidth {bandwidth!r}")
    return Gathered(
        None if bandwidth is None else float(bandwidth),
        Role(info["role"]),
        base,
        manifest,
        payload,
    )


def commitment_problem(
    body: dict[str, Any] | None, committed: str | None, hotkey: str, window: int, shard: int
) -> str:
    """Why a member's gathered manifest body does not bind its parts ('' when it does).

    The body is what the member committed to on the ledger (`store.manifest.
    commitment_body`): its sha256 over the canonical JSON must be the hotkey's commitment
    for the window, and it must name this hotkey, window and shard and list one sha256
    per part."""
    if committed is None:
        return "no commitment on the ledger for the window"
    if body is None:
        return "gathered no manifest"
    try:
        digest = hashlib.sha256(signing_bytes(body)).hexdigest()
    except (TypeError, ValueError) as exc:
        return f"its manifest is not canonical JSON: {exc}"
    if digest != committed:
        return "its gathered manifest is not the one it committed to"
    if (body.get("hotkey"), body.get("window"), body.get("shard")) != (hotkey, window, shard):
        return "its manifest is for another hotkey, window or shard"
    compression = body.get("compression")
    params = compression.get("params") if isinstance(compression, dict) else None
    parts = params.get("parts") if isinstance(params, dict) else None
    if not (isinstance(parts, list) and all(isinstance(d, str) and _HEX64.match(d) for d in parts)):
        return "its manifest lists no part digests"
    return ""
