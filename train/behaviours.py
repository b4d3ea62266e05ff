"""The miner behaviours a subnet can be shown or tested with: one honest, the rest cheats.

    from train.behaviours import BEHAVIOURS, flag_spelling, code_spelling

    BEHAVIOURS                      # ("honest", "free_rider", "noise", "copier", ...)
    flag_spelling("free_rider")     # "free-rider", as `--adversaries` and configs spell it
    code_spelling("wrong-data")     # "wrong_data"

What each one does is `train.adversary`'s business; this module only names them, with no
imports, so that configs and command lines can check a name without loading torch.
"""

from __future__ import annotations

from typing import Literal, get_args

Behaviour = Literal[
    "honest",
    "free_rider",
    "noise",
    "copier",
    "wrong_data",
    "heldout",
    "mixer",
    "backdater",
    "poisoner",
]
BEHAVIOURS: tuple[str, ...] = get_args(Behaviour)


def flag_spelling(behaviour: str) -> str:
    """A behaviour as command lines and configs write it (hyphens)."""
    return behaviour.replace("_", "-")


def code_spelling(behaviour: str) -> str:
    """A behaviour as `train.adversary` and the miner's `--behaviour` take it (underscores)."""
    return behaviour.replace("-", "_")
