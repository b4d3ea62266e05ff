"""The averager process behind `averaging.group.ShardAverager`: hivemind's
`DecentralizedAverager` (its own process, one per shard and participant) wired to our
matchmaking (`averaging.matchmaking`), all-reduce runner (`averaging.allreduce`) and state
envelope (`averaging.state`).

The caller's process talks to it through hivemind's control pipe: before each round,
`configure_round` hands over the group bits, the admission table (peer id -> hotkey and
ledger weight, read from the ledger in the caller's process only) and whether the round is
bound; `set_commitments` hands over the ledger's commitments once the deadline has passed;
`round_counters` and `download_state` ask for the round's counters and a peer's state.

- **Equal shares.** Every member reduces an equal share of the vector and aux peers none;
  hivemind would size shares by the bandwidth each peer announces about itself.
- **Drops.** In strict mode an attempt counts only if every part came back and was
  combined over the same senders; otherwise the members restore their Δ, remember who
  failed them, and form a new group without those peers until the deadline (a reducer
  that only timed out is given a second attempt: it may have waited on a dead groupmate).
- **Bound rounds.** A member's gathered manifest binds its parts once it hashes to its
  hotkey's commitment on the ledger (`averaging.gather.commitment_problem`).
- **State for late joiners.** Downloaded only from peers in the directory, newest declared
  state first, at most `max_bytes` from each.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import math
import signal
import time
from collections.abc import Mapping, Sequence

# hivemind tells streams by `typing.AsyncIterator`'s `_name`; the collections.abc one has none.
from typing import Any, AsyncIterator, ClassVar  # noqa: UP035

import msgpack
import torch
from hivemind import DHT
from hivemind.averaging import DecentralizedAverager
from hivemind.averaging.load_balancing import load_balance_peers
from hivemind.averaging.partition import AllreduceException
from hivemind.compression import deserialize_torch_tensor
from hivemind.p2p import P2PContext, P2PDaemonError, P2PHandlerError, PeerID
from hivemind.proto import averaging_pb2
from hivemind.utils.asyncio import achain, anext, as_aiter, enter_asynchronously
from hivemind.utils.mpfuture import MPFuture
from hivemind.utils.serializer import MSGPackSerializer
from hivemind.utils.streaming import combine_from_streaming

from averaging.allreduce import LedgerAllReduceRunner, RoundLog
from averaging.gather import Gathered, commitment_problem, parse_gather
from averaging.matchmaking import LedgerMatchmaking
from averaging.parts import part_count
from averaging.round import PeerInfo, Role, StateProvider
from averaging.settings import AveragingConfig
from averaging.state import STATE_TRIES, StateTruncated, unwrap_state, wrap_state
from averaging.wire import codec_for

logger = logging.getLogger(__name__)


# What a failed download from one peer may raise; the next peer is asked then.
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
        # The all-gathered sparseloco wire never hands hivemind a part to compress.
        self.tm_codec = codec_for("none" if config.wire == "sparseloco" else config.wire)
        self.tm_peers: dict[PeerID, PeerInfo] = {}
        self.tm_log = RoundLog()
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
        # A round still running (with overlap a miner may stop while its last one runs):
        # hivemind's own loop here called `finalize` on the runner's *future* and raised.
        for future in list(self._running_groups.values()):
            if future.done() and not future.cancelled() and future.exception() is None:
                runner = future.result()
                if hasattr(runner, "finalize"):
                    runner.finalize(cancel=True)  # its peers learn that we are gone
            else:
                future.cancel()

    # -- called from the caller's process ---------------------------------------------
    def configure_round(
        self,
        *,
        bits: str,
        peers: Mapping[str, PeerInfo],
        target_group_size: int | None,
        bound: tuple[int, int] | None = None,
        payload: bytes | None = None,
    ) -> None:
        """Before each round: group bits, admission table, whether it is bound, and (the
        all-gathered wire) this member's message, which goes through `stage_payload`:
        hivemind's control pipe drops large messages."""
        payload_size = None if payload is None else self.stage_payload(payload)
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
                    "payload_size": payload_size,
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
        return wrap_state(metadata, tensors), tensors, None

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

    def stage_payload(self, payload: bytes) -> int:
        """Hand a round's message to the averager's process (`averaging.allgather`); the
        butterfly takes none."""
        raise ValueError("this wire all-reduces parts; it takes no message")

    def _new_round(self, payload_size: int | None) -> None:
        """In the averager's process, at `configure_round`: take the staged message."""

    async def rpc_aggregate_part(
        self, stream: AsyncIterator[averaging_pb2.AveragingData], context: P2PContext
    ) -> AsyncIterator[averaging_pb2.AveragingData]:
        """hivemind's handler for a groupmate's part, except that it waits for our runner
        through a shield. hivemind awaits the group's future bare, so a sender that hung up
        (or died) while we were still preparing the round (commitments, shares, tensors)
        cancelled the future itself with its handler; our own `set_result` then raised
        `InvalidStateError` and we dropped out of an attempt the others completed (seen
        under load in the fault tests and in CI, issue 15). hivemind reads the stream's
        message types from these annotations, so they stay concrete."""
        request = await anext(stream)
        if request.group_id not in self._running_groups:
            # The leader's answer may reach us after a groupmate's first part does.
            await self._pending_groups_registered.wait()
        future = self._running_groups.get(request.group_id)
        if future is None:
            yield averaging_pb2.AveragingData(code=averaging_pb2.BAD_GROUP_ID)
            return
        runner = await asyncio.shield(future)
        async for message in runner.rpc_aggregate_part(achain(as_aiter(request), stream), context):
            yield message

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
        payload_size: int | None,
        future: Any,
    ) -> None:
        try:
            self._new_round(payload_size)
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
            self.tm_log = RoundLog()
            self.tm_bound, self.tm_commitments = bound, None
            self.tm_commitments_ready = asyncio.Event()
            future.set_result(None)
        except (ValueError, TypeError, AttributeError) as exc:
            future.set_exception(exc)

    def _admit_group(self, group_info: Any) -> tuple[list[Gathered], list[Role], list[PeerID]]:
        """The group's announcements, roles and members, once every peer of it is admitted
        and its members hold some ledger weight; `AllreduceException` otherwise."""
        try:
            gathered = [parse_gather(blob) for blob in group_info.gathered]
        except ValueError as exc:
            raise AllreduceException(f"malformed group metadata: {exc}") from exc
        strangers = [p for p in group_info.peer_ids if not self._is_admitted(p)]
        if strangers:
            raise AllreduceException(f"group contains unadmitted peers {strangers}")
        roles = [g.role for g in gathered]
        members = [p for p, r in zip(group_info.peer_ids, roles, strict=True) if r is Role.MEMBER]
        self.tm_log.seen_members.update(members)
        if sum(self.tm_peers[p].weight for p in members) <= 0:
            raise AllreduceException("no member of the group has ledger weight")
        return gathered, roles, members

    async def _aggregate_with_group(
        self, group_info: Any, min_vector_size: int, **kwargs: Any
    ) -> dict[str, Any]:
        log = self.tm_log
        log.attempts += 1
        gathered, roles, _members = self._admit_group(group_info)

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
        return self._report(group_info, gathered, roles, contributors)

    def _report(
        self,
        group_info: Any,
        gathered: Sequence[Gathered],
        roles: Sequence[Role],
        contributors: frozenset[PeerID],
    ) -> dict[str, Any]:
        """What `ShardAverager.average` gets back from a completed attempt."""
        log = self.tm_log
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

    def _commitments_wait(self) -> float:
        """How long a bound round waits for the ledger's commitments (the deadline block)
        once its group formed; the rest of `allreduce_timeout_s` is for the all-reduce."""
        return self.tm_config.allreduce_timeout_s / 2

    async def _committed_parts(
        self, peer_ids: Sequence[PeerID], gathered: Sequence[Gathered]
    ) -> dict[PeerID, Sequence[str] | None]:
        """Each member's committed part digests, from the manifest body it gathered once
        that body hashes to its hotkey's commitment on the ledger (None: no valid one)."""
        assert self.tm_bound is not None and self.tm_commitments_ready is not None
        try:
            await asyncio.wait_for(self.tm_commitments_ready.wait(), self._commitments_wait())
        except TimeoutError:
            raise AllreduceException("the ledger's commitments did not arrive") from None
        table = self.tm_commitments or {}
        window, shard = self.tm_bound
        shapes = [tuple(t.shape) for t in self._averaged_tensors]
        count = part_count(shapes, self.tm_config.wire, self.tm_config.wire_part_size_bytes)
        out: dict[PeerID, Sequence[str] | None] = {}
        for peer, g in zip(peer_ids, gathered, strict=True):
            if g.role is not Role.MEMBER:
                continue
            hotkey = self.tm_peers[peer].hotkey
            problem = commitment_problem(g.manifest, table.get(hotkey), hotkey, window, shard)
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
            # Whoever failed us this attempt does not get into the next one (a reducer that
            # only did not answer in time: once it did so twice).
            sets = runner.contributor_sets()
            self.tm_log.blocked.update(runner.to_block(sets))
            # Parts that counted us reached the others, unless (strict mode) their sets
            # differ: then every member saw it and refused the attempt.
            if not (self.tm_config.strict and len(sets) > 1):
                self.tm_log.delivered.extend(runner.delivered_spans())
        problem = self._check_outputs(runner)
        if problem is not None:
            self.tm_log.failures.append(problem)
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
