"""Averaging SparseLoCo messages over hivemind: an all-gather, not an all-reduce.

A sparse vector does not all-reduce well: a butterfly reducer's answer is the union of its
senders' supports (up to n·k values per chunk for n senders), so it must either go back
denser than it came, or be sparsified again, which loses what nobody keeps an error
feedback for and makes the result depend on who reduced what. At 0.23 bits per parameter
the messages are so small that every peer can simply hold all of them: each member
announces the sha256 of its message in matchmaking (`averaging.gather`), every peer of the
group fetches every member's message over hivemind's p2p streams (``rpc_tm_fetch``), and
every peer computes the same function of the same bytes, `averaging.parts.reduce_parts`
on the sparseloco wire (the robust rule over the members in hotkey order, with the ledger
weights of the round) — the function validators recompute from the store. So every peer
of the group ends bit-identical, and the average never passes through a reducer that
could alter it.

Bytes per peer per round, n members each sending an s-byte message: a member uploads its
message to each of the other n − 1 peers (more if auxiliary peers join) and downloads
n − 1 messages: (n − 1)·s each way. hivemind's butterfly sends 2·(n − 1)/n of the dense
vector each way; at 4 bytes a value and s ≈ P·0.2266/8 that is (2/n)·141 ≈ 70× fewer
bytes at n = 4, and the gap narrows as n grows (a reduce-scatter that re-sparsifies would
keep it constant, at the cost above).

**Rounds that do not fail on one lost stream.** A message is content-addressed: whoever
holds one (its author, or any peer that fetched and checked it) serves it by digest, so a
peer that cannot reach a member, or loses the stream half-way, asks the others until
`sender_timeout_s` × 2 has passed. A message nobody can deliver by then (its author died
before anyone fetched it) is left out by every peer alike. Bound rounds check each
member's announced digest against its committed manifest first — auxiliary peers too,
since each peer computes the average itself — and leave out, and name, a member whose
message is not the one it committed to.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import time
import typing
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from hivemind import DHT
from hivemind.averaging.partition import AllreduceException
from hivemind.p2p import P2PContext, P2PDaemonError, P2PHandlerError, PeerID
from hivemind.proto import averaging_pb2, runtime_pb2
from hivemind.utils.asyncio import aiter_with_timeout, enter_asynchronously

from averaging.averager import LedgerAverager
from averaging.parts import SPARSELOCO, reduce_parts
from averaging.round import Role
from averaging.settings import AveragingConfig
from averaging.sparseloco import SparseLoCoError, decode_bytes, max_message_bytes

logger = logging.getLogger(__name__)

FETCH_CHUNK = 1 << 19  # bytes of a message per stream message (libp2p frames stay small)
_FETCH_ERRORS = (
    P2PDaemonError,
    P2PHandlerError,
    StopAsyncIteration,
    ConnectionError,
    OSError,
    ValueError,
    TimeoutError,
    asyncio.TimeoutError,
)


class GatherAverager(LedgerAverager):
    """The averager process of a shard on the sparseloco wire (see the module docstring)."""

    # hivemind caches the RPC handlers per class on first use; a subclass that adds one
    # must collect its own.
    _rpc_handlers = None

    def __init__(
        self,
        averaged_tensors: Sequence[torch.Tensor],
        dht: DHT,
        *,
        prefix: str,
        config: AveragingConfig,
        role: Role,
        names: Sequence[str],
    ) -> None:
        spec = config.sparse_spec
        if spec is None:
            raise ValueError("GatherAverager runs the sparseloco wire only")
        if len(names) != len(averaged_tensors):
            raise ValueError("one name per averaged tensor")
        self.tm_spec = spec
        self.tm_shapes = {n: tuple(t.shape) for n, t in zip(names, averaged_tensors, strict=True)}
        self.tm_max_bytes = max_message_bytes(self.tm_shapes, spec)
        # digest -> message: this round's (our own and every one fetched and checked) and
        # the last round's, for a slow peer still gathering it.
        self.tm_held: dict[bytes, bytes] = {}
        self.tm_held_before: dict[bytes, bytes] = {}
        self.tm_own: bytes | None = None
        self.tm_served: set[PeerID] = set()  # peers that fetched our message this round
        # The caller's message reaches the averager's process through shared memory: the
        # control pipe loses large objects.
        staging = torch.zeros(self.tm_max_bytes, dtype=torch.uint8)
        self.tm_staging = staging.share_memory_()  # type: ignore[no-untyped-call]
        super().__init__(averaged_tensors, dht, prefix=prefix, config=config, role=role)

    def stage_payload(self, payload: bytes) -> int:
        if len(payload) > self.tm_max_bytes:
            raise ValueError(f"a message of {len(payload)} bytes; at most {self.tm_max_bytes}")
        if payload:
            self.tm_staging[: len(payload)].copy_(
                torch.frombuffer(bytearray(payload), dtype=torch.uint8)
            )
        return len(payload)

    def _new_round(self, payload_size: int | None) -> None:
        self.tm_held_before, self.tm_held = self.tm_held, {}
        self.tm_own, self.tm_served = None, set()
        if payload_size is not None:
            if not 0 <= payload_size <= self.tm_max_bytes:
                raise ValueError(f"a staged message of {payload_size} bytes")
            payload = self.tm_staging[:payload_size].numpy().tobytes()
            self.tm_own = hashlib.sha256(payload).digest()
            self.tm_held[self.tm_own] = payload

    def _commitments_wait(self) -> float:
        # The gather needs at most 2 × sender_timeout_s after the commitments; a chain that
        # lags the wall clock (the groups meet at the deadline's nominal time) gets the rest.
        cfg = self.tm_config
        return max(
            cfg.allreduce_timeout_s / 2, cfg.allreduce_timeout_s - 2 * cfg.sender_timeout_s - 1
        )

    # -- serving --------------------------------------------------------------------------
    async def rpc_tm_fetch(
        self, request: averaging_pb2.AveragingData, context: P2PContext
    ) -> typing.AsyncIterator[averaging_pb2.AveragingData]:
        """Stream the message whose sha256 is `request.group_id`, if we hold it (nothing
        otherwise), to admitted peers only. (hivemind tells a streaming handler by the
        ``typing.AsyncIterator`` of its annotation; ``collections.abc``'s reads as unary.)"""
        if not self._is_admitted(context.remote_id):
            return
        digest = bytes(request.group_id)
        blob = self.tm_held.get(digest) or self.tm_held_before.get(digest)
        if blob is None:
            return
        for start in range(0, max(len(blob), 1), FETCH_CHUNK):
            message = averaging_pb2.AveragingData(
                tensor_part=runtime_pb2.Tensor(
                    buffer=blob[start : start + FETCH_CHUNK], size=[len(blob)]
                )
            )
            self.tm_log.bytes_sent += message.ByteSize()
            yield message
        if digest == self.tm_own:
            # Someone holds our message now: it may be in their average even if this
            # round fails here (`ShardAverager` keeps the error feedback's residual then).
            self.tm_log.delivered = [(0, self.total_size)]
            self.tm_served.add(context.remote_id)

    # -- gathering ------------------------------------------------------------------------
    async def _fetch_from(self, peer: PeerID, digest: bytes) -> bytes | None:
        stub = self.get_stub(self._p2p, peer, namespace=self.prefix)
        stream = await stub.rpc_tm_fetch(averaging_pb2.AveragingData(group_id=digest))
        chunks: list[bytes] = []
        total, got = -1, 0
        async for message in aiter_with_timeout(stream, self.tm_config.sender_timeout_s):
            self.tm_log.bytes_received += message.ByteSize()
            sizes = list(message.tensor_part.size)
            if total < 0:
                if len(sizes) != 1 or not 0 < sizes[0] <= self.tm_max_bytes:
                    raise ValueError(f"{peer} announces a message of {sizes} bytes")
                total = int(sizes[0])
            chunk = bytes(message.tensor_part.buffer)
            got += len(chunk)
            if got > total:
                raise ValueError(f"{peer} sent more than the {total} bytes it announced")
            chunks.append(chunk)
        blob = b"".join(chunks)
        if not blob:
            return None  # it does not hold the message (yet)
        if len(blob) != total or hashlib.sha256(blob).digest() != digest:
            raise ValueError(f"{peer} sent a message that is not the one asked for")
        return blob

    async def _obtain(
        self, owner: PeerID, digest: bytes, sources: Sequence[PeerID], deadline: float
    ) -> bytes | None:
        """The message `digest`: from its owner first, then from every other peer of the
        group in turn, until `deadline` (monotonic)."""
        order = [owner, *(p for p in sources if p != owner)]
        pause = 0.05
        while True:
            held = self.tm_held.get(digest)
            if held is not None:
                return held
            for source in order:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    return None
                try:
                    blob = await asyncio.wait_for(self._fetch_from(source, digest), remaining)
                except _FETCH_ERRORS as exc:
                    logger.debug("message %s… from %s: %r", digest.hex()[:12], source, exc)
                    continue
                if blob is not None:
                    self.tm_held[digest] = blob
                    return blob
            await asyncio.sleep(min(pause, max(0.0, deadline - time.monotonic())))
            pause = min(2 * pause, 1.0)

    def _wanted(
        self,
        peer_ids: Sequence[PeerID],
        gathered: Sequence[Any],
        members: Sequence[PeerID],
        committed: Mapping[PeerID, Sequence[str] | None] | None,
    ) -> dict[PeerID, bytes]:
        """Each member's announced message digest, when the round may use it."""
        by_peer = dict(zip(peer_ids, gathered, strict=True))
        wanted = {}
        for peer in members:
            announced = by_peer[peer].payload
            hotkey = self.tm_peers[peer].hotkey
            if announced is None:
                logger.warning("%s announced no message; left out", hotkey)
                continue
            if committed is not None:
                parts = committed.get(peer)
                if parts is None or list(parts) != [announced]:
                    logger.warning("%s: its message is not the one it committed to", hotkey)
                    self.tm_log.mismatched.setdefault(hotkey, set()).add(0)
                    continue
            wanted[peer] = bytes.fromhex(announced)
        return wanted

    async def _aggregate_with_group(
        self, group_info: Any, min_vector_size: int, **kwargs: Any
    ) -> dict[str, Any]:
        try:
            return await self._gather(group_info)
        finally:
            # hivemind registers a future for the group's butterfly runner, which this wire
            # never starts; cancelled, it is done (no "did not finish" warning), and a
            # stray part sent to us would be refused.
            registered = self._running_groups.get(group_info.group_id)
            if registered is not None and not registered.done():
                registered.cancel()

    async def _gather(self, group_info: Any) -> dict[str, Any]:
        self.tm_log.attempts += 1
        gathered, roles, members = self._admit_group(group_info)
        peer_ids = list(group_info.peer_ids)
        committed = None
        if self.tm_bound is not None:
            committed = await self._committed_parts(peer_ids, gathered)
        wanted = self._wanted(peer_ids, gathered, members, committed)
        sources = [p for p in peer_ids if p != self.peer_id]
        deadline = time.monotonic() + 2 * self.tm_config.sender_timeout_s
        blobs = await asyncio.gather(
            *(self._obtain(peer, digest, sources, deadline) for peer, digest in wanted.items())
        )
        loop = asyncio.get_running_loop()
        rows: list[tuple[str, PeerID, dict[str, torch.Tensor]]] = []
        for (peer, _digest), blob in zip(wanted.items(), blobs, strict=True):
            hotkey = self.tm_peers[peer].hotkey
            if blob is None:
                logger.warning("no peer delivered the message of %s in time; left out", hotkey)
                continue
            try:
                values = await loop.run_in_executor(
                    None, decode_bytes, blob, self.tm_shapes, self.tm_spec
                )
            except SparseLoCoError as exc:
                logger.warning("the message of %s is malformed (%s); left out", hotkey, exc)
                continue
            rows.append((hotkey, peer, values))
        if not rows:
            raise AllreduceException("no member's message could be had")
        rows.sort(key=lambda row: row[0])
        average = await loop.run_in_executor(
            None,
            reduce_parts,
            [values for _h, _p, values in rows],
            [self.tm_peers[p].weight for _h, p, _v in rows],
            self.tm_shapes,
            SPARSELOCO,
            self.tm_config.wire_part_size_bytes,
            self.tm_config.robust,
        )
        async with enter_asynchronously(self.get_tensors()) as local_tensors:
            for tensor, name in zip(local_tensors, self.tm_shapes, strict=True):
                tensor.copy_(average[name])
        contributors = frozenset(p for _h, p, _v in rows)
        if self.tm_own is not None and self.peer_id in contributors:
            self.tm_log.delivered = [(0, self.total_size)]
            await self._until_served(set(sources))
        return self._report(group_info, gathered, roles, contributors)

    async def _until_served(self, peers: set[PeerID]) -> None:
        """Wait (at most `sender_timeout_s`) until every other peer of the group has
        fetched our message from us, so that the round's counters hold what we uploaded
        for it; a peer that got it through a relay never asks, and only costs the wait."""
        end = time.monotonic() + self.tm_config.sender_timeout_s
        while not peers <= self.tm_served and time.monotonic() < end:
            await asyncio.sleep(0.01)
