"""Commit-reveal of weights (`chain.commit_reveal`, `chain.reveals`): the timing rule,
the refusals by name, replay, and a validator's secrets across a restart."""

from __future__ import annotations

import json
import stat
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from chain import errors, storage
from chain.commit_reveal import (
    commit_hash,
    pending_commits,
    reveal_blocks,
    reveal_window,
    window_blocks,
)
from chain.config import ChainConfig
from chain.interface import Identity, is_epoch_block
from chain.keys import Keypair
from chain.ledger import Ledger
from chain.local import LocalChain
from chain.node import run_producer
from chain.replay import replay
from chain.reveals import PendingReveals, commit_and_reveal, reveal_due
from chain.storage import state_digest
from tensormine.cli import main

from .conftest import do, fast_config, subnet

SALT = "00" * 16
U16 = 65535


def cr_config(db: Path, **changes: object) -> ChainConfig:
    return fast_config(db, **{"commit_reveal": True, **changes})


@pytest.fixture
def cr(tmp_path: Path, owner: Keypair) -> Iterator[Ledger]:
    cfg = cr_config(tmp_path / "cr.sqlite")
    with Ledger.create(cfg.db, cfg, owner.address) as ledger:
        yield ledger


def next_is(ledger: Ledger, block: int) -> None:
    """Produce blocks until the next one is `block`."""
    assert ledger.block_number() < block
    while ledger.block_number() + 1 < block:
        ledger.produce_block()


def window_of_next(ledger: Ledger) -> int:
    cfg = ledger.config
    return reveal_window(ledger.block_number() + 1, cfg.netuid, cfg.tempo)


def digest(ledger: Ledger, kp: Keypair, uids: list[int], weights: list[int], salt: str) -> str:
    return commit_hash(ledger.genesis_hash, ledger.config.netuid, kp.address, uids, weights, salt)


def commit(ledger: Ledger, kp: Keypair, uids: list[int], weights: list[int]) -> int:
    """Commit with the fixed salt; returns the block that took it."""
    do(ledger, kp, "commit_weights", {"commit_hash": digest(ledger, kp, uids, weights, SALT)})
    return ledger.block_number()


def reveal_args(uids: list[int], weights: list[int], salt: str = SALT) -> dict[str, object]:
    return {"uids": uids, "weights": weights, "salt": salt}


@pytest.mark.parametrize(("netuid", "tempo"), [(1, 9), (0, 1), (7, 4), (3, 360)])
def test_reveal_windows_turn_over_at_epoch_blocks(netuid: int, tempo: int) -> None:
    for block in range(1, 3 * (tempo + 1) + 5):
        turned = reveal_window(block, netuid, tempo) == reveal_window(block - 1, netuid, tempo) + 1
        assert turned == is_epoch_block(block, netuid, tempo), block
        first, last = window_blocks(reveal_window(block, netuid, tempo), netuid, tempo)
        assert first <= block <= last and last - first == tempo
        if block == first and block > 0:
            assert is_epoch_block(block, netuid, tempo)


def test_commit_then_reveal_sets_exactly_the_weights(cr: Ledger) -> None:
    (v,), _ = subnet(cr, miners=3, validators=[100])
    cfg = cr.config
    made = commit(cr, v, [1, 2], [3, 1])
    window = reveal_window(made, cfg.netuid, cfg.tempo)
    assert pending_commits(cr.conn, v.address)[0].epoch == window
    assert cr.weights() == {}  # a hash only
    first, last = reveal_blocks(made, cfg)
    assert (first, last) == window_blocks(window + 1, cfg.netuid, cfg.tempo)
    next_is(cr, first)  # the epoch at `first` runs before the reveal: no weights yet
    do(cr, v, "reveal_weights", reveal_args([1, 2], [3, 1]))
    assert cr.block_number() == first
    assert all(n.incentive == 0 for n in cr.neurons()[1:])
    assert cr.weights() == {0: [(1, U16), (2, round(U16 / 3))]}
    assert cr.neurons()[0].last_update == made  # the weights as of their commit
    assert pending_commits(cr.conn, v.address) == []
    # The next epoch pays by them: one validator, so incentive = its normalized weights.
    next_is(cr, last + 2)
    incentive = [n.incentive for n in cr.neurons()]
    assert incentive[1] == pytest.approx(U16 / (U16 + round(U16 / 3)), abs=2e-5)
    assert incentive[2] == pytest.approx(round(U16 / 3) / (U16 + round(U16 / 3)), abs=2e-5)
    assert incentive[3] == 0
    assert replay(cr).digest == state_digest(cr.conn)


