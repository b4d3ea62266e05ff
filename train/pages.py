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

import dataclasses
import hashlib
from collections.abc import Iterator
from dataclasses import dataclass

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


@dataclass(frozen=True, eq=False)
class Affinity:
    """Where a miner of one expert group draws part of its pages (`data.expert_affinity`).

    `pool` holds the sorted train-page indices of the group's partition of the corpus
    (`topic_groups`); a `fraction` of every assignment comes from it, the rest from the
    pages outside it. Both are public: a validator rebuilds the same `Affinity` from the
    run's pages, the config and the contribution's shard.
    """

    pool: np.ndarray
    fraction: float
    _outside: dict[int, np.ndarray] = dataclasses.field(default_factory=dict, repr=False)

    def outside(self, n_train_pages: int) -> np.ndarray:
        """The sorted pages of 0 … n − 1 not in the pool (computed once per n)."""
        rest = self._outside.get(n_train_pages)
        if rest is None:
            every = np.arange(n_train_pages, dtype=np.int64)
            rest = self._outside[n_train_pages] = np.setdiff1d(every, self.pool, assume_unique=True)
        return rest

    def __post_init__(self) -> None:
        if not 0.0 < self.fraction <= 1.0:
            raise ValueError(f"fraction must be in (0, 1], got {self.fraction}")
        if self.pool.ndim != 1 or self.pool.size == 0:
            raise ValueError("an affinity needs a non-empty 1-D pool of pages")

    def split(self, count: int) -> int:
        """How many of `count` pages come from the pool (rounded half to even)."""
        return round(self.fraction * count)


def assigned_pages(
    hotkey: str,
    window: int,
    seed: int,
    n_train_pages: int,
    count: int,
    affinity: Affinity | None = None,
) -> np.ndarray:
    """The train pages `hotkey` trains on in `window`, in the order it consumes them (int64).

    Distinct when `count` <= `n_train_pages`; anyone can recompute them. With an
    `affinity`, `affinity.split(count)` pages are drawn from its pool and the rest from the
    pages outside it, interleaved by a keyed shuffle so every step sees the mix (distinct
    when each part fits its population).
    """
    _check(n_train_pages, count, "n_train_pages")
    if affinity is None:
        return _sample(_key("assigned", hotkey, window, seed), n_train_pages, count)
    pool = affinity.pool
    if int(pool[-1]) >= n_train_pages or int(pool[0]) < 0:
        raise ValueError(f"the affinity pool names pages outside 0..{n_train_pages - 1}")
    inside = affinity.split(count)
    rest = affinity.outside(n_train_pages)
    if rest.size == 0:  # the pool is the whole corpus
        rest, inside = pool, count
    picked = np.concatenate([
        pool[_sample(_key("assigned-affine", hotkey, window, seed), pool.size, inside)],
        rest[_sample(_key("assigned-rest", hotkey, window, seed), rest.size, count - inside)],
    ])  # fmt: skip
    mixed: np.ndarray = picked[_sample(_key("assigned-mix", hotkey, window, seed), count, count)]
    return mixed


def topic_groups(topics: np.ndarray, groups: int) -> np.ndarray:
    """The partition of the train pages into `groups` by topic: group of every page (int64).

    `topics` holds each page's topic id (uint64, `train.data.Pages.topics`: a hash of the
    topic of the document the page starts in). Whole topics go to groups, largest first,
    each to the group with the fewest pages so far (ties to the lower group; topics of equal
    size in order of their id), so the groups are as even as whole topics allow and any
    machine with the same pages computes the same partition.
    """
    if groups < 1:
        raise ValueError(f"groups must be at least 1, got {groups}")
    ids, inverse, sizes = np.unique(topics, return_inverse=True, return_counts=True)
    order = np.lexsort((ids, -sizes))  # largest first, then by id
    load = np.zeros(groups, dtype=np.int64)
    group_of_topic = np.zeros(ids.size, dtype=np.int64)
    for t in order.tolist():
        g = int(np.argmin(load))  # argmin returns the first minimum: the lower group
        group_of_topic[t] = g
        load[g] += sizes[t]
    return group_of_topic[inverse.reshape(-1)]


def unassigned_pages(
    hotkey: str,
    window: int,
    seed: int,
    n_train_pages: int,
    count: int,
    salt: bytes,
    *,
    assigned_count: int | None = None,
    affinity: Affinity | None = None,
) -> np.ndarray:
    """`count` train pages outside `hotkey`'s assignment for `window`, drawn with `salt`.

    The assignment excluded is `assigned_pages(..., assigned_count, affinity)`; pass the run's
    `train.pages_per_window` (default: `count`, i.e. as many as are drawn). With a salt the
    miner does not know, it cannot tell these control pages in advance. Distinct when
    `count` <= the number of unassigned pages; `ValueError` if there are none.
    """
    _check(n_train_pages, count, "n_train_pages")
    if not isinstance(salt, bytes) or not salt:
        raise ValueError("salt must be non-empty bytes known only to the caller")
    assigned = count if assigned_count is None else assigned_count
    excluded = np.unique(assigned_pages(hotkey, window, seed, n_train_pages, assigned, affinity))
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


# The key of the miners' own progress sample: public, since it is no test of anything.
MINER_EVAL_KEY = b"tensormine/miner-eval"


def miner_eval_rows(n_heldout_pages: int, count: int) -> np.ndarray:
    """The fixed held-out pages a miner reports its progress on: `count` (at most all of
    them) spread over the held-out split, since a prefix may be one document."""
    return heldout_sample(MINER_EVAL_KEY, 0, n_heldout_pages, min(count, n_heldout_pages))
