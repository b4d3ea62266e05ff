"""Weights as the local ledger's extrinsics carry them.

    uids, u16 = weights_to_wire([1, 2], [0.7, 0.3])     # ([1, 2], [65535, 28086])

`weights_to_wire` turns float weights into the u16 vector the chain stores (largest
weight 65535, as subtensor's set_weights upscales it), refusing negative, NaN, infinite
and all-zero vectors before anything is signed. What signs and submits them is
`chain.local.LocalChain.set_weights` (committing and revealing on a commit-reveal
ledger, `chain.reveals`).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

from chain.consensus import weights_to_u16
from chain.errors import InvalidWeights


def weights_to_wire(uids: Sequence[int], weights: Sequence[float]) -> tuple[list[int], list[int]]:
    """(uids, u16 weights) ready for a set_weights extrinsic; raises `InvalidWeights`."""
    values = [float(w) for w in weights]
    if any(math.isnan(w) or math.isinf(w) for w in values):
        raise InvalidWeights("weights must be finite numbers (got NaN or infinity)")
    if any(w < 0 for w in values):
        raise InvalidWeights(f"weights must be >= 0 (got {min(values)})")
    if not any(w > 0 for w in values):
        raise InvalidWeights("all weights are zero")
    if len(uids) != len(values):
        raise InvalidWeights(f"{len(uids)} UIDs but {len(values)} weights")
    scaled = weights_to_u16(values)
    return [int(u) for u in uids], [int(w) for w in scaled]
