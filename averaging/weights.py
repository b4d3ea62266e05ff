"""Each sender's weight in the average, from the ledger.

Each reducer weighs a sender by ``weight_of(hotkey)`` of the hotkey behind its
(libp2p-authenticated) peer id, looked up before the round; the weight a peer announces in
its messages is ignored. ``ShardAverager.average(weights=...)`` overrides it for one round:
`averaging.participant.Participant` passes `LedgerWeights.table(b)`, the weights as the
last epoch at or before block b left them (miners pass the window's first block), so peers
that look up at different moments, one just before an epoch and one just after, still
weigh alike, and a validator can redo the average with the same numbers.
"""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Literal

from chain.config import RAO_PER_TAO
from chain.factory import ChainSource
from chain.interface import Chain
from chain.types import Neuron

WeightSource = Literal["uniform", "stake", "incentive", "trust"]


class LedgerWeights:
    """``weight_of(hotkey)`` from the ledger: `source` of the hotkey's neuron, at least
    `floor` (so a newly registered member still counts); 0 for unregistered ones.

    Called, it reads the latest block. `table(at_block=b)` gives every registered
    hotkey's weight as the last epoch at or before b left it (`Chain.epoch_neurons`), the
    same whenever it is asked; a hotkey registered since, or every one before the first
    epoch, has the floor (for `stake` too: stake is pinned with the epoch's metagraph)."""

    def __init__(self, chain: Chain | Path | str, source: WeightSource, floor: float) -> None:
        if not floor > 0:
            raise ValueError("floor must be positive")
        self.ledger, self.source, self.floor = ChainSource(chain), source, floor
        self._block = -1
        self._neurons: dict[str, Neuron] = {}
        self._lock = threading.Lock()

    def _current(self) -> dict[str, Neuron]:
        with self._lock:
            ledger = self.ledger.get()
            block = ledger.block_number()
            if block != self._block:
                self._neurons = {n.hotkey: n for n in ledger.neurons()}
                self._block = block
            return self._neurons

    def _weight(self, neuron: Neuron | None) -> float:
        if neuron is None:
            return 0.0
        if self.source == "uniform":
            return 1.0
        value = {
            "stake": neuron.stake / RAO_PER_TAO,
            "incentive": neuron.incentive,
            "trust": neuron.trust,
        }[self.source]
        return max(float(value), self.floor)

    def __call__(self, hotkey: str) -> float:
        return self._weight(self._current().get(hotkey))

    def table(self, at_block: int | None = None) -> dict[str, float]:
        """Every registered hotkey's weight: now (None), or pinned to the last epoch at or
        before `at_block` (what every member of a round pinned to that block uses)."""
        current = self._current()
        if at_block is None:
            return {hotkey: self._weight(n) for hotkey, n in current.items()}
        with self._lock:
            pinned = self.ledger.get().epoch_neurons(at_block)
        then = {} if pinned is None else {n.hotkey: n for n in pinned[1]}
        table = {}
        for hotkey in current:
            if hotkey in then:
                table[hotkey] = self._weight(then[hotkey])
            else:  # registered since that epoch, or no epoch yet: a newcomer's weight
                table[hotkey] = 1.0 if self.source == "uniform" else self.floor
        return table
