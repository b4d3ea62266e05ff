"""Which pages a miner trains on in a window, and which pages a validator checks it with.

    from train.pages import assigned_pages, unassigned_pages, heldout_sample

    order = assigned_pages(hotkey, window, cfg.run.seed, len(pages.train), pages_per_window)
    batch_k = pages.train[order[k * batch_size : (k + 1) * batch_size]]    # step k

    # a validator, with salt and secret of its own:
    control = unassigned_pages(hotkey, window, seed, len(pages.train), 8, salt,
                               assigned_count=pages_per_window)
    probe = heldout_sample(secret, window, len(pages.heldout), 16)

All three are pure functions of their arguments, so a validator recomputes a miner's
assignment byte for byte. Their randomness is sha256 in counter mode over a
domain-separated, length-prefixed key: block i = sha256(key ‖ i) gives four big-endian
uint64 draws. That stream is fixed by a standard, so it is the same on every machine and
every numpy version (numpy's `Generator` methods may change their streams between
versions; Python's `hash()` is salted per process). Integers below m are drawn by
rejection (unbiased), and samples are ordered partial Fisher–Yates shuffles: distinct
when `count` ≤ the population, and a longer assignment starts with the shorter one.
When `count` exceeds the population, the population is exhausted in a shuffled pass and
the next pass reshuffles, so every page is used ⌊count/n⌋ or ⌈count/n⌉ times.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterator

import numpy as np

_DOMAIN = "tensormine/pages/v1"


def _key(purpose: str, *fields: str | int | bytes) -> bytes:
    """sha256 over the domain, the purpose and each field, each length-prefixed."""
    digest = hashlib.sha256()
    for field in (_DOMAIN, purpose, *fields):
        if isinstance(field, bytes):
            raw = b"b" + field
        elif isinstance(field, int):
            raw = b"i" + str(field).encode()
        else:
            raw = b"s" + field.encode("utf-8")
        digest.update(len(raw).to_bytes(8, "big") + raw)
    return digest.digest()


def _draws(key: bytes) -> Iterator[int]:
    """Uniform 64-bit integers: sha256(key ‖ counter) cut into four big-endian words."""
    counter = 0
    while True:
        block = hashlib.sha256(key + counter.to_bytes(8, "big")).digest()
        for offset in range(0, 32, 8):
            yield int.from_bytes(block[offset : offset + 8], "big")
        counter += 1


def _below(draws: Iterator[int], m: int) -> int:
    """Uniform integer in [0, m) by rejection, so no value is favoured."""
    limit = (1 << 64) - (1 << 64) % m
    while True:
        value = next(draws)
        if value < limit:
            return value % m


def _sample(key: bytes, n: int, count: int) -> np.ndarray:
    """`count` draws from range(n) in shuffled passes without replacement within a pass."""
    draws = _draws(key)
    out: list[int] = []
    while len(out) < count:
        # A sparse Fisher–Yates shuffle: `moved` holds only the swapped positions, so a
        # pass costs O(taken) however large n is.
        moved: dict[int, int] = {}
        for i in range(min(n, count - len(out))):
            j = i + _below(draws, n - i)
            out.append(moved.get(j, j))
            moved[j] = moved.get(i, i)
    return np.asarray(out, dtype=np.int64)


def _check(n: int, count: int, what: str) -> None:
    if n < 1:
        raise ValueError(f"{what} must be at least 1, got {n}")
    if count < 0:
        raise ValueError(f"count must be >= 0, got {count}")


def assigned_pages(
    hotkey: str, window: int, seed: int, n_train_pages: int, count: int
) -> np.ndarray:
    """The train pages `hotkey` trains on in `window`, in the order it consumes them (int64).

    Distinct when `count` <= `n_train_pages`; anyone can recompute them.
    """
    _check(n_train_pages, count, "n_train_pages")
    return _sample(_key("assigned", hotkey, window, seed), n_train_pages, count)


def unassigned_pages(
    hotkey: str,
    window: int,
    seed: int,
    n_train_pages: int,
    count: int,
    salt: bytes,
    *,
    assigned_count: int | None = None,
) -> np.ndarray:
    """`count` train pages outside `hotkey`'s assignment for `window`, drawn with `salt`.

    The assignment excluded is `assigned_pages(..., assigned_count)`; pass the run's
    `train.pages_per_window` (default: `count`, i.e. as many as are drawn). With a salt the
    miner does not know, it cannot tell these control pages in advance. Distinct when
    `count` <= the number of unassigned pages; `ValueError` if there are none.
    """
    _check(n_train_pages, count, "n_train_pages")
    if not isinstance(salt, bytes) or not salt:
        raise ValueError("salt must be non-empty bytes known only to the caller")
    excluded = np.unique(
        assigned_pages(
            hotkey, window, seed, n_train_pages, count if assigned_count is None else assigned_count
        )
    )
    free = n_train_pages - excluded.size
    if free < 1:
        raise ValueError(f"all {n_train_pages} train pages are assigned to {hotkey} in {window}")
    ranks = _sample(_key("unassigned", hotkey, window, seed, salt), free, count)
    # The r-th free page is r plus the number of assigned pages at or below it; with
    # excluded sorted, excluded[k] - k counts the free pages below excluded[k].
    free_before = excluded - np.arange(excluded.size)
    return ranks + np.searchsorted(free_before, ranks, side="right")


def heldout_sample(secret: bytes, window: int, n_heldout_pages: int, count: int) -> np.ndarray:
    """A validator's held-out pages for `window` (int64), unpredictable without `secret`.

    Distinct when `count` <= `n_heldout_pages`.
    """
    _check(n_heldout_pages, count, "n_heldout_pages")
    if not isinstance(secret, bytes) or not secret:
        raise ValueError("secret must be non-empty bytes")
    return _sample(_key("heldout", secret, window), n_heldout_pages, count)
