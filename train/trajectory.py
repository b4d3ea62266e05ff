"""A miner's inner trajectory, committed so that validators can spot-check its work.

    bounds = segment_bounds(H, cfg.train.pow_segments)      # e.g. [0, 5, 10, 15, 20]
    keeper = TrajectoryKeeper(run_dir / "trajectory")
    inner_loop(..., boundaries=bounds[1:], on_boundary=keeper.recorder(window, shard, bounds))
    digests = keeper.digests(window, bounds)                 # one per bound after 0
    manifest ... trajectory=Trajectory(bounds=bounds, states=digests)

Proof of learning measures how useful a Δ is, not how much work made it: a miner that
trains H/2 steps and doubles its Δ gets about the same score for half the compute. So
with its Δ a miner commits to its inner trajectory: the sha256 of its shard's state (the
parameters and AdamW's moments, everything the next step needs) at every segment bound,
the last one being θ_H, the end of the window's H steps (θ_w − Δ). The state at step 0 is
public (θ_w's shard and zero moments). After the commitment a validator picks segments
with randomness the miner could not know, the miner reveals the states at their ends,
and the validator recomputes the segment's steps on the pages the miner was assigned
(`validation.proof_of_work`). Skipped, scaled or misplaced work lands in some segment
that does not recompute, so it is caught with the probability that segment is drawn;
and the last state must be the θ_H the published Δ was made from.

A state's digest is ``sha256("tensormine-state/1:<step>:<params>:<moments>")`` over the
digests of its two halves, so a validator can check a revealed end state from its
parameters alone and the miner's word for the moments' digest (it has no use for the
end's moments; it recomputes its own).
"""

from __future__ import annotations

import hashlib
import json
import logging
import re
import shutil
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

import torch
from torch import nn

logger = logging.getLogger(__name__)

EXP_AVG = "exp_avg"
EXP_AVG_SQ = "exp_avg_sq"
MOMENT_KINDS = (EXP_AVG, EXP_AVG_SQ)
_STATE_FILE = re.compile(r"^state-(0|[1-9][0-9]{0,8})\.safetensors$")


def segment_bounds(steps: int, segments: int) -> list[int]:
    """The steps at which a trajectory of `steps` inner steps is cut into `segments`
    segments of (nearly) equal length: ``[0, …, steps]``, strictly increasing."""
    if steps < 1 or segments < 1:
        raise ValueError(f"need steps ≥ 1 and segments ≥ 1, got {steps} and {segments}")
    if segments > steps:
        raise ValueError(f"{segments} segments do not fit in {steps} steps")
    return [round(i * steps / segments) for i in range(segments + 1)]


def moment_name(name: str, kind: str) -> str:
    return f"{name}::{kind}"


def tensors_digest(tensors: Mapping[str, torch.Tensor], names: Sequence[str]) -> str:
    """sha256 over `names` in order: each one's name, dtype and shape, then its bytes
    (fp32, C order). Any bit of any value changes it."""
    h = hashlib.sha256()
    for name in names:
        t = tensors[name].detach().to("cpu", torch.float32).contiguous()
        h.update(json.dumps([name, "float32", list(t.shape)]).encode())
        h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def moment_names(names: Sequence[str]) -> list[str]:
    return [moment_name(n, kind) for n in names for kind in MOMENT_KINDS]


def state_digest(step: int, params_digest: str, moments_digest: str) -> str:
    """The digest a trajectory commits to at `step`."""
    return hashlib.sha256(
        f"tensormine-state/1:{step}:{params_digest}:{moments_digest}".encode()
    ).hexdigest()


def digest_of_state(
    step: int,
    params: Mapping[str, torch.Tensor],
    moments: Mapping[str, torch.Tensor],
    names: Sequence[str],
) -> str:
    return state_digest(
        step, tensors_digest(params, names), tensors_digest(moments, moment_names(names))
    )


def _inner(optimizer: torch.optim.Optimizer) -> torch.optim.Optimizer:
    """The torch optimizer under accelerate's wrapper (which keeps it as `.optimizer`)."""
    return getattr(optimizer, "optimizer", optimizer)


def read_moments(
    optimizer: torch.optim.Optimizer, params: Mapping[str, nn.Parameter]
) -> dict[str, torch.Tensor]:
    """AdamW's moments of `params` (name -> parameter), as ``name::exp_avg`` and
    ``name::exp_avg_sq`` fp32 CPU tensors; zeros for a parameter without state yet."""
    state = _inner(optimizer).state
    out = {}
    for name, p in params.items():
        got = state.get(p, {})
        for kind in MOMENT_KINDS:
            value = got.get(kind)
            out[moment_name(name, kind)] = (
                value.detach().to("cpu", torch.float32).clone()
                if value is not None
                else torch.zeros(p.shape, dtype=torch.float32)
            )
    return out


