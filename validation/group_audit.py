"""The group audit: the validator's seat in every shard's hivemind group, and its checks.

    seats = GroupSeats(seat, ledger, cfg, ledger_weights, first=w)   # a thread of its own
    future = seats.take(w)                              # after w's reveal deadline
    got = group_round(cfg, w, future)                   # (results, pinned weights) | None
    mark_averaged(rows, got[0], admitted_shards)        # each miner: in, mismatch, dropped
    audit = GroupAudit(shapes, cfg.averaging, tolerance, ledger_weights, admitted, hotkeys)
    checks = check_groups(audit, w, roster, got)        # the window record's group_checks

The validator is an auxiliary peer of every shard's group: it sends nothing, receives the
average the members agree on, and so knows what θ_{w+1} the miners in step compute
(`validation.next_model`). The groups meet at the deadline
(`train.windows.meeting_block`), so matchmaking starts a little before it. Scoring the
previous window can take longer than the time left until then (9-17 s beside three
training miners on 2 cores, against 16 s windows), so the seat joins every window from a
thread of its own (`GroupSeats`), whatever the scoring is doing: a validator that missed
a group would have no audit of it, and could neither name a miner whose input did not
match its commitment nor know whom the group left out.

What the groups say of each miner goes into its row (`mark_averaged`): "in" (its parts
are in the average), "mismatch" (a reducer refused parts that were not what it committed
to: no score this window, and a strike), "dropped" or "absent" (its group averaged
without it: its Δ is not in the model, so it is not paid for this window, without a
strike: a slow link is no offence). Each group's average is
then compared with the average of its members' admitted Δ that the group should have
reached (`check_group_average`): their parts weighted by the ledger field
`averaging.weights` pinned to the window's first block, reduced by `averaging.robust` and
encoded as every reducer does (`averaging.parts.reduce_parts`: the same bits when the
group is honest). A mismatch is logged with the group's members named.
"""

from __future__ import annotations

import concurrent.futures
import logging
import math
import threading
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from averaging.participant import Participant
from averaging.parts import reduce_parts
from averaging.round import AverageResult, AveragingFailed
from averaging.settings import AveragingConfig
from averaging.weights import LedgerWeights
from chain.errors import ChainError
from chain.interface import Chain
from common.errors import TensormineError
from tensormine.config import RunConfig
from train.contribution import committed_digests
from train.group_round import matchmaking_lead, round_times
from train.shards import trained_shards
from train.windows import deadline, meeting_block, start_block, wait_for_block
from validation.admission import Admitted, Roster
from validation.report import SCORED, MinerRow
from validation.scoring import OWN_FAIL, compare_group_average

NOT_AVERAGED = "not_averaged"  # a row's verdict: its group averaged without its Δ

logger = logging.getLogger(__name__)

GroupResults = dict[int, AverageResult | AveragingFailed]
# A window's group results, and each hotkey's weight in them (pinned to the window's start).
GroupRound = tuple[GroupResults, dict[str, float]]


def join_groups(
    seat: Participant | None,
    ledger: Chain,
    cfg: RunConfig,
    weights: LedgerWeights,
    window: int,
) -> concurrent.futures.Future[GroupRound] | None:
    """Join every shard's group of `window` as an auxiliary peer, in the background; None
    without a seat or when it is too late to meet them. Waits until matchmaking must
    start, a little before the groups meet at the deadline."""
    if seat is None:
        return None
    meeting = meeting_block(window, cfg.window)
    first = start_block(window, cfg.window)
    head = wait_for_block(ledger, join_block(ledger, cfg, window))
    if head >= meeting:
        return None  # too late to meet this window's groups
    start_at, timeout = round_times(ledger, cfg, window)
    # Only the shards some miner trains (as the miners decide it): with more shards than
    # miners (experts as shards) the others' groups would hold auxiliary peers alone and
    # fail, retrying until the deadline, for nothing. Read here: the ledger's connection
    # belongs to this thread.
    miners = [n.uid for n in ledger.neurons() if not n.validator_permit]
    trained = (
        trained_shards(miners, window, cfg.model.shards, shared=cfg.model.expert_shards)
        if miners
        else None
    )

    def meet() -> GroupRound:
        # The weights every member's reducer uses: the ledger's as the last epoch at or
        # before the window's first block left them (the miners pin the same block).
        table = weights.table(first)
        # On the all-gathered wire an auxiliary peer computes the average itself, so it
        # checks each member's message against its commitment as the members do.
        results = seat.average_window(
            window, {}, start_at=start_at, timeout=timeout, weights_block=first,
            commitments=committed_digests(ledger, window, deadline(window, cfg.window)),
            receive=trained,
        )  # fmt: skip
        return results, table

    pool = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="aux-averaging")
    future = pool.submit(meet)
    pool.shutdown(wait=False)
    return future


def join_block(ledger: Chain, cfg: RunConfig, window: int) -> int:
    """The block at which an auxiliary peer starts matchmaking for `window`'s groups: the
    matchmaking lead before they meet, not before the window starts."""
    meeting = meeting_block(window, cfg.window)
    return max(start_block(window, cfg.window), meeting - matchmaking_lead(ledger, cfg))


