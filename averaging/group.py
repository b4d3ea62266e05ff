"""Averaging one window's pseudo-gradients Δ of one shard among that shard's miners.

    averager = ShardAverager(dht, "demo", shard=0, template=shard_params, role=Role.MEMBER,
                             config=AveragingConfig(), directory=PeerDirectory(ledger, run="demo",
                             dht=dht), weight_of=LedgerWeights(ledger, "incentive", 1e-3))
    result = averager.average(window=7, delta=delta, timeout=30)   # or raises AveragingFailed
    result.tensors, result.members, result.dropped, result.bytes_sent, result.bytes_received
    # AveragingFailed has bytes_sent, bytes_received, seconds, attempts and delivered too
    averager.shutdown()

In DiLoCo (arXiv 2311.08105) every miner ends window w with a pseudo-gradient
Δ_i = θ_w − θ_i of its shard; the outer step needs their average. The miners of one shard
meet in one hivemind group per (run, shard, window) — hivemind prefix ``<run>_shard<s>``,
group bits = the window in binary — and run hivemind's butterfly all-reduce: the vector
is cut into parts, each member reduces a share of the parts for everyone and sends the
result back. What we change, by subclassing hivemind's averager, matchmaking, runner and
part reducer:

- **Admission.** Only peer ids that `PeerDirectory` ties to a registered hotkey may lead,
  join or send parts. A leader refuses their join requests, a follower leaves a group
  that contains one, a reducer refuses their parts. The table travels to the averager's
  process before each round, so the ledger is read in the caller's process only.
- **Weights from the ledger.** Each reducer weighs a sender by ``weight_of(hotkey)`` of
  the hotkey behind its (libp2p-authenticated) peer id, looked up before the round; the
  weight a peer announces in its messages is ignored. ``average(weights=...)`` overrides
  it for one round: `Participant` passes `LedgerWeights.table(b)`, the weights as the last
  epoch at or before block b left them (miners pass the window's first block), so peers
  that look up at different moments, one just before an epoch and one just after, still
  weigh alike, and a validator can redo the average with the same numbers.
- **Equal shares.** Every member reduces an equal share of the vector and aux peers none;
  hivemind would size shares by the bandwidth each peer announces about itself.
- **Robust reduction.** A reducer collects all contributions to a part before combining
  them with `averaging.robust.aggregate` (mean, trimmed mean, or BTARD's CenteredClip,
  arXiv 2106.11257), since a robust rule needs every row at once.
- **One answer for all.** A reducer encodes the averaged part once and sends the same
  bytes to everyone (itself included), with the set of senders it combined. Every member
  therefore ends with bit-identical tensors, and knows exactly whose Δ is in them.
  Plain hivemind sends each sender ``average − own part``, so fp16/8-bit rounding leaves
  members with slightly different results.
- **Drops.** A sender that stalls or breaks protocol is dropped by the reducers
  (hivemind's timeouts). In strict mode a round counts only if every part came back and
  was combined over the same senders; otherwise the members restore their Δ, remember who
  failed them, and form a new group without those peers until the deadline. The result
  reports members and dropped hotkeys; on failure `AveragingFailed` says why.
- **Auxiliary peers** (validators, other shards' miners) join with ``role=Role.AUX``:
  they send an empty placeholder per part, reduce nothing, have weight 0, and receive the
  average (hivemind's own AUX peers reduce but never receive it).
- **Roles per round.** `average(..., role=)` makes one averager a member in one window
  and an auxiliary peer in the next, as shard assignments move.
- **Who is in step.** A peer may announce a `base` (a fingerprint of the model it starts
  the window from); the result lists every peer's, so peers that started from different
  models find out (`averaging.participant.Participant.in_step`).
- **State for late joiners.** `share_state(priority, provider)` offers the provider's
  state through hivemind's state download; `load_state_from_peers` asks only peers in the
  directory, newest declared state first, and reads at most `max_bytes` from each.
- **Bytes.** Every protobuf message of the all-reduce is counted where it is sent and
  received (payload bytes, before libp2p framing), summed over the round's attempts, and
  reported on success (`AverageResult`) and on failure (`AveragingFailed`) alike;
  matchmaking's few hundred bytes are not.
- **Error feedback after a failure.** A member may fail a round that the others completed
  with its Δ in it (a reducer's last reply lost). The contributor sets tell it which parts
  of its Δ were counted; its top-k residual is committed for those values and kept as
  before for the rest (`AveragingFailed.delivered` says how much). `wire_residual` and
  `restore_wire_residual` carry it across a restart (the miner saves it with its state).

Wire codecs (`AveragingConfig.wire`): hivemind's `Float16Compression`, its uniform 8-bit
format (repaired for NumPy 2 in `averaging.wire.Uniform8BitCodec`), and our sparse top-k
with sender-side error feedback (`averaging.wire`, SparseLoCo arXiv 2508.15706).

Not covered: a reducer that lies (a wrong average, a false contributor set) is caught only
if it breaks the format; BTARD's verification of reducers by random re-computation is not
implemented, so members should rely on validators scoring the published Δ as well.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import hashlib
import logging
import math
import re
import signal
import threading
import time
from collections.abc import AsyncIterator, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from enum import StrEnum
from pathlib import Path
from typing import Any, ClassVar, Literal, Protocol

import msgpack
import torch
from hivemind import DHT
from hivemind.averaging import DecentralizedAverager
from hivemind.averaging.allreduce import AllReduceRunner
from hivemind.averaging.key_manager import GroupKeyManager
from hivemind.averaging.load_balancing import load_balance_peers
from hivemind.averaging.matchmaking import Matchmaking, MatchmakingException
from hivemind.averaging.partition import (
    AllreduceException,
    BannedException,
    TensorPartReducer,
)
from hivemind.compression import CompressionInfo, deserialize_torch_tensor
from hivemind.p2p import P2PDaemonError, P2PHandlerError, PeerID
from hivemind.proto import averaging_pb2
from hivemind.utils.asyncio import (
    aiter_with_timeout,
    amap_in_executor,
    attach_event_on_finished,
    enter_asynchronously,
)
from hivemind.utils.mpfuture import MPFuture
from hivemind.utils.serializer import MSGPackSerializer
from hivemind.utils.streaming import combine_from_streaming

from averaging.dht import LedgerSource, check_run_name
from averaging.parts import message_digest, part_layout, wire_parts
from averaging.robust import aggregate
from averaging.settings import AveragingConfig, RobustConfig
from averaging.wire import TopKSparsifier, codec_for, decode_part
from chain.config import RAO_PER_TAO
from chain.keys import signing_bytes
from chain.ledger import Ledger, Neuron

logger = logging.getLogger(__name__)


class Role(StrEnum):
    MEMBER = "member"  # contributes its Δ and receives the average
    AUX = "aux"  # contributes nothing, receives the average


class AveragingFailed(RuntimeError):
    """No average this round (no group, timeout, too many drops); fall back to the canonical
    checkpoint of the store.

    The counters say what the round cost anyway, summed over its attempts (as on
    `AverageResult`); `delivered` is the fraction of this member's Δ (its values) that
    reached a group's average with this member counted as a contributor, although the
    round failed here (0 for aux peers, or when nothing is known)."""

    bytes_sent: int = 0
    bytes_received: int = 0
    seconds: float = 0.0
    attempts: int = 0
    delivered: float = 0.0
    mismatched: dict[str, list[int]] = {}  # noqa: RUF012 - replaced per instance


@dataclass(frozen=True)
class AverageResult:
    tensors: dict[str, torch.Tensor]  # the average, same names, shapes and dtypes as the template
    members: list[str]  # hotkeys whose Δ is in the average
    dropped: list[str]  # hotkeys that were in a group of this round but are not in it
    aux: list[str]  # hotkeys of auxiliary peers of the final group
    bytes_sent: int  # all-reduce payload bytes this peer sent, all attempts
    bytes_received: int
    seconds: float
    attempts: int  # groups this round went through (> 1 after a failed attempt)
    bases: dict[str, str] = field(default_factory=dict)  # hotkey -> announced θ_w fingerprint
    # hotkey -> parts its reducers refused: not the bytes it committed to (bound rounds)
    mismatched: dict[str, list[int]] = field(default_factory=dict)


@dataclass(frozen=True)
class PreparedParts:
    """A member's Δ of one window as the wire carries it (`ShardAverager.prepare`): the
    serialized parts it commits to and publishes, and the fp32 values they decode to."""

    blobs: list[bytes]
    values: dict[str, torch.Tensor]
    # What the parts were encoded from: the averager encodes these again, to the same
    # bytes (the codecs are deterministic; 8-bit quantization is not idempotent, so
    # re-encoding `values` would not give them).
    raw: dict[str, torch.Tensor]


@dataclass(frozen=True)
class Binding:
    """What binds a bound round: `manifest`, the body of the contribution manifest this
    member committed to (None for an auxiliary peer), and `commitments`, which returns
    hotkey -> committed manifest digest of the window once the ledger is past its deadline
    (None until then; polled while the round runs)."""

    manifest: dict[str, Any] | None
    commitments: Callable[[], Mapping[str, str] | None]


# What a participant shares with late joiners: small JSON-able metadata and tensors, or
# None while it has nothing trustworthy to share. Called in the caller's process.
StateProvider = Callable[[], tuple[dict[str, Any], list[torch.Tensor]] | None]


@dataclass(frozen=True)
class PeerState:
    """A state downloaded from a peer: untrusted until the caller checked it."""

    hotkey: str
    metadata: dict[str, Any]
    tensors: list[torch.Tensor]
    nbytes: int


class Directory(Protocol):
    def peers(self) -> Mapping[str, str]:
        """peer id (base58) -> hotkey of every admitted peer."""
        ...


WeightSource = Literal["uniform", "stake", "incentive", "trust"]


class LedgerWeights:
    """``weight_of(hotkey)`` from the ledger: `source` of the hotkey's neuron, at least
    `floor` (so a newly registered member still counts); 0 for unregistered ones.

    Called, it reads the latest block. `table(at_block=b)` gives every registered
    hotkey's weight as the last epoch at or before b left it (`Ledger.epoch_neurons`), the
    same whenever it is asked; a hotkey registered since, or every one before the first
    epoch, has the floor (for `stake` too: stake is pinned with the epoch's metagraph)."""

    def __init__(self, ledger: Ledger | Path | str, source: WeightSource, floor: float) -> None:
        if not floor > 0:
            raise ValueError("floor must be positive")
        self.ledger, self.source, self.floor = LedgerSource(ledger), source, floor
        self._block = -1
        self._neurons: dict[str, Neuron] = {}
        self._lock = threading.Lock()

    def _current(self) -> dict[str, Neuron]:
        with self._lock:
            ledger = self.ledger.get()
            block = ledger.block_number()
            if block != self._block:
                self._neurons = {n.hotkey: n for n in ledger.neurons()}
                self._block = block
            return self._neurons

    def _weight(self, neuron: Neuron | None) -> float:
        if neuron is None:
            return 0.0
        if self.source == "uniform":
            return 1.0
        value = {
            "stake": neuron.stake / RAO_PER_TAO,
            "incentive": neuron.incentive,
            "trust": neuron.trust,
        }[self.source]
        return max(float(value), self.floor)

    def __call__(self, hotkey: str) -> float:
        return self._weight(self._current().get(hotkey))

    def table(self, at_block: int | None = None) -> dict[str, float]:
        """Every registered hotkey's weight: now (None), or pinned to the last epoch at or
        before `at_block` (what every member of a round pinned to that block uses)."""
        current = self._current()
        if at_block is None:
            return {hotkey: self._weight(n) for hotkey, n in current.items()}
        with self._lock:
            pinned = self.ledger.get().epoch_neurons(at_block)
        then = {} if pinned is None else {n.hotkey: n for n in pinned[1]}
        table = {}
        for hotkey in current:
            if hotkey in then:
                table[hotkey] = self._weight(then[hotkey])
            else:  # registered since that epoch, or no epoch yet: a newcomer's weight
                table[hotkey] = 1.0 if self.source == "uniform" else self.floor
        return table


def group_prefix(run: str, shard: int) -> str:
    if shard < 0:
        raise ValueError("shard must be non-negative")
    return f"{check_run_name(run)}_shard{shard}"


def window_bits(window: int) -> str:
    if window < 0:
        raise ValueError("window must be non-negative")
    return format(window, "b")


@dataclass(frozen=True)
class PeerInfo:
    hotkey: str
    weight: float


# ---- what runs inside the averager's process -------------------------------------------


@dataclass
class _RoundLog:
    """One `average` call, across its attempts (lives in the averager's process)."""

    bytes_sent: int = 0
    bytes_received: int = 0
    attempts: int = 0
    seen_members: set[PeerID] = field(default_factory=set)
    blocked: set[PeerID] = field(default_factory=set)  # failed us in an earlier attempt
    # Flat [start, stop) ranges of our vector in parts whose average counted us (any attempt).
    delivered: list[tuple[int, int]] = field(default_factory=list)
    # hotkey -> parts (global index) whose row a reducer refused as not what it committed.
    mismatched: dict[str, set[int]] = field(default_factory=dict)

    def counters(self) -> dict[str, Any]:
        return {
            "bytes_sent": self.bytes_sent,
            "bytes_received": self.bytes_received,
            "attempts": self.attempts,
            "delivered": _merge_spans(self.delivered),
            "mismatched": {h: sorted(parts) for h, parts in self.mismatched.items()},
        }


def _merge_spans(spans: Sequence[tuple[int, int]]) -> list[tuple[int, int]]:
    out: list[tuple[int, int]] = []
    for start, stop in sorted(spans):
        if out and start <= out[-1][1]:
            out[-1] = (out[-1][0], max(out[-1][1], stop))
        else:
            out.append((start, stop))
    return out


@dataclass(frozen=True)
class _Reduced:
    encoded: Any  # runtime_pb2.Tensor: the part of the average as every peer receives it
    value: torch.Tensor  # decode(encoded)
    contributors: bytes  # bitmap over sender indices
    mismatched: bytes  # bitmap over sender indices: rows refused as not what was committed

    @property
    def bitmaps(self) -> bytes:
        """What travels in the reply's (otherwise unused) `peer_id` field."""
        return self.contributors + self.mismatched


def _bitmap(indices: Sequence[int], size: int) -> bytes:
    out = bytearray((size + 7) // 8)
    for i in indices:
        out[i // 8] |= 1 << (i % 8)
    return bytes(out)


def _from_bitmap(bitmap: bytes, size: int) -> list[int]:
    return [i for i in range(size) if i // 8 < len(bitmap) and bitmap[i // 8] >> (i % 8) & 1]


_BASE = re.compile(r"^[0-9a-f]{8,64}$")


MAX_COMMITMENT_BODY = 1 << 20  # bytes of a gathered manifest body (msgpack)


@dataclass(frozen=True)
class Gathered:
    """What a peer announced in matchmaking."""

    bandwidth: float | None
    role: Role
    base: str | None
    manifest: dict[str, Any] | None  # the committed manifest body of a member's Δ


def _parse_gather(blob: bytes) -> Gathered:
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
        or not {"role"} <= set(info) <= {"role", "base", "manifest"}
        or info["role"] not in ("member", "aux")
    ):
        raise ValueError(
            f"gather data must be {{'role': 'member'|'aux', 'base'?, 'manifest'?}}, got {info!r}"
        )
    base = info.get("base")
    if base is not None and not (isinstance(base, str) and _BASE.match(base)):
        raise ValueError(f"bad base fingerprint {base!r}")
    manifest = info.get("manifest")
    if manifest is not None and not isinstance(manifest, dict):
        raise ValueError("a gathered manifest must be an object")
    if bandwidth is not None and not (
        isinstance(bandwidth, int | float) and math.isfinite(bandwidth) and bandwidth >= 0
    ):
        raise ValueError(f"bad bandwidth {bandwidth!r}")
    return Gathered(
        None if bandwidth is None else float(bandwidth), Role(info["role"]), base, manifest
    )


_HEX64 = re.compile(r"^[0-9a-f]{64}$")


def _commitment_problem(
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


class LedgerPartReducer(TensorPartReducer):  # type: ignore[misc]
    """hivemind's reducer, but it keeps every row of a part and combines them at the end
    with ledger weights and the configured robust rule, then encodes the result once."""

    current_part_future: asyncio.Future[Any]

    def __init__(
        self,
        part_shapes: Sequence[torch.Size],
        num_senders: int,
        *,
        weights: Sequence[float],
        contributes: Sequence[bool],
        robust: RobustConfig,
        codec: Any,
        order: Sequence[int] | None = None,
    ) -> None:
        self.weights, self.contributes = list(weights), list(contributes)
        self.robust, self.codec = robust, codec
        # Rows are combined in this order (senders by hotkey): floating-point sums depend
        # on it, and anyone recomputing the average must find the same bits.
        self.order = list(range(num_senders)) if order is None else list(order)
        self._rows: dict[int, torch.Tensor] = {}
        self._mismatched: set[int] = set()
        super().__init__(part_shapes, num_senders)

    def reset_accumulators(self) -> None:
        if self.current_part_index >= self.num_parts - 1:
            self.finalize()
            return
        self.current_part_index += 1
        self.current_part_accumulated_from = 0
        self.current_part_future = asyncio.Future()
        self.num_current_senders = sum(
            self.current_part_index < failed_after for failed_after in self.sender_failed_after
        )
        self._rows = {}
        self._mismatched = set()

    async def accumulate_part(
        self,
        sender_index: int,
        part_index: int,
        tensor_part: torch.Tensor | None,
        weight: float = 0.0,
        *,
        mismatched: bool = False,
    ) -> _Reduced:
        """Add one sender's part (None for an auxiliary peer); await the combined part.

        `weight` is what the sender announced and is ignored. A part of the wrong shape or
        with non-finite values is refused *before* it counts as received, so banning its
        sender never leaves the part waiting for a row that will not come. A `mismatched`
        part (not the bytes its sender committed to) counts as received and adds no row:
        the average goes on without it, and every receiver learns whose it was.
        """
        if not 0 <= sender_index < self.num_senders or not 0 <= part_index < self.num_parts:
            raise AllreduceException(f"part {part_index} of sender {sender_index}: out of range")
        if self.contributes[sender_index] and not mismatched:
            expected = self.part_shapes[part_index]
            if tensor_part is None or tuple(tensor_part.shape) != tuple(expected):
                got = None if tensor_part is None else tuple(tensor_part.shape)
                raise AllreduceException(
                    f"sender {sender_index} sent part {part_index} of shape {got}, "
                    f"expected {tuple(expected)}"
                )
            if not bool(torch.isfinite(tensor_part).all()):
                raise AllreduceException(f"sender {sender_index} sent non-finite values")
        self.num_parts_received[sender_index] += 1

        while part_index > self.current_part_index:
            await asyncio.wait(
                {self.current_part_future, asyncio.create_task(self.finished.wait())},
                return_when=asyncio.FIRST_COMPLETED,
            )
            if self.finished.is_set():
                raise AllreduceException(f"part {part_index} arrived after the reducer finished")
        if self.sender_failed_after[sender_index] != float("inf"):
            raise BannedException(f"sender {sender_index} was banned in background")
        if self.finished.is_set():
            raise AllreduceException(f"part {part_index} arrived after the reducer finished")
        if part_index != self.current_part_index:
            raise AllreduceException(f"part {part_index} arrived twice")

        future = self.current_part_future
        if mismatched:
            self._mismatched.add(sender_index)
        elif self.contributes[sender_index] and tensor_part is not None:
            self._rows[sender_index] = tensor_part
        self.current_part_accumulated_from += 1
        self.check_current_part_finished()
        # Shielded: when one sender's stream is cancelled (its peer died), cancelling its
        # wait must not cancel the part that every other sender is waiting for.
        result: _Reduced = await asyncio.shield(future)
        return result

    def check_current_part_finished(self) -> None:
        if self.current_part_accumulated_from < self.num_current_senders:
            return
        future = self.current_part_future
        if future.done():  # cancelled by `finalize`; nobody is left to answer
            return
        try:
            reduced = self._reduce()
        except (ValueError, TypeError, RuntimeError) as exc:
            # Every awaiting sender must learn that this part failed, or it would wait for
            # it until the all-reduce times out.
            future.set_exception(
                AllreduceException(f"part {self.current_part_index} has no average: {exc}")
            )
            # Nobody may await it if every sender has gone; do not warn about that.
            future.exception()
        else:
            future.set_result(reduced)
        self.reset_accumulators()

    def _reduce(self) -> _Reduced:
        rows = [i for i in self.order if i in self._rows and self.weights[i] > 0]
        if not rows:
            raise ValueError("no contribution with positive ledger weight")
        stack = torch.stack([self._rows[i].to(torch.float32) for i in rows])
        weights = torch.tensor([self.weights[i] for i in rows], dtype=torch.float64)
        value = aggregate(stack, weights, self.robust)
        encoded = self.codec.compress(value, CompressionInfo.from_tensor(value), False)
        return _Reduced(
            encoded,
            decode_part(encoded),
            _bitmap(rows, self.num_senders),
            _bitmap(sorted(self._mismatched), self.num_senders),
        )

    def finalize(self) -> None:
        if not self.finished.is_set():
            if hasattr(self, "current_part_future"):
                self.current_part_future.cancel()
            self._rows = {}
            self.finished.set()
            if self.num_parts and self.num_senders:
                received = sum(self.num_parts_received)
                expected = self.num_parts * self.num_senders
                if received != expected:
                    logger.debug("reducer got %d of %d parts", received, expected)


class LedgerAllReduceRunner(AllReduceRunner):  # type: ignore[misc]
    """hivemind's butterfly all-reduce with admission, ledger weights, robust parts, one
    encoded answer per part with its contributor set, aux placeholders and byte counts."""

    tensor_part_reducer: Any

    def __init__(
        self,
        *,
        peers: Mapping[PeerID, PeerInfo],
        admitted: Callable[[PeerID], bool],
        roles: Sequence[Role],
        robust: RobustConfig,
        codec: Any,
        log: _RoundLog,
        expected: Mapping[PeerID, Sequence[str] | None] | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        self._peers, self._admitted, self._log = peers, admitted, log
        # Bound round: each member's committed part digests (None: it has no valid
        # commitment, so none of its parts counts); None: parts are not checked.
        self._expected = expected
        role_of = dict(zip(self.ordered_peer_ids, roles, strict=True))
        self.role = role_of[self.peer_id]
        self.sender_roles = [role_of[p] for p in self.sender_peer_ids]
        # The container registers averages, not deltas, so a failed reducer leaves our own
        # values for its parts (and the consistency check below rejects the attempt).
        self.tensor_part_container.return_deltas = False
        # Retire the base class's reducer quietly (it would warn that it received nothing).
        self.tensor_part_reducer.num_parts = 0
        self.tensor_part_reducer.finalize()
        self.tensor_part_reducer = LedgerPartReducer(
            tuple(part.shape for part in self.parts_for_local_averaging),
            len(self.sender_peer_ids),
            weights=[
                peers[p].weight if r is Role.MEMBER and p in peers else 0.0
                for p, r in zip(self.sender_peer_ids, self.sender_roles, strict=True)
            ],
            contributes=[r is Role.MEMBER for r in self.sender_roles],
            robust=robust,
            codec=codec,
            order=sorted(
                range(len(self.sender_peer_ids)),
                key=lambda i: peers[p].hotkey if (p := self.sender_peer_ids[i]) in peers else "",
            ),
        )
        self._codec = codec
        self.contributors: dict[tuple[int, int], bytes] = {}
        self.failed_reducers: set[PeerID] = set()
        # hivemind cuts the flat vector into parts in order and hands them to reducers in
        # peer order, so (reducer, part) -> [start, stop) follows from the part sizes.
        self.part_spans: dict[tuple[int, int], tuple[int, int]] = {}
        # (reducer, part) -> the part's index in the whole layout (`averaging.parts`).
        self.part_numbers: dict[tuple[int, int], int] = {}
        offset = 0
        for peer_index, parts in enumerate(self.tensor_part_container._input_parts_by_peer):
            for part_index, (part, _info) in enumerate(parts):
                self.part_spans[peer_index, part_index] = (offset, offset + part.numel())
                self.part_numbers[peer_index, part_index] = len(self.part_numbers)
                offset += part.numel()
        self._my_index = self.ordered_peer_ids.index(self.peer_id)

    # -- as a sender ----------------------------------------------------------------
    async def _generate_input_for_peer(self, peer_index: int) -> AsyncIterator[Any]:
        if self.role is Role.AUX:
            for _ in range(self.tensor_part_container.num_parts_by_peer[peer_index]):
                msg = averaging_pb2.AveragingData(
                    code=averaging_pb2.PART_FOR_AVERAGING, group_id=self.group_id
                )
                self._log.bytes_sent += msg.ByteSize()
                yield msg
            return
        async for msg in super()._generate_input_for_peer(peer_index):
            self._log.bytes_sent += msg.ByteSize()
            yield msg

    async def _communicate_with_peer(self, peer_id: PeerID) -> None:
        peer_index = self.ordered_peer_ids.index(peer_id)
        container = self.tensor_part_container
        if peer_id == self.peer_id:
            sender_index = self.sender_peer_ids.index(peer_id)
            infos = [info for _part, info in container._input_parts_by_peer[peer_index]]
            loop = asyncio.get_running_loop()
            try:
                for part_index, part in enumerate(self.parts_for_local_averaging):
                    # Our own row as every other reducer would see it: through the codec,
                    # so that the average depends on the parts alone, not on who reduced.
                    row, mismatched = None, False
                    if self.role is Role.MEMBER:
                        row, digest = await loop.run_in_executor(
                            None, self._through_codec, part, infos[part_index]
                        )
                        mismatched = self._mismatched(peer_id, part_index, digest)
                    reduced = await self.tensor_part_reducer.accumulate_part(
                        sender_index, part_index, None if mismatched else row,
                        mismatched=mismatched,
                    )  # fmt: skip
                    self._record(peer_index, part_index, reduced.bitmaps)
                    container.register_processed_part(peer_index, part_index, reduced.value)
            except BaseException:
                # Fill our own share with local values so the outputs do not wait for it;
                # the missing contributor sets make the attempt fail in strict mode.
                container.register_failed_reducer(peer_index)
                raise
            return

        expected = [part.shape for part, _info in container._input_parts_by_peer[peer_index]]
        loop = asyncio.get_running_loop()
        try:
            done_sending = asyncio.Event()
            parts = self._generate_input_for_peer(peer_index)
            inputs = attach_event_on_finished(parts, done_sending)
            stream = await self._get_peer_stub(peer_id).rpc_aggregate_part(inputs)
            if self.should_delay_results(self.peer_id):
                await done_sending.wait()
            part_index = 0
            async for msg in aiter_with_timeout(stream, self.reducer_timeout):
                self._log.bytes_received += msg.ByteSize()
                if msg.code != averaging_pb2.AVERAGED_PART:
                    code = averaging_pb2.MessageCode.Name(msg.code)
                    raise AllreduceException(f"{peer_id} answered {code}")
                if part_index >= len(expected):
                    raise AllreduceException(f"{peer_id} sent more parts than it reduces")
                value = await loop.run_in_executor(None, decode_part, msg.tensor_part)
                if tuple(value.shape) != tuple(expected[part_index]):
                    raise AllreduceException(f"{peer_id} sent an average of the wrong shape")
                if not bool(torch.isfinite(value).all()):
                    raise AllreduceException(f"{peer_id} sent a non-finite average")
                self._record(peer_index, part_index, bytes(msg.peer_id))
                container.register_processed_part(peer_index, part_index, value)
                part_index += 1
            if part_index != len(expected):
                raise AllreduceException(f"{peer_id} sent {part_index} of {len(expected)} parts")
        except BaseException as exc:
            if isinstance(exc, Exception):
                logger.debug("reducer %s failed us: %r", peer_id, exc)
            self.failed_reducers.add(peer_id)
            container.register_failed_reducer(peer_index)
            raise

    def _through_codec(self, part: torch.Tensor, info: Any) -> tuple[torch.Tensor, str]:
        message = self._codec.compress(part, info, False)
        return decode_part(message), message_digest(message)

    def _mismatched(self, sender: PeerID, part_index: int, digest: str) -> bool:
        """Whether `sender`'s part `part_index` of ours is not what it committed to (always
        False in an unbound round)."""
        if self._expected is None:
            return False
        digests = self._expected.get(sender)
        number = self.part_numbers[self._my_index, part_index]
        if digests is not None and digest == digests[number]:
            return False
        name = self._peers[sender].hotkey if sender in self._peers else str(sender)
        why = "" if digests is not None else " (no valid commitment)"
        logger.warning("part %d from %s is not what it committed to%s; left out", number, name, why)
        return True

    def _record(self, peer_index: int, part_index: int, bitmaps: bytes) -> None:
        """Keep a reply's contributor set, and whose rows its reducer refused."""
        size = len(self.sender_peer_ids)
        n = (size + 7) // 8
        if len(bitmaps) != 2 * n:
            raise AllreduceException(f"a reply's sender bitmaps are {len(bitmaps)} bytes")
        self.contributors[peer_index, part_index] = bitmaps[:n]
        number = self.part_numbers[peer_index, part_index]
        for i in _from_bitmap(bitmaps[n:], size):
            peer = self.sender_peer_ids[i]
            if peer in self._peers:
                self._log.mismatched.setdefault(self._peers[peer].hotkey, set()).add(number)

    # -- as a reducer -----------------------------------------------------------------
    async def rpc_aggregate_part(
        self, stream: AsyncIterator[Any], context: Any
    ) -> AsyncIterator[Any]:
        remote = context.remote_id
        if not self._admitted(remote) or remote not in self.sender_peer_ids:
            logger.warning("refused parts from %s: not an admitted sender of this group", remote)
            yield averaging_pb2.AveragingData(code=averaging_pb2.PROTOCOL_VIOLATION)
            return

        async def counted() -> AsyncIterator[Any]:
            async for msg in stream:
                self._log.bytes_received += msg.ByteSize()
                yield msg

        async for msg in super().rpc_aggregate_part(counted(), context):
            self._log.bytes_sent += msg.ByteSize()
            yield msg

    async def _accumulate_parts_streaming(
        self, stream: AsyncIterator[Any], sender_index: int
    ) -> AsyncIterator[Any]:
        contributes = self.tensor_part_reducer.contributes[sender_index]
        sender = self.sender_peer_ids[sender_index]
        bound = self._expected is not None and contributes

        def decode(msg: Any) -> tuple[torch.Tensor | None, str]:
            if not contributes:
                return None, ""
            digest = message_digest(msg.tensor_part) if bound else ""
            return decode_part(msg.tensor_part), digest

        part_index = 0
        try:
            async for part, digest in amap_in_executor(
                decode, stream, max_prefetch=self.tensor_part_container.prefetch
            ):
                mismatched = bound and self._mismatched(sender, part_index, digest)
                try:
                    reduced = await self.tensor_part_reducer.accumulate_part(
                        sender_index, part_index, None if mismatched else part,
                        mismatched=mismatched,
                    )  # fmt: skip
                    part_index += 1
                except BannedException:
                    break
                # `peer_id` is unused in hivemind's replies; it carries who is in this part
                # and whose rows were refused.
                yield averaging_pb2.AveragingData(
                    code=averaging_pb2.AVERAGED_PART,
                    tensor_part=reduced.encoded,
                    peer_id=reduced.bitmaps,
                )
        finally:
            if part_index != self.tensor_part_reducer.num_parts:
                await self._ban_sender(self.sender_peer_ids[sender_index])

    # -- after the run ----------------------------------------------------------------
    def contributor_sets(self) -> set[frozenset[PeerID]]:
        """The distinct sets of senders combined into the parts we received."""
        size = len(self.sender_peer_ids)
        return {
            frozenset(self.sender_peer_ids[i] for i in _from_bitmap(bitmap, size))
            for bitmap in self.contributors.values()
        }

    def missing_parts(self) -> int:
        total = int(sum(self.tensor_part_container.num_parts_by_peer))
        return total - len(self.contributors)

    def delivered_spans(self) -> list[tuple[int, int]]:
        """Ranges of our vector in parts whose average (as its reducer sent it to every
        sender) counts us as a contributor; empty for an aux peer."""
        if self.role is not Role.MEMBER:
            return []
        me = self.sender_peer_ids.index(self.peer_id)
        return [
            self.part_spans[key]
            for key, bitmap in self.contributors.items()
            if me // 8 < len(bitmap) and bitmap[me // 8] >> (me % 8) & 1
        ]


class _WindowKeyManager(GroupKeyManager):  # type: ignore[misc]
    """Group bits name the window; hivemind would reshuffle them after every group, which
    would scatter the retry of a failed round over several keys."""

    async def update_key_on_group_assembled(self, group_info: Any) -> None:
        return None


class LedgerMatchmaking(Matchmaking):  # type: ignore[misc]
    """Matchmaking that only deals with admitted peers with well-formed metadata."""

    group_key_manager: Any

    def __init__(self, *args: Any, admitted: Callable[[PeerID], bool], **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._admitted = admitted
        self.group_key_manager = _WindowKeyManager(
            self.group_key_manager.dht,
            self.group_key_manager.prefix,
            self.group_key_manager.group_bits,
            self.group_key_manager.target_group_size,
        )

    def set_target_group_size(self, size: int | None) -> None:
        self.target_group_size = size
        self.potential_leaders.target_group_size = size
        self.group_key_manager.target_group_size = size

    def _check_reasons_to_reject(self, request: Any, context: Any) -> Any:
        if not self._admitted(context.remote_id):
            logger.info("refused join request from unadmitted peer %s", context.remote_id)
            return averaging_pb2.MessageFromLeader(code=averaging_pb2.PROTOCOL_VIOLATION)
        try:
            _parse_gather(request.gather)
        except ValueError as exc:
            logger.info("refused join request from %s: %s", context.remote_id, exc)
            return averaging_pb2.MessageFromLeader(code=averaging_pb2.PROTOCOL_VIOLATION)
        return super()._check_reasons_to_reject(request, context)

    async def _request_join_group(self, leader: PeerID) -> Any:
        if not self._admitted(leader):
            logger.debug("not joining unadmitted leader %s", leader)
            return None
        return await super()._request_join_group(leader)

    async def follower_assemble_group(self, leader: PeerID, msg: Any) -> Any:
        strangers = [p for p in map(PeerID, msg.ordered_peer_ids) if not self._admitted(p)]
        if strangers:
            raise MatchmakingException(f"leader {leader} grouped us with unadmitted {strangers}")
        return await super().follower_assemble_group(leader, msg)


class LedgerAverager(DecentralizedAverager):  # type: ignore[misc]
    """The averager process behind `ShardAverager` (one per shard and participant)."""

    runner_class: ClassVar[type[LedgerAllReduceRunner]] = LedgerAllReduceRunner
    _matchmaking: Any

    def __init__(
        self,
        averaged_tensors: Sequence[torch.Tensor],
        dht: DHT,
        *,
        prefix: str,
        config: AveragingConfig,
        role: Role,
    ) -> None:
        # Set before the base class forks the averager process, which needs them.
        # (Names avoid multiprocessing.Process's own attributes such as `_config`.)
        self.tm_config, self.tm_role = config, role
        self.tm_codec = codec_for(config.wire)
        self.tm_peers: dict[PeerID, PeerInfo] = {}
        self.tm_log = _RoundLog()
        # Bound rounds: (window, shard) of the round, and hotkey -> committed manifest digest
        # once the caller has read the ledger at the deadline.
        self.tm_bound: tuple[int, int] | None = None
        self.tm_commitments: dict[str, str] | None = None
        self.tm_commitments_ready: asyncio.Event | None = None
        self.tm_state_provider: StateProvider | None = None
        super().__init__(
            averaged_tensors,
            dht,
            start=True,
            prefix=prefix,
            target_group_size=config.target_group_size,
            min_group_size=config.min_group_size,
            min_matchmaking_time=config.min_matchmaking_time_s,
            request_timeout=config.request_timeout_s,
            allreduce_timeout=config.allreduce_timeout_s,
            sender_timeout=config.sender_timeout_s,
            reducer_timeout=2 * config.sender_timeout_s,
            compression=self.tm_codec,
            part_size_bytes=config.wire_part_size_bytes,
            # Announced for hivemind's format only; shares are set by role (see below).
            bandwidth=0.0 if role is Role.AUX else None,
            allow_state_sharing=False,  # switched on by `ShardAverager.share_state`
            declare_state_period=10,
            shutdown_timeout=5,
        )

    @classmethod
    def _get_handle_name(cls, namespace: str | None, method_name: str) -> str:
        # hivemind names RPC handlers after the class; subclasses (fault injection in tests,
        # variants) must still speak to plain LedgerAverager peers.
        name = f"LedgerAverager.{method_name}"
        return name if namespace is None else f"{namespace}::{name}"

    def run_in_background(self, await_ready: bool = True, timeout: float | None = None) -> None:
        # hivemind ignores SIGINT in the *calling* process (so that the child inherits it),
        # which leaves the miner deaf to Ctrl+C and fails outside the main thread; the
        # child ignores it by itself in `run` instead.
        self.start()
        if await_ready:
            self.wait_until_ready(timeout)

    def run(self) -> None:
        # The caller handles Ctrl+C and shuts us down in order; dying mid-round would not help.
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        super().run()

    async def _shutdown(self, timeout: float | None) -> None:
        # hivemind's, except that a p2p daemon already gone is no error: it shares the
        # caller's process group, so a SIGINT to the group (`subnet up` stopping its
        # children, Ctrl+C in a terminal) ends it before the caller shuts us down, and
        # its handlers went with it. Unhandled, this printed a traceback at every exit.
        if not self.client_mode:
            try:
                await self.remove_p2p_handlers(self._p2p, namespace=self.prefix)
            except (OSError, P2PDaemonError) as exc:
                logger.debug("p2p daemon gone before the averager's shutdown: %r", exc)
        remaining: set[Any] = set()
        for group in self._running_groups.values():
            remaining.update(group.finalize(cancel=True))
        await asyncio.wait_for(asyncio.gather(*remaining), timeout)

    # -- called from the caller's process ---------------------------------------------
    def configure_round(
        self,
        *,
        bits: str,
        peers: Mapping[str, PeerInfo],
        target_group_size: int | None,
        bound: tuple[int, int] | None = None,
    ) -> None:
        future: Any = MPFuture()
        self._outer_pipe.send(
            (
                "_configure_round",
                [],
                {
                    "bits": bits,
                    "peers": dict(peers),
                    "target": target_group_size,
                    "bound": bound,
                    "future": future,
                },
            )
        )
        future.result(timeout=30)

    def set_commitments(self, table: Mapping[str, str]) -> None:
        """Hand the round's reducers every hotkey's committed manifest digest."""
        future: Any = MPFuture()
        self._outer_pipe.send(("_set_commitments", [], {"table": dict(table), "future": future}))
        future.result(timeout=30)

    def round_counters(self, timeout: float = 5.0) -> dict[str, Any] | None:
        """Counters of the current (or last) round so far, or None if the process is silent."""
        future: Any = MPFuture()
        try:
            self._outer_pipe.send(("_round_counters", [], {"future": future}))
            counters: dict[str, Any] = future.result(timeout=timeout)
        except (TimeoutError, concurrent.futures.CancelledError, OSError) as exc:
            future.cancel()
            logger.debug("no round counters from the averager: %r", exc)
            return None
        return counters

    def get_current_state(self) -> tuple[Any, Sequence[torch.Tensor], None]:
        # hivemind calls this in the caller's process (a background thread) when a peer
        # downloads our state; refusing raises there and the peer tries the next one.
        provider = self.tm_state_provider
        state = provider() if provider is not None else None
        if state is None:
            raise RuntimeError("no state to share")
        metadata, tensors = state
        # The count travels with the metadata so that the receiver can tell a complete
        # state from a stream that ended early (hivemind issue #504: a download sometimes
        # stops after a tensor without an error; the second try gets everything).
        return {STATE_METADATA: metadata, STATE_COUNT: len(tensors)}, tensors, None

    def download_state(
        self, peers: Mapping[str, PeerInfo], *, timeout: float, max_bytes: int
    ) -> tuple[str, Any, list[torch.Tensor], int] | None:
        future: Any = MPFuture()
        self._outer_pipe.send(
            (
                "_download_state",
                [],
                {
                    "peers": dict(peers),
                    "timeout": timeout,
                    "max_bytes": max_bytes,
                    "future": future,
                },
            )
        )
        try:
            result: tuple[str, Any, list[torch.Tensor], int] | None = future.result(
                timeout=timeout + 30
            )
        except TimeoutError:
            future.cancel()
            logger.warning("no state from any peer within %.0fs", timeout + 30)
            return None
        return result

    # -- inside the averager's process ------------------------------------------------
    async def _download_state(
        self, *, peers: dict[str, PeerInfo], timeout: float, max_bytes: int, future: Any
    ) -> None:
        """hivemind's `load_state_from_peers`, but only from admitted (registered) peers, in
        order of the window they declare, reading at most `max_bytes` from each."""
        try:
            admitted = {PeerID.from_base58(k): v for k, v in peers.items()}
            key = f"{self._matchmaking.group_key_manager.prefix}.all_averagers"
            found = await asyncio.wait_for(
                self.dht.get(key, latest=True, return_future=True), timeout=timeout
            )
            declared = found.value if found is not None and isinstance(found.value, dict) else {}
            ranked = []
            for subkey, entry in declared.items():
                try:
                    peer = PeerID(subkey)
                except (TypeError, ValueError):
                    continue
                value = getattr(entry, "value", None)
                if peer == self.peer_id or peer not in admitted:
                    continue
                if isinstance(value, int | float) and math.isfinite(value):
                    ranked.append((float(value), peer))
            ranked.sort(key=lambda item: item[0], reverse=True)
            deadline = time.monotonic() + timeout
            tries = [peer for _priority, peer in ranked for _ in range(STATE_TRIES)]
            truncated: set[PeerID] = set()
            for i, peer in enumerate(tries):
                if i % STATE_TRIES and peer not in truncated:
                    continue  # only a cut-short stream earns a peer a second try
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    break
                try:
                    got = await asyncio.wait_for(
                        self._read_state(peer, max_bytes), timeout=remaining
                    )
                except StateTruncated as exc:
                    logger.info("state download from %s: %s; asking again", peer, exc)
                    truncated.add(peer)
                    continue
                except (TimeoutError, *_STATE_ERRORS) as exc:
                    logger.warning("state download from %s failed: %r", peer, exc)
                    truncated.discard(peer)
                    continue
                truncated.discard(peer)
                if got is not None:
                    metadata, tensors, nbytes = got
                    future.set_result((admitted[peer].hotkey, metadata, tensors, nbytes))
                    return
            future.set_result(None)
        except Exception as exc:  # noqa: BLE001 - handed to the caller, who re-raises it
            if not future.done():
                future.set_exception(exc)

    async def _read_state(
        self, peer: PeerID, max_bytes: int
    ) -> tuple[Any, list[torch.Tensor], int] | None:
        stub = self.get_stub(self._p2p, peer, namespace=self.prefix)
        stream = await stub.rpc_download_state(averaging_pb2.DownloadRequest())
        metadata: Any = None
        tensors: list[torch.Tensor] = []
        parts: list[Any] = []
        total = 0
        async for message in stream:
            total += message.ByteSize()
            if total > max_bytes:
                raise AllreduceException(f"{peer} sent over {max_bytes} bytes of state")
            if message.metadata:
                if metadata is not None:
                    raise AllreduceException(f"{peer} sent its metadata twice")
                metadata = MSGPackSerializer.loads(message.metadata)
            if message.tensor_part.dtype and parts:
                tensors.append(deserialize_torch_tensor(combine_from_streaming(parts)))
                parts = []
            parts.append(message.tensor_part)
        if parts:
            tensors.append(deserialize_torch_tensor(combine_from_streaming(parts)))
        if metadata is None:
            return None  # the peer declined (nothing to share)
        return (*unwrap_state(metadata, tensors), total)

    async def _round_counters(self, *, future: Any) -> None:
        future.set_result(self.tm_log.counters())

    def _is_admitted(self, peer: PeerID) -> bool:
        return peer in self.tm_peers and peer not in self.tm_log.blocked

    async def _set_commitments(self, *, table: dict[str, str], future: Any) -> None:
        self.tm_commitments = {str(k): str(v) for k, v in table.items()}
        if self.tm_commitments_ready is not None:
            self.tm_commitments_ready.set()
        future.set_result(None)

    async def _configure_round(
        self,
        *,
        bits: str,
        peers: dict[str, PeerInfo],
        target: int | None,
        bound: tuple[int, int] | None,
        future: Any,
    ) -> None:
        try:
            if not isinstance(self._matchmaking, LedgerMatchmaking):
                self._matchmaking = LedgerMatchmaking(
                    self._p2p,
                    self.schema_hash,
                    self.dht,
                    client_mode=self.client_mode,
                    admitted=self._is_admitted,
                    **self.matchmaking_kwargs,
                )
            self._matchmaking.group_key_manager.group_bits = bits
            self._matchmaking.set_target_group_size(target)
            self.tm_peers = {PeerID.from_base58(k): v for k, v in peers.items()}
            self.tm_log = _RoundLog()
            self.tm_bound, self.tm_commitments = bound, None
            self.tm_commitments_ready = asyncio.Event()
            future.set_result(None)
        except (ValueError, TypeError, AttributeError) as exc:
            future.set_exception(exc)

    async def _aggregate_with_group(
        self, group_info: Any, min_vector_size: int, **kwargs: Any
    ) -> dict[str, Any]:
        log = self.tm_log
        log.attempts += 1
        try:
            gathered = [_parse_gather(blob) for blob in group_info.gathered]
        except ValueError as exc:
            raise AllreduceException(f"malformed group metadata: {exc}") from exc
        strangers = [p for p in group_info.peer_ids if not self._is_admitted(p)]
        if strangers:
            raise AllreduceException(f"group contains unadmitted peers {strangers}")
        roles = [g.role for g in gathered]
        members = [p for p, r in zip(group_info.peer_ids, roles, strict=True) if r is Role.MEMBER]
        log.seen_members.update(members)
        if sum(self.tm_peers[p].weight for p in members) <= 0:
            raise AllreduceException("no member of the group has ledger weight")

        # Equal shares for members, none for aux peers. hivemind would size shares by the
        # bandwidth each peer announces, which lets one peer claim to reduce everything.
        bandwidths = [0.0 if role is Role.AUX else None for role in roles]
        expected = None
        mine = dict(zip(group_info.peer_ids, roles, strict=True)).get(self.peer_id)
        if self.tm_bound is not None and mine is Role.MEMBER:
            expected = await self._committed_parts(group_info.peer_ids, gathered)
        loop = asyncio.get_running_loop()
        fractions = await loop.run_in_executor(
            None, load_balance_peers, self.total_size, bandwidths, min_vector_size
        )
        async with enter_asynchronously(self.get_tensors()) as local_tensors:
            runner = await self._run_allreduce_inplace_(
                local_tensors, group_info, peer_fractions=fractions, roles=roles,
                expected=expected, **kwargs,
            )  # fmt: skip
        # One set in strict mode; without it, everyone who is in some part.
        contributors: frozenset[PeerID] = frozenset().union(*runner.contributor_sets())
        by_role = dict(zip(group_info.peer_ids, roles, strict=True))
        bases = {
            self.tm_peers[p].hotkey: base
            for p, base in zip(group_info.peer_ids, (g.base for g in gathered), strict=True)
            if base is not None
            and p in contributors | {q for q, r in by_role.items() if r is Role.AUX}
        }
        return log.counters() | {
            "bases": bases,
            "members": sorted(self.tm_peers[p].hotkey for p in contributors),
            "dropped": sorted({self.tm_peers[p].hotkey for p in log.seen_members - contributors}),
            "aux": sorted(self.tm_peers[p].hotkey for p, r in by_role.items() if r is Role.AUX),
        }

    async def _committed_parts(
        self, peer_ids: Sequence[PeerID], gathered: Sequence[Gathered]
    ) -> dict[PeerID, Sequence[str] | None]:
        """Each member's committed part digests, from the manifest body it gathered once
        that body hashes to its hotkey's commitment on the ledger (None: no valid one)."""
        assert self.tm_bound is not None and self.tm_commitments_ready is not None
        try:
            await asyncio.wait_for(
                self.tm_commitments_ready.wait(), self.tm_config.allreduce_timeout_s / 2
            )
        except TimeoutError:
            raise AllreduceException("the ledger's commitments did not arrive") from None
        table = self.tm_commitments or {}
        window, shard = self.tm_bound
        shapes = [tuple(t.shape) for t in self._averaged_tensors]
        count = len(part_layout(shapes, self.tm_codec, self.tm_config.wire_part_size_bytes))
        out: dict[PeerID, Sequence[str] | None] = {}
        for peer, g in zip(peer_ids, gathered, strict=True):
            if g.role is not Role.MEMBER:
                continue
            hotkey = self.tm_peers[peer].hotkey
            problem = _commitment_problem(g.manifest, table.get(hotkey), hotkey, window, shard)
            parts = None if problem else g.manifest["compression"]["params"]["parts"]  # type: ignore[index]
            if parts is not None and len(parts) != count:
                problem = f"commits {len(parts)} parts, the shard has {count}"
                parts = None
            if problem:
                logger.warning("window %d shard %d: %s: %s", window, shard, hotkey, problem)
            out[peer] = parts
        return out

    async def _run_allreduce_inplace_(
        self,
        tensors: Sequence[torch.Tensor],
        group_info: Any,
        group_id: bytes | None = None,
        *,
        roles: Sequence[Role],
        expected: Mapping[PeerID, Sequence[str] | None] | None = None,
        **kwargs: Any,
    ) -> LedgerAllReduceRunner:
        group_id = group_info.group_id if group_id is None else group_id
        runner = self.runner_class(
            p2p=self._p2p,
            servicer_type=type(self),
            prefix=self.prefix,
            tensors=tensors,
            group_id=group_id,
            ordered_peer_ids=group_info.peer_ids,
            peers=self.tm_peers,
            admitted=self._is_admitted,
            roles=roles,
            robust=self.tm_config.robust,
            codec=self.tm_codec,
            log=self.tm_log,
            expected=expected,
            **kwargs,
        )
        self._running_groups[group_id].set_result(runner)
        try:
            outputs = [tensor async for tensor in runner]
        finally:
            # Whoever failed us this attempt does not get into the next one: reducers that
            # did not answer, senders we dropped, and senders that some reducer dropped (the
            # contributor sets tell every member the same story, so all of them agree).
            sets = runner.contributor_sets()
            disputed = frozenset().union(*sets) - frozenset.intersection(*sets) if sets else set()
            self.tm_log.blocked.update(runner.failed_reducers, runner.banned_senders, disputed)
            # Parts that counted us reached the others, unless (strict mode) their sets
            # differ: then every member saw it and refused the attempt.
            if not (self.tm_config.strict and len(sets) > 1):
                self.tm_log.delivered.extend(runner.delivered_spans())
        problem = self._check_outputs(runner)
        if problem is not None:
            raise AllreduceException(problem)
        for tensor, output in zip(tensors, outputs, strict=True):
            tensor.copy_(output)
        return runner

    def _check_outputs(self, runner: LedgerAllReduceRunner) -> str | None:
        """Why this attempt's result must not be used (strict mode), or None."""
        if not self.tm_config.strict:
            return None
        if runner.failed_reducers or runner.missing_parts():
            return f"reducers {sorted(map(str, runner.failed_reducers))} did not answer"
        sets = runner.contributor_sets()
        if len(sets) > 1:
            return f"parts were reduced over {len(sets)} different sets of senders"
        return None


# ---- state downloads ----------------------------------------------------------------------

STATE_METADATA = "metadata"
STATE_COUNT = "tensors"
STATE_TRIES = 2  # per peer, when its stream was cut short


class StateTruncated(Exception):
    """A state stream ended before every tensor its metadata announced had arrived."""


def unwrap_state(envelope: Any, tensors: list[torch.Tensor]) -> tuple[Any, list[torch.Tensor]]:
    """The sender's metadata, once the number of tensors received matches its count.

    Raises `StateTruncated` for fewer tensors than announced (the stream was cut short:
    worth asking again) and `AllreduceException` for anything else malformed.
    """
    if not isinstance(envelope, dict) or set(envelope) != {STATE_METADATA, STATE_COUNT}:
        raise AllreduceException("state metadata is not a {metadata, tensors} object")
    count = envelope[STATE_COUNT]
    if not isinstance(count, int) or isinstance(count, bool) or count < 0:
        raise AllreduceException(f"state announces {count!r} tensors")
    if len(tensors) < count:
        raise StateTruncated(f"{len(tensors)} of {count} tensors arrived")
    if len(tensors) > count:
        raise AllreduceException(f"{len(tensors)} tensors arrived, {count} announced")
    return envelope[STATE_METADATA], tensors


# ---- the caller's side -------------------------------------------------------------------


_STATE_ERRORS = (
    AllreduceException,
    P2PDaemonError,
    P2PHandlerError,
    StopAsyncIteration,
    ValueError,
    TypeError,
    RuntimeError,
    msgpack.UnpackException,
)

_STEP_ERRORS = (
    AllreduceException,
    MatchmakingException,
    P2PDaemonError,
    P2PHandlerError,
    AssertionError,
    StopAsyncIteration,
    RuntimeError,
    concurrent.futures.CancelledError,
    asyncio.CancelledError,
    asyncio.InvalidStateError,
)


class ShardAverager:
    """Averages Δ of one shard with that shard's group, once per window."""

    averager_class: ClassVar[type[LedgerAverager]] = LedgerAverager

    def __init__(
        self,
        dht: DHT,
        run: str,
        shard: int,
        template: Mapping[str, torch.Tensor],
        *,
        role: Role = Role.MEMBER,
        config: AveragingConfig,
        directory: Directory,
        weight_of: Callable[[str], float],
        state_provider: StateProvider | None = None,
    ) -> None:
        if not template:
            raise ValueError("the template has no tensors")
        self.run, self.shard, self.role, self.config = check_run_name(run), shard, role, config
        self.directory, self.weight_of = directory, weight_of
        self._shapes = {name: tuple(t.shape) for name, t in template.items()}
        self._dtypes = {name: t.dtype for name, t in template.items()}
        buffers = [torch.zeros(shape, dtype=torch.float32) for shape in self._shapes.values()]
        # Kept even while this peer is auxiliary: its error feedback carries over to the
        # next window in which it is a member again.
        self._sparsifier = (
            TopKSparsifier(config.topk.density, config.topk.chunk)
            if config.wire == "topk"
            else None
        )
        self._averager = self.averager_class(
            buffers, dht, prefix=group_prefix(run, shard), config=config, role=role
        )
        self._averager.tm_state_provider = state_provider
        self.peer_id = dht.peer_id.to_base58()

    def average(
        self,
        window: int,
        delta: Mapping[str, torch.Tensor] | None = None,
        *,
        timeout: float,
        expected_peers: int | None = None,
        start_at: float | None = None,
        role: Role | None = None,
        base: str | None = None,
        weights: Mapping[str, float] | None = None,
        prepared: PreparedParts | None = None,
        binding: Binding | None = None,
    ) -> AverageResult:
        """All-reduce `delta` with this window's group; members pass Δ, aux peers None.

        A member that committed to its Δ passes `prepared` (from `prepare`, in place of
        `delta`) and `binding`: every reducer then checks each part it receives against
        the sender's committed digests and leaves out, and names, the parts that differ
        (`AverageResult.mismatched`).

        `role` overrides the averager's default role for this round (a miner is a member
        of its own shard's group and an auxiliary peer of the others, which change with
        the window). `base` (hex, 8–64 digits), e.g. a fingerprint of the model the
        window started from, is announced to the group; the result's `bases` lists what
        every peer of the final group announced. `weights` (hotkey -> weight; absent: not
        registered, 0) replaces `weight_of` for this round, e.g. `LedgerWeights.table`
        pinned to a block that every peer of the round passes alike.

        Forms a group for up to `timeout` seconds (earlier once `expected_peers` joined),
        then runs the all-reduce for up to `allreduce_timeout_s`; a failed attempt is
        retried with the remaining peers until `timeout`. Raises `AveragingFailed`.

        `start_at` (unix time, within `timeout`) is when the group should be complete. Peers
        that pass the same value (e.g. the window's end from the ledger) declare the same
        expiry and so all pick the same leader, the lowest peer id; without it each peer
        declares "now + min_matchmaking_time", and a peer that starts late may be left out.
        One call at a time per averager.
        """
        start = time.monotonic()
        if not timeout > self.config.min_matchmaking_time_s:
            raise ValueError("timeout must exceed min_matchmaking_time_s (groups need that long)")
        if start_at is not None and not start_at < time.time() + timeout:
            raise ValueError("start_at must fall within the timeout")
        role = self.role if role is None else role
        if prepared is not None:
            if role is not Role.MEMBER:
                raise ValueError("an auxiliary peer has no prepared parts")
            values = self._check_delta(prepared.raw, role)
        else:
            values = self._check_delta(delta, role)
        peers = self._peer_table(weights)
        if self._sparsifier is not None and role is Role.MEMBER and prepared is None:
            values = self._sparsifier.sparsify(values)
        with self._averager.get_tensors() as buffers:
            for buffer, name in zip(buffers, self._shapes, strict=True):
                if name in values:
                    buffer.copy_(values[name])
                else:
                    buffer.zero_()
        if not self._averager.is_alive():
            raise AveragingFailed("the averager process is not running")
        checked = binding is not None and role is Role.MEMBER
        self._averager.configure_round(
            bits=window_bits(window),
            peers=peers,
            target_group_size=expected_peers or self.config.target_group_size,
            bound=(window, self.shard) if checked else None,
        )
        gather: dict[str, Any] = {"role": role.value}
        if base is not None:
            gather["base"] = base
        if checked and binding is not None and binding.manifest is not None:
            gather["manifest"] = binding.manifest
        step = self._averager.step(
            gather=gather,
            scheduled_time=start_at,
            timeout=timeout,
            allow_retries=True,
            wait=False,
        )
        pending = binding if checked else None

        def push() -> bool:
            table = pending.commitments() if pending is not None else None
            if table is not None:
                self._averager.set_commitments(table)
            return pending is None or table is not None

        try:
            report = self._wait(step, window, timeout + self.config.allreduce_timeout_s + 5.0, push)
        except _STEP_ERRORS as exc:
            failed = (
                exc
                if isinstance(exc, AveragingFailed)
                else AveragingFailed(f"window {window}: {type(exc).__name__}: {exc}")
            )
            self._after_failure(failed, role, window, time.monotonic() - start, prepared is None)
            if failed is exc:
                raise
            raise failed from exc
        with self._averager.get_tensors() as buffers:
            tensors = {
                name: buffer.detach().clone().to(self._dtypes[name])
                for buffer, name in zip(buffers, self._shapes, strict=True)
            }
        if self._sparsifier is not None and role is Role.MEMBER and prepared is None:
            self._sparsifier.commit()
        if report["mismatched"]:
            logger.warning(
                "window %d shard %d: parts not as committed from %s",
                window, self.shard, sorted(report["mismatched"]),
            )  # fmt: skip
        if report["dropped"]:
            logger.warning("window %d shard %d: dropped %s", window, self.shard, report["dropped"])
        return AverageResult(
            tensors=tensors,
            members=list(report["members"]),
            dropped=list(report["dropped"]),
            aux=list(report["aux"]),
            bytes_sent=int(report["bytes_sent"]),
            bytes_received=int(report["bytes_received"]),
            seconds=time.monotonic() - start,
            attempts=int(report["attempts"]),
            bases=dict(report["bases"]),
            mismatched={str(h): list(p) for h, p in report["mismatched"].items()},
        )

    def _wait(
        self, step: Any, window: int, limit: float, poll: Callable[[], bool] | None = None
    ) -> dict[str, Any]:
        """The step's report; polls so that a dead averager process fails the round at once
        (its result would never arrive) and the wait never outlasts `limit`. `poll` is
        called every second until it returns True (bound rounds hand over the ledger's
        commitments that way once the deadline has passed)."""
        end = time.monotonic() + limit
        polled = poll is None
        while True:
            if not polled and poll is not None:
                polled = poll()
            try:
                report: dict[str, Any] = step.result(
                    timeout=min(1.0 if polled else 0.1, max(0.0, end - time.monotonic()))
                )
                return report
            except TimeoutError as exc:
                if step.done():  # the averager's own all-reduce timeout
                    raise AveragingFailed(
                        f"window {window}: all-reduce took over {self.config.allreduce_timeout_s}s"
                    ) from exc
                if not self._averager.is_alive():
                    raise AveragingFailed(f"window {window}: the averager process died") from exc
                if time.monotonic() >= end:
                    step.cancel()
                    raise AveragingFailed(
                        f"window {window}: no result within {limit:.0f}s"
                    ) from exc

    def prepare(self, delta: Mapping[str, torch.Tensor]) -> PreparedParts:
        """This member's Δ as the wire will carry it (`averaging.parts`): sparsified with the
        error feedback (committed at once: the parts are final and public), cut into
        hivemind's parts and serialized. Commit to `part_digest` of each blob, publish the
        blobs, and pass the result to `average(prepared=...)`."""
        values = self._check_delta(delta, Role.MEMBER)
        if self._sparsifier is not None:
            values = self._sparsifier.sparsify(values)
            self._sparsifier.commit()
        blobs, decoded = wire_parts(
            {n: values[n] for n in self._shapes}, self.config.wire, self.config.wire_part_size_bytes
        )
        return PreparedParts(blobs, decoded, values)

    def _check_delta(
        self, delta: Mapping[str, torch.Tensor] | None, role: Role
    ) -> dict[str, torch.Tensor]:
        if role is Role.AUX:
            if delta is not None:
                raise ValueError("an auxiliary peer contributes no Δ; pass delta=None")
            return {}
        if delta is None or set(delta) != set(self._shapes):
            raise ValueError(f"Δ must have exactly the template's tensors {sorted(self._shapes)}")
        out = {}
        for name, tensor in delta.items():
            if tuple(tensor.shape) != self._shapes[name]:
                raise ValueError(
                    f"Δ[{name}] has shape {tuple(tensor.shape)}, expected {self._shapes[name]}"
                )
            if not bool(torch.isfinite(tensor).all()):
                raise ValueError(f"Δ[{name}] has non-finite values")
            out[name] = tensor.detach().to(device="cpu", dtype=torch.float32)
        return out

    def _peer_table(self, weights: Mapping[str, float] | None = None) -> dict[str, PeerInfo]:
        table = {}
        for peer, hotkey in self.directory.peers().items():
            weight = float(self.weight_of(hotkey) if weights is None else weights.get(hotkey, 0.0))
            if not math.isfinite(weight) or weight < 0:
                raise ValueError(f"weight_of({hotkey}) = {weight}; weights must be finite and ≥ 0")
            table[peer] = PeerInfo(hotkey, weight)
        if self.peer_id not in table:
            raise AveragingFailed(
                f"this peer {self.peer_id} is not tied to a registered hotkey; commit its "
                "multiaddrs (or publish its identity record) first"
            )
        return table

    def share_state(self, priority: float, provider: StateProvider | None = None) -> None:
        """Offer the state provider's state to peers that call `load_state_from_peers`;
        peers try the highest `priority` (e.g. the window the state belongs to) first."""
        if provider is not None:
            self._averager.tm_state_provider = provider
        if self._averager.tm_state_provider is None:
            raise ValueError("no state provider to share from")
        self._averager.state_sharing_priority = float(priority)
        self._averager.allow_state_sharing = True

    def stop_sharing_state(self) -> None:
        self._averager.allow_state_sharing = False

    @property
    def tensor_names(self) -> list[str]:
        """The names of the tensors this shard's group averages."""
        return list(self._shapes)

    def wire_residual(self) -> dict[str, torch.Tensor]:
        """The top-k error feedback not yet sent (empty without top-k on the wire): save it
        with the model so that a restarted peer still sends what it owes the group."""
        if self._sparsifier is None:
            return {}
        return {name: t.clone() for name, t in self._sparsifier.residual.items()}

    def restore_wire_residual(self, tensors: Mapping[str, torch.Tensor]) -> None:
        """Take back what `wire_residual` returned (names and shapes of this shard, fp32,
        finite; anything else raises `ValueError`). Without top-k on the wire (the config
        changed) there is nothing to owe, and the residual is dropped."""
        for name, tensor in tensors.items():
            if name not in self._shapes:
                raise ValueError(f"shard {self.shard} has no tensor {name!r}")
            if tuple(tensor.shape) != self._shapes[name]:
                raise ValueError(
                    f"{name}: residual shape {tuple(tensor.shape)}, expected {self._shapes[name]}"
                )
            if tensor.dtype != torch.float32 or not bool(torch.isfinite(tensor).all()):
                raise ValueError(f"{name}: a residual must be finite fp32")
        if self._sparsifier is None:
            if tensors:
                logger.info("shard %d: no top-k on the wire; dropping its residual", self.shard)
            return
        self._sparsifier.residual = {name: t.clone() for name, t in tensors.items()}

    def load_state_from_peers(self, *, timeout: float, max_bytes: int) -> PeerState | None:
        """The state of the registered peer that declares the newest one, or None.

        Only peers in the directory are asked; each may send at most `max_bytes`. The
        result is still untrusted: check its metadata, shapes and values before use.
        """
        if not self._averager.is_alive():
            raise AveragingFailed("the averager process is not running")
        got = self._averager.download_state(
            self._peer_table(), timeout=timeout, max_bytes=max_bytes
        )
        if got is None:
            return None
        hotkey, metadata, tensors, nbytes = got
        if not isinstance(metadata, dict):
            logger.warning("state from %s has metadata of type %s", hotkey, type(metadata))
            return None
        return PeerState(hotkey, metadata, tensors, nbytes)

    def _after_failure(
        self,
        failed: AveragingFailed,
        role: Role,
        window: int,
        seconds: float,
        owe_residual: bool = True,
    ) -> None:
        """Put the round's counters on `failed`, and keep the error-feedback residual of
        what the group's average holds of our Δ even though the round failed here (a peer
        may give up on a round that the others completed with its Δ in it)."""
        counters = self._averager.round_counters() if self._averager.is_alive() else None
        failed.seconds = seconds
        if counters is not None:
            failed.bytes_sent = int(counters["bytes_sent"])
            failed.bytes_received = int(counters["bytes_received"])
            failed.attempts = int(counters["attempts"])
            failed.mismatched = {str(h): list(p) for h, p in counters["mismatched"].items()}
        spans = list(counters["delivered"]) if counters is not None else []
        if role is not Role.MEMBER or not owe_residual:
            return
        masks = self._masks(spans)
        total = sum(m.numel() for m in masks.values())
        failed.delivered = sum(int(m.sum()) for m in masks.values()) / max(total, 1)
        if self._sparsifier is None:
            return
        if failed.delivered > 0:
            logger.info(
                "window %d shard %d: the round failed here, but %.1f%% of our Δ reached the "
                "group's average; keeping its error-feedback residual",
                window,
                self.shard,
                100 * failed.delivered,
            )
        self._sparsifier.commit(masks)

    def _masks(self, spans: Sequence[tuple[int, int]]) -> dict[str, torch.Tensor]:
        """Flat [start, stop) ranges of the averaged vector as boolean masks per tensor."""
        sizes = [math.prod(shape) for shape in self._shapes.values()]
        flat = torch.zeros(sum(sizes), dtype=torch.bool)
        for start, stop in spans:
            flat[int(start) : int(stop)] = True
        masks, offset = {}, 0
        for (name, shape), size in zip(self._shapes.items(), sizes, strict=True):
            masks[name] = flat[offset : offset + size].reshape(shape)
            offset += size
        return masks

    def shutdown(self) -> None:
        if self._averager.is_alive():
            self._averager.shutdown()
        self._averager.join(10)

    def __enter__(self) -> ShardAverager:
        return self

    def __exit__(self, *exc: object) -> None:
        self.shutdown()
