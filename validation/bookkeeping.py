"""Score bookkeeping: moving averages, strikes and flags per UID, and weights on the ledger.

    apply_verdicts(rows, verdicts)          # proof of work gates the window's scores
    update_scores(state, roster, rows, alpha=cfg.validation.ema_alpha)   # fills row.ema/weight
    setter = WeightSetter(chain, every=cfg.validation.weights_every)
    report.weights_set = setter.maybe_set(state, window)

After each window every miner of the roster gets its score (0 without an admitted,
passing contribution; a UID with several rows keeps its best), and its moving average
follows m ← (1 − α)·m + α·s (`scoring.update_ema`). Own-data strikes count the windows
in a row without an outright pass (a pass clears them; a UID that published nothing
keeps its count) and held-out-rival flags the windows in a row flagged. A UID that
changed hands (re-registration) starts again from zero on all three. The state is
`validation.state.ValidatorState`, saved with θ after every window.

Every `validation.weights_every` windows the normalized moving averages go to the chain
as this validator's weights (`Chain.set_weights`: committed, and revealed later, where the
chain runs commit-reveal), without waiting for inclusion: the chain checks the call before
it takes it into its pool, so the validator's window never waits for a block.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence

from chain.errors import ChainError
from chain.interface import Chain
from validation.admission import Roster
from validation.proof_of_work import PowVerdict
from validation.report import REFUSED, MinerRow
from validation.scoring import OWN_FAIL, OWN_OFF, OWN_PASS, OWN_POW, normalized_weights, update_ema
from validation.state import ValidatorState

logger = logging.getLogger(__name__)


def update_scores(
    state: ValidatorState,
    roster: Roster,
    rows: list[MinerRow],
    *,
    alpha: float,
    pow_fail_resets: bool = False,
) -> None:
    """Fold the window's `rows` into `state` (moving averages, strikes, flags, the UIDs'
    hotkeys) and give each row its UID's new moving average and normalized weight. With
    `pow_fail_resets`, a UID whose proof of work failed (`row.pow`) restarts its moving
    average from zero: a caught cheat costs what the average had built, not one window."""
    scores = {uid: 0.0 for uid in roster.miners.values()}
    for row in rows:
        if row.uid is not None and row.uid in scores:
            # A UID may also have a refused entry (e.g. a second shard): keep its best.
            scores[row.uid] = max(scores[row.uid], row.score)
    # A UID that now belongs to another hotkey (re-registration) starts from zero.
    by_uid = {uid: hk for hk, uid in roster.miners.items()}
    ema = {uid: v for uid, v in state.ema.items() if state.hotkeys.get(uid) == by_uid.get(uid)}
    if pow_fail_resets:
        for row in rows:
            if row.uid is not None and row.pow is not None and row.pow != "pass":
                ema.pop(row.uid, None)
    state.ema = update_ema(ema, scores, alpha)
    # Own-data strikes: a pass clears them, anything else adds one; a UID that did not
    # publish keeps its count, one that changed hands starts again from zero.
    strikes = {
        uid: n for uid, n in state.own_strikes.items()
        if state.hotkeys.get(uid) == by_uid.get(uid)
    }  # fmt: skip
    for row in rows:
        if row.uid is None or row.own_outcome in (None, OWN_OFF, OWN_POW):
            continue
        before = strikes.get(row.uid, 0)
        strikes[row.uid] = 0 if row.own_outcome == OWN_PASS else before + 1
    state.own_strikes = {uid: n for uid, n in sorted(strikes.items()) if n > 0}
    flags = {
        uid: n for uid, n in state.heldout_flags.items()
        if state.hotkeys.get(uid) == by_uid.get(uid)
    }  # fmt: skip
    for row in rows:
        if row.uid is not None and row.heldout_outcome is not None:
            flags[row.uid] = 0 if row.heldout_outcome == OWN_PASS else flags.get(row.uid, 0) + 1
    state.heldout_flags = {uid: n for uid, n in sorted(flags.items()) if n > 0}
    state.hotkeys = by_uid
    weights = normalized_weights(state.ema)
    for row in rows:
        if row.uid is not None:
            row.ema = state.ema.get(row.uid, 0.0)
            row.weight = weights.get(row.uid, 0.0)


class WeightSetter:
    """Sets a validator's weights every `every` windows."""

    def __init__(self, chain: Chain, *, every: int) -> None:
        self.chain = chain
        self.every = every

    def maybe_set(self, state: ValidatorState, window: int) -> bool:
        """Submit the normalized moving averages of `state` as weights when they are due
        (recorded in `state.weights_window`); returns whether they were submitted."""
        last = state.weights_window
        if last is not None and window - last < self.every:
            return False
        weights = normalized_weights(state.ema)
        if not weights:
            logger.info("window %d: no miner has a positive score yet; no weights set", window)
            return False
        uids = sorted(weights)
        try:
            # Not waiting for inclusion: the chain checks the call before it takes it.
            self.chain.set_weights(uids, [weights[u] for u in uids], wait=False)
        except ChainError as exc:
            logger.warning("window %d: set_weights refused: %s", window, exc)
            return False
        state.weights_window = window
        return True


def apply_verdicts(rows: Sequence[MinerRow], verdicts: Mapping[int, PowVerdict]) -> None:
    """Proof of work gates the score: a failed check scores 0 and counts as a strike (as
    the other checks' failures do); a pass keeps the loss-delta score."""
    for row in rows:
        verdict = verdicts.get(row.uid) if row.uid is not None else None
        if verdict is None or row.status == REFUSED:
            continue
        row.pow, row.pow_detail = verdict.label, verdict.detail or None
        row.pow_rel_error, row.pow_cosine = verdict.rel_error, verdict.cosine
        if not verdict.ok:
            row.score = 0.0
            row.own_outcome = OWN_FAIL
            row.verdict = f"pow_{verdict.reason}"
            logger.warning(
                "UID %d (%s…) failed its proof of work: %s %s",
                row.uid, row.hotkey[:8], verdict.reason, verdict.detail,
            )  # fmt: skip
