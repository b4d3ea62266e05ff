"""What dishonest miners read and write beyond their own work (demos and tests only).

    others = peek_contributions(store, ledger, w, shard, like=delta, me=kp.address,
                                until=block, poll_s=0.25)      # [(hotkey, Δ), ...]
    backdate(store, ref, ledger, start_block(w, cfg.window))    # file times set back

`train.adversary` says what each behaviour publishes, as pure functions; this module is
the I/O a copier, mixer or backdater needs for it: reading the other miners' revealed Δ
of the window from the store, and setting a revealed contribution's file times back so
that anything that trusted them would take it for an early one. Validators trust neither:
contributions are ordered and judged late by the ledger block of their commitment.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Mapping

import torch

from averaging.compression import CompressionError, decode
from chain.interface import Chain
from store.api import Store
from store.backend import ContributionRef
from store.errors import StoreError
from store.local import LocalBackend

logger = logging.getLogger(__name__)


def peek_contributions(
    store: Store,
    ledger: Chain,
    window: int,
    shard: int,
    like: Mapping[str, torch.Tensor],
    me: str,
    *,
    until: int,
    poll_s: float,
) -> list[dict[str, torch.Tensor]]:
    """The decoded Δ of `window` and `shard` that other hotkeys have revealed in `store`,
    polled for until the ledger reaches block `until` or one is found."""
    shapes = {n: tuple(t.shape) for n, t in like.items()}
    while True:
        found = []
        for ref in store.list_contributions(window, shard):
            if ref.hotkey == me:
                continue
            try:
                manifest = store.read_manifest(ref)
                raw = store.load_contribution(
                    ref, hotkey=ref.hotkey, uid=manifest.uid, window=window, shard=shard
                )
                found.append(decode(raw.tensors, manifest.compression.params, shapes))
            except (StoreError, CompressionError, ValueError, KeyError) as exc:
                logger.info("cannot read %s's contribution: %s", ref.hotkey, exc)
        if found or ledger.block_number() >= until:
            return found
        time.sleep(poll_s)


def backdate(store: Store, ref: ContributionRef, ledger: Chain, block: int) -> bool:
    """Set the revealed contribution's file times (local store) to block `block`'s
    timestamp; returns whether it could (a Hub commit's date cannot be set back)."""
    backend = store.backend
    header = ledger.block(block)
    if not isinstance(backend, LocalBackend) or header is None:
        return False
    manifest = backend.root / ref.manifest_path
    for path in manifest.parent.glob(f"{ref.hotkey}*"):
        os.utime(path, (header.timestamp, header.timestamp))
    logger.info("set %s's files back to block %d", ref.hotkey, block)
    return True
