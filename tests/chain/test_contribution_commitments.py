"""Per-window contribution commitments: a miner commits the sha256 of its pseudo-gradient
for window W once, and the block that included it is the commitment's time."""

from __future__ import annotations

import hashlib
import time
from pathlib import Path

import pytest

from chain import errors, storage
from chain.extrinsics import Extrinsic, sign_extrinsic
from chain.keys import Keypair
from chain.ledger import Ledger
from chain.replay import replay
from chain.storage import state_digest
from chain.types import ContributionCommitment
from tensormine.cli import main

from .conftest import do, fast_config, subnet


def sha(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


def test_commit_then_read_back_with_the_including_block(ledger: Ledger) -> None:
    _, (m0, m1) = subnet(ledger, miners=2, validators=[50])
    h0 = ledger.submit_call(m0, "commit_contribution", {"round": 3, "digest": sha("m0 w3")})
    h1 = ledger.submit_call(m1, "commit_contribution", {"round": 3, "digest": sha("m1 w3")})
    assert ledger.contribution_commitments(3) == {}  # pooled, not yet included
    block = ledger.produce_block().number
    for h in (h0, h1):
        receipt = ledger.receipt(h)
        assert receipt is not None and receipt.ok and receipt.block == block
    got = ledger.contribution_commitments(3)
    assert got == {
        m0.address: ContributionCommitment(m0.address, 3, sha("m0 w3"), block),
        m1.address: ContributionCommitment(m1.address, 3, sha("m1 w3"), block),
    }
    assert ledger.contribution_commitment(m0.address, 3) == got[m0.address]
    assert ledger.contribution_commitment(m0.address, 4) is None
    assert ledger.contribution_commitments(4) == {}
    assert (
        ledger.contribution_commitments(-1) == {} and ledger.contribution_commitments(2**70) == {}
    )


@pytest.mark.parametrize(
    ("args", "match"),
    [
        ({"round": 1, "digest": "a" * 63}, "digest"),
        ({"round": 1, "digest": "a" * 65}, "digest"),
        ({"round": 1, "digest": "A" * 64}, "digest"),
        ({"round": 1, "digest": "g" * 64}, "digest"),
        ({"round": 1, "digest": "a" * 64 + "\n"}, "digest"),
        ({"round": -1, "digest": "a" * 64}, "round"),
        ({"round": 2**63, "digest": "a" * 64}, "round"),
        ({"round": True, "digest": "a" * 64}, "round"),
        ({"round": "1", "digest": "a" * 64}, "round"),
        ({"digest": "a" * 64}, "round"),
        ({"round": 1, "digest": "a" * 64, "extra": 1}, "extra"),
    ],
)
def test_malformed_arguments_are_refused_at_submit(
    ledger: Ledger, args: dict[str, object], match: str
) -> None:
    _, (m,) = subnet(ledger, miners=1, validators=[50])
    before = state_digest(ledger.conn)
    with pytest.raises(errors.InvalidCall, match=rf"commit_contribution: {match}"):
        ledger.submit_call(m, "commit_contribution", args)
    # Signed by hand (skipping the client's own check) the ledger refuses it too.
    with pytest.raises(errors.InvalidCall, match=match):
        ledger.submit(_signed_unchecked(ledger, m, args))
    assert state_digest(ledger.conn) == before and ledger.pool_size() == 0


def _signed_unchecked(ledger: Ledger, kp: Keypair, args: dict[str, object]) -> Extrinsic:
    nonce = ledger.next_nonce(kp.address)
    unsigned = Extrinsic("commit_contribution", args, kp.address, nonce, ledger.genesis_hash, b"")
    return Extrinsic(
        "commit_contribution",
        args,
        kp.address,
        nonce,
        ledger.genesis_hash,
        kp.sign(unsigned.payload()),
    )


def test_unregistered_signer_is_refused(ledger: Ledger) -> None:
    subnet(ledger, miners=1, validators=[50])
    stranger = Keypair.generate()
    before = state_digest(ledger.conn)
    with pytest.raises(errors.NotRegistered, match="not registered"):
        ledger.submit_call(stranger, "commit_contribution", {"round": 0, "digest": sha("x")})
    assert state_digest(ledger.conn) == before and ledger.pool_size() == 0


def test_one_commitment_per_round(ledger: Ledger) -> None:
    _, (m,) = subnet(ledger, miners=1, validators=[50])
    do(ledger, m, "commit_contribution", {"round": 7, "digest": sha("first")})
    first = ledger.contribution_commitment(m.address, 7)
    assert first is not None
    ledger.advance(2)
    before = state_digest(ledger.conn)
    nonce = ledger.next_nonce(m.address)
    for digest in (sha("second"), sha("first")):  # a change, or the same digest again
        with pytest.raises(errors.AlreadyCommitted, match=rf"round 7 in block {first.block}\b"):
            ledger.submit_call(m, "commit_contribution", {"round": 7, "digest": digest})
    assert state_digest(ledger.conn) == before and ledger.pool_size() == 0
    assert ledger.next_nonce(m.address) == nonce
    do(ledger, m, "commit_contribution", {"round": 8, "digest": sha("second")})
    assert ledger.contribution_commitment(m.address, 7) == first
    got = ledger.contribution_commitment(m.address, 8)
    assert got is not None and got.digest == sha("second")


def test_a_pending_commitment_counts_at_submit(ledger: Ledger) -> None:
    _, (m,) = subnet(ledger, miners=1, validators=[50])
    ledger.submit_call(m, "commit_contribution", {"round": 1, "digest": sha("a")})
    with pytest.raises(errors.AlreadyCommitted, match="round 1"):
        ledger.submit_call(m, "commit_contribution", {"round": 1, "digest": sha("b")})
    assert ledger.pool_size() == 1
    ledger.produce_block()
    got = ledger.contribution_commitment(m.address, 1)
    assert got is not None and got.digest == sha("a")


def test_two_in_the_pool_at_once_the_second_fails_in_its_block(ledger: Ledger) -> None:
    _, (m,) = subnet(ledger, miners=1, validators=[50])
    first = ledger.submit_call(m, "commit_contribution", {"round": 2, "digest": sha("a")})
    # The second enters the pool behind the dry run's back, as a competing process could.
    xt = sign_extrinsic(
        m,
        "commit_contribution",
        {"round": 2, "digest": sha("b")},
        ledger.next_nonce(m.address),
        ledger.genesis_hash,
    )
    ledger.conn.execute(
        "INSERT INTO pool (hash, signer, nonce, body, submitted_at) VALUES (?, ?, ?, ?, ?)",
        (xt.hash, xt.signer, xt.nonce, xt.to_json(), time.time()),
    )
    block = ledger.produce_block().number
    ok, failed = ledger.receipt(first), ledger.receipt(xt.hash)
    assert ok is not None and ok.ok
    assert failed is not None and failed.status == "failed"
    assert failed.error_type == "AlreadyCommitted" and f"in block {block}" in (failed.error or "")
    with pytest.raises(errors.AlreadyCommitted):
        failed.raise_for_status()
    got = ledger.contribution_commitment(m.address, 2)
    assert got == ContributionCommitment(m.address, 2, sha("a"), block)
    assert ledger.account(m.address).nonce == xt.nonce + 1  # the failed call used its nonce
    assert replay(ledger).digest == state_digest(ledger.conn)


def test_replaced_uid_keeps_its_commitments_and_replay_matches(
    tmp_path: Path, owner: Keypair
) -> None:
    cfg = fast_config(tmp_path / "l.sqlite", max_uids=2, immunity_period=2)
    with Ledger.create(cfg.db, cfg, owner.address) as ledger:
        (v,), (m,) = subnet(ledger, miners=1, validators=[50])
        do(ledger, m, "commit_contribution", {"round": 0, "digest": sha("m w0")})
        do(ledger, m, "commit", {"data": "hello"})
        do(ledger, v, "set_weights", {"uids": [0], "weights": [1]})  # m earns nothing
        ledger.advance(12)
        newcomer = Keypair.generate()
        do(ledger, newcomer, "register", {})
        assert ledger.uid_of(m.address) is None and ledger.uid_of(newcomer.address) == 1
        assert m.address not in ledger.commitments()
        kept = ledger.contribution_commitment(m.address, 0)
        assert kept is not None and kept.digest == sha("m w0")
        with pytest.raises(errors.NotRegistered):
            ledger.submit_call(m, "commit_contribution", {"round": 1, "digest": sha("m w1")})
        do(ledger, newcomer, "commit_contribution", {"round": 0, "digest": sha("n w0")})
        assert set(ledger.contribution_commitments(0)) == {m.address, newcomer.address}
        ledger.advance(3)
        report = replay(ledger)
        assert report.digest == state_digest(ledger.conn)
        # Tampering with a commitment is caught by the replay.
        ledger.conn.execute(
            "UPDATE contribution_commitments SET block = block + 1 WHERE hotkey = ?",
            (m.address,),
        )
        with pytest.raises(errors.CorruptLedger, match="differs"):
            replay(ledger)


def test_old_ledger_gets_the_table_and_keeps_its_digest(
    tmp_path: Path, owner: Keypair, monkeypatch: pytest.MonkeyPatch
) -> None:
    cfg = fast_config(tmp_path / "old.sqlite")
    with Ledger.create(cfg.db, cfg, owner.address) as ledger:
        (v,), (m,) = subnet(ledger, miners=1, validators=[50])
        do(ledger, m, "commit", {"data": "hello"})
        do(ledger, v, "set_weights", {"uids": [1], "weights": [1]})
        ledger.advance(12)
        with_empty_table = state_digest(ledger.conn)
        # A file written before the table existed.
        ledger.conn.execute("DROP TABLE contribution_commitments")
        with monkeypatch.context() as patch:  # the digest as the code of that time computed it
            patch.delitem(storage.STATE_TABLES, "contribution_commitments")
            old = state_digest(ledger.conn)
    assert old == with_empty_table
    with Ledger(cfg.db) as ledger:
        assert state_digest(ledger.conn) == old
        assert ledger.contribution_commitments(0) == {}
        assert replay(ledger).digest == old
        do(ledger, m, "commit_contribution", {"round": 0, "digest": sha("m w0")})
        assert state_digest(ledger.conn) != old
        assert replay(ledger).digest == state_digest(ledger.conn)


def test_cli_lists_a_rounds_commitments(ledger: Ledger, capsys: pytest.CaptureFixture[str]) -> None:
    _, (m0, m1) = subnet(ledger, miners=2, validators=[50])
    do(ledger, m0, "commit_contribution", {"round": 5, "digest": sha("m0")})
    do(ledger, m1, "commit_contribution", {"round": 6, "digest": sha("m1")})
    capsys.readouterr()
    assert main(["chain", "commitments", "--db", str(ledger.path), "--round", "5"]) == 0
    out = capsys.readouterr().out
    assert m0.address in out and sha("m0") in out
    assert m1.address not in out
    assert "1 commitments for round 5" in out
