"""A real ledger, a real store and a tiny model, plus miners that publish in-process.

`Subnet` registers one staked validator (UID 0) and miners with behaviours from
`train.adversary`; `Subnet.mine(window)` trains and publishes each miner's contribution
from the store's θ_window exactly as `train.miner` would (inner loop, Δ = θ_w − θ,
compression, signed manifest, a commitment on the ledger, then the reveal);
`Subnet.to_deadline(window)` produces blocks up to the window's reveal deadline, when a
validator may score it. Proof of work is off here unless a test turns it on
(`train.pow_segments`, `validation.pow_checks`); then miners of `tests.validation.work`'s
behaviours commit their trajectories and answer challenges with `train.responder`.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import torch
from accelerate import Accelerator

from averaging.compression import encode
from averaging.parts import payload_params, payload_tensors, wire_parts
from chain.config import RAO_PER_TAO
from chain.keys import Keypair, create_key
from chain.ledger import Ledger
from chain.local import LocalChain
from store.api import Store, open_store
from store.manifest import Compression, Trajectory
from tensormine.config import RunConfig, load_config
from train.adversary import make_adversarial_delta, training_rows
from train.inner import inner_loop
from train.model import build_model
from train.responder import Responder
from train.shards import apply_to_shard, make_trainable, shard_map, shard_state
from train.startup import load_checkpoint_weights
from train.trajectory import TrajectoryKeeper
from train.windows import reveal_deadline, start_block, wait_for_block
from validation.validator import Validator

TAO = RAO_PER_TAO


def overrides(run: Path, data: Path, **extra: object) -> list[str]:
    sets: dict[str, object] = {
        "run.dir": run,
        "chain.db": f"{run}/ledger.sqlite",
        "store.root": f"{run}/store",
        "data.cache_dir": data,
        "chain.block_time_s": 0.05,
        "chain.tempo": 9,
        "chain.weights_rate_limit": 0,
        # The validator's weights count at once: these tests read them from the ledger.
        "chain.commit_reveal": False,
        # Miners earn stake; keep them below the permit threshold for the whole test.
        "chain.validator_min_stake_rao": 1000 * TAO,
        "chain.faucet_rao": 100_000 * TAO,
        "chain.immunity_period": 5,
        "window.blocks": 20,
        "window.publish_margin": 2,
        "data.max_documents": 120,
        "data.seq_len": 64,
        "train.inner_steps": 8,
        "train.batch_size": 4,
        "train.warmup_steps": 2,
        "train.lr": 0.01,
        # A 0.4 M-parameter model: the machine is shared, and the signals are the same.
        "model.hidden_size": 64,
        "model.intermediate_size": 176,
        "model.num_layers": 2,
        "model.num_heads": 2,
        "model.num_kv_heads": 2,
        "validation.heldout_pages": 16,
        "validation.own_data_pairs": 16,
        "wandb.mode": "disabled",
        # These tests publish contributions themselves; no miner averages over hivemind.
        "averaging.enabled": False,
        # Proof of work has tests of its own (test_proof_of_work.py).
        "train.pow_segments": 0,
        "validation.pow_checks": 0,
    }
    sets.update(extra)
    return [f"{k}={v}" for k, v in sets.items()]


@pytest.fixture(scope="session")
def data_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Tokenizer and pages are built once for the whole directory."""
    return tmp_path_factory.mktemp("data")


