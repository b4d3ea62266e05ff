"""`tensormine verify --window W`: is the published θ_{W+1} the model the public inputs make?

    result = verify_window(cfg, window=7)
    result.verdict        # "identical" | "within the wire's rounding" | "differs"
    result.lines()        # what a person reads: inputs, refusals, per-shard errors

θ_{W+1} is one function of public inputs (DESIGN, "The loop"): the checkpoint of W (θ_W
and the outer momentum published with it), the contributions committed on the ledger
before W's deadline and revealed in their miners' stores, the ledger's weights pinned to
the last epoch at or before W's first block, the robust rule and the outer step. This
module recomputes it from the store and the ledger alone and compares it with the
checkpoint of W+1:

- every contributor the checkpoint names must pass admission as a validator runs it
  (commitment before the deadline, reveal matching it, signature, shard, shapes, finite
  values), and its weight must be the pinned ledger weight's share;
- each shard's recomputed average goes through the outer step from θ_W with the
  published momentum; the result is compared tensor by tensor with the checkpoint.

With `averaging.overlap` θ_{W+1} steps window W − 1's average (`train.overlap`): its
contributors are window W − 1's, checked against W − 1's deadline and pinned weights.

"identical" means the same fingerprint. A contribution is the wire parts its miner sent
into its group (`averaging.parts`), and `reduce_parts` combines them per part as every
reducer does, so an honest group's average, and the checkpoint built on it, come out the
same bit for bit. "within the wire's rounding" is left for a group that dropped a member
after its parts reached some reducers (the relative error of the update at most
`validation.group_tolerance`); anything else "differs", with the shards and the problems
named.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import tempfile
from pathlib import Path

import torch

from averaging.outer import outer_step
from averaging.parts import reduce_parts
from averaging.weights import LedgerWeights
from chain.errors import ChainError
from chain.factory import open_chain
from chain.interface import Chain
from common.errors import TensormineError
from store.api import Store, open_store
from store.checkpoint import Provenance
from store.errors import NotFound
from tensormine.config import RunConfig
from train.model import build_model, model_fingerprint
from train.shards import shard_map
from train.startup import load_checkpoint_momentum, load_checkpoint_weights
from train.windows import deadline, reveal_deadline, start_block
from validation.admission import Admitted, Refused, Roster, admit, run_scheme
from validation.listing import committed_location
from validation.next_model import weight_shares

logger = logging.getLogger(__name__)

IDENTICAL = "identical"
WITHIN = "within the wire's rounding"
DIFFERS = "differs"


class VerifyError(TensormineError, RuntimeError):
    """The inputs to recompute θ_{W+1} are not there (a checkpoint, the ledger)."""


@dataclasses.dataclass
class VerifyResult:
    window: int
    verdict: str
    published_fingerprint: str
    recomputed_fingerprint: str
    relative_error: float  # ‖θ_pub − θ_re‖ / ‖θ_re − θ_W‖ over all shards
    contributors: int
    problems: list[str] = dataclasses.field(default_factory=list)  # named, one per line
    shard_errors: dict[int, float] = dataclasses.field(default_factory=dict)

    def lines(self) -> list[str]:
        head = (
            f"window {self.window} -> {self.window + 1}: {self.verdict} "
            f"(published {self.published_fingerprint[:16]}…, recomputed "
            f"{self.recomputed_fingerprint[:16]}…, relative error {self.relative_error:.3g}, "
            f"{self.contributors} contributors)"
        )
        shards = [
            f"  shard {s}: relative error {e:.3g}" for s, e in sorted(self.shard_errors.items())
        ]
        return [head, *shards, *(f"  {p}" for p in self.problems)]


def _contribution(
    store: Store,
    ledger: Chain,
    cfg: RunConfig,
    window: int,
    hotkey: str,
    roster: Roster,
    shapes: dict[int, dict[str, tuple[int, ...]]],
) -> Admitted | Refused:
    """`hotkey`'s revealed contribution of `window`, from the location it committed,
    through the validators' admission."""
    uid = roster.miners.get(hotkey)
    if uid is None:
        return Refused(None, hotkey, None, "not_a_miner", "not a miner of the window")
    shard = roster.shard_of(uid)
    source = committed_location(
        ledger.commitments().get(hotkey), own=store.contributions_location,
        backend=cfg.store.backend,
    )  # fmt: skip
    refs = [
        r for r in store.list_contributions(window, shard, sources=[source]) if r.hotkey == hotkey
    ]
    if not refs:
        return Refused(uid, hotkey, shard, "unrevealed", f"nothing revealed at {source}")
    scheme, wire = run_scheme(cfg)
    return admit(
        store, refs[0], roster=roster, window=window, shapes=shapes, scheme=scheme,
        commitment=ledger.contribution_commitment(
            hotkey, window, block=reveal_deadline(window, cfg.window)
        ),
        deadline_block=deadline(window, cfg.window), wire=wire,
    )  # fmt: skip


