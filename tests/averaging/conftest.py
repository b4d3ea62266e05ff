"""Multi-peer fixtures: four real DHT peers on 127.0.0.1, each a miner registered on a ledger.

The swarm is built the way a real subnet grows: the first peer starts alone and commits
its multiaddrs to the ledger; each later peer bootstraps from the ledger's commitments
only. Miner i has staked i + 1 TAO, so stake-weighted averages have closed forms. Tests
share the swarm (one DHT start per peer per session) and keep out of each other's way by
using their own shard number, which is the hivemind group prefix.
"""

from __future__ import annotations

import os

# hivemind's default ("file_system") starts a torch_shm_manager child that outlives every
# test and trips the suite's leftover-process check; fork-inherited descriptors suffice here.
# This must run before anything imports hivemind.
os.environ.setdefault("HIVEMIND_MEMORY_SHARING_STRATEGY", "file_descriptor")

import concurrent.futures
import itertools
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from hivemind import DHT

from averaging.dht import PeerDirectory, commitment_for, start_dht
from averaging.group import ShardAverager
from averaging.round import AverageResult, AveragingFailed, Role
from averaging.settings import AveragingConfig, DHTConfig
from averaging.weights import LedgerWeights
from chain.config import RAO_PER_TAO
from chain.keys import Keypair
from chain.ledger import Ledger
from chain.local import LocalChain
from tests.chain.conftest import do, fast_config, subnet

RUN = "avgtest"
N_PEERS = 4

# Short timeouts keep failure paths quick on a loaded 2-core machine. Parts of 1 KiB (256
# values) cut the 1584-value template into 7 parts, so that each of four peers reduces some
# (with 512 values a part, load balancing can leave one peer without any).
FAST = AveragingConfig(
    wire="none",
    min_matchmaking_time_s=1.5,
    request_timeout_s=0.5,
    # 1 s (reducers 2 s) lost a round now and then on a loaded CI runner: a reducer stalled
    # for 2 s, one member gave up, the others finished without it (issue 15).
    sender_timeout_s=2.0,
    allreduce_timeout_s=10.0,
    part_size_bytes=1 << 10,
)


def template() -> dict[str, torch.Tensor]:
    return {"w": torch.zeros(32, 48), "b": torch.zeros(48)}


def random_delta(seed: int, scale: float = 0.01) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return {name: torch.randn(t.shape, generator=gen) * scale for name, t in template().items()}


def weighted(
    deltas: Sequence[dict[str, torch.Tensor]], weights: Sequence[float]
) -> dict[str, torch.Tensor]:
    """Σ w_i Δ_i / Σ w_i, computed in float64 in the test process."""
    w = torch.tensor(list(weights), dtype=torch.float64)
    return {
        name: (torch.stack([d[name].double() for d in deltas]) * w.view(-1, *[1] * d0.dim()))
        .sum(0)
        .div(w.sum())
        .float()
        for name, d0 in deltas[0].items()
    }


@dataclass
class Swarm:
    ledger_path: Path
    ledger: Ledger  # main-thread handle; threads pass `ledger_path` instead
    miners: list[Keypair]
    dhts: list[DHT]
    shards: Iterator[int]

    @property
    def hotkeys(self) -> list[str]:
        return [kp.address for kp in self.miners]

    @property
    def chain(self) -> LocalChain:
        """The `Chain` view of the main-thread ledger handle (what the library takes)."""
        return LocalChain(self.ledger)

    def directory(self, dht: DHT | None = None) -> PeerDirectory:
        return PeerDirectory(self.ledger_path, run=RUN, dht=dht)

    def new_shard(self) -> int:
        """A shard number (hence a hivemind prefix) no other test uses."""
        return next(self.shards)