class GroupSeatError(TensormineError, RuntimeError):
    """The thread that joins the validator's seat to every window's groups has ended."""


class GroupSeats:
    """The validator's seat in the groups of every window from `first` on, each joined on
    time by a thread of its own (with its own ledger handle), however long scoring the
    previous window takes. `take(w)` hands over window w's round (`join_groups`'s
    future; None when the seat could not meet that window). Rounds not taken are dropped
    once `keep` newer ones exist (a validator that skips windows never takes them)."""

    def __init__(
        self,
        seat: Participant,
        ledger: Chain,
        cfg: RunConfig,
        weights: LedgerWeights,
        *,
        first: int,
        keep: int = 3,
    ) -> None:
        self.seat, self.cfg, self.weights, self.keep = seat, cfg, weights, keep
        self._parent = ledger
        self._next = first  # the window the thread decides next
        self._rounds: dict[int, concurrent.futures.Future[GroupRound] | None] = {}
        self._cond = threading.Condition()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="group-seats", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        # The ledger's connection belongs to the thread that opened it: this one opens its own.
        with self._parent.reopen() as ledger:
            while not self._stop.is_set():
                window = self._next
                future = None
                try:
                    if self._wait(ledger, join_block(ledger, self.cfg, window)):
                        future = join_groups(self.seat, ledger, self.cfg, self.weights, window)
                        if future is None:
                            logger.warning("window %d: too late to meet its groups", window)
                except (TimeoutError, ChainError, ValueError) as exc:
                    # No blocks for a while, a ledger read that failed, an anchor block not
                    # made yet: this window goes unaudited, the next ones are tried.
                    logger.warning("window %d: could not join its groups: %s", window, exc)
                with self._cond:
                    self._rounds[window] = future
                    for old in sorted(self._rounds)[: -self.keep]:
                        del self._rounds[old]
                    self._next = window + 1
                    self._cond.notify_all()

    def _wait(self, ledger: Chain, block: int) -> bool:
        """Poll until the head reaches `block`; False when stopped first."""
        poll = max(0.05, min(1.0, ledger.block_time_s / 4))
        while ledger.block_number() < block:
            if self._stop.wait(poll):
                return False
        return not self._stop.is_set()

    def take(
        self, window: int, *, timeout: float = 10.0
    ) -> concurrent.futures.Future[GroupRound] | None:
        """Window `window`'s round (call it after its groups met: the thread has decided
        it by then, so the wait is short); None when the seat did not meet it."""
        with self._cond:
            self._cond.wait_for(lambda: self._next > window or self._stop.is_set(), timeout=timeout)
            if self._next <= window and not self._thread.is_alive() and not self._stop.is_set():
                # An error the thread does not expect ended it (its traceback is in the log):
                # say so here rather than leave every later window unaudited.
                raise GroupSeatError("the validator's group seat thread ended; see the log")
            return self._rounds.pop(window, None)

    def close(self) -> None:
        """Stop joining windows (a round already under way finishes in its own thread)."""
        self._stop.set()
        with self._cond:
            self._cond.notify_all()
        self._thread.join(timeout=5.0)


def group_round(
    cfg: RunConfig, window: int, groups: concurrent.futures.Future[GroupRound] | None
) -> GroupRound | None:
    """The window's group results as this validator received them, and the pinned
    weights the members used; None when it took no part or they never came."""
    if groups is None:
        return None
    limit = cfg.averaging.allreduce_timeout_s + 30
    try:
        return groups.result(timeout=limit)
    except TimeoutError:
        logger.warning("window %d: no group average within %.0fs", window, limit)
        return None


def mark_averaged(rows: list[MinerRow], results: GroupResults, shard_of: Mapping[str, int]) -> None:
    """What each miner's group says of what it sent. `averaged` is "in" (its parts are
    in the average), "mismatch" (a reducer refused parts that were not what it
    committed to: no score this window, and a strike), "dropped" or "absent" (its group,
    of shard `shard_of[hotkey]` as admitted in the averaged window, averaged without
    it). A miner is paid only for what went into the model: "dropped" and "absent" score
    0 for the window, with no strike (a slow link is no offence). None: no group of its
    shard reached this validator, so it cannot say (the model then takes every admitted
    Δ of that shard from the store: `validation.next_model`)."""
    members: dict[str, str] = {}
    for result in results.values():
        if isinstance(result, AverageResult):
            for hotkey in result.dropped:
                members[hotkey] = "dropped"
            for hotkey in result.members:
                members[hotkey] = "in"
        for hotkey, parts in (result.mismatched or {}).items():
            members[hotkey] = f"mismatch: parts {spans(parts)}"
    formed = {s for s, r in results.items() if isinstance(r, AverageResult) and r.members}
    for row in rows:
        if row.uid is None:
            continue
        said = members.get(row.hotkey)
        if said is None and shard_of.get(row.hotkey) in formed:
            said = "absent"
        row.averaged = said
        if said is None or said == "in":
            continue
        if said.startswith("mismatch"):
            logger.warning(
                "UID %d (%s…) sent parts into its group that are not what it committed "
                "to (%s): no score this window", row.uid, row.hotkey[:8], said,
            )  # fmt: skip
            row.score = 0.0
            row.verdict = "mismatch"
            row.own_outcome = OWN_FAIL  # counts as a strike, as the other checks do
        elif row.status == SCORED:
            logger.info(
                "UID %d (%s…): its group averaged without it (%s); not paid for the window",
                row.uid, row.hotkey[:8], said,
            )  # fmt: skip
            row.score = 0.0
            row.verdict = NOT_AVERAGED


