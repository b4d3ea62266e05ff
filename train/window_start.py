"""Which θ_w a miner starts window w from: its own, a peer's in step, or the canonical one.

    start = choose_start(model, w, seat=seat, synced=True, own_window=w, store=store,
                         ledger=ledger, cfg=cfg, pulls=pulls)   # all of the below, in order
    momentum = load_from_peers(seat, model, w, timeout=cfg.averaging.state_timeout_s)
    source = fetch_canonical(store, ledger, cfg, pulls, w, have_own=True, wait=True)
    word = check_canonical(store, w, ours=fingerprint_of_theta_w, synced=True)
    offer = StateOffer(seat); offer.update(model, momentum, window=w + 1, synced=True)

With hivemind averaging (`averaging.enabled`, the default) a miner whose last round
succeeded keeps its own θ_w, which every miner in step shares. One that joins late or
missed a round downloads θ_w and the outer momentum from a registered peer in step
(`load_from_peers`), else falls back to the store. The store's θ_w is the canonical
checkpoint of window w (the validators publish it), else the latest one before it, else
the run's deterministic window-0 checkpoint (which the first miner to start writes):
`fetch_canonical`. An out-of-step miner with no peer to copy waits for the canonical θ_w
while there is still time to train before the deadline (`window.canonical_wait`), since
it puts every such miner back on one model. Without averaging the canonical checkpoint
always wins when present.

A miner in step offers its θ_{w+1} and momentum to the late joiners of window w+1
(`StateOffer`); one out of step withdraws its offer, so that nobody copies a model the
groups did not make. A miner in step never adopts a published checkpoint that disagrees with its own
successful round: `check_canonical` names the disagreement in the window's report.
"""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from averaging.participant import Participant
from averaging.round import AveragingFailed
from chain.interface import Chain
from store.api import Store
from store.errors import NotFound, StoreError
from tensormine.config import RunConfig
from train.peer_state import PeerStateError, pack_state, unpack_state
from train.startup import adopt_checkpoint
from train.windows import start_block

logger = logging.getLogger(__name__)

MATCH = "match"
DIFFERS = "differs"
OUT_OF_STEP = "out-of-step"
ABSENT = "absent"


def pull(store: Store, pulls: Path, window: int) -> Path:
    """The checkpoint of `window` under `pulls`, pulled (and verified) unless it is there;
    `store.errors.NotFound` when none is published."""
    target = pulls / f"window-{window}"
    if not target.exists():
        store.pull_checkpoint(target, window=window)
    return target


def load_from_peers(
    seat: Participant, model: torch.nn.Module, window: int, *, timeout: float
) -> dict[str, torch.Tensor] | None:
    """Take θ_window into `model` from a registered peer in step and return the outer
    momentum that came with it; None (and `model` untouched) when no peer shares a
    usable state."""
    own = model.state_dict()
    budget = 3 * sum(t.numel() * 4 for t in own.values()) + (1 << 20)  # θ + b + framing
    try:
        got = seat.load_state(timeout=timeout, max_bytes=budget)
    except AveragingFailed as exc:
        logger.warning("window %d: cannot ask peers for their state: %s", window, exc)
        return None
    if got is None:
        logger.info("window %d: no peer shares its state", window)
        return None
    try:
        weights, momentum = unpack_state(got.metadata, got.tensors, expected=own, window=window)
    except PeerStateError as exc:
        logger.warning("window %d: refused the state of %s: %s", window, got.hotkey, exc)
        return None
    model.load_state_dict(weights)
    logger.info(
        "window %d: loaded θ and outer momentum from %s (%d bytes)",
        window, got.hotkey, got.nbytes,
    )  # fmt: skip
    return momentum


def fetch_canonical(
    store: Store,
    ledger: Chain,
    cfg: RunConfig,
    pulls: Path,
    window: int,
    *,
    have_own: bool,
    wait: bool = False,
) -> int:
    """Pull the checkpoint to start `window` from (under `pulls`) and return its window,
    or -1 to keep our own θ: the canonical θ_window if published (with `wait`, polled for
    until `window.canonical_wait` of the window has passed); a miner without state of its
    own (not `have_own`) takes the latest published one before it instead (window 0 at
    worst)."""
    until = start_block(window, cfg.window) + int(cfg.window.canonical_wait * cfg.window.blocks)
    waited = False
    while True:
        try:
            pull(store, pulls, window)
            if waited:
                logger.info("window %d: the canonical checkpoint appeared", window)
            return window
        except NotFound:
            pass
        if not wait or ledger.block_number() >= until:
            break
        if not waited:
            logger.info(
                "window %d: waiting for the canonical checkpoint until block %d", window, until
            )
            waited = True
        time.sleep(ledger.block_time_s)
    if have_own:
        return -1
    earlier = [ref.window for ref in store.list_checkpoints() if ref.window < window]
    if not earlier:
        return -1
    pull(store, pulls, max(earlier))
    return max(earlier)


