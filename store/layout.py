"""Names and paths inside a store, shared by both backends so that they look the same.

    window_revision(12)                 -> "window-12"      (a Hub tag, a local folder)
    parse_window_revision("window-12")  -> 12
    contribution_dir(12, 0)             -> "contributions/window-12/shard-0"
    challenge_path(12, "5Min", "5Val")  -> "proofs/window-12/challenges/5Min/5Val.json"
    answer_dir(12, "5Val", "5Min")      -> "proofs/window-12/answers/5Val/5Min"
    safe_relpath("model.safetensors")   -> "model.safetensors"; "../x" raises Rejected

A store holds three things:

- checkpoints of the global model, one immutable revision per window named
  ``window-<w>``, plus ``latest`` (the highest window; on the Hub, the ``main`` branch);
- contributions: ``contributions/window-<w>/shard-<s>/<hotkey>.json`` (the signed
  manifest) next to ``<hotkey>-<sha256[:16]>.safetensors`` (the tensors). Naming the
  tensor file by its content means a re-published contribution never overwrites bytes
  that a reader may be loading; the manifest switches to the new file in one step;
- proofs: the challenges and answers of the proof-of-work spot checks. A validator writes
  ``proofs/window-<w>/challenges/<miner>/<validator>.json`` in its own contributions
  location; the challenged miner answers in its own, with a folder
  ``proofs/window-<w>/answers/<validator>/<miner>/`` (a JSON and safetensors files). Each
  side reads the other's with `Store.fetch_file`; `Store.put_files` writes them.
"""

from __future__ import annotations

import re
from pathlib import PurePosixPath

from store.errors import Rejected

LATEST = "latest"
CONTRIBUTIONS = "contributions"
PROOFS = "proofs"
# "window-<w>" names both a checkpoint revision and a contributions folder.
_WINDOW = re.compile(r"^window-(0|[1-9][0-9]{0,17})$")
_SHARD_DIR = re.compile(r"^shard-(0|[1-9][0-9]{0,8})$")
_PART = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.+-]{0,254}$")


def window_revision(window: int) -> str:
    if window < 0:
        raise ValueError(f"window must be >= 0, got {window}")
    return f"window-{window}"


def parse_window_revision(name: str) -> int | None:
    """The window of a ``window-<w>`` revision name, None for any other name."""
    match = _WINDOW.match(name)
    return int(match.group(1)) if match else None


def contribution_dir(window: int, shard: int) -> str:
    return f"{CONTRIBUTIONS}/window-{window}/shard-{shard}"


def contribution_manifest_name(hotkey: str) -> str:
    return f"{hotkey}.json"


def contribution_file_name(hotkey: str, sha256: str) -> str:
    return f"{hotkey}-{sha256[:16]}.safetensors"


def challenge_path(window: int, miner: str, validator: str) -> str:
    """Where `validator` puts its challenge to `miner` for `window` (in its own store)."""
    return (
        f"{PROOFS}/{window_revision(window)}/challenges/"
        f"{_hotkey(miner, 'miner')}/{_hotkey(validator, 'validator')}.json"
    )


def answer_dir(window: int, validator: str, miner: str) -> str:
    """The folder where `miner` answers `validator`'s challenge of `window` (in its own store)."""
    return (
        f"{PROOFS}/{window_revision(window)}/answers/"
        f"{_hotkey(validator, 'validator')}/{_hotkey(miner, 'miner')}"
    )


def _hotkey(name: str, role: str) -> str:
    """`name` if it can be one part of a path (as hotkey addresses always can)."""
    if not _PART.match(name):
        raise Rejected("path_escape", f"{role} hotkey {name!r} cannot name a folder or file")
    return name


def parse_contribution_path(path: str) -> tuple[int, int, str] | None:
    """(window, shard, hotkey) of ``contributions/window-w/shard-s/<hotkey>.json``, else None."""
    parts = path.split("/")
    if len(parts) != 4 or parts[0] != CONTRIBUTIONS or not parts[3].endswith(".json"):
        return None
    wmatch, smatch = _WINDOW.match(parts[1]), _SHARD_DIR.match(parts[2])
    hotkey = parts[3][: -len(".json")]
    if not wmatch or not smatch or not _PART.match(hotkey):
        return None
    return int(wmatch.group(1)), int(smatch.group(1)), hotkey


def safe_relpath(path: str) -> str:
    """`path` if it is a plain relative POSIX path that stays inside its folder.

    Refuses absolute paths, ``..``, empty or dot-leading parts, backslashes and anything
    outside ``[A-Za-z0-9_.+-]``, so the result can be joined to any root safely.
    """
    if not path or "\\" in path or path.startswith("/") or "\x00" in path:
        raise Rejected("path_escape", f"path {path!r} is not a plain relative path")
    parts = PurePosixPath(path).parts
    if any(part in ("", ".", "..") or not _PART.match(part) for part in parts):
        raise Rejected("path_escape", f"path {path!r} leaves its folder or has odd characters")
    return "/".join(parts)


def safe_name(name: str) -> str:
    """`name` if it is a plain file name (`safe_relpath` with no folder in it)."""
    if "/" in name:
        raise Rejected("path_escape", f"file name {name!r} has a folder in it")
    return safe_relpath(name)
