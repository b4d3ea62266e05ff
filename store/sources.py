"""Where each miner keeps its contributions, as it tells the chain: one key of its commitment.

    from store.sources import contributions_entry, parse_contributions_location

    body = {**other_keys, **contributions_entry(store.contributions_location)}   # a miner
    location = parse_contributions_location(data, backend=cfg.store.backend)     # a validator

A miner's ledger commitment is a JSON object (the averaging adds ``"dht"``); the key
``"contributions"`` holds the string `store.api.Store.contributions_location` gives: a Hub
repo id (``org/name``, or ``datasets/org/name`` for a dataset repo) or, on the local
backend, the absolute path of the miner's store folder. Validators list each miner's
location (`Store.list_contributions(window, sources=...)`).

The commitment is written by whoever holds a hotkey, so it is untrusted input, parsed
strictly here and never raised on: anything that is not exactly one of the accepted
forms is `None` (the validator then looks in its own store). What a location can do is
limited anyway: a contribution counts only if its manifest is signed by the hotkey it is
listed under, and the validator takes a hotkey's contributions only from the location that
hotkey committed, so pointing at another miner's repo earns nothing.

- Hub: ``owner/name`` or ``datasets/owner/name`` (``models/owner/name`` is read as
  ``owner/name``), each part a Hub name (letters, digits, ``-``, ``_``, ``.``; starting
  with a letter or digit; no ``..`` or ``--``), at most 200 characters. No URL, no
  ``hf://``, no revision: the validator builds the address itself.
- Local: an absolute, normalized POSIX path (no ``.``/``..`` parts, no ``~``, no doubled
  or trailing ``/``), printable characters, at most 200 of them. The local backend is one
  machine run by one operator, so a path is not a remote attack surface; the rules keep
  out relative paths (they would resolve against the validator's working directory, not
  the miner's) and traversal tricks, and `store.local.LocalBackend` then refuses any
  folder that is not a tensormine store and any file that resolves outside it.

Standard library only: pure functions, no I/O.
"""

from __future__ import annotations

import json
import posixpath
import re

KEY = "contributions"
MAX_LOCATION_CHARS = 200

# One Hub name: as `store.config.REPO_ID`'s parts.
_HUB_PART = r"[A-Za-z0-9][A-Za-z0-9_.-]{0,95}"
_HUB = re.compile(rf"^(?:(datasets|models)/)?({_HUB_PART}/{_HUB_PART})$")
_PRINTABLE_PATH = re.compile(r"^/[\x21-\x7e /]*$")


def contributions_entry(location: str) -> dict[str, str]:
    """The commitment key that tells validators where a miner's contributions are.

    `location` is the miner's `Store.contributions_location`; `ValueError` if it is one
    no validator would accept (too long, or neither a Hub repo id nor an absolute path).
    """
    if not isinstance(location, str) or (
        _parse(location, "hub") is None and (_parse(location, "local") is None)
    ):
        raise ValueError(f"{location!r} is not a contributions location validators accept")
    return {KEY: location}


def parse_contributions_location(commitment_text: str, *, backend: str) -> str | None:
    """The contributions location in a hotkey's commitment, normalized, or None when the
    commitment has none or it is not valid for `backend` (``"hub"`` or ``"local"``)."""
    if backend not in ("hub", "local"):
        raise ValueError(f"unknown store backend {backend!r}")
    if not isinstance(commitment_text, str) or len(commitment_text) > 64 * 1024:
        return None
    try:
        body = json.loads(commitment_text)
    except ValueError:
        return None
    if not isinstance(body, dict):
        return None
    value = body.get(KEY)
    return _parse(value, backend) if isinstance(value, str) else None


def _parse(value: str, backend: str) -> str | None:
    if not 0 < len(value) <= MAX_LOCATION_CHARS:
        return None
    if backend == "hub":
        match = _HUB.fullmatch(value)
        if match is None or any(bad in value for bad in ("..", "--")):
            return None
        kind, repo_id = match.groups()
        if kind is None and repo_id.split("/")[0] in ("datasets", "models"):
            return None  # the Hub reads "datasets/x" as a dataset repo missing its name
        return f"datasets/{repo_id}" if kind == "datasets" else repo_id
    if not _PRINTABLE_PATH.fullmatch(value) or posixpath.normpath(value) != value:
        return None
    if value.startswith("//") or any(part in ("", ".", "..", "~") for part in value[1:].split("/")):
        return None
    return value
