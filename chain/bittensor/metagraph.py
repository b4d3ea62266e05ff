"""Subtensor's metagraph and weight matrix in `chain.types` terms.

``client.subnets.metagraph(netuid, block=)`` returns a `bittensor.Metagraph` built from
one ``SubnetInfoRuntimeApi.get_metagraph`` call: scores already scaled from u16 to
[0, 1] (``PerU16``), amounts as `bittensor.Balance`. We keep rao integers:

- ``stake`` is ``total_stake`` in rao of the subnet's own token (alpha on dynamic-TAO
  subnets; 1 alpha = 10⁹ rao as for TAO), the stake that Yuma and validator permits use;
- ``balance`` is 0: the metagraph does not carry the hotkey account's free balance;
- ``validator_trust`` comes from the raw record when the runtime still sends that
  column, else 0.0 (newer runtimes dropped it from the metagraph);
- ``emission`` is the subnet-token rao the UID earned at the last epoch.

Weights are read as the chain stores them (``SubtensorModule.Weights`` under the
subnet's mechanism-0 index = netuid): u16 values, max-upscaled per row. The SDK's
``weights`` read divides each row by its sum; reading the storage map keeps the exact
integers `chain.interface.Chain.weights` promises.
"""

from __future__ import annotations

from typing import Any

from chain.types import Neuron

U16_MAX = 65535


def _u16_column(raw: dict[str, Any], key: str, uid: int) -> float:
    values = raw.get(key) or []
    if uid >= len(values) or values[uid] is None:
        return 0.0
    return int(values[uid]) / U16_MAX


def neurons_of(metagraph: Any) -> list[Neuron]:
    """The UIDs of a `bittensor.Metagraph`, in UID order."""
    if metagraph is None:
        return []
    raw: dict[str, Any] = metagraph.raw or {}
    return [
        Neuron(
            uid=int(n.uid),
            hotkey=str(n.hotkey),
            coldkey=str(n.coldkey),
            stake=int(n.total_stake.rao),
            balance=0,
            registered_block=int(n.block_at_registration),
            last_update=int(n.last_update),
            validator_permit=bool(n.validator_permit),
            rank=float(n.rank),
            trust=float(n.trust),
            consensus=float(n.consensus),
            incentive=float(n.incentive),
            dividends=float(n.dividends),
            validator_trust=_u16_column(raw, "validator_trust", int(n.uid)),
            emission=int(n.emission.rao),
        )
        for n in sorted(metagraph.neurons, key=lambda n: int(n.uid))
    ]


def weight_rows(rows: list[tuple[Any, Any]]) -> dict[int, list[tuple[int, int]]]:
    """``Weights`` storage-map pairs as {validator UID: [(UID, u16)]}, sorted, zeros
    and empty rows dropped."""
    out: dict[int, list[tuple[int, int]]] = {}
    for uid, row in rows:
        pairs = sorted((int(target), int(value)) for target, value in row or [] if int(value))
        if pairs:
            out[int(uid)] = pairs
    return dict(sorted(out.items()))
