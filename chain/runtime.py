"""The state transition function: what a block and each extrinsic do to ledger state.

`Runtime` wraps one SQLite connection that is already inside a transaction; the caller
(`chain.ledger` when producing blocks, `chain.replay` when re-executing history) owns the
transaction, so exactly the same code changes the state live and on replay. Each call
either applies fully or raises a `ChainError` subclass; callers run calls inside a
SAVEPOINT and roll back on error, so a refused call leaves nothing behind.

A block runs `on_initialize(block)` first (mint the block emission, run the epoch when
one is due, as subtensor's on_initialize does, and expire old weight commits) and then
its extrinsics in pool order. Commit-reveal of weights lives in `chain.commit_reveal`.
"""

from __future__ import annotations

import json
import logging
import sqlite3
from collections.abc import Sequence
from dataclasses import dataclass

from chain import commit_reveal
from chain.config import ChainConfig
from chain.consensus import weights_to_u16
from chain.emission import TOTAL_SUPPLY_RAO, block_emission
from chain.errors import (
    AlreadyCommitted,
    AlreadyRegistered,
    BadNonce,
    CommitRevealEnabled,
    InsufficientFunds,
    InvalidCall,
    InvalidWeights,
    NotRegistered,
    NoValidatorPermit,
    RateLimited,
)
from chain.extrinsics import (
    AmountArgs,
    CommitArgs,
    ContributionArgs,
    Extrinsic,
    TransferArgs,
    WeightCommitArgs,
    WeightRevealArgs,
    WeightsArgs,
    parse_args,
)
from chain.interface import is_epoch_block

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class Account:
    address: str
    balance: int
    stake: int
    nonce: int


def compute_permits(stakes: Sequence[int], top_k: int, min_stake: int) -> list[bool]:
    """Validator permits: the top-K UIDs by stake (ties to the lower UID), at or above the
    minimum stake and above zero."""
    order = sorted(range(len(stakes)), key=lambda uid: (-stakes[uid], uid))
    chosen = set(order[:top_k])
    return [
        uid in chosen and stakes[uid] >= min_stake and stakes[uid] > 0 for uid in range(len(stakes))
    ]


