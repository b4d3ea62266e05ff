"""The validator's persisted state: moving averages, its θ, outer momentum, in one snapshot.

    save_state(folder, ValidatorState(window=w + 1, ema=..., hotkeys=..., ...), theta, momentum)
    loaded = load_state(folder, shapes)        # None on a first start
    loaded.state.ema, loaded.theta, loaded.momentum

A snapshot is a folder ``window-<w>/`` holding ``state.json`` (moving averages per UID, the
hotkey each UID had, when weights were last set, each UID's own-data strikes),
``model.safetensors`` (θ_w, the model the next window starts from) and
``outer.safetensors`` (the outer Nesterov momentum). It is written under a temporary name,
renamed into place, and then a one-line ``CURRENT`` file is atomically replaced to point
at it, so a validator killed at any moment restarts from the last complete snapshot and
never from a mix of two. Only safetensors and JSON are read.
"""

from __future__ import annotations

import json
import logging
import shutil
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from averaging.outer import load_outer_state, save_outer_state
from common.errors import TensormineError
from store.fsio import fsync_dir, write_atomic

logger = logging.getLogger(__name__)

FORMAT = "tensormine-validator-state/1"
POINTER = "CURRENT"


class StateError(TensormineError, ValueError):
    """A saved state does not fit this run (other model) or is damaged."""


@dataclass
class ValidatorState:
    """What a validator must not forget across restarts."""

    window: int  # the window θ belongs to, i.e. the next window to score
    ema: dict[int, float] = field(default_factory=dict)
    hotkeys: dict[int, str] = field(default_factory=dict)  # the hotkey each EMA belongs to
    weights_window: int | None = None  # last window whose weights went to the ledger
    # Windows in a row (up to the last scored one) in which a UID's own-data check did not
    # pass outright (`validation.scoring.own_data_outcome`); absent = 0.
    own_strikes: dict[int, int] = field(default_factory=dict)
    # Windows in a row (up to the last scored one) in which a UID's held-out-rival check
    # flagged it (`validation.scoring.heldout_outcome`); absent = 0.
    heldout_flags: dict[int, int] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        return {
            "format": FORMAT,
            "window": self.window,
            "ema": {str(uid): v for uid, v in sorted(self.ema.items())},
            "hotkeys": {str(uid): hk for uid, hk in sorted(self.hotkeys.items())},
            "weights_window": self.weights_window,
            "own_strikes": {str(uid): n for uid, n in sorted(self.own_strikes.items())},
            "heldout_flags": {str(uid): n for uid, n in sorted(self.heldout_flags.items())},
        }

    @classmethod
    def from_json(cls, body: Mapping[str, Any]) -> ValidatorState:
        if body.get("format") != FORMAT:
            raise StateError(f"unknown state format {body.get('format')!r}")
        return cls(
            window=int(body["window"]),
            ema={int(k): float(v) for k, v in body["ema"].items()},
            hotkeys={int(k): str(v) for k, v in body["hotkeys"].items()},
            weights_window=None if body["weights_window"] is None else int(body["weights_window"]),
            # Older snapshots have no strikes: every UID starts at 0.
            own_strikes={int(k): int(v) for k, v in body.get("own_strikes", {}).items()},
            heldout_flags={int(k): int(v) for k, v in body.get("heldout_flags", {}).items()},
        )


@dataclass
class LoadedState:
    state: ValidatorState
    theta: dict[str, torch.Tensor]
    momentum: dict[str, torch.Tensor]


def save_state(
    root: Path,
    state: ValidatorState,
    theta: Mapping[str, torch.Tensor],
    momentum: Mapping[str, torch.Tensor],
) -> Path:
    """Write a complete snapshot and switch `CURRENT` to it; older snapshots are removed."""
    root.mkdir(parents=True, exist_ok=True)
    folder = root / f"window-{state.window}"
    tmp = root / f".window-{state.window}.partial"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    weights = {k: v.detach().to("cpu").contiguous() for k, v in theta.items()}
    save_file(weights, str(tmp / "model.safetensors"))
    save_outer_state(tmp / "outer.safetensors", momentum)
    (tmp / "state.json").write_text(json.dumps(state.to_json(), indent=1) + "\n")
    shutil.rmtree(folder, ignore_errors=True)
    tmp.rename(folder)
    fsync_dir(root)
    write_atomic(root / POINTER, f"{folder.name}\n".encode())
    for old in root.glob("window-*"):
        if old != folder:
            shutil.rmtree(old, ignore_errors=True)
    return folder


def load_state(root: Path, shapes: Mapping[str, Sequence[int]]) -> LoadedState | None:
    """The last complete snapshot under `root`, checked against the model's `shapes`."""
    pointer = root / POINTER
    if not pointer.is_file():
        return None
    folder = root / pointer.read_text(encoding="utf-8").strip()
    try:
        state = ValidatorState.from_json(json.loads((folder / "state.json").read_text()))
        theta = load_file(str(folder / "model.safetensors"))
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise StateError(f"{folder}: unreadable validator state ({exc})") from exc
    got = {k: tuple(v.shape) for k, v in theta.items()}
    want = {k: tuple(int(d) for d in s) for k, s in shapes.items()}
    if got != want:
        raise StateError(f"{folder}: the saved model does not fit this run's model config")
    momentum = load_outer_state(folder / "outer.safetensors", shapes)
    logger.info("resumed validator state of window %d from %s", state.window, folder)
    return LoadedState(state=state, theta=theta, momentum=momentum)