def test_reveal_too_early_too_late_and_expired(cr: Ledger) -> None:
    (v,), _ = subnet(cr, miners=2, validators=[100])
    made = commit(cr, v, [1], [1])
    first, last = reveal_blocks(made, cr.config)
    with pytest.raises(errors.RevealTooEarly, match=f"blocks {first}..{last}"):
        cr.submit_call(v, "reveal_weights", reveal_args([1], [1]))
    next_is(cr, first - 1)  # the last block of the commit's own window
    with pytest.raises(errors.RevealTooEarly):
        cr.submit_call(v, "reveal_weights", reveal_args([1], [1]))
    next_is(cr, last + 1)  # the window after the reveal window
    with pytest.raises(errors.ExpiredWeightCommit, match="too late"):
        cr.submit_call(v, "reveal_weights", reveal_args([1], [1]))
    next_is(cr, last + 1 + cr.config.tempo + 2)  # the next epoch block deleted the commit
    assert pending_commits(cr.conn, v.address) == []
    with pytest.raises(errors.NoWeightsCommitFound):
        cr.submit_call(v, "reveal_weights", reveal_args([1], [1]))
    assert cr.weights() == {}


def test_mismatching_reveals_and_someone_elses_commit(cr: Ledger) -> None:
    (a, b), _ = subnet(cr, miners=2, validators=[100, 100])
    made = commit(cr, a, [2, 3], [1, 2])
    next_is(cr, reveal_blocks(made, cr.config)[0])
    before = state_digest(cr.conn)
    for args in (
        reveal_args([2, 3], [1, 2], "11" * 16),  # another salt
        reveal_args([2, 3], [2, 1]),  # other weights
        reveal_args([2], [1]),  # other UIDs
    ):
        with pytest.raises(errors.InvalidRevealCommitHashNotMatch):
            cr.submit_call(a, "reveal_weights", args)
    # b holds no commit: it cannot reveal a's, even with a's exact secret.
    with pytest.raises(errors.NoWeightsCommitFound):
        cr.submit_call(b, "reveal_weights", reveal_args([2, 3], [1, 2]))
    assert state_digest(cr.conn) == before
    with pytest.raises(errors.InvalidCall, match="salt"):
        cr.submit_call(a, "reveal_weights", reveal_args([2, 3], [1, 2], "short"))
    with pytest.raises(errors.InvalidCall, match="sha256"):
        cr.submit_call(a, "commit_weights", {"commit_hash": "x" * 64})
    do(cr, a, "reveal_weights", reveal_args([2, 3], [1, 2]))
    assert cr.weights() == {0: [(2, 32768), (3, U16)]}


def test_plain_set_weights_is_refused_and_commits_need_a_permit(cr: Ledger) -> None:
    (v,), (m,) = subnet(cr, miners=1, validators=[100])
    with pytest.raises(errors.CommitRevealEnabled, match="commit_weights"):
        cr.submit_call(v, "set_weights", {"uids": [1], "weights": [1]})
    with pytest.raises(errors.NoValidatorPermit):
        cr.submit_call(m, "commit_weights", {"commit_hash": digest(cr, m, [0], [1], SALT)})
    stranger = Keypair.generate()
    with pytest.raises(errors.NotRegistered):
        cr.submit_call(stranger, "commit_weights", {"commit_hash": "ab" * 32})


def test_off_means_set_weights_as_before(tmp_path: Path, owner: Keypair) -> None:
    cfg = fast_config(tmp_path / "off.sqlite")
    assert cfg.commit_reveal is False and ChainConfig().commit_reveal is True
    with Ledger.create(cfg.db, cfg, owner.address) as ledger:
        (v,), _ = subnet(ledger, miners=1, validators=[100])
        with pytest.raises(errors.CommitRevealDisabled):
            ledger.submit_call(v, "commit_weights", {"commit_hash": "ab" * 32})
        with pytest.raises(errors.CommitRevealDisabled):
            ledger.submit_call(v, "reveal_weights", reveal_args([1], [1]))
        do(ledger, v, "set_weights", {"uids": [1], "weights": [1]})
        assert ledger.weights() == {0: [(1, U16)]}
        assert ledger.neurons()[0].last_update == ledger.block_number()