@dataclass
class Subnet:
    cfg: RunConfig
    sets: list[str]
    keys: Path
    ledger: Ledger
    store: Store
    validator_key: Keypair
    miners: dict[str, Keypair] = field(default_factory=dict)  # name -> key, name = behaviour
    deltas: dict[str, dict[str, torch.Tensor]] = field(default_factory=dict)  # last published
    producer: bool = False  # a `chain run` process makes the blocks: wait, never advance
    tiny: float = 0.0  # a free rider's Δ: tiny × what it trained (0: a zero Δ, no training)
    keepers: dict[str, TrajectoryKeeper] = field(default_factory=dict)
    responders: dict[str, Responder] = field(default_factory=dict)
    # name -> the whole model a miner of `tests.validation.work` starts from instead of θ_w
    # (an eager-overlap miner's own start, `train.overlap.start_for`)
    starts: dict[str, dict[str, torch.Tensor]] = field(default_factory=dict)

    @property
    def chain(self) -> LocalChain:
        """The `Chain` view of the ledger handle (what the library takes)."""
        return LocalChain(self.ledger)

    def uid(self, name: str) -> int:
        uid = self.ledger.uid_of(self.miners[name].address)
        assert uid is not None
        return uid

    def validator(self) -> Validator:
        return Validator(self.cfg, self.validator_key, "v0")

    def to_block(self, block: int) -> None:
        head = self.ledger.block_number()
        if self.producer:
            wait_for_block(self.chain, block)
        elif head < block:
            self.ledger.advance(block - head)

    def to_deadline(self, window: int) -> None:
        self.to_block(reveal_deadline(window, self.cfg.window))

    def commit(self, kp: Keypair, window: int, digest: str) -> int:
        """Commit `digest` for `window` on the ledger; returns the block that took it."""
        xt = self.ledger.submit_call(kp, "commit_contribution", {"round": window, "digest": digest})
        if self.producer:
            receipt = self.ledger.wait(xt, timeout=30)
        else:
            self.ledger.produce_block()
            got = self.ledger.receipt(xt)
            assert got is not None
            receipt = got
        return receipt.raise_for_status().block

    def publish_to(
        self,
        store: Store,
        kp: Keypair,
        uid: int,
        window: int,
        shard: int,
        tensors: dict[str, torch.Tensor],
        compression: Compression,
        trajectory: Trajectory | None = None,
    ) -> None:
        """Prepare, commit and reveal a payload, as `train.miner` does (the reveal comes
        at once here: no one in these tests peeks before the deadline)."""
        prepared = store.prepare_contribution(
            tensors, keypair=kp, uid=uid, window=window, shard=shard, compression=compression,
            trajectory=trajectory,
        )  # fmt: skip
        self.commit(kp, window, prepared.digest)
        store.reveal_contribution(prepared)

    def theta(self, window: int) -> dict[str, torch.Tensor]:
        """θ_window as a miner gets it: the store's canonical checkpoint, else window 0."""
        have = [r.window for r in self.store.list_checkpoints() if r.window <= window]
        folder = self.keys.parent / "miner-pulls" / f"window-{max(have)}"
        if not folder.exists():
            self.store.pull_checkpoint(folder, window=max(have), progress=False)
        return load_checkpoint_weights(folder)

    def mine(self, window: int, names: list[str] | None = None) -> None:
        """Every (named) miner trains and publishes its Δ of `window`, honest ones first."""
        from validation.admission import Roster

        self.to_block(start_block(window, self.cfg.window))
        cfg = self.cfg
        validator = getattr(self, "_pages_owner", None)
        if validator is None:
            validator = self._pages_owner = self.validator()
        pages = validator.pages
        model = build_model(cfg.model, cfg.run.seed)
        theta = self.theta(window)
        roster = Roster.from_neurons(self.ledger.neurons(), model=cfg.model, window=window)
        rng = torch.Generator().manual_seed(window)
        acc = Accelerator(cpu=True)
        order = sorted(names or self.miners, key=lambda n: not n.startswith("honest"))
        for name in order:
            kp = self.miners[name]
            behaviour = name.split("-")[0]
            if cfg.train.pow_segments:
                self._mine_with_work(name, window, theta, roster, pages, model, acc)
                continue
            uid = self.uid(name)
            shard = roster.shard_of(uid)
            names_s = shard_map(model, cfg.model.shards)[shard]
            model.load_state_dict(theta)
            start = shard_state(model, names_s)
            if behaviour in ("honest", "wrong_data", "heldout") or (
                behaviour == "free_rider" and self.tiny > 0
            ):
                rows = training_rows(
                    behaviour, kp.address, window, cfg.run.seed, pages.train, pages.heldout,
                    cfg.train.pages_per_window, affinity=validator.affinities.get(shard),
                )  # fmt: skip
                make_trainable(model, names_s)
                # One accelerator per `mine`, dropped after it: no `free_memory` (a full
                # garbage collection) per miner.
                inner_loop(acc, model, names_s, torch.from_numpy(rows), cfg.train, release=False)
                trained = shard_state(model, names_s)
                own = {n: start[n] - trained[n] for n in names_s}
            else:  # these do not train: noise takes the honest Δ's norms, the rest copy
                own = self.deltas.get("honest") or {n: torch.zeros_like(start[n]) for n in names_s}
            other = self.deltas.get("honest")
            delta = make_adversarial_delta(behaviour, own, other, rng, tiny=self.tiny)
            self.deltas[behaviour] = delta
            self.publish(kp, uid, window, shard, delta)
            apply_to_shard(model, names_s, start)

    def _mine_with_work(
        self,
        name: str,
        window: int,
        theta: dict[str, torch.Tensor],
        roster: object,
        pages: object,
        model: torch.nn.Module,
        acc: Accelerator,
    ) -> None:
        """One miner of `tests.validation.work` trains, commits its trajectory with its Δ
        and (unless silent) answers challenges from a `train.responder` thread."""
        from tests.validation.work import Job, train_window

        cfg, kp = self.cfg, self.miners[name]
        behaviour, uid = name.split("-")[0], self.uid(name)
        shard = roster.shard_of(uid)  # type: ignore[attr-defined]
        names_s = shard_map(model, cfg.model.shards)[shard]
        model.load_state_dict(self.starts.get(name, theta))
        count = cfg.train.pages_per_window
        train = pages.train  # type: ignore[attr-defined]
        # The pages `train.miner` would take: its shard's affinity included (the validators
        # recompute with it).
        affinity = self._pages_owner.affinities.get(shard)
        rows = training_rows(
            "honest", kp.address, window, cfg.run.seed, train, train, count, affinity=affinity
        )
        other = training_rows(
            "wrong_data", kp.address, window, cfg.run.seed, train, train, count, affinity=affinity
        )
        keeper = self.keepers.setdefault(
            name, TrajectoryKeeper(self.keys.parent / "trajectories" / name)
        )
        if behaviour != "silent" and name not in self.responders:
            responder = Responder(
                self.store, kp, keeper, shard_map(model, cfg.model.shards),
                chain=self.chain, backend=cfg.store.backend, interval=0.1,
            )  # fmt: skip
            responder.start()
            self.responders[name] = responder
        make_trainable(model, names_s)
        job = Job(acc, model, names_s, rows, other, cfg.train, window, shard)
        delta = train_window(behaviour, job, keeper)
        meta = keeper.meta(window)
        assert meta is not None
        states = tuple(keeper.digests(window, meta[1]))
        trajectory = Trajectory(bounds=tuple(meta[1]), states=states)
        self.deltas[name] = delta
        self.publish(kp, uid, window, shard, delta, trajectory)

    def publish(
        self,
        kp: Keypair,
        uid: int,
        window: int,
        shard: int,
        delta: dict[str, torch.Tensor],
        trajectory: Trajectory | None = None,
    ) -> None:
        avg = self.cfg.averaging
        if avg.enabled:  # the wire's parts, as a miner of a group publishes them
            assert avg.wire != "sparseloco", "these miners publish the dense wires only"
            size = avg.wire_part_size_bytes
            blobs, _ = wire_parts(delta, avg.wire, size)
            params = payload_params(blobs, list(delta), avg.wire, size)
            self.publish_to(
                self.store, kp, uid, window, shard, payload_tensors(blobs),
                Compression(scheme="wire", params=params), trajectory,
            )  # fmt: skip
            return
        encoded = encode(delta, self.cfg.compression, None)
        compression = Compression(scheme=self.cfg.compression.scheme, params=encoded.params)
        self.publish_to(
            self.store, kp, uid, window, shard, dict(encoded.tensors), compression, trajectory
        )