@dataclass(frozen=True)
class Start:
    """What `choose_start` did: whether it changed the model's weights, whether the model
    is now the groups' θ_w, and the outer momentum that came with it (None: keep ours)."""

    changed: bool
    synced: bool
    momentum: dict[str, torch.Tensor] | None = None


def choose_start(
    model: torch.nn.Module,
    window: int,
    *,
    seat: Participant | None,
    synced: bool,
    own_window: int,
    store: Store,
    ledger: Chain,
    cfg: RunConfig,
    pulls: Path,
) -> Start:
    """Load θ_window into `model` (see the module docstring). `synced`: the model is the
    groups' θ_{own_window} (`own_window` = −1: the model holds no window yet)."""
    if seat is not None:
        if synced and own_window == window:
            return Start(changed=False, synced=True)  # the groups' θ_window, as every miner
        momentum = load_from_peers(seat, model, window, timeout=cfg.averaging.state_timeout_s)
        if momentum is not None:
            return Start(changed=True, synced=True, momentum=momentum)
    # Out of step with no peer to copy (say, a group that could not form): the validators'
    # canonical θ_window puts every such miner back on one model, so wait for it as long as
    # there is still time to train before the deadline.
    source = fetch_canonical(
        store, ledger, cfg, pulls, window, have_own=own_window >= 0, wait=seat is not None
    )
    if source >= 0:
        momentum = adopt_checkpoint(model, pulls / f"window-{source}")
        # θ_window itself is the groups' model; an older checkpoint is not.
        in_step = seat is not None and source == window
        if momentum is not None:
            logger.info("window %d: adopted the canonical checkpoint of window %d", window, source)
            return Start(changed=True, synced=in_step, momentum=momentum)
        return Start(changed=False, synced=in_step)
    if own_window != window:
        # No canonical θ_window yet: our own θ from the last outer step stands in.
        logger.info(
            "window %d: no canonical checkpoint; using our own from window %d", window, own_window
        )
    return Start(changed=False, synced=False)


def serve_until_published(store: Store, ledger: Chain, window: int, timeout: float) -> bool:
    """Wait (the caller's averagers serving its state meanwhile) until the canonical
    checkpoint of `window` is published, at most `timeout` seconds; whether it was.

    A miner that stops after window w − 1 stays for this: a validator whose auxiliary seat
    missed that window's round (it was still scoring the last one) cannot tell which inputs
    the group's reducers left out, so it loads the group's θ_w from a member over hivemind,
    and a member that has already left cannot serve it.
    """
    limit = time.monotonic() + timeout
    while True:
        try:
            store.resolve(window=window)
            return True
        except NotFound:
            if time.monotonic() >= limit:
                return False
        time.sleep(ledger.block_time_s)


def check_canonical(store: Store, window: int, *, ours: str, synced: bool) -> str:
    """Whether the published checkpoint of `window` is the θ_window (fingerprint `ours`)
    our last round produced: "match", "differs" (we keep ours and say so), "out-of-step"
    (we did not end the last round in step, so we had adopted it or a peer's) or
    "absent"."""
    if not synced:
        return OUT_OF_STEP
    try:
        theirs = store.read_provenance(store.resolve(window=window)).fingerprint
    except StoreError:
        return ABSENT
    if theirs is None:
        return ABSENT
    if theirs != ours:
        logger.warning(
            "window %d: the published checkpoint (fingerprint %s…) is not the θ our round "
            "produced (%s…); keeping ours. `tensormine verify --window %d` checks it",
            window, theirs[:16], ours[:16], window - 1,
        )  # fmt: skip
        return DIFFERS
    return MATCH


class StateOffer:
    """θ and the outer momentum a miner in step offers registered peers that join late."""

    def __init__(self, seat: Participant) -> None:
        self.seat = seat
        self._state: tuple[dict[str, Any], list[torch.Tensor]] | None = None
        self._lock = threading.Lock()

    def update(
        self,
        model: torch.nn.Module,
        momentum: dict[str, torch.Tensor],
        *,
        window: int,
        synced: bool,
    ) -> None:
        """Offer θ_window (`model`) and `momentum` while `synced`; withdraw the offer else."""
        if not synced:
            self.seat.stop_sharing_state()
            return
        state = pack_state(model.state_dict(), momentum, window=window)
        with self._lock:
            self._state = state
        self.seat.share_state(self._provide, priority=window)

    def _provide(self) -> tuple[dict[str, Any], list[torch.Tensor]] | None:
        # Called from hivemind's thread when a peer downloads our state.
        with self._lock:
            return self._state
