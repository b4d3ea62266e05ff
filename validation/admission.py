"""Admission: turn a listed contribution into a verified, decoded Δ, or a named refusal.

    roster = Roster.from_neurons(ledger.neurons(), model=cfg.model, window=w)
    commitments = ledger.contribution_commitments(w)   # hotkey -> ContributionCommitment
    outcome = admit(store, ref, roster=roster, window=w, shapes=shard_shapes,
                    scheme=cfg.compression.scheme, commitment=commitments.get(ref.hotkey),
                    deadline_block=deadline(w, cfg.window))
    if isinstance(outcome, Refused):
        record(outcome.uid, outcome.reason)          # score 0, the validator goes on

    admitted, refused = admit_window(store, refs, roster=roster, window=w, shapes=shapes,
                                     commitments=commitments, deadline_block=due, cfg=cfg)

The checks, cheapest first, each with its reason code:

1. the hotkey is a registered miner (`not_a_miner`: unknown hotkey or a validator);
2. it is stored under the shard the miner owns this window (`wrong_shard`);
3. the miner committed to it on the ledger (`train.contribution`): a commitment for the
   window exists (`uncommitted`), a block before the deadline block took it (`late`: the
   ledger's clock, never a file time a miner can set), and the revealed manifest hashes
   to it (`reveal_mismatch`). A miner that committed but revealed nothing readable by the
   reveal deadline is `unrevealed` (`admit_window`);
4. the manifest's compression names the run's scheme, twice consistently
   (`compression_mismatch`), with parameters the codec accepts (`bad_compression`);
5. everything `store.Store.load_contribution` checks, with the store's own reason
   (`bad_signature`, `wrong_window`, `sha256_mismatch`, `not_safetensors` for a pickle,
   `shape_mismatch`, `dtype_mismatch`, `not_finite`, `too_large`, ...), against tensor
   specs computed from the validator's own model, never from the payload;
6. the payload decodes to exactly the shard's tensors (`bad_compression`), and the
   decoded Δ is finite everywhere (`decoded_not_finite`): finite int8 values times a
   finite but huge scale (e.g. 3e38) overflow to inf, which would spoil the copy check's
   cosines and the aggregate for everyone else.

`admit_window` admits every listed contribution of a window and adds a refusal for each
miner of the roster that has none: `unrevealed` when it committed, `missing` when not.

Only `load_contribution` reads tensor bytes (safetensors, after the signed manifest
passed); nothing is ever unpickled.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import torch

from averaging.compression import CompressionError, decode, expected_specs
from averaging.parts import WIRE_SCHEME, PartError, decode_payload
from averaging.sparseloco import SparseSpec
from chain.types import ContributionCommitment, Neuron
from store.api import Store
from store.backend import ContributionRef
from store.errors import Rejected
from store.manifest import Trajectory, commitment_digest
from store.safetensors_check import TORCH_DTYPES, TensorSpec
from tensormine.config import RunConfig
from train.config import ModelConfig
from train.shards import shard_for_miner

logger = logging.getLogger(__name__)

# Reasons of our own, next to the store's `store.errors.REASONS`.
LATE = "late"
UNCOMMITTED = "uncommitted"  # revealed without a commitment for the window
REVEAL_MISMATCH = "reveal_mismatch"  # the revealed manifest is not what was committed
UNREVEALED = "unrevealed"  # committed, but nothing that matches was revealed in time
NOT_A_MINER = "not_a_miner"
WRONG_SHARD = "wrong_shard"
COMPRESSION_MISMATCH = "compression_mismatch"
BAD_COMPRESSION = "bad_compression"
MISSING = "missing"  # a miner of the window published nothing (in time to be listed)
DECODED_NOT_FINITE = "decoded_not_finite"


@dataclass(frozen=True)
class Roster:
    """Who mines in a window and which shard each owns, read from the ledger once."""

    window: int
    shards: int
    miners: dict[str, int]  # hotkey -> UID, neurons without a validator permit
    validators: frozenset[str] = field(default_factory=frozenset)
    shared: bool = False  # shard 0 trained every window (`ModelConfig.expert_shards`)

    @classmethod
    def from_neurons(cls, neurons: Sequence[Neuron], *, model: ModelConfig, window: int) -> Roster:
        return cls(
            window=window,
            shards=model.shards,
            miners={n.hotkey: n.uid for n in neurons if not n.validator_permit},
            validators=frozenset(n.hotkey for n in neurons if n.validator_permit),
            shared=model.expert_shards,
        )

    def shard_of(self, uid: int) -> int:
        miners = sorted(self.miners.values())
        return shard_for_miner(uid, miners, self.window, self.shards, shared=self.shared)


@dataclass(frozen=True)
class Admitted:
    """A contribution that passed every check: its decoded fp32 Δ on its shard."""

    uid: int
    hotkey: str
    shard: int
    delta: dict[str, torch.Tensor]
    committed_block: int  # the ledger block that took its commitment: its time
    nbytes: int
    # What proof of work reads (`validation.proof_of_work`): the committed trajectory and
    # where the miner keeps its files (its answers go there too).
    trajectory: Trajectory | None = None
    source: str = ""


@dataclass(frozen=True)
class Refused:
    """A contribution (or a missing one) that scores 0, and why."""

    uid: int | None  # None when the hotkey is not a miner's
    hotkey: str
    shard: int | None
    reason: str
    detail: str


# (wire codec, part size, SparseLoCo spec on the sparseloco wire): how parts are cut and read.
Wire = tuple[str, int, SparseSpec | None]


def run_scheme(cfg: RunConfig) -> tuple[str, Wire | None]:
    """(the scheme every contribution of the run must use, `Wire` when that is ``wire``):
    with averaging on, a contribution is its wire parts."""
    avg = cfg.averaging
    if avg.enabled:
        return WIRE_SCHEME, (avg.wire, avg.wire_part_size_bytes, avg.sparse_spec)
    return cfg.compression.scheme, None


def payload_specs(
    shapes: Mapping[str, Sequence[int]], params: Mapping[str, object]
) -> dict[str, TensorSpec]:
    """The payload tensors a contribution of these parameter shapes must hold."""
    specs = expected_specs(shapes, params)
    return {k: TensorSpec(TORCH_DTYPES[dtype], shape) for k, (dtype, shape) in specs.items()}


def admit(
    store: Store,
    ref: ContributionRef,
    *,
    roster: Roster,
    window: int,
    shapes: Mapping[int, Mapping[str, Sequence[int]]],
    scheme: str,
    commitment: ContributionCommitment | None,
    deadline_block: int,
    wire: Wire | None = None,
) -> Admitted | Refused:
    """Run every admission check on `ref` (see the module docstring); never raises
    `Rejected` or `CompressionError`: those become a `Refused` with their reason.

    `shapes[s]` maps each parameter name of shard s to its shape (from the validator's own
    model), in the shard's order. With averaging on, `scheme` is ``wire`` and `wire` the
    run's (codec, part size): the payload is the parts the miner sent into its group's
    average (`averaging.parts`), each checked against its digest in the signed manifest
    and decoded as every reducer decoded it.
    """
    uid = roster.miners.get(ref.hotkey)
    if uid is None:
        what = "a validator" if ref.hotkey in roster.validators else "not registered"
        return Refused(None, ref.hotkey, ref.shard, NOT_A_MINER, f"{ref.hotkey} is {what}")
    shard = roster.shard_of(uid)
    if ref.shard != shard:
        return Refused(
            uid, ref.hotkey, shard, WRONG_SHARD, f"stored under shard {ref.shard}, owns {shard}"
        )
    if commitment is None:
        return Refused(
            uid, ref.hotkey, shard, UNCOMMITTED, f"no commitment on the ledger for window {window}"
        )
    if commitment.block >= deadline_block:
        return Refused(
            uid, ref.hotkey, shard, LATE,
            f"committed in block {commitment.block}, the deadline block is {deadline_block}",
        )  # fmt: skip
    try:
        manifest = store.read_manifest(ref)
        digest = commitment_digest(manifest)
        if digest != commitment.digest:
            return Refused(
                uid, ref.hotkey, shard, REVEAL_MISMATCH,
                f"revealed manifest hashes to {digest[:16]}…, committed {commitment.digest[:16]}…",
            )  # fmt: skip
        params = manifest.compression.params
        if manifest.compression.scheme != scheme or params.get("scheme") != scheme:
            return Refused(
                uid, ref.hotkey, shard, COMPRESSION_MISMATCH,
                f"scheme {manifest.compression.scheme!r} / params {params.get('scheme')!r}, "
                f"the run uses {scheme!r}",
            )  # fmt: skip
        expected = None
        if scheme != WIRE_SCHEME:
            try:
                expected = payload_specs(shapes[shard], params)
            except CompressionError as exc:
                return Refused(uid, ref.hotkey, shard, BAD_COMPRESSION, str(exc))
        # Verified again from here on: the signature covers the compression params read above.
        verified = store.load_contribution(
            ref, hotkey=ref.hotkey, uid=uid, window=window, shard=shard, expected=expected
        )
        if verified.manifest.compression != manifest.compression:
            return Refused(
                uid, ref.hotkey, shard, COMPRESSION_MISMATCH, "manifest changed while read"
            )
        if scheme == WIRE_SCHEME:
            if wire is None:
                raise ValueError("the wire scheme needs the run's wire codec and part size")
            delta = decode_payload(
                verified.tensors, params, shapes[shard], wire=wire[0], part_size_bytes=wire[1],
                sparse=wire[2],
            )  # fmt: skip
        else:
            delta = decode(verified.tensors, params, shapes[shard])
    except Rejected as exc:
        return Refused(uid, ref.hotkey, shard, exc.reason, exc.detail)
    except (CompressionError, PartError) as exc:
        return Refused(uid, ref.hotkey, shard, BAD_COMPRESSION, str(exc))
    for name, tensor in delta.items():
        if not bool(torch.isfinite(tensor).all()):
            return Refused(
                uid, ref.hotkey, shard, DECODED_NOT_FINITE,
                f"{name!r} decodes to NaN or infinity (payload finite, scale too large)",
            )  # fmt: skip
    return Admitted(
        uid=uid,
        hotkey=ref.hotkey,
        shard=shard,
        delta=delta,
        committed_block=commitment.block,
        nbytes=manifest.size,
        trajectory=manifest.trajectory,
        source=ref.source,
    )


def admit_window(
    store: Store,
    refs: Sequence[ContributionRef],
    *,
    roster: Roster,
    window: int,
    shapes: Mapping[int, Mapping[str, Sequence[int]]],
    commitments: Mapping[str, ContributionCommitment],
    deadline_block: int,
    cfg: RunConfig,
) -> tuple[list[Admitted], list[Refused]]:
    """`admit` each of `refs` (the window's listed contributions, `validation.listing`)
    under the run's scheme; then refuse each miner of `roster` with no listed contribution:
    `unrevealed` when it committed, `missing` when it did not."""
    admitted: list[Admitted] = []
    refused: list[Refused] = []
    scheme, wire = run_scheme(cfg)
    for ref in refs:
        outcome = admit(
            store, ref, roster=roster, window=window, shapes=shapes, scheme=scheme,
            commitment=commitments.get(ref.hotkey), deadline_block=deadline_block, wire=wire,
        )  # fmt: skip
        if isinstance(outcome, Refused):
            logger.info("window %d: refused %s: %s", window, ref.hotkey, outcome.reason)
            refused.append(outcome)
        else:
            admitted.append(outcome)
    listed = {a.uid for a in admitted} | {r.uid for r in refused if r.uid is not None}
    for hotkey, uid in sorted(roster.miners.items(), key=lambda kv: kv[1]):
        if uid in listed:
            continue
        committed = commitments.get(hotkey)
        if committed is None:
            reason, detail = MISSING, "no commitment and nothing revealed"
        else:
            reason = UNREVEALED
            detail = (
                f"committed in block {committed.block}, nothing revealed by the reveal deadline"
            )
        refused.append(Refused(uid, hotkey, roster.shard_of(uid), reason, detail))
    return admitted, refused