def test_rate_limit_applies_to_commits_and_the_last_commit_of_a_window_wins(
    tmp_path: Path, owner: Keypair
) -> None:
    cfg = cr_config(tmp_path / "rl.sqlite", weights_rate_limit=3, tempo=19)
    with Ledger.create(cfg.db, cfg, owner.address) as ledger:
        (v,), _ = subnet(ledger, miners=2, validators=[100])
        next_is(ledger, window_blocks(window_of_next(ledger) + 1, cfg.netuid, cfg.tempo)[0])
        made = commit(ledger, v, [1], [1])
        with pytest.raises(errors.RateLimited, match="next is allowed"):
            ledger.submit_call(v, "commit_weights", {"commit_hash": "ab" * 32})
        ledger.advance(2)
        second = commit(ledger, v, [2], [1])  # same window: replaces the first
        assert reveal_window(second, 1, 19) == reveal_window(made, 1, 19)
        assert [c.block for c in pending_commits(ledger.conn, v.address)] == [second]
        next_is(ledger, reveal_blocks(second, cfg)[0])
        with pytest.raises(errors.InvalidRevealCommitHashNotMatch):
            ledger.submit_call(v, "reveal_weights", reveal_args([1], [1]))
        do(ledger, v, "reveal_weights", reveal_args([2], [1]))  # a reveal is not rate limited
        assert ledger.weights() == {0: [(2, U16)]}
        assert replay(ledger).digest == state_digest(ledger.conn)


def test_replay_of_a_commit_reveal_history(cr: Ledger) -> None:
    (a, b), _ = subnet(cr, miners=3, validators=[100, 60])
    for _ in range(4):  # both commit every window; a reveals, b never does
        made = commit(cr, a, [2, 3, 4], [1, 2, 3])
        commit(cr, b, [2], [1])
        next_is(cr, reveal_blocks(made, cr.config)[0])
        do(cr, a, "reveal_weights", reveal_args([2, 3, 4], [1, 2, 3]))
    assert set(cr.weights()) == {0}
    assert len(pending_commits(cr.conn, b.address)) <= cr.config.reveal_period_epochs + 2
    report = replay(cr)
    assert report.digest == state_digest(cr.conn)
    cr.conn.execute("UPDATE weight_commits SET commit_hash = ?", ("cd" * 32,))
    with pytest.raises(errors.CorruptLedger, match="differs"):
        replay(cr)


def test_old_ledgers_run_without_commit_reveal_and_keep_their_digest(
    tmp_path: Path, owner: Keypair, monkeypatch: pytest.MonkeyPatch
) -> None:
    cfg = fast_config(tmp_path / "old.sqlite")
    with Ledger.create(cfg.db, cfg, owner.address) as ledger:
        (v,), _ = subnet(ledger, miners=1, validators=[50])
        do(ledger, v, "set_weights", {"uids": [1], "weights": [1]})
        ledger.advance(12)
        with_empty_table = state_digest(ledger.conn)
        # Written before commit-reveal: no table, and a genesis that does not name it.
        ledger.conn.execute("DROP TABLE weight_commits")
        (text,) = ledger.conn.execute("SELECT value FROM meta WHERE key = 'genesis'").fetchone()
        genesis = json.loads(text)
        del genesis["config"]["commit_reveal"], genesis["config"]["reveal_period_epochs"]
        ledger.conn.execute(
            "UPDATE meta SET value = ? WHERE key = 'genesis'", (json.dumps(genesis),)
        )
        with monkeypatch.context() as patch:
            patch.delitem(storage.STATE_TABLES, "weight_commits")
            old = state_digest(ledger.conn)
    assert old == with_empty_table
    with Ledger(cfg.db) as ledger:
        assert ledger.config.commit_reveal is False
        assert replay(ledger).digest == old
        do(ledger, v, "set_weights", {"uids": [1], "weights": [2]})


