"""Page assignment: determinism across processes, distinctness, range, spread, salts, secrets."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from train.pages import assigned_pages, heldout_sample, unassigned_pages

HOTKEY = "5GrwvaEF5zXb26Fz9rcQpDWS57CtERHpNehXCPcNoHGKutQY"
SALT = b"validator salt"
ROOT = Path(__file__).resolve().parents[2]

hotkeys = st.text(min_size=1, max_size=20)
windows = st.integers(min_value=0, max_value=2**40)
seeds = st.integers(min_value=0, max_value=2**63)


def reference_sample(key_fields: list[bytes], n: int, count: int) -> list[int]:
    """The documented algorithm written out plainly: sha256 counter stream, rejection,
    full-list Fisher–Yates per pass (the module uses a sparse one)."""
    digest = hashlib.sha256()
    for raw in key_fields:
        digest.update(len(raw).to_bytes(8, "big") + raw)
    key = digest.digest()
    words: list[int] = []
    counter = 0

    def word() -> int:
        nonlocal counter
        if not words:
            block = hashlib.sha256(key + counter.to_bytes(8, "big")).digest()
            words.extend(int.from_bytes(block[i : i + 8], "big") for i in range(0, 32, 8))
            words.reverse()
            counter += 1
        return words.pop()

    out: list[int] = []
    while len(out) < count:
        deck = list(range(n))
        for i in range(min(n, count - len(out))):
            m = n - i
            while (value := word()) >= (1 << 64) - (1 << 64) % m:
                pass
            j = i + value % m
            deck[i], deck[j] = deck[j], deck[i]
            out.append(deck[i])
    return out


def test_matches_the_documented_algorithm() -> None:
    fields = [b"stensormine/pages/v1", b"sassigned", b"s" + HOTKEY.encode(), b"i7", b"i42"]
    expected = reference_sample(fields, 50, 120)  # 120 > 50: three passes
    assert assigned_pages(HOTKEY, 7, 42, 50, 120).tolist() == expected
    fields = [b"stensormine/pages/v1", b"sheldout", b"b" + b"secret", b"i3"]
    assert heldout_sample(b"secret", 3, 1000, 30).tolist() == reference_sample(fields, 1000, 30)


def test_pinned_values() -> None:
    """Frozen vectors: a change here breaks agreement between old and new validators."""
    assert assigned_pages(HOTKEY, 3, 42, 1000, 8).tolist() == [
        827, 709, 683, 328, 199, 883, 124, 948,
    ]  # fmt: skip
    control = unassigned_pages(HOTKEY, 3, 42, 1000, 4, SALT, assigned_count=8)
    assert control.tolist() == [150, 864, 23, 536]
    assert heldout_sample(b"secret", 3, 1000, 4).tolist() == [347, 963, 990, 579]


def test_same_in_another_process() -> None:
    code = (
        "import json; from train.pages import assigned_pages, unassigned_pages;"
        f"print(json.dumps([assigned_pages({HOTKEY!r}, 9, 1, 5000, 64).tolist(),"
        f"unassigned_pages({HOTKEY!r}, 9, 1, 5000, 16, {SALT!r}, assigned_count=64).tolist()]))"
    )
    env = {**os.environ, "PYTHONHASHSEED": "12345"}
    out = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True, check=True
    )
    theirs = json.loads(out.stdout)
    assert theirs[0] == assigned_pages(HOTKEY, 9, 1, 5000, 64).tolist()
    assert theirs[1] == unassigned_pages(HOTKEY, 9, 1, 5000, 16, SALT, assigned_count=64).tolist()


@settings(max_examples=200, deadline=None)
@given(hotkeys, windows, seeds, st.integers(1, 300), st.integers(0, 300))
def test_assigned_count_range_distinct(
    hotkey: str, window: int, seed: int, n: int, count: int
) -> None:
    pages = assigned_pages(hotkey, window, seed, n, count)
    assert pages.dtype == np.int64 and pages.shape == (count,)
    assert ((pages >= 0) & (pages < n)).all()
    uses = Counter(pages.tolist())
    # Within a pass no page repeats: each is used ⌊count/n⌋ or ⌈count/n⌉ times.
    assert set(uses.values()) <= {count // n, -(-count // n)}
    if count <= n:
        assert len(uses) == count


@settings(max_examples=100, deadline=None)
@given(hotkeys, windows, st.integers(1, 500), st.integers(0, 100), st.integers(0, 100))
def test_longer_assignment_starts_with_the_shorter(
    hotkey: str, window: int, n: int, short: int, extra: int
) -> None:
    longer = assigned_pages(hotkey, window, 0, n, short + extra)
    assert np.array_equal(assigned_pages(hotkey, window, 0, n, short), longer[:short])


def test_differs_across_hotkeys_windows_seeds() -> None:
    base = assigned_pages(HOTKEY, 5, 42, 10_000, 32)
    assert not np.array_equal(base, assigned_pages(HOTKEY + "x", 5, 42, 10_000, 32))
    assert not np.array_equal(base, assigned_pages(HOTKEY, 6, 42, 10_000, 32))
    assert not np.array_equal(base, assigned_pages(HOTKEY, 5, 43, 10_000, 32))
    # Field boundaries are part of the key: ("ab", 1) and ("a", "b1") cannot collide.
    assert not np.array_equal(
        assigned_pages("a1", 23, 0, 10_000, 32), assigned_pages("a", 123, 0, 10_000, 32)
    )


def test_every_page_equally_likely() -> None:
    """Over many windows each of n pages is assigned count/n of the time (chi-square)."""
    n, count, rounds = 20, 5, 2000
    hits = np.zeros(n)
    first = np.zeros(n)
    for window in range(rounds):
        pages = assigned_pages(HOTKEY, window, 0, n, count)
        hits[pages] += 1
        first[pages[0]] += 1
    for observed, total in ((hits, rounds * count), (first, rounds)):
        expected = total / n
        chi2 = ((observed - expected) ** 2 / expected).sum()
        assert chi2 < 50.0  # 19 degrees of freedom: P(χ² > 50) ≈ 1e-4


@settings(max_examples=150, deadline=None)
@given(
    hotkeys,
    windows,
    st.integers(2, 300),
    st.integers(0, 50),
    st.integers(1, 299),
    st.binary(min_size=1, max_size=8),
)
def test_unassigned_avoid_the_assignment(
    hotkey: str, window: int, n: int, count: int, assigned: int, salt: bytes
) -> None:
    assigned = min(assigned, n - 1)
    control = unassigned_pages(hotkey, window, 7, n, count, salt, assigned_count=assigned)
    mine = set(assigned_pages(hotkey, window, 7, n, assigned).tolist())
    assert control.dtype == np.int64 and control.shape == (count,)
    assert ((control >= 0) & (control < n)).all()
    assert not mine & set(control.tolist())
    if count <= n - len(mine):
        assert len(set(control.tolist())) == count


def test_unassigned_default_excludes_count_pages_and_depends_on_salt() -> None:
    control = unassigned_pages(HOTKEY, 1, 0, 50, 10, SALT)
    assert not set(control.tolist()) & set(assigned_pages(HOTKEY, 1, 0, 50, 10).tolist())
    # 40 free pages, 10 drawn: the complement is exhausted by 4 draws, so all 40 appear.
    control = unassigned_pages(HOTKEY, 1, 0, 50, 40, SALT, assigned_count=10)
    assert sorted(control.tolist()) == sorted(
        set(range(50)) - set(assigned_pages(HOTKEY, 1, 0, 50, 10).tolist())
    )
    a = unassigned_pages(HOTKEY, 1, 0, 10_000, 16, b"one", assigned_count=64)
    b = unassigned_pages(HOTKEY, 1, 0, 10_000, 16, b"two", assigned_count=64)
    assert not np.array_equal(a, b)


def test_unassigned_uniform_over_the_free_pages() -> None:
    n, assigned, rounds = 12, 4, 3000
    hits = np.zeros(n)
    for salt in range(rounds):
        hits[unassigned_pages(HOTKEY, 0, 0, n, 1, salt.to_bytes(4, "big"), assigned_count=4)] += 1
    mine = assigned_pages(HOTKEY, 0, 0, n, assigned)
    assert hits[mine].sum() == 0
    free = np.setdiff1d(np.arange(n), mine)
    expected = rounds / free.size
    chi2 = ((hits[free] - expected) ** 2 / expected).sum()
    assert chi2 < 30.0  # 7 degrees of freedom: P(χ² > 30) ≈ 1e-4


def test_heldout_sample() -> None:
    sample = heldout_sample(b"secret-a", 4, 500, 64)
    assert sample.dtype == np.int64 and len(set(sample.tolist())) == 64
    assert ((sample >= 0) & (sample < 500)).all()
    assert np.array_equal(sample, heldout_sample(b"secret-a", 4, 500, 64))
    assert not np.array_equal(sample, heldout_sample(b"secret-b", 4, 500, 64))
    assert not np.array_equal(sample, heldout_sample(b"secret-a", 5, 500, 64))


def test_bad_arguments() -> None:
    with pytest.raises(ValueError, match="n_train_pages"):
        assigned_pages(HOTKEY, 0, 0, 0, 4)
    with pytest.raises(ValueError, match="count"):
        assigned_pages(HOTKEY, 0, 0, 10, -1)
    with pytest.raises(ValueError, match="all 10 train pages"):
        unassigned_pages(HOTKEY, 0, 0, 10, 1, SALT, assigned_count=10)
    with pytest.raises(ValueError, match="salt"):
        unassigned_pages(HOTKEY, 0, 0, 10, 1, b"")
    with pytest.raises(ValueError, match="secret"):
        heldout_sample(b"", 0, 10, 1)
    with pytest.raises(ValueError, match="n_heldout_pages"):
        heldout_sample(b"s", 0, 0, 1)
