"""Weight copying on the ledger: does a copier earn the honest validators' dividends?

A copier evaluates nothing: each epoch it sets as its own weights the consensus of the
weights it can read on the ledger. Without commit-reveal it reads the weights the honest
validators set in the same epoch window and earns what they earn per unit of stake (or
more: its weights sit exactly on consensus, so nothing of them is clipped). With
commit-reveal (`chain.commit_reveal`) what it can read was committed a reveal period
ago; when the miners' quality drifts, its weights lag the honest ones and its bonds sit
on yesterday's best miners.

    run = run_copier(CopierSetup(), commit_reveal=True, seed=0, folder=tmp)
    run.ratio      # copier's dividend per unit stake / the honest validators' mean

`run_copier` drives a real `Ledger` in `folder` (short tempo, blocks produced in
process, validators' writes through `chain.local.LocalChain`, so the same
commit/reveal code as a validator). Per epoch window, as the validators of a subnet do:
the epoch block runs Yuma; the honest validators set noisy views of the current quality
(on a commit-reveal ledger: commit them and reveal the commit now due); one block later
the copier reads the revealed weights and sets their consensus; then the next epoch.
The model of the miners and the views (`drift`, `honest_view`, `copied_weights`) is pure.
"""

from __future__ import annotations

import math
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from numpy.typing import NDArray

from chain.config import RAO_PER_TAO, ChainConfig
from chain.consensus import yuma_epoch
from chain.interface import Identity, blocks_until_epoch
from chain.keys import Keypair
from chain.ledger import Ledger
from chain.local import LocalChain

F64 = NDArray[np.float64]


@dataclass(frozen=True)
class CopierSetup:
    """The experiment: `honest` validators and one copier of equal stake, `miners`
    miners whose latent quality follows an AR(1) with per-epoch correlation `rho`
    (quality = exp(`sharpness` · latent)); each honest validator sees the quality times
    log-normal noise of scale `noise`. The first `warmup` epochs are not counted: bonds
    are a moving average (10 % an epoch by default), and under commit-reveal the copier's
    first weights count an epoch after the honest ones, a head start that fades only as
    0.9^t."""

    honest: int = 3
    miners: int = 8
    epochs: int = 30
    warmup: int = 60
    rho: float = 0.9
    sharpness: float = 1.5
    noise: float = 0.2
    stake_tao: int = 1000
    tempo: int = 2
    reveal_period_epochs: int = 1


@dataclass
class CopierRun:
    """Per counted epoch: each validator's dividend per unit stake (emission / stake
    before the payout); `ratio` = the copier's total over the honest validators' mean."""

    commit_reveal: bool
    seed: int
    copier: list[float] = field(default_factory=list)
    honest: list[list[float]] = field(default_factory=list)

    @property
    def ratio(self) -> float:
        honest = float(np.mean([sum(h) for h in zip(*self.honest, strict=True)]))
        return sum(self.copier) / honest if honest > 0 else math.nan

    def per_epoch_ratio(self) -> list[float]:
        return [c / float(np.mean(h)) for c, h in zip(self.copier, self.honest, strict=True)]


# ---- the pure model ------------------------------------------------------------------
def drift(latent: F64, rho: float, rng: np.random.Generator) -> F64:
    """One epoch of AR(1) drift, stationary with unit variance."""
    return rho * latent + math.sqrt(1.0 - rho * rho) * rng.standard_normal(latent.shape)


def honest_view(quality: F64, noise: float, rng: np.random.Generator) -> F64:
    """An honest validator's weights: the true quality times log-normal noise."""
    return quality * np.exp(noise * rng.standard_normal(quality.shape))


def copied_weights(rows: dict[int, list[tuple[int, int]]], stake: F64, kappa: float) -> F64:
    """The consensus of the revealed weight `rows` (validator UID -> [(UID, u16)]), as
    Yuma computes it with `stake`: the weights a copier sets. Zeros when none is revealed."""
    n = len(stake)
    w = np.zeros((n, n))
    for i, row in rows.items():
        for j, value in row:
            w[i, j] = value
    if not w.any():
        return np.zeros(n)
    voting = np.where(w.any(axis=1), stake, 0.0)
    result = yuma_epoch(w, voting, np.zeros((n, n)), kappa=kappa, owner_uid=None)
    return np.asarray(result.consensus, dtype=np.float64)