def load_moments(
    optimizer: torch.optim.Optimizer,
    params: Mapping[str, nn.Parameter],
    moments: Mapping[str, torch.Tensor],
    step: int,
) -> None:
    """Give AdamW the state it had after `step` steps: these moments and the step count
    its bias correction reads."""
    state = _inner(optimizer).state
    for name, p in params.items():
        state[p] = {
            "step": torch.tensor(float(step)),
            EXP_AVG: moments[moment_name(name, EXP_AVG)].to(p.device, p.dtype).clone(),
            EXP_AVG_SQ: moments[moment_name(name, EXP_AVG_SQ)].to(p.device, p.dtype).clone(),
        }


BoundaryHook = Callable[[int, Mapping[str, torch.Tensor], Mapping[str, torch.Tensor]], None]


class TrajectoryKeeper:
    """The states a miner committed to, kept on disk until the window's challenges close.

    ``<root>/window-<w>/state-<step>.safetensors`` holds the shard's parameters under their
    names and the moments under ``name::exp_avg`` / ``name::exp_avg_sq``; `digests` are
    computed as the states are recorded. Only the main process of a miner records."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self._digests: dict[int, dict[int, str]] = {}

    def folder(self, window: int) -> Path:
        return self.root / f"window-{window}"

    def path(self, window: int, step: int) -> Path:
        return self.folder(window) / f"state-{step}.safetensors"

    def start(self, window: int, shard: int, bounds: Sequence[int]) -> None:
        """Forget whatever an earlier attempt at `window` recorded; note its shard and
        segment bounds (``meta.json``) for answering challenges later."""
        shutil.rmtree(self.folder(window), ignore_errors=True)
        self.folder(window).mkdir(parents=True, exist_ok=True)
        meta = {"shard": shard, "bounds": list(bounds)}
        (self.folder(window) / "meta.json").write_text(json.dumps(meta))
        self._digests[window] = {}

    def meta(self, window: int) -> tuple[int, list[int]] | None:
        """(shard, bounds) of a kept window, None if it has none."""
        try:
            meta = json.loads((self.folder(window) / "meta.json").read_text())
        except (FileNotFoundError, ValueError):
            return None
        return int(meta["shard"]), [int(b) for b in meta["bounds"]]

    def record(
        self,
        window: int,
        step: int,
        params: Mapping[str, torch.Tensor],
        moments: Mapping[str, torch.Tensor],
    ) -> str:
        from safetensors.torch import save_file

        names = list(params)
        cpu = {n: params[n].detach().to("cpu", torch.float32).contiguous() for n in names}
        cpu.update(
            {k: v.detach().to("cpu", torch.float32).contiguous() for k, v in moments.items()}
        )
        digest = digest_of_state(step, cpu, cpu, names)
        tmp = self.path(window, step).with_suffix(".tmp")
        save_file(cpu, str(tmp))
        tmp.replace(self.path(window, step))
        self._digests.setdefault(window, {})[step] = digest
        return digest

    def recorder(self, window: int, shard: int, bounds: Sequence[int]) -> BoundaryHook:
        """The `inner_loop(on_boundary=...)` hook that records `window`'s states."""
        self.start(window, shard, bounds)

        def hook(
            step: int, params: Mapping[str, torch.Tensor], moments: Mapping[str, torch.Tensor]
        ) -> None:
            self.record(window, step, params, moments)

        return hook

    def digests(self, window: int, bounds: Sequence[int]) -> list[str]:
        """The committed digests of `window`: one per bound after 0, in order."""
        got = self._digests.get(window, {})
        missing = [b for b in bounds[1:] if b not in got]
        if missing:
            raise ValueError(f"window {window}: no state recorded at steps {missing}")
        return [got[b] for b in bounds[1:]]

    def load(self, window: int, step: int) -> dict[str, torch.Tensor] | None:
        """Every tensor of the state at `step` (parameters and moments), or None."""
        from safetensors.torch import load_file

        path = self.path(window, step)
        return load_file(str(path)) if path.is_file() else None

    def windows(self) -> list[int]:
        if not self.root.is_dir():
            return []
        return sorted(
            int(p.name.removeprefix("window-"))
            for p in self.root.glob("window-*")
            if p.name.removeprefix("window-").isdigit()
        )

    def prune(self, keep_from: int) -> None:
        """Drop the states of windows before `keep_from` (their challenges are closed)."""
        for window in self.windows():
            if window < keep_from:
                shutil.rmtree(self.folder(window), ignore_errors=True)
                self._digests.pop(window, None)

    def prune_window(self, window: int) -> None:
        """Drop the states of `window` (every challenge of it is answered)."""
        shutil.rmtree(self.folder(window), ignore_errors=True)
        self._digests.pop(window, None)

    def nbytes(self, window: int) -> int:
        """Disk the states of `window` take."""
        folder = self.folder(window)
        return sum(p.stat().st_size for p in folder.iterdir() if _STATE_FILE.match(p.name))
