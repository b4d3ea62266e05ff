"""Proof of work: spot-check that a contribution is H real steps on the assigned pages.

    checker = SpotChecker(cfg, keypair, store, secret, shards, shapes, pages.train, device)
    issued = checker.issue(window, admitted, block=b, block_hash=h)    # after the deadline
    ...                                                                # score the window
    verdicts = checker.settle(window, issued, theta_w, until=t)        # uid -> PowVerdict

The loss-delta score ranks how useful a Δ is; it cannot tell H steps from H/2 steps and a
doubled Δ. So a miner commits, with its Δ, to the digests of its shard's state at every
segment bound of its inner loop (`train.trajectory`), the last being θ_H. After the
deadline each validator draws `validation.pow_checks` segments per contribution from a
seed the miner could not know when it committed: the validator's secret and the hash of
the deadline block (`challenge_seed`). It writes a signed challenge into its store; the
miner answers with the states at the ends of those segments (`store.proofs`). The
validator checks the states against the committed digests, reruns the segment's steps
from its start (the miner's parameters and AdamW moments) on the pages the miner was
assigned, and compares the update the miner claims, ``end − start``, with the one it
recomputed: relative error ≤ `validation.pow_max_rel_error` and cosine ≥
`validation.pow_min_cosine` (IOTA's validators compare recomputed work by cosine and
magnitude the same way). A segment ending at H also binds the trajectory to the Δ: the
published payload must be exactly what the run's codec makes of θ_w − θ_H.

Everything a miner can get wrong has a name (`PowVerdict.reason`): ``no_trajectory``,
``bad_trajectory`` (not the run's segment bounds), ``unanswered`` (nothing by the time
the validator settles), ``bad_answer`` / ``bad_signature`` / ``wrong_window`` (the answer
document), ``too_large`` / ``size_mismatch`` / ``name_mismatch`` / ``shape_mismatch`` /
``dtype_mismatch`` / ``not_finite`` (the state files, checked before they are loaded),
``state_mismatch`` (a revealed state is not the committed one), ``recompute`` (the steps
do not give the claimed end) and ``end_mismatch`` (θ_H is not what the Δ was made from).
A failed check does not change θ_{w+1} (admission, which is public, decides that); it
costs the miner its score for the window and a strike, and with
`validation.pow_fail_resets` its moving average starts again from zero.

Why a segment drawn at random is enough: skipped, scaled or misplaced work must sit in
segments whose end does not follow from their start, and each segment is drawn with
probability ``checks / segments`` (`choose_segments`), so a miner that fakes a fraction
f of its steps is caught in a window with probability about f · checks (exactly
1 − C(n−k, m)/C(n, m) for k of n segments and m checks). A catch costs the window and,
through the reset, what the moving average had built. With reset probability p per
window a cheat that scores g × an honest miner's keeps, in expectation,
``(1 − p)·α·g / (α + p − α·p)`` of the honest moving average: at α = 0.3 and one check
(p = f), faking half the steps (f = 0.5) needs g > 4.3 to match an honest miner's pay
and g > 2.2 to match its pay per step computed; scaling the Δ of H/2 steps earned
1.13–1.35× before these checks (benchmarks/RESULTS.md, "Proof of work").
"""

from __future__ import annotations

import hashlib
import logging
import math
import random
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np
import torch
from accelerate import Accelerator

from averaging.compression import decode, encode
from averaging.parts import WIRE_SCHEME, wire_parts
from chain.interface import SigningKey
from store import layout
from store.api import Store
from store.errors import Rejected, StoreError
from store.proofs import (
    ANSWER_FILE,
    Answer,
    Challenge,
    SegmentAnswer,
    load_segment,
    message_bytes,
    parse_message,
    segment_bytes,
    segment_specs,
    sign_message,
)
from tensormine.config import RunConfig
from train.inner import inner_loop
from train.model import build_model
from train.pages import Affinity, assigned_pages
from train.shards import make_trainable
from train.startup import resolve_mixed_precision
from train.trajectory import digest_of_state, segment_bounds, state_digest, tensors_digest
from validation.admission import Admitted, run_scheme