def test_pending_reveals_survive_a_restart(cr: Ledger, tmp_path: Path) -> None:
    (v,), _ = subnet(cr, miners=2, validators=[100])
    run = tmp_path / "run"
    store = PendingReveals(
        cr.genesis_hash, v.address, PendingReveals.file_for(run, cr.genesis_hash, v.address)
    )
    sent = commit_and_reveal(cr, v, [1, 2], [U16, 100], store)
    assert sent.reveals == ()
    cr.produce_block()
    assert store.path is not None and stat.S_IMODE(store.path.stat().st_mode) == 0o600
    (entry,) = json.loads(store.path.read_text())["reveals"]
    assert entry["commit_xt"] == sent.commit and entry["weights"] == [U16, 100]
    del store  # the validator restarts
    again = PendingReveals(
        cr.genesis_hash, v.address, PendingReveals.file_for(run, cr.genesis_hash, v.address)
    )
    assert reveal_due(cr, v, again) == []  # not yet
    made = pending_commits(cr.conn, v.address)[0].block
    next_is(cr, reveal_blocks(made, cr.config)[0])
    (xt,) = reveal_due(cr, v, again)
    assert reveal_due(cr, v, again) == []  # its reveal waits in the pool: not twice
    cr.produce_block()
    receipt = cr.receipt(xt)
    assert receipt is not None and receipt.ok
    assert cr.weights() == {0: [(1, U16), (2, 100)]}
    assert reveal_due(cr, v, again) == [] and len(again) == 0  # revealed: forgotten
    with pytest.raises(errors.ChainError, match="another ledger"):
        PendingReveals("0" * 64, v.address, again.path)


def test_local_chain_set_weights_commits_and_reveals_on_time(
    tmp_path: Path, owner: Keypair
) -> None:
    cfg = cr_config(tmp_path / "live.sqlite", block_time_s=0.05, tempo=9)
    with Ledger.create(cfg.db, cfg, owner.address) as ledger:
        (v, w), _ = subnet(ledger, miners=2, validators=[100, 100])
    stop = threading.Event()
    producer = threading.Thread(target=lambda: run_producer(Ledger(cfg.db), stop=stop), daemon=True)
    producer.start()
    # v calls set_weights once per window and reveals as it commits again;
    # w calls it once, and the background revealer reveals it in time.
    chain_v = LocalChain(Ledger(cfg.db), Identity.single(v), auto_reveal=False)
    chain_w = LocalChain(Ledger(cfg.db), Identity.single(w), reveals_dir=tmp_path / "w")
    try:
        assert chain_w.set_weights([2, 3], [0.25, 0.75]).ok
        first = chain_v.set_weights([2, 3], [1.0, 0.0])
        assert first.ok and 0 not in chain_v.ledger.weights()
        due = reveal_blocks(first.block, cfg)[0]
        chain_v.wait_for_block(due - 1, timeout=30)
        chain_v.set_weights([2, 3], [0.5, 0.5])
        deadline = time.monotonic() + 30
        while set(chain_v.ledger.weights()) != {0, 1} and time.monotonic() < deadline:
            time.sleep(0.05)
        assert chain_v.ledger.weights() == {0: [(2, U16)], 1: [(2, round(U16 / 3)), (3, U16)]}
        assert (tmp_path / "w").is_dir()
    finally:
        chain_v.close()
        chain_w.close()
        stop.set()
        producer.join(timeout=10)
    with Ledger(cfg.db) as ledger:
        assert replay(ledger).digest == state_digest(ledger.conn)


def test_cli_weights_commits_then_reveals(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    db = tmp_path / "cli.sqlite"
    sets = ["--set", "chain.block_time_s=0.05", "--set", "chain.tempo=9"]
    sets += ["--set", "chain.faucet_rao=10000000000000", "--set", "chain.weights_rate_limit=0"]
    assert main(["keys", "new", "alice"]) == 0
    assert main(["chain", "init", "--owner", "alice", "--db", str(db), *sets]) == 0
    stop = threading.Event()
    producer = threading.Thread(target=lambda: run_producer(Ledger(db), stop=stop), daemon=True)
    producer.start()
    try:
        d = ["--db", str(db)]
        assert main(["chain", "faucet", "--key", "alice", "--amount", "2000", *d]) == 0
        assert main(["chain", "register", "--key", "alice", *d]) == 0
        assert main(["chain", "stake", "add", "--key", "alice", "--amount", "1500", *d]) == 0
        capsys.readouterr()
        weights = ["--uids", "0", "--weights", "1"]
        assert main(["chain", "weights", "--key", "alice", *weights, *d]) == 0
        out = capsys.readouterr().out
        assert "weights committed in block" in out and "tensormine chain reveal" in out
        assert main(["chain", "weights", "--key", "alice", *weights, "--reveal", *d]) == 0
        assert "weights revealed in block" in capsys.readouterr().out
        with Ledger(db) as ledger:
            assert ledger.weights() == {0: [(0, U16)]}
    finally:
        stop.set()
        producer.join(timeout=10)
