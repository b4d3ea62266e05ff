"""A miner's window and a validator's window on the Bittensor backend, in one process.

    .venv/bin/pytest -q tests/chain/test_bittensor_window.py

`train.miner.Miner` and `validation.validator.Validator` get `BittensorChain` handles
(the real bittensor SDK) on `tests.chain.substrate.InMemorySubtensor`, which a thread
advances one block per block time while they run, and go through the code paths they
use on the local ledger: `Miner.run` (train, commit the contribution's digest in the
hotkey's commitment before the deadline, reveal it in the store) and
`Validator.process_window` (list, admit, score, publish θ_{w+1}, set weights). The
subnet runs commit-reveal, subtensor's default: the weights go out as a timelocked
``commit_timelocked_mechanism_weights`` that the node stores (drand would reveal it
later). Plain ``set_mechanism_weights``, readable at once, is checked on both backends by
the contract suite (`tests/chain/test_contract.py`); a second window run for it would
cost the test suite ten seconds for no new code path above the chain.
"""

from __future__ import annotations

import json
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
from accelerate import Accelerator
from bittensor import storage as sdk_storage

from chain.bittensor import BittensorChain
from chain.bittensor.commitments import CONTRIBUTION_KEY
from chain.config import RAO_PER_TAO
from chain.interface import Identity
from store.sources import KEY as CONTRIBUTIONS_KEY
from tensormine.config import RunConfig, load_config
from tests.chain.substrate import InMemorySubtensor, SdkKey, SubmittedCall, isolate_sdk_paths
from train.miner import Miner
from train.windows import deadline, reveal_deadline, start_block, wait_for_block
from validation.report import SCORED
from validation.validator import Validator

TAO = RAO_PER_TAO
NETUID = 1
TEMPO = 9
BLOCK_TIME_S = 0.1


def run_config(run: Path) -> RunConfig:
    """A tiny run on the Bittensor backend. The chain's block time (read from the node)
    and `chain.block_time_s` (the miner's commit timeout) agree.

    Averaging is off: a lone miner has no group to average with, and a hivemind DHT per
    process would only add start-up time; the miner's Δ then goes to the store alone, as
    with `averaging.enabled=false` on the local ledger. The own-data check is off too
    (it is statistical, with tests of its own in tests/validation), so the miner's score
    is its loss delta on E, which one window of training on a fresh model makes
    positive. Proof of work is off (tests/validation/test_proof_of_work.py)."""
    sets: dict[str, object] = {
        "run.dir": run,
        "store.root": run / "store",
        "data.cache_dir": run / "data",
        "chain.backend": "bittensor",
        "chain.network": "local",
        "chain.netuid": NETUID,
        "chain.cache_dir": run / "bittensor",
        "chain.block_time_s": BLOCK_TIME_S,
        # 7.8 s from a window's start to its deadline: training and committing take ~1 s,
        # up to ~4 s on two loaded cores, and the blocks keep coming meanwhile.
        "window.blocks": 80,
        "window.publish_margin": 2,
        "window.reveal_blocks": 2,
        "data.max_documents": 40,
        "data.seq_len": 32,
        "model.hidden_size": 64,
        "model.intermediate_size": 176,
        "model.num_layers": 2,
        "model.num_heads": 2,
        "model.num_kv_heads": 2,
        "train.inner_steps": 4,
        "train.batch_size": 2,
        "train.warmup_steps": 1,
        "train.lr": 0.01,
        "train.eval_pages": 2,
        "train.pow_segments": 0,
        "validation.pow_checks": 0,
        "validation.own_data_pairs": 0,
        "validation.heldout_pages": 8,
        "averaging.enabled": False,
        "wandb.mode": "disabled",
    }
    return load_config("configs/tiny.yaml", [f"{k}={v}" for k, v in sets.items()])


def sdk_identity(substrate: InMemorySubtensor, tao: int) -> Identity:
    hotkey, coldkey = SdkKey.generate(), SdkKey.generate()
    substrate.fund(coldkey.address, tao * TAO)
    return Identity(hotkey=hotkey, coldkey=coldkey, coldkey_address=coldkey.address)


def committed_text(call: SubmittedCall) -> str:
    """The UTF-8 text a ``Commitments.set_commitment`` call carried (its Raw fields)."""
    fields = call.args["info"]["fields"]
    return b"".join(bytes(v) for field in fields for v in field.values()).decode()