def verify_window(cfg: RunConfig, window: int, *, workdir: Path | None = None) -> VerifyResult:
    """Recompute θ_{window+1} from the store and the ledger; compare with the published one."""
    store = open_store(cfg.store, create=False)
    try:
        ledger = open_chain(cfg.chain)
    except (FileNotFoundError, ChainError) as exc:
        raise VerifyError(f"no chain: {exc}") from None
    with ledger, tempfile.TemporaryDirectory(dir=workdir) as tmp:
        # θ_W is W's checkpoint, else the latest one before it (what miners start from).
        start = max((r.window for r in store.list_checkpoints() if r.window <= window), default=-1)
        folders = {}
        for w, want in ((window, start), (window + 1, window + 1)):
            try:
                folders[w] = store.pull_checkpoint(Path(tmp) / f"w{w}", window=want, progress=False)
            except NotFound as exc:
                raise VerifyError(f"no published checkpoint of window {want}: {exc}") from None
        prov: Provenance = folders[window + 1].provenance
        model = build_model(cfg.model, cfg.run.seed)
        model.load_state_dict(load_checkpoint_weights(folders[window].path))
        momentum = load_checkpoint_momentum(folders[window].path, model)
        shards = shard_map(model, cfg.model.shards)
        params = dict(model.named_parameters())
        shapes = {s: {n: tuple(params[n].shape) for n in names} for s, names in enumerate(shards)}
        theta = {n: t.detach().clone() for n, t in model.state_dict().items()}
        published = load_checkpoint_weights(folders[window + 1].path)
        # With overlap θ_{W+1} steps the average of window W − 1 (`train.overlap`).
        landed = window - 1 if cfg.averaging.overlap_mode != "off" else window
        roster = Roster.from_neurons(ledger.neurons(), model=cfg.model, window=landed)
        pinned = LedgerWeights(ledger, cfg.averaging.weights, cfg.averaging.weight_floor)
        weights = pinned.table(start_block(max(landed, 0), cfg.window))
        problems: list[str] = []
        by_shard: dict[int, list[tuple[Admitted, float]]] = {}
        for c in prov.contributors:
            got = _contribution(store, ledger, cfg, landed, c.hotkey, roster, shapes)
            if isinstance(got, Refused):
                problems.append(
                    f"UID {c.uid} ({c.hotkey[:8]}…) is in it but {got.reason}: {got.detail}"
                )
                continue
            if c.shard is not None and c.shard != got.shard:
                problems.append(f"UID {c.uid} is listed for shard {c.shard}, owns {got.shard}")
            by_shard.setdefault(got.shard, []).append((got, c.weight))
        recomputed = dict(theta)
        for shard, members in sorted(by_shard.items()):
            members.sort(key=lambda m: m[0].hotkey)
            ledger_w = [weights.get(a.hotkey, cfg.averaging.weight_floor) for a, _ in members]
            shares = weight_shares(
                [a.hotkey for a, _ in members], weights, cfg.averaging.weight_floor
            )
            for (a, listed), share in zip(members, shares, strict=True):
                if not math.isclose(listed, share, rel_tol=1e-6, abs_tol=1e-9):
                    problems.append(
                        f"UID {a.uid}: weight {listed:.6g} in the checkpoint, the ledger's "
                        f"pinned share is {share:.6g}"
                    )
            avg = cfg.averaging
            average = reduce_parts(
                [a.delta for a, _ in members], ledger_w, shapes[shard],
                avg.wire, avg.wire_part_size_bytes, avg.robust,
            )  # fmt: skip
            names = shards[shard]
            mom = {n: momentum[n] for n in names if n in momentum}
            new, _ = outer_step({n: theta[n] for n in names}, average, mom, cfg.outer)
            recomputed.update(new)
        shard_errors: dict[int, float] = {}
        num = den = 0.0
        for shard, names in enumerate(shards):
            d_num = sum(float((published[n] - recomputed[n]).double().norm() ** 2) for n in names)
            d_den = sum(float((recomputed[n] - theta[n]).double().norm() ** 2) for n in names)
            if d_num or d_den:
                shard_errors[shard] = math.sqrt(d_num) / max(math.sqrt(d_den), 1e-30)
            num, den = num + d_num, den + d_den
        outside = [
            n for n in published if n not in {m for names in shards for m in names}
            and not torch.equal(published[n], theta[n])
        ]  # fmt: skip
        if outside:
            problems.append(f"tensors outside every shard changed: {outside[:5]}")
        error = math.sqrt(num) / max(math.sqrt(den), 1e-30) if num else 0.0
        fp_pub, fp_re = model_fingerprint(published), model_fingerprint(recomputed)
        if prov.fingerprint is not None and prov.fingerprint != fp_pub:
            problems.append("the checkpoint's files do not hash to the fingerprint it claims")
        if fp_pub == fp_re and not problems:
            verdict = IDENTICAL
        elif error <= cfg.validation.group_tolerance and not problems:
            verdict = WITHIN
        else:
            verdict = DIFFERS
        return VerifyResult(
            window=window, verdict=verdict, published_fingerprint=fp_pub,
            recomputed_fingerprint=fp_re, relative_error=error,
            contributors=len(prov.contributors), problems=problems, shard_errors=shard_errors,
        )  # fmt: skip