@dataclass(frozen=True)
class GroupAudit:
    """What checking group averages against admitted Δ needs: each shard's parameter
    shapes, the run's averaging settings, the relative error tolerated, each hotkey's
    current ledger weight (for a round whose pinned weights are unknown), the last
    scored window's admitted Δ by UID and the UIDs' hotkeys (to name members)."""

    shapes: Mapping[int, Mapping[str, Sequence[int]]]
    averaging: AveragingConfig
    tolerance: float
    weight_of: Callable[[str], float]
    admitted: Mapping[int, Admitted]
    hotkeys: Mapping[int, str]


def check_group_average(
    audit: GroupAudit,
    shard: int,
    group_average: Mapping[str, torch.Tensor],
    members: Sequence[int],
    weights: Mapping[str, float] | None = None,
) -> tuple[float, bool]:
    """Compare the average a hivemind group of `members` (UIDs) reached on `shard` in
    the last scored window with the average of those members' admitted Δ that the
    groups should have reached (see the module docstring), and log a mismatch naming the
    group; returns (relative error, ok). Members without an admitted Δ make it a
    mismatch. `weights` (hotkey -> weight) are the ones the round used
    (`LedgerWeights.table` pinned to the window's first block); without them, the
    ledger's current ones."""
    admitted = audit.admitted
    missing = [u for u in members if u not in admitted]
    if not members or missing:
        logger.warning(
            "group average on shard %d: members %s of the group %s have no admitted Δ",
            shard, missing, name_members(audit, members),
        )  # fmt: skip
        return math.inf, False
    ordered = sorted(members, key=lambda u: admitted[u].hotkey)
    known = weights or {}
    avg = audit.averaging
    expected = reduce_parts(
        [admitted[u].delta for u in ordered],
        [known.get(h, audit.weight_of(h)) for h in (admitted[u].hotkey for u in ordered)],
        audit.shapes[shard], avg.wire, avg.wire_part_size_bytes, avg.robust,
    )  # fmt: skip
    error, ok = compare_group_average(group_average, expected, tolerance=audit.tolerance)
    if not ok:
        logger.warning(
            "group average on shard %d differs from the admitted Δ of its members %s "
            "(relative error %.3g > %.3g)",
            shard, name_members(audit, members), error, audit.tolerance,
        )  # fmt: skip
    return error, ok


def check_groups(
    audit: GroupAudit, window: int, roster: Roster, round_: GroupRound
) -> dict[str, dict[str, Any]]:
    """Each group's average against the mean of its members' admitted Δ, as the
    window record's `group_checks`: "shard<s>" -> error, ok, members (UIDs) and the
    bytes this validator sent and received in the group as an auxiliary peer."""
    results, weights = round_
    checks: dict[str, dict[str, Any]] = {}
    for shard, result in sorted(results.items()):
        if not isinstance(result, AverageResult):
            continue  # no group formed (no miners, or they failed): nothing to check
        uids = sorted(roster.miners[h] for h in result.members if h in roster.miners)
        error, ok = check_group_average(audit, shard, result.tensors, uids, weights or None)
        logger.info(
            "window %d shard %d: group of %s averaged; relative error vs admitted %.3g (%s)",
            window, shard, uids, error, "ok" if ok else "MISMATCH",
        )  # fmt: skip
        checks[f"shard{shard}"] = {
            "error": error, "ok": ok, "members": uids,
            "bytes_sent": result.bytes_sent, "bytes_received": result.bytes_received,
        }  # fmt: skip
    return checks


def name_members(audit: GroupAudit, members: Sequence[int]) -> str:
    """'UID 3 (5Fabc…), UID 4 (5Gdef…)': who was in a group, for the log."""
    hotkeys = {a.uid: a.hotkey for a in audit.admitted.values()}
    hotkeys |= {u: h for u, h in audit.hotkeys.items() if u not in hotkeys}
    return ", ".join(
        f"UID {u} ({hotkeys[u][:8]}…)" if u in hotkeys else f"UID {u}" for u in sorted(members)
    )


def spans(parts: Sequence[int]) -> str:
    """[0, 1, 2, 5] -> '0-2, 5'."""
    out: list[str] = []
    for p in sorted(parts):
        if out and int(out[-1].split("-")[-1]) == p - 1:
            out[-1] = f"{out[-1].split('-')[0]}-{p}"
        else:
            out.append(str(p))
    return ", ".join(out)
