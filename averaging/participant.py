"""A participant's seat in the averaging: its DHT, its ledger commitment, one averager per shard.

    seat = Participant.join(cfg.averaging, run="tiny", chain=chain,
                            identity_path=Path("runs/tiny/miners/m0/dht.key"),
                            templates={0: shard0_params, 1: shard1_params})
    results = seat.average_window(7, {0: delta}, start_at=t, timeout=20)
    # {0: AverageResult(...), 1: AverageResult(...) or AveragingFailed(...)}
    seat.share_state(provider, priority=8)          # late joiners may download it
    state = seat.load_state(timeout=10, max_bytes=1 << 28)   # PeerState or None
    seat.close()

Every miner and validator holds one: the DHT node (bootstrapped from the multiaddrs that
other hotkeys committed to the ledger), its own multiaddrs committed under its hotkey
(which also ties its libp2p peer id to the hotkey), and a `ShardAverager` per model shard.
In each window the participant is a member of the groups of the shards it trained and an
auxiliary peer of the others, so it receives every shard's average and can assemble the
next global model by itself (DiLoCo, arXiv 2311.08105, with the model cut into shards).
The groups of all shards run at once, one thread each.

A participant whose model is in step with the groups shares it (`share_state`) through
hivemind's state download, restricted here to registered peers and a byte budget; a
miner that joins late or missed a round loads it with `load_state`.
"""

from __future__ import annotations

import concurrent.futures
import logging
from collections import Counter
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any

import torch
from hivemind import DHT

from averaging.dht import PeerDirectory, commitment_for, join_ledger_peers, start_dht
from averaging.group import ShardAverager
from averaging.round import (
    AverageResult,
    AveragingFailed,
    Binding,
    PeerState,
    PreparedParts,
    Role,
    StateProvider,
)
from averaging.settings import AveragingConfig
from averaging.weights import LedgerWeights
from chain.interface import Chain

logger = logging.getLogger(__name__)


def commit_address(chain: Chain, dht: DHT, *, run: str) -> bool:
    """Commit `dht`'s multiaddrs (and its key's proof of the tie in `run`) under the
    chain handle's hotkey unless the chain already has exactly that; returns whether a
    commitment was made (and included)."""
    hotkey = chain.signer().address
    text = commitment_for(dht, chain, hotkey, run=run)
    current = chain.commitments().get(hotkey)
    if current is not None and current[0] == text:
        return False
    receipt = chain.commit(text)
    logger.info("committed DHT address %s in block %d", text, receipt.block)
    return True


