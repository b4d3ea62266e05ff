"""Where each miner's contributions are, and which listed ones count for whom.

    where = contribution_sources(roster, ledger.commitments(),
                                 own=store.contributions_location, backend="local")
    source = committed_location(ledger.commitments().get(hotkey), own=..., backend=...)
    refs = list_contributions(store, window, where, own=store.contributions_location)

Every miner keeps its contributions in its own store and names it in its ledger
commitment (the ``"contributions"`` key, `store.sources`); a miner that committed none
(or an unusable location) is looked for in this validator's own store. A hotkey's
contributions count only from the location that hotkey committed — its own store, not
one that re-hosts or replays its files — so listing a location twice, or a miner
pointing at another's repo, neither duplicates nor moves credit. A location that fails
to list is logged and skipped: its miners are then `missing` (`validation.admission`).
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from pathlib import Path

from store.api import Store
from store.backend import ContributionRef
from store.errors import StoreError
from store.sources import parse_contributions_location
from validation.admission import Roster

logger = logging.getLogger(__name__)


def committed_location(entry: tuple[str, int] | None, *, own: str, backend: str) -> str:
    """Where a hotkey keeps its contributions: the location in its ledger commitment
    (`entry`: (data, block), as `Ledger.commitments` gives it), else `own`, this
    validator's store."""
    location = parse_contributions_location(entry[0], backend=backend) if entry else None
    if location is not None and backend == "local":
        location = str(Path(location).resolve())  # as `LocalBackend` names its refs
    return location or own


def contribution_sources(
    roster: Roster,
    commitments: Mapping[str, tuple[str, int]],
    *,
    own: str,
    backend: str,
) -> dict[str, str]:
    """hotkey -> where each miner of `roster` keeps its contributions
    (`committed_location`; `commitments` as `Ledger.commitments` gives them)."""
    return {
        hotkey: committed_location(commitments.get(hotkey), own=own, backend=backend)
        for hotkey in roster.miners
    }


def list_contributions(
    store: Store, window: int, where: Mapping[str, str], *, own: str
) -> list[ContributionRef]:
    """The contributions of `window` at every location of `where` (and `own`), each kept
    only when it sits where its hotkey committed (`own` for hotkeys not in `where`)."""
    refs: list[ContributionRef] = []
    for source in sorted(set(where.values()) | {own}):
        try:
            listed = store.list_contributions(window, sources=[source])
        except StoreError as exc:
            logger.warning("window %d: cannot list contributions at %s: %s", window, source, exc)
            continue
        for ref in listed:
            if where.get(ref.hotkey, own) == ref.source:
                refs.append(ref)
            else:
                logger.info(
                    "window %d: ignoring %s's contribution at %s (it committed %s)",
                    window, ref.hotkey, ref.source, where.get(ref.hotkey, own),
                )  # fmt: skip
    return refs