# ---- the ledger run --------------------------------------------------------------------
def copier_config(db: Path, setup: CopierSetup, commit_reveal: bool) -> ChainConfig:
    tao = RAO_PER_TAO
    return ChainConfig(
        db=db,
        tempo=setup.tempo,
        weights_rate_limit=0,
        immunity_period=10**6,
        validator_min_stake_rao=setup.stake_tao * tao // 2,
        faucet_rao=10 * setup.stake_tao * tao,
        commit_reveal=commit_reveal,
        reveal_period_epochs=setup.reveal_period_epochs,
    )


def run_copier(setup: CopierSetup, *, commit_reveal: bool, seed: int, folder: Path) -> CopierRun:
    """One run on a new ledger in a new folder under `folder` (see the module docstring)."""
    rng = np.random.default_rng(seed)
    where = Path(tempfile.mkdtemp(prefix=f"copier-{seed}-", dir=folder))
    cfg = copier_config(where / "ledger.sqlite", setup, commit_reveal)
    n_val = setup.honest + 1
    validators = [Keypair(rng.bytes(32)) for _ in range(n_val)]  # UIDs 0..honest; copier last
    miners = [Keypair(rng.bytes(32)) for _ in range(setup.miners)]
    miner_uids = list(range(n_val, n_val + setup.miners))
    run = CopierRun(commit_reveal, seed)
    with Ledger.create(cfg.db, cfg, Keypair(rng.bytes(32)).address, timestamp=0.0) as ledger:
        _populate(ledger, validators, miners, setup.stake_tao * RAO_PER_TAO)
        # Reveals only when set_weights is called: each validator sets weights every
        # epoch window here, so no background revealer is needed.
        clients = [LocalChain(ledger, Identity.single(kp), auto_reveal=False) for kp in validators]
        latent = rng.standard_normal(setup.miners)
        while blocks_until_epoch(ledger.block_number() + 1, cfg.netuid, cfg.tempo) != 0:
            ledger.produce_block()
        for epoch in range(setup.warmup + setup.epochs):
            ledger.produce_block()  # the epoch block: Yuma pays by the weights revealed
            if epoch >= setup.warmup:
                per_stake = [
                    nr.emission / (nr.stake - nr.emission) for nr in ledger.neurons()[:n_val]
                ]
                run.copier.append(per_stake[-1])
                run.honest.append(per_stake[:-1])
            latent = drift(latent, setup.rho, rng)
            quality = np.exp(setup.sharpness * latent)
            for client in clients[:-1]:
                view = honest_view(quality, setup.noise, rng)
                client.set_weights(miner_uids, view.tolist(), wait=False)
            ledger.produce_block()
            stake = np.array([nr.stake for nr in ledger.neurons()], dtype=np.float64)
            revealed = {u: r for u, r in ledger.weights().items() if u != n_val - 1}
            copied = copied_weights(revealed, stake, cfg.kappa)[miner_uids]
            if copied.any():
                clients[-1].set_weights(miner_uids, copied.tolist(), wait=False)
            for _ in range(cfg.tempo - 1):
                ledger.produce_block()
    return run


def _populate(ledger: Ledger, validators: list[Keypair], miners: list[Keypair], stake: int) -> None:
    hashes = []
    for kp in validators:
        hashes.append(ledger.submit_call(kp, "faucet", {"amount": stake + RAO_PER_TAO}))
        hashes.append(ledger.submit_call(kp, "register", {}))
        hashes.append(ledger.submit_call(kp, "add_stake", {"amount": stake}))
    hashes += [ledger.submit_call(kp, "register", {}) for kp in miners]
    ledger.produce_block()
    for xt in hashes:
        receipt = ledger.receipt(xt)
        assert receipt is not None
        receipt.raise_for_status()