class Participant:
    """One hotkey's DHT node and shard averagers; see the module docstring."""

    def __init__(
        self,
        dht: DHT,
        averagers: Mapping[int, ShardAverager],
        *,
        state_shard: int,
    ) -> None:
        if state_shard not in averagers:
            raise ValueError(f"no averager for state shard {state_shard}")
        self.dht, self.averagers, self._state_shard = dht, dict(averagers), state_shard
        self.chain: Chain | None = None
        self.weights: LedgerWeights | None = None  # what `weights_block` pins

    @classmethod
    def join(
        cls,
        config: AveragingConfig,
        *,
        run: str,
        chain: Chain,
        identity_path: Path | None,
        templates: Mapping[int, Mapping[str, torch.Tensor]],
    ) -> Participant:
        """Start the DHT, commit its address, and start one averager per shard."""
        if not templates:
            raise ValueError("templates must name at least one shard")
        identity = config.dht.identity_path or identity_path
        dht = start_dht(config.dht, run=run, ledger=chain, identity_path=identity)
        averagers: dict[int, ShardAverager] = {}
        try:
            commit_address(chain, dht, run=run)
            directory = PeerDirectory(chain, run=run, dht=dht)
            weights = LedgerWeights(chain, config.weights, config.weight_floor)
            for shard, template in sorted(templates.items()):
                averagers[shard] = ShardAverager(
                    dht,
                    run,
                    shard,
                    template,
                    role=Role.AUX,
                    config=config,
                    directory=directory,
                    weight_of=weights,
                )
        except BaseException:
            for averager in averagers.values():
                averager.shutdown()
            dht.shutdown()
            raise
        seat = cls(dht, averagers, state_shard=min(averagers))
        seat.chain = chain
        seat.weights = weights
        seat.join_peers()
        return seat

    def join_peers(self) -> int:
        """Connect to committed peers we are not connected to (see `join_ledger_peers`)."""
        if self.chain is None:
            return 0
        with self.chain.reopen() as chain:
            return join_ledger_peers(self.dht, chain)

    @property
    def peer_id(self) -> str:
        return str(self.dht.peer_id.to_base58())

    def average_window(
        self,
        window: int,
        deltas: Mapping[int, Mapping[str, torch.Tensor]],
        *,
        start_at: float,
        timeout: float,
        receive: Iterable[int] | None = None,
        base: str | None = None,
        weights_block: int | None = None,
        prepared: Mapping[int, tuple[PreparedParts, dict[str, Any]]] | None = None,
        commitments: Callable[[], Mapping[str, str] | None] | None = None,
    ) -> dict[int, AverageResult | AveragingFailed]:
        """Average this window in every group at once: a member of each shard in `deltas`
        (with that Δ), an auxiliary peer of each other shard in `receive` (default: all).
        `base` (a fingerprint of the model the window started from) is announced to every
        group; see `in_step`. `weights_block` pins the members' ledger weights to the last
        epoch at or before it (`LedgerWeights.table`, read once for every group); every
        peer passes the same one.

        `prepared` (shard -> the parts from `prepare` and the body of the manifest
        committed for them) makes a bound round of that shard: reducers check every part
        against the commitments that `commitments` returns once the ledger is past the
        deadline (hotkey -> digest; None before), and leave out and name what differs.

        A group that fails gives its `AveragingFailed` in place of a result; a bad Δ
        (wrong names or shapes, non-finite) raises `ValueError` before anything is sent.
        """
        prepared = dict(prepared or {})
        if prepared and commitments is None:
            raise ValueError("a bound round needs the ledger's commitments")
        deltas = {**deltas, **{s: p.values for s, (p, _body) in prepared.items()}}
        unknown = set(deltas) - set(self.averagers)
        if unknown:
            raise ValueError(f"no averager for shard(s) {sorted(unknown)}")
        wanted = set(self.averagers) if receive is None else set(receive) & set(self.averagers)
        shards = sorted(set(deltas) | wanted)
        if not shards:
            return {}
        self.join_peers()
        pinned = None
        if weights_block is not None:
            if self.weights is None:
                raise ValueError("weights_block needs the ledger weights of `Participant.join`")
            pinned = self.weights.table(weights_block)

        def one(shard: int) -> AverageResult | AveragingFailed:
            delta = deltas.get(shard)
            bound = prepared.get(shard)
            try:
                return self.averagers[shard].average(
                    window,
                    None if bound is not None else delta,
                    timeout=timeout,
                    start_at=start_at,
                    role=Role.AUX if delta is None else Role.MEMBER,
                    base=base,
                    weights=pinned,
                    prepared=None if bound is None else bound[0],
                    # An auxiliary peer gets the commitments too (`ShardAverager.average`
                    # uses them on the all-gathered wire, where it averages by itself).
                    binding=(
                        None
                        if commitments is None
                        else Binding(None if bound is None else bound[1], commitments)
                    ),
                )
            except AveragingFailed as exc:
                logger.warning("window %d shard %d: %s", window, shard, exc)
                return exc

        with concurrent.futures.ThreadPoolExecutor(len(shards)) as pool:
            futures = {shard: pool.submit(one, shard) for shard in shards}
            return {shard: future.result() for shard, future in futures.items()}

    def prepare(self, shard: int, delta: Mapping[str, torch.Tensor]) -> PreparedParts:
        """`delta` of `shard` as its group's wire carries it (`ShardAverager.prepare`)."""
        if shard not in self.averagers:
            raise ValueError(f"no averager for shard {shard}")
        return self.averagers[shard].prepare(delta)

    @staticmethod
    def in_step(results: Mapping[int, AverageResult | AveragingFailed], hotkey: str) -> bool:
        """Whether `hotkey` started the window from the model most peers started from.

        Every peer of every group announced its base; the most common one wins (ties go to
        the smallest, so that two peers that disagree settle it the same way). A peer that
        is not in step applied the averages to a different model: it should load a peer's
        state before the next window.
        """
        bases: dict[str, str] = {}
        for result in results.values():
            if isinstance(result, AverageResult):
                bases.update(result.bases)
        mine = bases.get(hotkey)
        if mine is None:
            return False
        counts = Counter(bases.values())
        winner = min(counts, key=lambda b: (-counts[b], b))
        return mine == winner

    def share_state(self, provider: StateProvider, *, priority: float) -> None:
        """Let registered peers download `provider()`'s state; newest `priority` first."""
        self.averagers[self._state_shard].share_state(priority, provider)

    def stop_sharing_state(self) -> None:
        self.averagers[self._state_shard].stop_sharing_state()

    def load_state(self, *, timeout: float, max_bytes: int) -> PeerState | None:
        """The newest state a registered peer shares (untrusted: check it), or None."""
        self.join_peers()
        return self.averagers[self._state_shard].load_state_from_peers(
            timeout=timeout, max_bytes=max_bytes
        )

    def wire_residuals(self) -> dict[str, torch.Tensor]:
        """Every shard's top-k error feedback, by tensor name (shards own disjoint names)."""
        out: dict[str, torch.Tensor] = {}
        for averager in self.averagers.values():
            out.update(averager.wire_residual())
        return out

    def restore_wire_residuals(self, tensors: Mapping[str, torch.Tensor]) -> None:
        """Hand each shard's averager its part of what `wire_residuals` returned; a name
        that no shard holds raises `ValueError`."""
        owner = {name: shard for shard, a in self.averagers.items() for name in a.tensor_names}
        unknown = sorted(set(tensors) - set(owner))
        if unknown:
            raise ValueError(f"residuals for tensors no shard holds: {unknown[:5]}")
        for shard, averager in self.averagers.items():
            averager.restore_wire_residual(
                {name: t for name, t in tensors.items() if owner[name] == shard}
            )

    def close(self) -> None:
        for averager in self.averagers.values():
            averager.shutdown()
        self.dht.shutdown()