logger = logging.getLogger(__name__)

PASS = "pass"
FAIL = "fail"
POLL_S = 0.25


@dataclass
class PowVerdict:
    """What one validator's spot check found of one contribution."""

    ok: bool
    reason: str | None = None
    detail: str = ""
    segments: tuple[int, ...] = ()
    rel_error: float | None = None  # the worst checked segment's
    cosine: float | None = None
    seconds: float = 0.0  # recomputing

    @property
    def label(self) -> str:
        return PASS if self.ok else f"{FAIL}: {self.reason}"


@dataclass
class Issued:
    """A contribution and the challenge sent for it (or the verdict it already has)."""

    admitted: Admitted
    challenge: Challenge | None
    verdict: PowVerdict | None = None
    issued_at: float = field(default_factory=time.monotonic)


def challenge_seed(secret: bytes, window: int, block_hash: str, hotkey: str) -> bytes:
    """The seed of a contribution's challenge: unknown to its miner when it committed
    (the deadline block did not exist, and the secret is the validator's)."""
    return hashlib.sha256(
        b"tensormine-pow/1" + secret + f":{window}:{block_hash}:{hotkey}".encode()
    ).digest()


def choose_segments(seed: bytes, segments: int, checks: float) -> tuple[int, ...]:
    """Distinct segment indices of `segments`, drawn from `seed`, ascending: ⌊checks⌋ of
    them, and one more with probability ``checks − ⌊checks⌋`` (so each segment is checked
    with probability checks / segments). May be empty."""
    rng = random.Random(int.from_bytes(seed, "big"))
    whole = math.floor(checks)
    count = whole + (1 if rng.random() < checks - whole else 0)
    return tuple(sorted(rng.sample(range(segments), min(count, segments))))


def compare_update(
    start: Mapping[str, torch.Tensor],
    claimed: Mapping[str, torch.Tensor],
    recomputed: Mapping[str, torch.Tensor],
) -> tuple[float, float]:
    """(relative error, cosine) of the claimed update ``claimed − start`` against the
    recomputed one ``recomputed − start``, over every tensor of the shard (float64)."""
    diff = dot = claimed_sq = ref_sq = 0.0
    for name, s in start.items():
        base = s.detach().to("cpu", torch.float64)
        c = claimed[name].detach().to("cpu", torch.float64) - base
        r = recomputed[name].detach().to("cpu", torch.float64) - base
        diff += float(((c - r) ** 2).sum())
        dot += float((c * r).sum())
        claimed_sq += float((c**2).sum())
        ref_sq += float((r**2).sum())
    if ref_sq == 0.0:
        return (0.0, 1.0) if claimed_sq == 0.0 else (math.inf, 0.0)
    cosine = dot / math.sqrt(claimed_sq * ref_sq) if claimed_sq > 0 else 0.0
    return math.sqrt(diff / ref_sq), cosine


def end_binding(
    delta: Mapping[str, torch.Tensor], published: Mapping[str, torch.Tensor], cfg: RunConfig
) -> str | None:
    """Why the published Δ (decoded, as admitted) is not the run's encoding of `delta`
    (= θ_w − θ_H on the shard), or None when it is, bit for bit. Codecs with error
    feedback send Δ plus a private residual, which no validator can recompute: their
    end is not bound here (`None`)."""
    scheme, wire = run_scheme(cfg)
    shapes = {n: tuple(t.shape) for n, t in delta.items()}
    if scheme == WIRE_SCHEME:
        assert wire is not None
        if wire[0] in ("topk", "sparseloco"):
            return None
        _, expected = wire_parts(dict(delta), wire[0], wire[1], sparse=wire[2])
    else:
        feeds_back = cfg.compression.scheme == "sparseloco" or (
            cfg.compression.scheme == "topk" and cfg.compression.error_feedback
        )
        if feeds_back:
            return None
        enc = encode(dict(delta), cfg.compression, None)
        expected = decode(enc.tensors, enc.params, shapes)
    differ = [n for n in delta if not torch.equal(expected[n], published[n].to("cpu"))]
    if differ:
        return f"the published Δ is not θ_w − θ_H encoded (tensors {differ[:3]} differ)"
    return None