class Runtime:
    """Reads and changes ledger state through a connection inside a transaction."""

    def __init__(self, conn: sqlite3.Connection, config: ChainConfig, owner: str, genesis: str):
        self.conn = conn
        self.config = config
        self.owner = owner
        self.genesis = genesis

    # ---- reads -----------------------------------------------------------------
    def block(self) -> int:
        return int(self.conn.execute("SELECT block FROM state").fetchone()[0])

    def issuance(self) -> tuple[int, int]:
        """(total issuance, pending emission) in rao."""
        row = self.conn.execute("SELECT total_issuance, pending_emission FROM state").fetchone()
        return int(row[0]), int(row[1])

    def account(self, address: str) -> Account:
        row = self.conn.execute(
            "SELECT balance, stake, nonce FROM accounts WHERE address = ?", (address,)
        ).fetchone()
        if row is None:
            return Account(address, 0, 0, 0)
        return Account(address, int(row[0]), int(row[1]), int(row[2]))

    def uid_of(self, hotkey: str) -> int | None:
        row = self.conn.execute("SELECT uid FROM neurons WHERE hotkey = ?", (hotkey,)).fetchone()
        return None if row is None else int(row[0])

    def n(self) -> int:
        return int(self.conn.execute("SELECT COUNT(*) FROM neurons").fetchone()[0])

    def stakes_by_uid(self) -> list[int]:
        rows = self.conn.execute(
            "SELECT COALESCE(a.stake, 0) FROM neurons n "
            "LEFT JOIN accounts a ON a.address = n.hotkey ORDER BY n.uid"
        ).fetchall()
        return [int(r[0]) for r in rows]

    def permits(self) -> list[bool]:
        cfg = self.config
        return compute_permits(
            self.stakes_by_uid(), cfg.max_validators, cfg.validator_min_stake_rao
        )

    # ---- balance helpers ---------------------------------------------------------
    def _adjust(self, address: str, *, balance: int = 0, stake: int = 0, nonce: int = 0) -> None:
        acct = self.account(address)
        new_balance, new_stake = acct.balance + balance, acct.stake + stake
        if new_balance < 0:
            raise InsufficientFunds(f"{address} has {acct.balance} rao free, needs {-balance} rao")
        if new_stake < 0:
            raise InsufficientFunds(f"{address} has {acct.stake} rao staked, asked for {-stake}")
        self.conn.execute(
            "INSERT INTO accounts (address, balance, stake, nonce) VALUES (?, ?, ?, ?) "
            "ON CONFLICT(address) DO UPDATE SET balance = excluded.balance, "
            "stake = excluded.stake, nonce = excluded.nonce",
            (address, new_balance, new_stake, acct.nonce + nonce),
        )

    def _add_issuance(self, amount: int) -> None:
        self.conn.execute("UPDATE state SET total_issuance = total_issuance + ?", (amount,))

    # ---- extrinsics ----------------------------------------------------------------
    def check(self, xt: Extrinsic, *, expected_nonce: int | None = None) -> None:
        """Signature, ledger and nonce; raises without touching state."""
        if xt.genesis != self.genesis:
            raise InvalidCall(f"extrinsic is for ledger {xt.genesis[:12]}…, not this one")
        xt.check_signature()
        want = self.account(xt.signer).nonce if expected_nonce is None else expected_nonce
        if xt.nonce < want:
            raise BadNonce(f"stale nonce {xt.nonce} from {xt.signer}: next is {want} (replay?)")
        if xt.nonce > want:
            raise BadNonce(f"nonce {xt.nonce} from {xt.signer} is ahead: next is {want}")

    def bump_nonce(self, address: str) -> None:
        self._adjust(address, nonce=1)

    def execute(self, xt: Extrinsic, block: int) -> None:
        """Apply the call's effect (not the nonce). Raises `ChainError` on refusal."""
        args = parse_args(xt.call, xt.args)
        signer = xt.signer
        if xt.call == "register":
            self._register(signer, block)
        elif xt.call == "add_stake":
            assert isinstance(args, AmountArgs)
            if self.uid_of(signer) is None:
                raise NotRegistered(f"{signer} is not registered; `tensormine chain register`")
            self._adjust(signer, balance=-args.amount, stake=args.amount)
        elif xt.call == "remove_stake":
            assert isinstance(args, AmountArgs)
            self._adjust(signer, balance=args.amount, stake=-args.amount)
        elif xt.call == "transfer":
            assert isinstance(args, TransferArgs)
            self._adjust(signer, balance=-args.amount)
            self._adjust(args.dest, balance=args.amount)
        elif xt.call == "set_weights":
            assert isinstance(args, WeightsArgs)
            self._set_weights(signer, args, block)
        elif xt.call == "commit_weights":
            assert isinstance(args, WeightCommitArgs)
            commit_reveal.commit_weights(self, signer, args, block)
        elif xt.call == "reveal_weights":
            assert isinstance(args, WeightRevealArgs)
            commit_reveal.reveal_weights(self, signer, args, block)
        elif xt.call == "faucet":
            assert isinstance(args, AmountArgs)
            self._faucet(signer, args.amount)
        elif xt.call == "commit":
            assert isinstance(args, CommitArgs)
            if self.uid_of(signer) is None:
                raise NotRegistered(f"{signer} is not registered and cannot commit")
            self.conn.execute(
                "INSERT INTO commitments (hotkey, data, block) VALUES (?, ?, ?) "
                "ON CONFLICT(hotkey) DO UPDATE SET data = excluded.data, block = excluded.block",
                (signer, args.data, block),
            )
        elif xt.call == "commit_contribution":
            assert isinstance(args, ContributionArgs)
            self._commit_contribution(signer, args, block)
        else:  # parse_args already refused unknown calls
            raise InvalidCall(f"unknown call {xt.call!r}")

    def _register(self, hotkey: str, block: int) -> None:
        cfg = self.config
        if self.uid_of(hotkey) is not None:
            raise AlreadyRegistered(f"{hotkey} already holds UID {self.uid_of(hotkey)}")
        if cfg.registration_burn_rao:
            # The burn is recycled: it leaves the balance and the total issuance.
            self._adjust(hotkey, balance=-cfg.registration_burn_rao)
            self._add_issuance(-cfg.registration_burn_rao)
        else:
            self._adjust(hotkey)  # make sure the account exists
        n = self.n()
        if n < cfg.max_uids:
            self.conn.execute(
                "INSERT INTO neurons (uid, hotkey, registered_block, last_update) "
                "VALUES (?, ?, ?, ?)",
                (n, hotkey, block, block),
            )
            return
        uid = self._uid_to_prune(block)
        old = self.conn.execute("SELECT hotkey FROM neurons WHERE uid = ?", (uid,)).fetchone()[0]
        logger.info("UID %d: %s replaced by %s", uid, old, hotkey)
        self.conn.execute("DELETE FROM weights WHERE uid = ?", (uid,))
        self.conn.execute("DELETE FROM bonds WHERE uid = ?", (uid,))
        self.conn.execute("DELETE FROM commitments WHERE hotkey = ?", (old,))
        self.conn.execute("DELETE FROM weight_commits WHERE hotkey = ?", (old,))
        # Its contribution_commitments stay: history of past windows.
        self.conn.execute("DELETE FROM neurons WHERE uid = ?", (uid,))
        self.conn.execute(
            "INSERT INTO neurons (uid, hotkey, registered_block, last_update) VALUES (?, ?, ?, ?)",
            (uid, hotkey, block, block),
        )

    def _commit_contribution(self, hotkey: str, args: ContributionArgs, block: int) -> None:
        """Record `hotkey`'s digest for `args.round` at `block`, the block that includes it
        (a time the miner cannot set). Once per round: a commitment cannot be changed."""
        if self.uid_of(hotkey) is None:
            raise NotRegistered(f"{hotkey} is not registered and cannot commit a contribution")
        first = self.conn.execute(
            "SELECT block FROM contribution_commitments WHERE hotkey = ? AND round = ?",
            (hotkey, args.round),
        ).fetchone()
        if first is not None:
            raise AlreadyCommitted(
                f"{hotkey} already committed a contribution for round {args.round} "
                f"in block {int(first[0])}; a hotkey commits once per round"
            )
        self.conn.execute(
            "INSERT INTO contribution_commitments (hotkey, round, digest, block) "
            "VALUES (?, ?, ?, ?)",
            (hotkey, args.round, args.digest, block),
        )

    def _uid_to_prune(self, block: int) -> int:
        """Subtensor's rule: the non-immune UID with the lowest emission (the oldest
        registration on a tie); if every UID is still immune, the lowest of all."""
        rows = self.conn.execute("SELECT uid, registered_block, emission FROM neurons").fetchall()
        immune = self.config.immunity_period
        candidates = [r for r in rows if block - int(r[1]) >= immune] or rows
        best = min(candidates, key=lambda r: (int(r[2]), int(r[1]), int(r[0])))
        return int(best[0])

    def _set_weights(self, hotkey: str, args: WeightsArgs, block: int) -> None:
        if self.config.commit_reveal:
            raise CommitRevealEnabled(
                "this ledger runs commit-reveal (chain.commit_reveal): commit the weights' "
                "hash with commit_weights and reveal them with reveal_weights one reveal "
                "period later; `Chain.set_weights` and `tensormine chain weights` do both"
            )
        uid = self.weights_setter(hotkey, block, rate_limited=True)
        self.store_weights(uid, args.uids, args.weights, last_update=block)
        self.conn.execute("UPDATE neurons SET weights_block = ? WHERE uid = ?", (block, uid))

    def weights_setter(self, hotkey: str, block: int, *, rate_limited: bool) -> int:
        """The UID of `hotkey` if it may set weights now: registered, holding a validator
        permit and, when `rate_limited`, `weights_rate_limit` blocks after its last
        set_weights (or commit)."""
        cfg = self.config
        uid = self.uid_of(hotkey)
        if uid is None:
            raise NotRegistered(f"{hotkey} is not registered and cannot set weights")
        if not self.permits()[uid]:
            raise NoValidatorPermit(
                f"UID {uid} has no validator permit: it needs a top-{cfg.max_validators} "
                f"stake of at least {cfg.validator_min_stake_rao} rao"
            )
        if not rate_limited:
            return uid
        last = self.conn.execute("SELECT weights_block FROM neurons WHERE uid = ?", (uid,))
        last_block = last.fetchone()[0]
        if last_block is not None and block - int(last_block) < cfg.weights_rate_limit:
            raise RateLimited(
                f"UID {uid} set weights at block {last_block}; the next is allowed at "
                f"block {int(last_block) + cfg.weights_rate_limit}"
            )
        return uid

    def store_weights(
        self, uid: int, uids: Sequence[int], weights: Sequence[int], *, last_update: int
    ) -> None:
        """Check the weight vector and store it as `uid`'s row (u16, zeros dropped)."""
        validate_weight_vector(uids, weights, self.n())
        scaled = weights_to_u16([float(w) for w in weights])
        data = sorted((u, int(w)) for u, w in zip(uids, scaled, strict=True) if w > 0)
        self.conn.execute(
            "INSERT INTO weights (uid, data) VALUES (?, ?) "
            "ON CONFLICT(uid) DO UPDATE SET data = excluded.data",
            (uid, json.dumps(data)),
        )
        self.conn.execute("UPDATE neurons SET last_update = ? WHERE uid = ?", (last_update, uid))

    def _faucet(self, address: str, amount: int) -> None:
        cap = self.config.faucet_rao
        if cap == 0:
            raise InvalidCall("the faucet is disabled on this ledger (chain.faucet_rao = 0)")
        if amount > cap:
            raise InvalidCall(f"the faucet gives at most {cap} rao per call, asked {amount}")
        issuance, _ = self.issuance()
        if issuance + amount > TOTAL_SUPPLY_RAO:
            raise InvalidCall("the faucet cannot mint past the 21 M TAO cap")
        self._adjust(address, balance=amount)
        self._add_issuance(amount)

    # ---- blocks --------------------------------------------------------------------
    def on_initialize(self, block: int) -> tuple[int, bool]:
        """Mint this block's emission and run the epoch if one is due."""
        from chain.epoch import run_epoch

        issuance, _ = self.issuance()
        minted = block_emission(issuance)
        self.conn.execute(
            "UPDATE state SET block = ?, total_issuance = total_issuance + ?, "
            "pending_emission = pending_emission + ?",
            (block, minted, minted),
        )
        cfg = self.config
        if not is_epoch_block(block, cfg.netuid, cfg.tempo):
            return minted, False
        commit_reveal.expire_commits(self, block)
        if self.n() > 0:
            run_epoch(self, block)
            return minted, True
        return minted, False


def validate_weight_vector(uids: Sequence[int], weights: Sequence[float], n: int) -> None:
    """The checks subtensor makes on a weight vector; raises `InvalidWeights`."""
    if len(uids) != len(weights):
        raise InvalidWeights(f"{len(uids)} UIDs but {len(weights)} weights")
    if not uids:
        raise InvalidWeights("an empty weight vector")
    if len(set(uids)) != len(uids):
        raise InvalidWeights("a UID appears twice")
    unknown = [u for u in uids if not 0 <= u < n]
    if unknown:
        raise InvalidWeights(f"unknown UIDs {unknown[:5]} (registered UIDs are 0..{n - 1})")
    for w in weights:
        if w != w or w in (float("inf"), float("-inf")):
            raise InvalidWeights("weights must be finite numbers (got NaN or infinity)")
        if w < 0:
            raise InvalidWeights(f"weights must be >= 0 (got {w})")
        if w > 65535:
            raise InvalidWeights(f"weights on the wire are u16, <= 65535 (got {w})")
    if not any(w > 0 for w in weights):
        raise InvalidWeights("all weights are zero")
