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
part reducer, one piece a module:

- `averaging.matchmaking`: only peer ids that `PeerDirectory` ties to a registered hotkey
  may lead, join or be grouped (admission);
- `averaging.allreduce`: nor may others send parts; auxiliary peers send placeholders and
  receive the average; every byte is counted; bound rounds check each part received
  against its sender's committed digest;
- `averaging.reducer`: robust reduction with ledger weights, and one encoded answer for
  all with its contributor set, so that every member ends bit-identical;
- `averaging.averager`: the averager's own process: equal shares, strict mode and retries
  without the peers that failed us, the ledger's commitments, state downloads;
- `averaging.weights`: ``weight_of`` from the ledger, pinned to an epoch for a round;
- `averaging.gather`: what peers announce in matchmaking, and the commitment check;
- `averaging.state`: the envelope of a state download;
- `averaging.round`: the types a caller passes in and gets back.

This module is the caller's side, `ShardAverager`:

- **Roles per round.** `average(..., role=)` makes one averager a member in one window
  and an auxiliary peer (``role=Role.AUX``: validators, other shards' miners) in the next,
  as shard assignments move.
- **Who is in step.** A peer may announce a `base` (a fingerprint of the model it starts
  the window from); the result lists every peer's, so peers that started from different
  models find out (`averaging.participant.Participant.in_step`).
- **Drops.** The result reports members and dropped hotkeys; on failure `AveragingFailed`
  says why.
- **Bytes.** The all-reduce's payload bytes, summed over the round's attempts, are
  reported on success (`AverageResult`) and on failure (`AveragingFailed`) alike.
- **Error feedback after a failure.** A member may fail a round that the others completed
  with its Δ in it (a reducer's last reply lost). The contributor sets tell it which parts
  of its Δ were counted; its top-k residual is committed for those values and kept as
  before for the rest (`AveragingFailed.delivered` says how much). `wire_residual` and
  `restore_wire_residual` carry it across a restart (the miner saves it with its state).

Wire codecs (`AveragingConfig.wire`): hivemind's `Float16Compression`, its uniform 8-bit
format (repaired for NumPy 2 in `averaging.wire.Uniform8BitCodec`), and our sparse top-k
with sender-side error feedback (`averaging.wire`), all in hivemind's butterfly; and
``sparseloco`` (`averaging.sparseloco`, arXiv 2508.15706: 2-bit values, packed indices,
error feedback β), whose whole messages every peer all-gathers instead
(`averaging.allgather.GatherAverager`, picked here by the wire).

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
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any, ClassVar

import torch
from hivemind import DHT
from hivemind.averaging.matchmaking import MatchmakingException
from hivemind.averaging.partition import AllreduceException
from hivemind.p2p import P2PDaemonError, P2PHandlerError

from averaging.allgather import GatherAverager
from averaging.averager import LedgerAverager
from averaging.dht import check_run_name
from averaging.parts import wire_parts
from averaging.round import (
    AverageResult,
    AveragingFailed,
    Binding,
    Directory,
    PeerInfo,
    PeerState,
    PreparedParts,
    Role,
    StateProvider,
    group_prefix,
    window_bits,
)
from averaging.settings import AveragingConfig
from averaging.sparseloco import ErrorFeedback, Sent, SparseSpec
from averaging.wire import TopKSparsifier

logger = logging.getLogger(__name__)


# What hivemind's step may end with when the round fails; each becomes `AveragingFailed`.
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
    gather_class: ClassVar[type[GatherAverager]] = GatherAverager  # the sparseloco wire

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
        # SparseLoCo's error-feedback buffer (wire = sparseloco), kept like top-k's.
        self._feedback = (
            ErrorFeedback(config.sparseloco.error_decay) if config.wire == "sparseloco" else None
        )
        self._averager: LedgerAverager
        if config.wire == "sparseloco":
            self._averager = self.gather_class(
                buffers, dht, prefix=group_prefix(run, shard), config=config, role=role,
                names=list(self._shapes),
            )  # fmt: skip
        else:
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
        payload, sent = None, None
        if self._feedback is not None and role is Role.MEMBER:
            if prepared is not None:
                payload = prepared.blobs[0]
            else:
                sent = self._feedback.compress(values, self._sparse_spec())
                payload = sent.message.to_bytes()
        if self._sparsifier is not None and role is Role.MEMBER and prepared is None:
            values = self._sparsifier.sparsify(values)
        if self._feedback is None:  # the all-gather sends the message, not these buffers
            with self._averager.get_tensors() as buffers:
                for buffer, name in zip(buffers, self._shapes, strict=True):
                    if name in values:
                        buffer.copy_(values[name])
                    else:
                        buffer.zero_()
        if not self._averager.is_alive():
            raise AveragingFailed("the averager process is not running")
        # On the all-gathered wire every peer computes the average itself, so auxiliary
        # peers check the members' commitments too.
        checked = binding is not None and (role is Role.MEMBER or self._feedback is not None)
        self._averager.configure_round(
            bits=window_bits(window),
            peers=peers,
            target_group_size=expected_peers or self.config.target_group_size,
            bound=(window, self.shard) if checked else None,
            payload=payload,
        )
        gather: dict[str, Any] = {"role": role.value}
        if base is not None:
            gather["base"] = base
        if payload is not None:
            gather["payload"] = hashlib.sha256(payload).hexdigest()
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
            self._after_failure(
                failed, role, window, time.monotonic() - start, prepared is None, sent
            )
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
        if self._feedback is not None and sent is not None:
            self._feedback.commit(sent)
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
        if self._feedback is not None:
            sent = self._feedback.compress(values, self._sparse_spec())
            self._feedback.commit(sent)
            message = sent.message
            return PreparedParts([message.to_bytes()], dict(message.decoded), values)
        if self._sparsifier is not None:
            values = self._sparsifier.sparsify(values)
            self._sparsifier.commit()
        blobs, decoded = wire_parts(
            {n: values[n] for n in self._shapes}, self.config.wire, self.config.wire_part_size_bytes
        )
        return PreparedParts(blobs, decoded, values)

    def _sparse_spec(self) -> SparseSpec:
        spec = self.config.sparse_spec
        assert spec is not None, "the sparseloco wire has a spec"
        return spec

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
        if self._feedback is not None:
            return {name: t.clone() for name, t in self._feedback.residual.items()}
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
        if self._feedback is not None:
            self._feedback.residual = {name: t.clone() for name, t in tensors.items()}
            return
        if self._sparsifier is None:
            if tensors:
                logger.info(
                    "shard %d: no error feedback on the wire; dropping its residual", self.shard
                )
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
        sent: Sent | None = None,
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
            if counters["failures"] and "could not find a group" in str(failed):
                # The others completed the round without us; say why our attempt failed.
                failed.args = (
                    f"{failed} (after an attempt that failed: {counters['failures'][-1]})",
                )
        spans = list(counters["delivered"]) if counters is not None else []
        if role is not Role.MEMBER or not owe_residual:
            return
        masks = self._masks(spans)
        total = sum(m.numel() for m in masks.values())
        failed.delivered = sum(int(m.sum()) for m in masks.values()) / max(total, 1)
        if self._feedback is not None and sent is not None:
            # A message is whole or nothing: once a peer holds it, it may be in an average.
            if failed.delivered > 0:
                self._feedback.commit(sent)
            return
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