class SpotChecker:
    """One validator's proof-of-work checks (see the module docstring)."""

    def __init__(
        self,
        cfg: RunConfig,
        keypair: SigningKey,
        store: Store,
        secret: bytes,
        shards: Sequence[Sequence[str]],
        shapes: Mapping[int, Mapping[str, tuple[int, ...]]],
        train_pages: np.ndarray,
        device: torch.device,
        affinities: Mapping[int, Affinity] | None = None,
    ) -> None:
        self.cfg, self.vcfg = cfg, cfg.validation
        self.keypair, self.store, self.secret = keypair, store, secret
        self.shards, self.shapes = shards, shapes
        self.train_pages = train_pages
        self.affinities = dict(affinities or {})  # expert shards' page affinities
        self.device = device
        self.bounds = (
            segment_bounds(cfg.train.inner_steps, cfg.train.trajectory_segments)
            if cfg.train.pow_segments
            else []
        )
        self._model: torch.nn.Module | None = None

    @property
    def enabled(self) -> bool:
        return self.vcfg.pow_checks > 0 and bool(self.bounds)

    # ---- challenges --------------------------------------------------------------------
    def issue(
        self, window: int, admitted: Sequence[Admitted], *, block: int, block_hash: str
    ) -> list[Issued]:
        """Draw and write a challenge for every admitted contribution (those without a
        trajectory, or with another segmentation, fail at once)."""
        out = []
        for a in admitted:
            t = a.trajectory
            if t is None:
                out.append(Issued(a, None, PowVerdict(False, "no_trajectory", "no trajectory")))
                continue
            if list(t.bounds) != self.bounds:
                detail = f"bounds {list(t.bounds)[:8]} are not the run's {self.bounds}"
                out.append(Issued(a, None, PowVerdict(False, "bad_trajectory", detail)))
                continue
            seed = challenge_seed(self.secret, window, block_hash, a.hotkey)
            segments = choose_segments(seed, len(self.bounds) - 1, self.vcfg.pow_checks)
            if not segments:
                continue  # not drawn this window (pow_checks < 1): keeps its score
            challenge = sign_message(
                Challenge(
                    window=window, miner=a.hotkey, validator=self.keypair.address,
                    segments=segments, block=block, block_hash=block_hash,
                ),
                self.keypair,
            )  # fmt: skip
            path = layout.challenge_path(window, a.hotkey, self.keypair.address)
            folder, name = path.rsplit("/", 1)
            try:
                self.store.put_files(
                    folder, {name: message_bytes(challenge)}, message=f"challenge {path}"
                )
            except StoreError as exc:
                # Our store failed, not the miner: it keeps its score unchecked this window.
                logger.warning("window %d: cannot write the challenge %s: %s", window, path, exc)
                continue
            out.append(Issued(a, challenge))
        return out

    # ---- answers -----------------------------------------------------------------------
    def settle(
        self,
        window: int,
        issued: Sequence[Issued],
        theta: Mapping[str, torch.Tensor],
        *,
        until: float,
        start_of: Callable[[Admitted], Mapping[str, torch.Tensor]] | None = None,
    ) -> dict[int, PowVerdict]:
        """Wait (until `time.monotonic()` reaches `until`) for each challenged miner's
        answer and check it; an answer still missing then is ``unanswered``. `theta` is
        θ_w, where every trajectory starts, unless `start_of` gives a miner's own start
        (eager overlap: `train.overlap.start_for`)."""
        verdicts = {i.admitted.uid: i.verdict for i in issued if i.verdict is not None}
        pending = [i for i in issued if i.verdict is None]
        while pending:
            waiting = []
            for item in pending:
                got = self._fetch_answer(window, item)
                if got is None:
                    waiting.append(item)
                else:
                    start = theta if start_of is None else start_of(item.admitted)
                    verdicts[item.admitted.uid] = self._check(window, item, got, start)
            pending = waiting
            if pending and time.monotonic() >= until:
                for item in pending:
                    verdicts[item.admitted.uid] = PowVerdict(
                        False, "unanswered", "no answer in time", item.challenge.segments
                        if item.challenge else (),
                    )  # fmt: skip
                break
            if pending:
                time.sleep(POLL_S)
        return verdicts

    def _answer_dir(self, window: int, hotkey: str) -> str:
        return layout.answer_dir(window, self.keypair.address, hotkey)

    def _fetch_answer(self, window: int, item: Issued) -> Answer | PowVerdict | None:
        """The miner's answer document, a failed verdict, or None while there is none."""
        a = item.admitted
        try:
            path = self.store.fetch_file(
                a.source, f"{self._answer_dir(window, a.hotkey)}/{ANSWER_FILE}", 1 << 16
            )
            if path is None:
                return None
            answer = parse_message(Answer, path.read_bytes(), signer=a.hotkey)
        except Rejected as exc:
            return PowVerdict(False, exc.reason, exc.detail)
        except (StoreError, OSError) as exc:
            logger.warning("window %d: cannot read %s's answer: %s", window, a.hotkey, exc)
            return None
        return answer

    def _check(
        self,
        window: int,
        item: Issued,
        got: Answer | PowVerdict,
        theta: Mapping[str, torch.Tensor],
    ) -> PowVerdict:
        assert item.challenge is not None
        segments = item.challenge.segments
        if isinstance(got, PowVerdict):
            got.segments = segments
            return got
        if got.window != window:
            return PowVerdict(False, "wrong_window", f"answer is for window {got.window}", segments)
        if got.validator != self.keypair.address or got.miner != item.admitted.hotkey:
            return PowVerdict(False, "bad_answer", "answer addressed elsewhere", segments)
        if tuple(s.index for s in got.segments) != segments:
            detail = f"answers segments {[s.index for s in got.segments]}, asked {list(segments)}"
            return PowVerdict(False, "bad_answer", detail, segments)
        started = time.perf_counter()
        worst_rel, worst_cos = 0.0, 1.0
        for seg in got.segments:
            try:
                rel, cos = self._check_segment(window, item.admitted, seg, theta)
            except Rejected as exc:
                return PowVerdict(False, exc.reason, f"segment {seg.index}: {exc.detail}", segments)
            except _Failed as exc:
                return PowVerdict(
                    False, exc.reason, f"segment {seg.index}: {exc}", segments,
                    exc.rel_error, exc.cosine, time.perf_counter() - started,
                )  # fmt: skip
            worst_rel, worst_cos = max(worst_rel, rel), min(worst_cos, cos)
        return PowVerdict(
            True, None, "", segments, worst_rel, worst_cos, time.perf_counter() - started
        )

    def _check_segment(
        self,
        window: int,
        a: Admitted,
        seg: SegmentAnswer,
        theta: Mapping[str, torch.Tensor],
    ) -> tuple[float, float]:
        assert a.trajectory is not None
        names = list(self.shards[a.shard])
        shapes = self.shapes[a.shard]
        begin, end_step = self.bounds[seg.index], self.bounds[seg.index + 1]
        at_zero = begin == 0
        limit = segment_bytes(segment_specs(names, shapes, starts_at_zero=at_zero)) + (1 << 20)
        path = self.store.fetch_file(
            a.source, f"{self._answer_dir(window, a.hotkey)}/{seg.file}", limit
        )
        if path is None:
            raise Rejected("not_found", f"{seg.file} is missing")
        # No sha256 of the file: its every byte is bound by the state digests checked below.
        if path.stat().st_size != seg.size:
            raise Rejected("size_mismatch", f"{seg.file} is not the size the answer names")
        start, end = load_segment(path, names, shapes, starts_at_zero=at_zero)
        states = a.trajectory.states
        if (
            start is not None
            and digest_of_state(begin, start, start, names) != states[seg.index - 1]
        ):
            raise _Failed("state_mismatch", f"the state at step {begin} is not the committed one")
        end_digest = state_digest(end_step, tensors_digest(end, names), seg.end_moments)
        if end_digest != states[seg.index]:
            raise _Failed(
                "state_mismatch", f"the state at step {end_step} is not the committed one"
            )
        start_params = (
            {n: theta[n] for n in names} if start is None else {n: start[n] for n in names}
        )
        moments = None if start is None else {k: v for k, v in start.items() if "::" in k}
        recomputed = self.recompute(
            a.hotkey, window, names, theta, start_params, moments, begin, end_step,
            affinity=self.affinities.get(a.shard),
        )  # fmt: skip
        rel, cos = compare_update(start_params, end, recomputed)
        if not (rel <= self.vcfg.pow_max_rel_error and cos >= self.vcfg.pow_min_cosine):
            raise _Failed(
                "recompute",
                f"steps {begin}..{end_step} recompute to another end (relative error "
                f"{rel:.3g}, cosine {cos:.4f})",
                rel, cos,
            )  # fmt: skip
        if end_step == self.bounds[-1]:
            delta = {n: theta[n].to("cpu", torch.float32) - end[n] for n in names}
            why = end_binding(delta, a.delta, self.cfg)
            if why is not None:
                raise _Failed("end_mismatch", why, rel, cos)
        return rel, cos

    # ---- recomputation -----------------------------------------------------------------
    def recompute(
        self,
        hotkey: str,
        window: int,
        names: Sequence[str],
        theta: Mapping[str, torch.Tensor],
        start: Mapping[str, torch.Tensor],
        moments: Mapping[str, torch.Tensor] | None,
        begin: int,
        end: int,
        *,
        affinity: Affinity | None = None,
    ) -> dict[str, torch.Tensor]:
        """The shard's parameters after steps [begin, end) of `hotkey`'s window, run from
        `start` (and AdamW `moments`) on the pages it was assigned (with its shard's
        `affinity`), with θ_w elsewhere."""
        cfg = self.cfg
        if self._model is None:
            self._model = build_model(cfg.model, cfg.run.seed, device=self.device)
        model = self._model
        # A fresh accelerator per segment, dropped after it: what it prepared goes with it,
        # without `free_memory`'s full garbage collection (0.27 s a check in a test process).
        acc = Accelerator(
            cpu=self.device.type == "cpu",
            mixed_precision=resolve_mixed_precision(cfg.train.mixed_precision),
        )
        model.load_state_dict({k: v.to(self.device) for k, v in theta.items()})
        params = dict(model.named_parameters())
        with torch.no_grad():
            for n in names:
                params[n].copy_(start[n].to(self.device))
        make_trainable(model, names)
        idx = assigned_pages(
            hotkey, window, cfg.run.seed, self.train_pages.shape[0], cfg.train.pages_per_window,
            affinity,
        )  # fmt: skip
        pages = torch.from_numpy(self.train_pages[idx])
        inner_loop(
            acc, model, names, pages, cfg.train, start_step=begin, stop_step=end,
            moments=moments, release=False,
        )  # fmt: skip
        return {n: params[n].detach().to("cpu", torch.float32).clone() for n in names}


class _Failed(Exception):
    """A segment whose states or recomputation do not hold up."""

    def __init__(
        self, reason: str, detail: str, rel_error: float | None = None, cosine: float | None = None
    ) -> None:
        super().__init__(detail)
        self.reason, self.rel_error, self.cosine = reason, rel_error, cosine
