"""hivemind's butterfly all-reduce within one group, as our groups run it.

The vector is cut into parts; each member reduces a share of the parts for everyone
(`averaging.reducer`) and sends the result back. What `LedgerAllReduceRunner` changes:

- **Admission.** A reducer refuses parts from a peer id that the directory does not tie to
  a registered hotkey, or that is not a sender of this group.
- **Auxiliary peers** (validators, other shards' miners) send an empty placeholder per
  part, reduce nothing, have weight 0, and receive the average (hivemind's own AUX peers
  reduce but never receive it).
- **One answer for all.** A reducer replies with the same encoded part to every sender,
  with the bitmaps of whose rows are in it and whose it refused (in the reply's otherwise
  unused `peer_id` field); a sender keeps them, so that the averager can tell whether all
  parts were reduced over the same senders, and which parts of its own Δ got in.
- **Bound rounds.** When members committed to their parts, each part received (our own
  included, through the codec) is checked against the sender's committed digest; a part
  that differs is left out of the average and named in the reply.
- **Drops.** A sender that stalls or breaks protocol is dropped by the reducers
  (hivemind's timeouts and bans); a reducer that fails us is remembered.
- **Bytes.** Every protobuf message is counted where it is sent and received (payload
  bytes, before libp2p framing), into the round's `RoundLog`, summed over its attempts;
  matchmaking's few hundred bytes are not.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from hivemind.averaging.allreduce import AllReduceRunner
from hivemind.averaging.partition import AllreduceException, BannedException
from hivemind.p2p import PeerID
from hivemind.proto import averaging_pb2
from hivemind.utils.asyncio import aiter_with_timeout, amap_in_executor, attach_event_on_finished

from averaging.parts import message_digest
from averaging.reducer import LedgerPartReducer, from_bitmap
from averaging.round import PeerInfo, Role
from averaging.settings import RobustConfig
from averaging.wire import decode_part

logger = logging.getLogger(__name__)

# A reducer that did not answer in time is left out of the retry only once it failed us in
# this many attempts: it may have been waiting on a groupmate that died (its reply then
# comes after our timeout under load), and leaving it out at once left its accuser alone
# (tests/averaging/test_faults.py, seen in CI). A reducer that answered wrongly is left out
# at once.
REDUCER_STRIKES = 2


class ReducerViolation(AllreduceException):  # type: ignore[misc]
    """A reducer's answer that no honest reducer sends (wrong shape, non-finite, too many
    parts, malformed sender bitmaps): the reducer is left out of the retry at once."""


@dataclass
class RoundLog:
    """One `average` call, across its attempts (lives in the averager's process)."""

    bytes_sent: int = 0
    bytes_received: int = 0
    attempts: int = 0
    seen_members: set[PeerID] = field(default_factory=set)
    blocked: set[PeerID] = field(default_factory=set)  # failed us in an earlier attempt
    strikes: dict[PeerID, int] = field(default_factory=dict)  # reducer -> attempts it failed
    # Flat [start, stop) ranges of our vector in parts whose average counted us (any attempt).
    delivered: list[tuple[int, int]] = field(default_factory=list)
    # hotkey -> parts (global index) whose row a reducer refused as not what it committed.
    mismatched: dict[str, set[int]] = field(default_factory=dict)
    # Why earlier attempts failed: a retry that then finds no group (the others completed
    # the round without us) reports the cause, not only "could not find a group".
    failures: list[str] = field(default_factory=list)

    def counters(self) -> dict[str, Any]:
        return {
            "failures": list(self.failures),
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


def left_out(
    *,
    failed: set[PeerID],
    misbehaved: set[PeerID],
    banned: set[PeerID],
    contributor_sets: set[frozenset[PeerID]],
    strikes: dict[PeerID, int],
) -> set[PeerID]:
    """Whom a failed attempt leaves out of the next one: senders we dropped (`banned`),
    senders that some reducer dropped (the contributor sets tell every member the same
    story, so all of them agree), reducers that answered wrongly (`misbehaved`), and
    reducers that did not answer (`failed`) in `REDUCER_STRIKES` attempts of the round
    (`strikes` counts them across attempts and is updated here)."""
    sets = contributor_sets
    disputed = frozenset().union(*sets) - frozenset.intersection(*sets) if sets else frozenset()
    out = banned | set(disputed) | misbehaved
    for peer in sorted(failed - out, key=str):
        strikes[peer] = strikes.get(peer, 0) + 1
        if strikes[peer] >= REDUCER_STRIKES:
            out.add(peer)
    return out


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
        log: RoundLog,
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
        self.misbehaved_reducers: set[PeerID] = set()  # of failed_reducers: wrong answers
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
                    raise ReducerViolation(f"{peer_id} sent more parts than it reduces")
                value = await loop.run_in_executor(None, decode_part, msg.tensor_part)
                if tuple(value.shape) != tuple(expected[part_index]):
                    raise ReducerViolation(f"{peer_id} sent an average of the wrong shape")
                if not bool(torch.isfinite(value).all()):
                    raise ReducerViolation(f"{peer_id} sent a non-finite average")
                self._record(peer_index, part_index, bytes(msg.peer_id))
                container.register_processed_part(peer_index, part_index, value)
                part_index += 1
            if part_index != len(expected):
                raise AllreduceException(f"{peer_id} sent {part_index} of {len(expected)} parts")
        except BaseException as exc:
            if isinstance(exc, Exception):
                logger.debug("reducer %s failed us: %r", peer_id, exc)
            self.failed_reducers.add(peer_id)
            if isinstance(exc, ReducerViolation):
                self.misbehaved_reducers.add(peer_id)
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
            raise ReducerViolation(f"a reply's sender bitmaps are {len(bitmaps)} bytes")
        self.contributors[peer_index, part_index] = bitmaps[:n]
        number = self.part_numbers[peer_index, part_index]
        for i in from_bitmap(bitmaps[n:], size):
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
            frozenset(self.sender_peer_ids[i] for i in from_bitmap(bitmap, size))
            for bitmap in self.contributors.values()
        }

    def missing_parts(self) -> int:
        total = int(sum(self.tensor_part_container.num_parts_by_peer))
        return total - len(self.contributors)

    def to_block(self, sets: set[frozenset[PeerID]]) -> set[PeerID]:
        """Whom this attempt leaves out of the retry (`left_out`; `sets`: this attempt's
        `contributor_sets`), counting reducer strikes into the round's log."""
        return left_out(
            failed=self.failed_reducers, misbehaved=self.misbehaved_reducers,
            banned=set(self.banned_senders), contributor_sets=sets, strikes=self._log.strikes,
        )  # fmt: skip

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
