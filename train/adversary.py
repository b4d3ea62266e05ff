"""Dishonest miners, for tests and demos: what each one trains on and what Δ it publishes.

    from train.adversary import BEHAVIOURS, training_pages, make_adversarial_delta

    order = training_pages("wrong_data", hotkey, w, seed, n_train, pages_per_window)
    rows = training_rows("heldout", hotkey, w, seed, pages.train, pages.heldout, count)
    delta = ...                                             # trained on `rows` as usual
    sent = make_adversarial_delta("copier", delta, other_miners_delta, rng)

Behaviours (DESIGN "Proof of learning"; the validator must give each of them nothing):

- `honest`: trains on its assigned pages and publishes its own Δ.
- `free_rider`: publishes a zero Δ (or `tiny` × its own Δ), hoping for a share for nothing.
- `noise`: publishes random Gaussian noise with the same norm as an honest Δ (per tensor),
  so size checks alone cannot tell it apart.
- `copier`: publishes another miner's Δ, rescaled by `copy_scale` and with Gaussian noise
  of `copy_noise` × the rescaled copy's norm added, to defeat an exact-match check.
- `mixer`: waits for the other miners' Δ of the window and publishes its own plus their
  mean. Commitments close at the deadline and nothing is revealed before it, so it finds
  nothing to mix in and publishes its own (`train.cheats` does the peeking).
- `backdater`: waits past the deadline for another miner's revealed Δ, publishes an exact
  copy (committed after the deadline, since it could not have it before), and sets its
  store files' times back to the window's start: refused as late by the ledger's clock,
  and the miner it copied keeps its score.
- `poisoner`: publishes (commits to) its honest Δ but sends −10·Δ into its group's
  all-reduce (`train.miner` does the sending): every reducer checks each part against the
  commitment and leaves its parts out, and the validators name it and pay it nothing.
- `wrong_data`: trains honestly, but on train pages outside its assignment (drawn with a
  public salt), e.g. data it had cached; its Δ helps on held-out data but not
  particularly on the pages it was assigned.
- `heldout`: trains on pages of the public held-out split as well as its assignment
  (`heldout_share` of its steps' pages, every other page by default; 1.0 = only held-out
  pages), hoping to lower the loss on the validator's held-out sample E more than
  honest training does. Pages of one document teach each other, so this pays on E even
  though E is drawn with the validator's secret; the validator's held-out-rival check
  (`validation.scoring.heldout_verdict`) gives it nothing.

Everything is a pure function of its arguments (the noise comes from the caller's
`torch.Generator`), so a test or a `--behaviour` flag of the miner can reuse it.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np
import torch

from train.behaviours import BEHAVIOURS
from train.pages import Affinity, assigned_pages, heldout_sample, unassigned_pages

WRONG_DATA_SALT = b"tensormine/adversary/wrong-data"
HELDOUT_KEY = b"tensormine/adversary/heldout"


def training_pages(
    behaviour: str,
    hotkey: str,
    window: int,
    seed: int,
    n_train_pages: int,
    count: int,
    affinity: Affinity | None = None,
) -> np.ndarray:
    """The train pages a miner of `behaviour` trains on (every behaviour but `wrong_data`
    uses its assignment; `affinity` is its shard's, `train.data.shard_affinities`)."""
    if behaviour not in BEHAVIOURS:
        raise ValueError(f"unknown behaviour {behaviour!r}; one of {', '.join(BEHAVIOURS)}")
    if behaviour == "wrong_data":
        return unassigned_pages(
            hotkey, window, seed, n_train_pages, count, WRONG_DATA_SALT, assigned_count=count,
            affinity=affinity,
        )  # fmt: skip
    return assigned_pages(hotkey, window, seed, n_train_pages, count, affinity)


def training_rows(
    behaviour: str,
    hotkey: str,
    window: int,
    seed: int,
    train: np.ndarray,
    heldout: np.ndarray,
    count: int,
    *,
    heldout_share: float = 0.5,
    affinity: Affinity | None = None,
) -> np.ndarray:
    """The token rows (in step order) a miner of `behaviour` trains on: `train` rows of
    `training_pages`, except that `heldout` puts rows of the public held-out split in
    `heldout_share` of the places (evenly spread: every other row at 0.5)."""
    order = training_pages(behaviour, hotkey, window, seed, train.shape[0], count, affinity)
    rows: np.ndarray = train[order]
    if behaviour != "heldout":
        return rows
    if not 0.0 <= heldout_share <= 1.0:
        raise ValueError(f"heldout_share must be in [0, 1], got {heldout_share}")
    places = [i for i in range(count) if int((i + 1) * heldout_share) > int(i * heldout_share)]
    if not places:
        return rows
    picks = heldout_sample(HELDOUT_KEY + hotkey.encode(), window, heldout.shape[0], len(places))
    mixed: np.ndarray = rows.copy()
    mixed[places] = heldout[picks]
    return mixed


def mean_of(deltas: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """The coordinate-wise mean of several Δ with the same names and shapes."""
    if not deltas:
        raise ValueError("mean_of needs at least one Δ")
    return {n: torch.stack([d[n] for d in deltas]).mean(0) for n in deltas[0]}


def _noise_like(t: torch.Tensor, norm: float, rng: torch.Generator) -> torch.Tensor:
    noise = torch.randn(t.shape, generator=rng, dtype=torch.float32)
    current = float(noise.norm())
    return noise * (norm / current) if current > 0 else noise


def make_adversarial_delta(
    behaviour: str,
    honest_delta: Mapping[str, torch.Tensor],
    other_delta: Mapping[str, torch.Tensor] | None,
    rng: torch.Generator,
    *,
    tiny: float = 0.0,
    copy_scale: float = 1.7,
    copy_noise: float = 0.3,
) -> dict[str, torch.Tensor]:
    """The Δ a miner of `behaviour` publishes, given the Δ it trained (`honest_delta`) and,
    for `copier` and `backdater`, the Δ of the miner it copies, for `mixer` the mean of
    the others' (`other_delta`, same names and shapes; None: a mixer found nothing).

    `honest`, `wrong_data`, `heldout` and `poisoner` publish what they trained (the
    difference is in `training_rows`, or in what a poisoner sends). All results are new
    fp32 CPU tensors.
    """
    if behaviour not in BEHAVIOURS:
        raise ValueError(f"unknown behaviour {behaviour!r}; one of {', '.join(BEHAVIOURS)}")
    own = {n: t.detach().to("cpu", torch.float32) for n, t in honest_delta.items()}
    if behaviour in ("honest", "wrong_data", "heldout", "poisoner"):
        return {n: t.clone() for n, t in own.items()}
    if behaviour == "free_rider":
        return {n: t * tiny for n, t in own.items()}
    if behaviour == "noise":
        return {n: _noise_like(t, float(t.norm()), rng) for n, t in own.items()}
    if behaviour == "mixer" and other_delta is None:
        return {n: t.clone() for n, t in own.items()}  # nothing of others was readable
    if other_delta is None:
        raise ValueError(f"a {behaviour} needs the Δ it copies (other_delta)")
    if set(other_delta) != set(own):
        raise ValueError("other_delta must cover the same tensors as honest_delta")
    if behaviour == "mixer":
        return {n: own[n] + other_delta[n].detach().to("cpu", torch.float32) for n in own}
    if behaviour == "backdater":
        return {n: t.detach().to("cpu", torch.float32).clone() for n, t in other_delta.items()}
    out = {}
    for name, t in other_delta.items():
        scaled = t.detach().to("cpu", torch.float32) * copy_scale
        out[name] = scaled + _noise_like(scaled, copy_noise * float(scaled.norm()), rng)
    return out