def make_subnet(
    tmp_path: Path,
    data_cache: Path,
    miners: list[str],
    *,
    key_seed: str | None = None,
    **extra: object,
) -> Subnet:
    """A ledger with a staked validator and `miners` registered. With `key_seed` every key
    (and so the validator's secret and each miner's pages) is derived from it: a run whose
    statistical checks come out the same every time."""
    run, keys = tmp_path / "run", tmp_path / "keys"
    sets = overrides(run, data_cache, **extra)
    cfg = load_config("configs/tiny.yaml", sets)

    def key(name: str) -> Keypair:
        seed = None if key_seed is None else hashlib.sha256(f"{key_seed}/{name}".encode()).digest()
        return create_key(keys, name, seed=seed)

    owner = key("owner")
    vkey = key("v0")
    ledger = Ledger.create(cfg.chain.db, cfg.chain, owner.address)
    hashes = [
        ledger.submit_call(vkey, "faucet", {"amount": 2001 * TAO}),
        ledger.submit_call(vkey, "register", {}),
        ledger.submit_call(vkey, "add_stake", {"amount": 2000 * TAO}),
    ]
    ledger.produce_block()
    keyed = {name: key(name) for name in miners}
    hashes += [ledger.submit_call(kp, "register", {}) for kp in keyed.values()]
    ledger.produce_block()
    for h in hashes:
        receipt = ledger.receipt(h)
        assert receipt is not None
        receipt.raise_for_status()
    # Permits are computed at epochs: run one so the staked validator holds its permit.
    ledger.advance(cfg.chain.tempo + 2)
    assert ledger.neurons()[0].validator_permit
    store = open_store(cfg.store)
    return Subnet(cfg, sets, keys, ledger, store, vkey, keyed)


@pytest.fixture
def subnet_factory(tmp_path: Path, data_cache: Path) -> Iterator[object]:
    made: list[Subnet] = []

    def factory(miners: list[str], *, key_seed: str | None = None, **extra: object) -> Subnet:
        net = make_subnet(tmp_path, data_cache, miners, key_seed=key_seed, **extra)
        made.append(net)
        return net

    yield factory
    for net in made:
        for responder in net.responders.values():
            responder.stop()
        net.ledger.close()