class Node:
    """The in-memory node, its block producer (started by `start_producing`: one block
    per `BLOCK_TIME_S`) and the handles opened on it (all closed after the test; closing
    twice is harmless, so the miner and validator close theirs too)."""

    def __init__(self, substrate: InMemorySubtensor, cfg: RunConfig) -> None:
        self.substrate, self.cfg = substrate, cfg
        self.handles: list[BittensorChain] = []
        self.go, self.stop = threading.Event(), threading.Event()
        self.producer = threading.Thread(target=self._produce, name="producer", daemon=True)
        self.producer.start()

    def _produce(self) -> None:
        self.go.wait()
        while not self.stop.wait(BLOCK_TIME_S):
            self.substrate.produce_blocks(1)

    def start_producing(self) -> None:
        self.go.set()

    def connect(self, identity: Identity | None = None) -> BittensorChain:
        handle = BittensorChain.connect(self.cfg.chain, identity, substrate=self.substrate)
        self.handles.append(handle)
        return handle

    def close(self) -> None:
        self.stop.set()
        self.go.set()
        self.producer.join(timeout=10)
        for handle in self.handles:
            handle.close()


@pytest.fixture
def node(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Iterator[Node]:
    """A `Node` whose subnet runs commit-reveal."""
    isolate_sdk_paths(monkeypatch, tmp_path / "home")
    substrate = InMemorySubtensor(
        netuid=NETUID,
        tempo=TEMPO,
        block_time_s=BLOCK_TIME_S,
        wall_clock=True,
        commit_reveal=True,
    )
    made = Node(substrate, run_config(tmp_path / "run"))
    try:
        yield made
    finally:
        made.close()


def test_a_miner_window_and_a_validator_window_on_the_in_memory_subtensor(node: Node) -> None:
    substrate, cfg, connect = node.substrate, node.cfg, node.connect

    # Registration (burned, from the coldkey) and the validator's stake, through the
    # Chain interface; the next epoch gives the staked hotkey its validator permit.
    miner_id, validator_id = sdk_identity(substrate, 5), sdk_identity(substrate, 40)
    miner_chain, validator_chain, reader = connect(miner_id), connect(validator_id), connect()
    miner_uid, validator_uid = miner_chain.register(), validator_chain.register()
    validator_chain.add_stake(20 * TAO)
    substrate.advance_to_epoch()
    permits = {n.uid: n.validator_permit for n in reader.neurons()}
    assert permits == {miner_uid: False, validator_uid: True}
    assert reader.block_time_s == cfg.chain.block_time_s

    miner = Miner(cfg, miner_id, "m0", Accelerator(cpu=True), chain=miner_chain)
    validator: Validator | None = None
    try:
        validator = Validator(cfg, validator_id, "v0", chain=validator_chain)
        # Enter the miner at a window's first block: the whole window is left to train.
        window = substrate.head // cfg.window.blocks + 1
        substrate.advance_to(start_block(window, cfg.window))
        node.start_producing()

        (report,) = miner.run(max_windows=1)
        assert report.window == window and not report.late
        assert report.committed_block < deadline(window, cfg.window)
        assert report.published_bytes > 0

        wait_for_block(reader, reveal_deadline(window, cfg.window))
        scored = validator.process_window(window)
    finally:
        miner.close()
        if validator is not None:
            validator.close()

    # The miner's commitment: its contributions location, then the window's digest with
    # it, hotkey-signed, in a block before the deadline.
    due = deadline(window, cfg.window)
    commits = [c for c in substrate.calls_to("set_commitment") if c.signer == miner_id.address]
    assert commits and all(c.success for c in commits)
    bodies = [json.loads(committed_text(c)) for c in commits]
    location = str(cfg.store.root.resolve())
    assert bodies[0] == {CONTRIBUTIONS_KEY: location}
    last, body = commits[-1], bodies[-1]
    assert body[CONTRIBUTIONS_KEY] == location
    round_, digest = body[CONTRIBUTION_KEY]
    assert round_ == window
    assert last.block == report.committed_block < due
    read = reader.contribution_commitments(window, block=due)
    assert read[miner_id.address].digest == digest
    assert read[miner_id.address].block == report.committed_block

    # The validator listed, admitted and scored the miner's contribution.
    assert scored.contributions == scored.admitted == 1
    (row,) = [r for r in scored.miners if r.uid == miner_uid]
    assert row.status == SCORED and row.hotkey == miner_id.address
    assert row.committed_block == report.committed_block and row.revealed
    assert row.loss_delta is not None and row.score > 0
    assert row.weight == pytest.approx(1.0)
    assert scored.weights_set

    # Its weights went out through the SDK's SetWeights, signed by its hotkey, as a
    # timelocked commit the chain now stores (drand reveals it later; until then no weights
    # show).
    assert not substrate.calls_to("set_mechanism_weights")
    (commit_call,) = substrate.calls_to("commit_timelocked_mechanism_weights")
    assert commit_call.success and commit_call.signer == validator_id.address
    assert commit_call.args["commit_reveal_version"] == 4
    assert commit_call.args["reveal_round"] > 0
    stored = reader.client.query_map(sdk_storage.SubtensorModule.TimelockedWeightCommits, [NETUID])
    pending = [entry for _, entries in stored for entry in entries]
    assert [(who, block) for who, block, *_ in pending] == [
        (validator_id.address, commit_call.block)
    ]
    assert reader.weights() == {}
