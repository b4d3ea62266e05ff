"""A miner's state on disk, saved atomically after every window so a killed miner resumes.

    save_state(root, window=w, uid=uid, weights=model.state_dict(), momentum=b,
               residual=r, wire_residual=seat.wire_residuals())
    saved = load_state(root, shapes)        # None before the first save
    saved.window, saved.weights, saved.momentum, saved.residual, saved.wire_residual

``<root>/window-<w>/`` holds the weights (``model.safetensors``), the outer momentum
(``outer.safetensors``), the publication's top-k error feedback (``residual.safetensors``),
the wire's top-k residuals owed to the groups (``wire_residual.safetensors``, with
averaging) and ``state.json`` (window, fingerprint, UID). A state is written to a
``.window-<w>.partial`` folder, renamed into place, and only then named by the
``CURRENT`` pointer, itself replaced in one rename: a kill at any point leaves the last
complete state in force, and a half-written folder is never read.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from averaging.outer import load_outer_state, save_outer_state
from common.errors import TensormineError
from train.model import model_fingerprint

STATE_POINTER = "CURRENT"
WIRE_RESIDUAL = "wire_residual.safetensors"  # top-k error feedback owed to the groups


class StateMismatch(TensormineError, ValueError):
    """The saved state does not fit the model."""


@dataclass(frozen=True)
class SavedState:
    folder: Path
    window: int  # the window the weights belong to
    weights: dict[str, torch.Tensor]
    momentum: dict[str, torch.Tensor]
    residual: dict[str, torch.Tensor]
    wire_residual: Path | None  # the wire's residuals when saved (read by the seat's owner)


def save_state(
    root: Path,
    *,
    window: int,
    uid: int,
    weights: Mapping[str, torch.Tensor],
    momentum: Mapping[str, torch.Tensor],
    residual: Mapping[str, torch.Tensor],
    wire_residual: Mapping[str, torch.Tensor] | None = None,
) -> Path:
    """Write the state of `window` under `root` atomically; returns its folder."""
    from safetensors.torch import save_file

    folder = root / f"window-{window}"
    tmp = root / f".window-{window}.partial"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    state = {k: v.detach().cpu().contiguous() for k, v in weights.items()}
    save_file(state, str(tmp / "model.safetensors"))
    save_outer_state(tmp / "outer.safetensors", momentum)
    save_outer_state(tmp / "residual.safetensors", residual)
    if wire_residual is not None:
        save_outer_state(tmp / WIRE_RESIDUAL, wire_residual)
    meta = {"window": window, "fingerprint": model_fingerprint(state), "uid": uid}
    (tmp / "state.json").write_text(json.dumps(meta))
    shutil.rmtree(folder, ignore_errors=True)
    tmp.rename(folder)
    pointer = root / f".{STATE_POINTER}.tmp"
    pointer.write_text(folder.name)
    pointer.replace(root / STATE_POINTER)  # the switch to the new state is one rename
    for old in root.glob("window-*"):
        if old != folder:
            shutil.rmtree(old, ignore_errors=True)
    return folder


def load_state(root: Path, shapes: Mapping[str, Sequence[int]]) -> SavedState | None:
    """The state `CURRENT` names under `root`, checked against the model's `shapes`; None
    when there is none. `StateMismatch` when the weights do not fit; the outer states'
    own `averaging.outer.OuterStateError` when theirs do not."""
    from safetensors.torch import load_file

    pointer = root / STATE_POINTER
    if not pointer.is_file():
        return None
    folder = root / pointer.read_text().strip()
    meta = json.loads((folder / "state.json").read_text())
    weights = load_file(str(folder / "model.safetensors"))
    if {k: tuple(v.shape) for k, v in weights.items()} != {k: tuple(s) for k, s in shapes.items()}:
        raise StateMismatch(f"{folder}: saved weights do not fit model")
    wire = folder / WIRE_RESIDUAL
    return SavedState(
        folder=folder,
        window=int(meta["window"]),
        weights=weights,
        momentum=load_outer_state(folder / "outer.safetensors", shapes),
        residual=load_outer_state(folder / "residual.safetensors", shapes),
        wire_residual=wire if wire.is_file() else None,
    )