@pytest.fixture(scope="session")
def swarm(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Swarm]:
    root = tmp_path_factory.mktemp("swarm")
    owner = Keypair.generate()
    cfg = fast_config(root / "ledger.sqlite")
    ledger = Ledger.create(cfg.db, cfg, owner.address)
    _, miners = subnet(ledger, N_PEERS, [])
    for i, kp in enumerate(miners):
        do(ledger, kp, "faucet", {"amount": (i + 2) * RAO_PER_TAO})
        do(ledger, kp, "add_stake", {"amount": (i + 1) * RAO_PER_TAO})
    dhts: list[DHT] = []
    try:
        for kp in miners:
            dht = start_dht(DHTConfig(), run=RUN, ledger=LocalChain(ledger))
            dhts.append(dht)
            text = commitment_for(dht, LocalChain(ledger), kp.address, run=RUN)
            do(ledger, kp, "commit", {"data": text})
        yield Swarm(cfg.db, ledger, miners, dhts, itertools.count(100))
    finally:
        for dht in dhts:
            dht.shutdown()
        ledger.close()


Outcome = AverageResult | AveragingFailed


def run_round(
    averagers: Sequence[ShardAverager],
    deltas: Sequence[dict[str, torch.Tensor] | None],
    window: int,
    *,
    timeout: float = 8.0,
    timeouts: Sequence[float] | None = None,
    expected_peers: int | None = None,
    weights: dict[str, float] | None = None,
) -> list[Outcome]:
    """Every averager's `average` at once (one thread each); a failure is returned, not raised.
    `timeouts` gives each averager its own timeout (default: `timeout` for all). They share a
    start time, as miners do with the window's end, so that they agree on one leader, and
    `weights`."""
    limits = list(timeouts) if timeouts is not None else [timeout] * len(averagers)
    start_at = time.time() + FAST.min_matchmaking_time_s + 0.5

    def one(avg: ShardAverager, delta: dict[str, torch.Tensor] | None, limit: float) -> Outcome:
        try:
            return avg.average(
                window,
                delta,
                timeout=limit,
                expected_peers=expected_peers,
                start_at=start_at,
                weights=weights,
            )
        except AveragingFailed as exc:
            return exc

    with concurrent.futures.ThreadPoolExecutor(len(averagers)) as pool:
        futures = [
            pool.submit(one, a, d, t) for a, d, t in zip(averagers, deltas, limits, strict=True)
        ]
        return [f.result(timeout=max(limits) + FAST.allreduce_timeout_s + 30) for f in futures]


@pytest.fixture
def shutdown_later() -> Iterator[list[ShardAverager]]:
    """Averagers appended here are shut down after the test, whatever happened."""
    started: list[ShardAverager] = []
    yield started
    for avg in started:
        avg.shutdown()


def make(
    swarm: Swarm,
    started: list[ShardAverager],
    shard: int,
    peers: range | list[int] = range(4),
    *,
    config: AveragingConfig = FAST,
    roles: dict[int, Role] | None = None,
    source: str = FAST.weights,  # trust: zero on this fresh ledger, so every member gets the floor
    cls: type[ShardAverager] = ShardAverager,
    tmpl: dict[str, torch.Tensor] | None = None,
) -> list[ShardAverager]:
    out = []
    for i in peers:
        avg = cls(
            swarm.dhts[i],
            RUN,
            shard,
            tmpl or template(),
            role=(roles or {}).get(i, Role.MEMBER),
            config=config,
            directory=swarm.directory(),
            weight_of=LedgerWeights(swarm.ledger_path, source, 1e-3),  # type: ignore[arg-type]
        )
        started.append(avg)
        out.append(avg)
    return out


def ok(outcomes: list[AverageResult | AveragingFailed]) -> list[AverageResult]:
    for outcome in outcomes:
        if isinstance(outcome, AveragingFailed):
            raise AssertionError(f"a peer failed: {outcome}")
    return outcomes  # type: ignore[return-value]


def assert_all_equal(results: list[AverageResult]) -> None:
    for r in results[1:]:
        for name in r.tensors:
            assert torch.equal(r.tensors[name], results[0].tensors[name])
