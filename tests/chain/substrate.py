"""`InMemorySubtensor`: one subnet of subtensor in memory, behind the SDK's `Substrate`
protocol (``bittensor/_substrate.py``), so the SDK's REAL client, reads, intents and
executor run against it with no network.

    sub = InMemorySubtensor(netuid=1, tempo=9)
    sub.fund(coldkey_address, 100 * TAO)
    chain = BittensorChain.connect(config, identity, substrate=sub)
    sub.calls[-1]          # SubmittedCall(pallet, function, args, signer, block, ...)

It serves the storage items, runtime APIs and constants the v11 SDK reads for what
`chain.bittensor` does (metagraph, weights, commitments, balances, epochs; the preflight
of SetWeights, BurnedRegister, AddStake, RemoveStake, Transfer), each at any block
(every block keeps its own copy of the state). A submitted call is checked (nonce,
signature against the signer's address) and applied in a new block, with subtensor's
refusals: an unregistered hotkey, no validator permit, the weights rate limit (rejected
in the pool with ``Custom error: 6``, as the node does), an insufficient balance or
stake, a commitment over ``MaxFields`` or the epoch's ``MaxSpace``. Timelocked weight
commits are stored (``TimelockedWeightCommits``), never revealed: nothing here holds
drand's round signatures. MEV-shielded extrinsics (registration) are "decrypted" by
matching the inner extrinsic the SDK signed just before. It can also refuse to connect
(`fail_connects`) and forget old state (`prune_before`), as a pruning node does.
"""

from __future__ import annotations

import asyncio
import copy
import hashlib
import os
import threading
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import bittensor_core
from bittensor import Balance, ExtrinsicResult
from bittensor import ChainError as SdkChainError
from bittensor._generated.errors import ERRORS
from bittensor._transport.errors import StateDiscardedError, SubstrateRequestException
from bittensor.result import RpcConnectionError, chain_error_from_substrate_request

from chain.interface import is_epoch_block

TAO = 1_000_000_000
U16_MAX = 65535
GENESIS_MS = 1_700_000_000_000
SCORES = ("rank", "trust", "consensus", "incentives", "dividends", "pruning_score")
_DOCS = {info.name: info.docs or info.name for info in ERRORS.values()}


@dataclass(frozen=True)
class FakeCall:
    """A composed call: the SDK tells composed calls by their ``data`` bytes."""

    module: str
    function: str
    params: dict[str, Any]
    data: bytes


@dataclass(frozen=True)
class SubmittedCall:
    """What the chain saw: one extrinsic (or a shielded one's inner call)."""

    pallet: str
    function: str
    args: dict[str, Any]
    signer: str
    block: int | None
    success: bool
    error: str | None
    shielded: bool = False


@dataclass
class State:
    """One block's state of the subnet (copied for every block)."""

    tempo: int
    commit_reveal: bool = False
    weights_rate_limit: int = 0
    min_allowed_weights: int = 0
    max_weights_limit: int = U16_MAX
    reveal_period: int = 1
    burn: int = TAO
    max_validators: int = 64
    min_validator_stake: int = 10 * TAO
    max_space: int = 3100
    balances: dict[str, int] = field(default_factory=dict)
    nonces: dict[str, int] = field(default_factory=dict)
    owners: dict[str, str] = field(default_factory=dict)
    hotkeys: list[str] = field(default_factory=list)
    registered: list[int] = field(default_factory=list)
    last_update: list[int] = field(default_factory=list)
    permits: list[bool] = field(default_factory=list)
    stake: dict[tuple[str, str], int] = field(default_factory=dict)
    weights: dict[int, list[tuple[int, int]]] = field(default_factory=dict)
    timelocked: dict[int, list[tuple[str, int, str, int]]] = field(default_factory=dict)
    commitments: dict[str, dict[str, Any]] = field(default_factory=dict)
    used_space: dict[str, dict[str, int]] = field(default_factory=dict)
    scores: dict[str, dict[int, int]] = field(default_factory=dict)
    last_epoch_block: int = 0
    epoch_index: int = 0

    def uid(self, hotkey: str) -> int | None:
        return self.hotkeys.index(hotkey) if hotkey in self.hotkeys else None

    def total_stake(self, hotkey: str) -> int:
        return sum(v for (h, _), v in self.stake.items() if h == hotkey)


@dataclass
class Block:
    number: int
    hash: str
    parent: str
    timestamp_ms: int
    extrinsics: list[dict[str, Any]] = field(default_factory=list)
    results: dict[str, ExtrinsicResult] = field(default_factory=dict)


class Refused(Exception):
    """A dispatch error: the extrinsic is included and fails with subtensor's `name`."""

    def __init__(self, name: str) -> None:
        super().__init__(name)
        self.name = name


class SdkKey:
    """A key as `chain.wallet` makes them from a Bittensor wallet: ``address``,
    ``sign`` and the SDK's sr25519 keypair as ``sdk_keypair``."""

    def __init__(self, sdk_keypair: Any) -> None:
        self.sdk_keypair = sdk_keypair

    @classmethod
    def generate(cls) -> SdkKey:
        return cls(bittensor_core.Keypair.create_from_seed(os.urandom(32)))

    @classmethod
    def from_uri(cls, uri: str) -> SdkKey:
        return cls(bittensor_core.Keypair.create_from_uri(uri))

    @property
    def address(self) -> str:
        return str(self.sdk_keypair.ss58_address)

    def sign(self, message: bytes) -> bytes:
        return bytes(self.sdk_keypair.sign(message))


def isolate_sdk_paths(monkeypatch: Any, home: Path) -> None:
    """Give the SDK's path variables (`chain.bittensor.paths`) a value under `home` and
    make `home` the home directory, all undone after the test (``monkeypatch``), since
    `BittensorChain.connect` sets them process-wide."""
    from chain.bittensor.paths import RUNTIME_CACHE_VARIABLE, SDK_FILE_VARIABLES

    monkeypatch.setenv("HOME", str(home))
    for name in (RUNTIME_CACHE_VARIABLE, *SDK_FILE_VARIABLES):
        monkeypatch.setenv(name, str(home / "unused" / name))


def pool_rejection(data: str) -> SdkChainError:
    """The error the RPC backend makes of a node's pool rejection (``Custom error: N``)."""
    error = SubstrateRequestException({"error": {"message": "Invalid Transaction", "data": data}})
    return chain_error_from_substrate_request(error)


class InMemorySubtensor:
    """One subnet of a subtensor chain, in memory (see the module docstring)."""

    def __init__(
        self,
        *,
        netuid: int = 1,
        tempo: int = 9,
        block_time_s: float = 12.0,
        wall_clock: bool = False,
        **state: Any,
    ) -> None:
        """`wall_clock`: blocks carry the time they were made (as a live node's do; what
        the averaging's meeting times are computed from) instead of a fixed genesis time
        plus one block time per block (reproducible hashes for call-level tests)."""
        self.netuid = netuid
        self.block_time_s = block_time_s
        self.wall_clock = wall_clock
        self.token_symbols: dict[int, str] = {}
        self.calls: list[SubmittedCall] = []
        self.connect_attempts = 0
        self.failing_connects = 0
        self.pruned_below = 0
        self.stateful_epochs = True  # False: a runtime without LastEpochBlock (None)
        self.owner = bittensor_core.Keypair.create_from_uri("//SubnetOwner").ss58_address
        self._lock = threading.RLock()
        self._pending_inner: dict[str, tuple[FakeCall, str, int]] = {}
        genesis = self._new_block(0, "0x" + "00" * 32, [])
        self._blocks: list[Block] = [genesis]
        self._numbers: dict[str, int] = {genesis.hash: 0}
        self._states: list[State] = [State(tempo=tempo, **state)]

    # ---- test controls ---------------------------------------------------------------
    @property
    def head(self) -> int:
        return len(self._blocks) - 1

    @property
    def state(self) -> State:
        """The head state; tests change hyperparameters here (as sudo would)."""
        return self._states[-1]

    def state_at(self, block: int) -> State:
        return self._states[block]

    def fund(self, address: str, rao: int) -> None:
        with self._lock:
            self.state.balances[address] = self.state.balances.get(address, 0) + rao

    def set_scores(self, uid: int, **u16: int) -> None:
        """Seed Yuma outputs (u16) for `uid`: rank, trust, consensus, incentives, ..."""
        with self._lock:
            for name, value in u16.items():
                self.state.scores.setdefault(name, {})[uid] = value

    def produce_blocks(self, count: int = 1) -> int:
        with self._lock:
            for _ in range(count):
                self._produce([])
            return self.head

    def advance_to(self, number: int) -> int:
        return self.produce_blocks(max(0, number - self.head))

    def advance_to_epoch(self) -> int:
        """Produce blocks up to and including the next epoch block."""
        with self._lock:
            while True:
                self._produce([])
                if is_epoch_block(self.head, self.netuid, self.state.tempo):
                    return self.head

    def prune_before(self, block: int) -> None:
        """Forget the state of blocks before `block` (a pruning node)."""
        self.pruned_below = block

    def fail_connects(self, count: int) -> None:
        """The next `count` connections fail, as an unreachable endpoint does."""
        self.failing_connects = count

    def calls_to(self, function: str) -> list[SubmittedCall]:
        return [c for c in self.calls if c.function == function]

    # ---- blocks ----------------------------------------------------------------------
    def _new_block(self, number: int, parent: str, extrinsics: list[dict[str, Any]]) -> Block:
        digest = hashlib.sha256(f"{number}:{parent}".encode()).hexdigest()
        stamp = (
            int(time.time() * 1000)
            if self.wall_clock
            else GENESIS_MS + int(number * self.block_time_s * 1000)
        )
        inherent = {
            "call": {
                "call_module": "Timestamp",
                "call_function": "set",
                "call_args": [{"name": "now", "value": stamp}],
            }
        }
        return Block(number, "0x" + digest, parent, stamp, [inherent, *extrinsics])

    def _produce(self, extrinsics: list[tuple[str, FakeCall, str, bool]]) -> Block:
        """A block applying `extrinsics` ((hash, call, signer, shielded)) in order."""
        number = self.head + 1
        state = copy.deepcopy(self.state)
        if is_epoch_block(number, self.netuid, state.tempo):
            self._epoch(state, number)
        block = self._new_block(number, self._blocks[-1].hash, [])
        for xt_hash, call, signer, shielded in extrinsics:
            index = len(block.extrinsics)
            trial = copy.deepcopy(state)
            try:
                self._dispatch(trial, call, signer, number)
                state, error = trial, None
            except Refused as refused:
                error = refused.name
            state.nonces[signer] = state.nonces.get(signer, 0) + 1
            block.extrinsics.append(
                {"call": {"call_module": call.module, "call_function": call.function}}
            )
            xt_id = f"{number}-{index:04d}"
            if error is None:
                result = ExtrinsicResult(
                    True, "Success", block.hash, xt_id, None, Balance.from_rao(0), []
                )
            else:
                text = _DOCS.get(error, error)
                result = ExtrinsicResult(
                    False, text, block.hash, xt_id, error=SdkChainError(text, error)
                )
            block.results[xt_hash] = result
            self.calls.append(
                SubmittedCall(
                    call.module,
                    call.function,
                    call.params,
                    signer,
                    number,
                    error is None,
                    error,
                    shielded,
                )
            )
        self._blocks.append(block)
        self._numbers[block.hash] = number
        self._states.append(state)
        return block

    def _epoch(self, state: State, number: int) -> None:
        state.last_epoch_block = number
        state.epoch_index += 1
        stakes = [state.total_stake(h) for h in state.hotkeys]
        ranked = sorted(range(len(stakes)), key=lambda u: (-stakes[u], u))
        top = set(ranked[: state.max_validators])
        state.permits = [
            u in top and stakes[u] >= state.min_validator_stake for u in range(len(stakes))
        ]

    # ---- dispatch: the calls chain.bittensor makes -----------------------------------
    def _dispatch(self, s: State, call: FakeCall, signer: str, block: int) -> None:
        p = call.params
        name = f"{call.module}.{call.function}"
        if name == "SubtensorModule.burned_register":
            if s.uid(p["hotkey"]) is not None:
                raise Refused("HotKeyAlreadyRegisteredInSubNet")
            self._debit(s, signer, s.burn, "NotEnoughBalanceToStake")
            s.hotkeys.append(p["hotkey"])
            s.owners[p["hotkey"]] = signer
            s.registered.append(block)
            s.last_update.append(block)
            s.permits.append(False)
        elif name in (
            "SubtensorModule.set_mechanism_weights",
            "SubtensorModule.commit_timelocked_mechanism_weights",
        ):
            uid = self._weights_setter(s, signer, p, block)
            if call.function == "set_mechanism_weights":
                if s.commit_reveal:
                    raise Refused("CommitRevealEnabled")
                if any(d >= len(s.hotkeys) for d in p["dests"]):
                    raise Refused("UidVecContainInvalidOne")
                s.weights[uid] = sorted(zip(p["dests"], p["weights"], strict=True))
            else:
                commit = "0x" + bytes(p["commit"]).hex()
                entry = (signer, block, commit, int(p["reveal_round"]))
                s.timelocked.setdefault(s.epoch_index, []).append(entry)
            s.last_update[uid] = block
        elif call.function in ("add_stake", "add_stake_limit"):
            if s.uid(p["hotkey"]) is None:
                raise Refused("HotKeyAccountNotExists")
            self._debit(s, signer, p["amount_staked"], "NotEnoughBalanceToStake")
            key = (p["hotkey"], signer)
            s.stake[key] = s.stake.get(key, 0) + p["amount_staked"]
        elif call.function in ("remove_stake", "remove_stake_limit"):
            key = (p["hotkey"], signer)
            if s.stake.get(key, 0) < p["amount_unstaked"]:
                raise Refused("NotEnoughStakeToWithdraw")
            s.stake[key] -= p["amount_unstaked"]
            s.balances[signer] = s.balances.get(signer, 0) + p["amount_unstaked"]
        elif name in ("Balances.transfer_keep_alive", "Balances.transfer_allow_death"):
            self._debit(s, signer, p["value"], "InsufficientBalance")
            s.balances[p["dest"]] = s.balances.get(p["dest"], 0) + p["value"]
        elif name == "Commitments.set_commitment":
            self._set_commitment(s, signer, p, block)
        elif name == "MevShield.submit_encrypted":
            pass  # the carrier; its inner extrinsic follows it in the block
        else:
            raise Refused("CallFiltered")

    @staticmethod
    def _debit(s: State, address: str, amount: int, error: str) -> None:
        if s.balances.get(address, 0) < amount:
            raise Refused(error)
        s.balances[address] -= amount

    def _weights_setter(self, s: State, hotkey: str, p: dict[str, Any], block: int) -> int:
        uid = s.uid(hotkey)
        if uid is None:
            raise Refused("HotKeyNotRegisteredInSubNet")
        dests = list(p.get("dests") or [])
        if dests != [uid] and not (uid < len(s.permits) and s.permits[uid]):
            raise Refused("NeuronNoValidatorPermit")
        return uid

    def _set_commitment(self, s: State, hotkey: str, p: dict[str, Any], block: int) -> None:
        if s.uid(hotkey) is None:
            raise Refused("AccountNotAllowedCommit")
        fields = list(p["info"]["fields"])
        if len(fields) > 3:
            raise Refused("TooManyFieldsInCommitmentInfo")
        decoded = [{k: "0x" + bytes(v).hex()} for f in fields for k, v in f.items()]
        cost = max(100, sum(len(bytes(v)) for f in fields for v in f.values()))
        usage = s.used_space.get(hotkey)
        if usage is None or usage["last_epoch"] != s.epoch_index:
            usage = {"last_epoch": s.epoch_index, "used_space": 0}
        if usage["used_space"] + cost > s.max_space:
            raise Refused("SpaceLimitExceeded")
        s.used_space[hotkey] = {**usage, "used_space": usage["used_space"] + cost}
        s.commitments[hotkey] = {"deposit": 0, "block": block, "info": {"fields": decoded}}

    # ---- reads -----------------------------------------------------------------------
    def _block_of(self, block_hash: str | None) -> int:
        if block_hash is None:
            return self.head
        number = self._numbers.get(block_hash)
        if number is None:
            raise SdkChainError(f"Block not found: {block_hash}")
        return number

    def _state(self, block_hash: str | None) -> tuple[int, State]:
        with self._lock:
            number = self._block_of(block_hash)
            if number < self.pruned_below:
                error = StateDiscardedError(str(block_hash))
                raise chain_error_from_substrate_request(error)
            return number, self._states[number]

    def _storage(self, s: State, n: int, module: str, name: str, p: list[Any]) -> Any:
        """One storage value (`p` the full key) or, with a partial key, None."""
        stakes = [s.total_stake(h) for h in s.hotkeys]
        netuid_items: dict[str, Any] = {
            "NetworksAdded": True,
            "Tempo": s.tempo,
            "LastEpochBlock": s.last_epoch_block if self.stateful_epochs else None,
            "SubnetEpochIndex": s.epoch_index,
            "PendingEpochAt": 0,
            "BlocksSinceLastStep": n - s.last_epoch_block,
            "RevealPeriodEpochs": s.reveal_period,
            "CommitRevealWeightsEnabled": s.commit_reveal,
            "WeightsSetRateLimit": s.weights_rate_limit,
            "LastUpdate": list(s.last_update),
            "MinAllowedWeights": s.min_allowed_weights,
            "MaxWeightsLimit": s.max_weights_limit,
            "SubnetEpochConsensus": "Yuma",
            "ValidatorPermit": list(s.permits),
            "Burn": s.burn,
            "CollateralLockShare": 0,
            "SubnetworkN": len(s.hotkeys),
            "TotalHotkeyAlpha": stakes,
        }
        if module == "SubtensorModule" and name in netuid_items:
            if p[0] != self.netuid:
                return None if name != "NetworksAdded" else False
            return netuid_items[name]
        if (module, name) == ("SubtensorModule", "Uids"):
            return s.uid(p[1]) if p[0] == self.netuid else None
        if (module, name) == ("SubtensorModule", "Owner"):
            return s.owners.get(p[0])
        if (module, name) == ("System", "Account"):
            free = s.balances.get(p[0], 0)
            return {"nonce": s.nonces.get(p[0], 0), "data": {"free": free, "reserved": 0}}
        if (module, name) == ("Commitments", "CommitmentOf"):
            return copy.deepcopy(s.commitments.get(p[1])) if p[0] == self.netuid else None
        if (module, name) == ("Commitments", "UsedSpaceOf"):
            return dict(s.used_space[p[1]]) if p[1] in s.used_space else None
        if (module, name) == ("Commitments", "MaxSpace"):
            return s.max_space
        if (module, name) == ("Timestamp", "Now"):
            return self._blocks[n].timestamp_ms
        if (module, name) == ("MevShield", "NextKey"):
            return bytes(1184)  # an ML-KEM-768 key of zeros: encryption works, nobody decrypts
        raise SdkChainError(f"the in-memory subtensor serves no storage item {module}.{name}")

    def _storage_map(self, s: State, module: str, name: str, p: list[Any]) -> list[Any]:
        if p and p[0] != self.netuid:
            return []
        if (module, name) == ("SubtensorModule", "TokenSymbol"):
            return [(self.netuid, list("α".encode()))]
        if (module, name) == ("SubtensorModule", "Uids"):
            return [(h, u) for u, h in enumerate(s.hotkeys)]
        if (module, name) == ("SubtensorModule", "Weights"):
            return [(u, list(row)) for u, row in sorted(s.weights.items())]
        if (module, name) == ("SubtensorModule", "TimelockedWeightCommits"):
            return [(e, list(rows)) for e, rows in sorted(s.timelocked.items())]
        if (module, name) == ("Commitments", "CommitmentOf"):
            return [(h, copy.deepcopy(r)) for h, r in sorted(s.commitments.items())]
        if (module, name) == ("Commitments", "RevealedCommitments"):
            return []
        raise SdkChainError(f"the in-memory subtensor serves no storage map {module}.{name}")

    def _metagraph(self, s: State, n: int) -> dict[str, Any]:
        count = len(s.hotkeys)
        stakes = [s.total_stake(h) for h in s.hotkeys]

        def column(name: str) -> list[int]:
            values = s.scores.get(name, {})
            return [values.get(uid, 0) for uid in range(count)]

        graph: dict[str, Any] = {name: column(name) for name in SCORES}
        graph.update(
            netuid=self.netuid,
            name=list(b"tensormine"),
            symbol=list("α".encode()),
            block=n,
            tempo=s.tempo,
            last_step=s.last_epoch_block,
            blocks_since_last_step=n - s.last_epoch_block,
            owner_hotkey=self.owner,
            owner_coldkey=self.owner,
            network_registered_at=0,
            num_uids=count,
            max_uids=256,
            hotkeys=list(s.hotkeys),
            coldkeys=[s.owners[h] for h in s.hotkeys],
            identities=[None] * count,
            axons=[{"ip": 0, "port": 0, "ip_type": 4}] * count,
            active=[True] * count,
            validator_permit=list(s.permits),
            last_update=list(s.last_update),
            block_at_registration=list(s.registered),
            validator_trust=column("validator_trust"),
            emission=column("emission"),
            alpha_stake=stakes,
            tao_stake=[0] * count,
            total_stake=stakes,
            tao_in=1000 * TAO,
            alpha_in=1000 * TAO,
            moving_price={"bits": 2**32},
        )
        return graph

    def _runtime(self, s: State, n: int, api: str, method: str, params: Any) -> Any:
        if method == "get_metagraph":
            return self._metagraph(s, n) if params[0] == self.netuid else None
        if method == "get_next_epoch_start_block":
            return s.last_epoch_block + s.tempo + 1
        if method == "current_alpha_price":
            return TAO
        if method == "sim_swap_tao_for_alpha":
            return {"alpha_amount": params["tao"], "tao_fee": 0, "alpha_fee": 0}
        if method == "sim_swap_alpha_for_tao":
            return {"tao_amount": params["alpha"], "tao_fee": 0, "alpha_fee": 0}
        if method == "get_stake_info_for_hotkey_coldkey_netuid":
            return {"stake": s.stake.get((params[0], params[1]), 0)}
        raise SdkChainError(f"the in-memory subtensor serves no runtime API {api}.{method}")

    # ---- the Substrate protocol: lifecycle and reads ---------------------------------
    def balance(self, rao: int, netuid: int = 0) -> Balance:
        return Balance(int(rao), netuid, self.token_symbols.get(netuid) if netuid else None)

    async def connect(self) -> None:
        self.connect_attempts += 1
        if self.failing_connects > 0:
            self.failing_connects -= 1
            raise RpcConnectionError("[Errno 111] Connection refused (in-memory endpoint down)")

    async def close(self) -> None:
        return None

    async def block_hash(self, block: int | None = None) -> str:
        with self._lock:
            number = self.head if block is None else block
            if not 0 <= number <= self.head:
                raise SdkChainError(f"Block not found: {number}")
            return self._blocks[number].hash

    async def block_number(self) -> int:
        return self.head

    async def finalized_block_number(self) -> int:
        return self.head

    async def block_time(self) -> float:
        return self.block_time_s

    async def spec_version(self) -> int:
        return 400

    async def get_block(
        self, block_number: int | None = None, block_hash: str | None = None
    ) -> dict[str, Any] | None:
        with self._lock:
            number = self._block_of(block_hash) if block_number is None else block_number
            if not 0 <= number <= self.head:
                return None
            block = self._blocks[number]
            header = {"number": number, "hash": block.hash, "parentHash": block.parent}
            return {"header": header, "extrinsics": copy.deepcopy(block.extrinsics)}

    async def query(
        self,
        module: str,
        storage_function: str,
        params: list[Any] | None = None,
        block_hash: str | None = None,
    ) -> Any:
        number, state = self._state(block_hash)
        return self._storage(state, number, module, storage_function, list(params or []))

    async def map_has_entries(
        self, module: str, storage_function: str, params: list[Any], block_hash: str | None = None
    ) -> bool:
        return bool(await self.query_map(module, storage_function, params, block_hash))

    async def query_map(
        self,
        module: str,
        storage_function: str,
        params: list[Any] | None = None,
        block_hash: str | None = None,
    ) -> list[tuple[Any, Any]]:
        _, state = self._state(block_hash)
        return self._storage_map(state, module, storage_function, list(params or []))

    async def query_batch(
        self,
        module: str,
        storage_function: str,
        param_sets: list[list[Any]],
        block_hash: str | None = None,
    ) -> list[Any]:
        return [await self.query(module, storage_function, p, block_hash) for p in param_sets]

    async def runtime_call(
        self, api: str, method: str, params: Any, block_hash: str | None = None
    ) -> Any:
        number, state = self._state(block_hash)
        return self._runtime(state, number, api, method, params)

    async def constant(self, module: str, name: str) -> Any:
        values = {
            ("Aura", "SlotDuration"): int(self.block_time_s * 1000),
            ("Commitments", "MaxFields"): 3,
            ("Balances", "ExistentialDeposit"): 500,
        }
        if (module, name) not in values:
            raise SdkChainError(f"the in-memory subtensor serves no constant {module}.{name}")
        return values[(module, name)]

    async def decode_scale(self, type_string: str, data: Any) -> Any:
        raise SdkChainError("the in-memory subtensor decodes no SCALE")

    async def blocks(self, *, finalized: bool = False) -> AsyncIterator[dict[str, Any]]:
        seen = self.head - 1
        while True:
            head = self.head
            for number in range(seen + 1, head + 1):
                block = self._blocks[number]
                yield {"header": {"number": number, "hash": block.hash, "parentHash": block.parent}}
            seen = head
            await asyncio.sleep(0.005)

    async def events(self, block_hash: str | None = None) -> list[dict[str, Any]]:
        return []

    # ---- the Substrate protocol: calls and writes ------------------------------------
    async def compose(self, call: Any) -> FakeCall:
        module, function, params = call
        if (module, function) == ("Commitments", "set_commitment"):
            for f in params["info"]["fields"]:
                for variant, value in f.items():
                    if variant != f"Raw{len(bytes(value))}" or len(bytes(value)) > 128:
                        raise SdkChainError(f"cannot encode {variant} as a Commitments Data field")
        data = hashlib.blake2b(repr((module, function, params)).encode(), digest_size=32).digest()
        return FakeCall(module, function, dict(params), data)

    async def estimate_fee(self, call: Any, keypair: Any) -> Balance:
        return Balance.from_rao(0)

    async def estimate_weight(self, call: Any, keypair: Any) -> dict[str, int]:
        return {"ref_time": 0, "proof_size": 0}

    async def account_next_index(self, address: str) -> int:
        return self.state.nonces.get(address, 0)

    async def mev_next_key(self) -> bytes | None:
        return bytes(1184)

    def _sign(self, call: FakeCall, keypair: Any, nonce: int) -> tuple[bytes, str]:
        """Sign `call` at `nonce` with `keypair` and check the signature against the
        signer's address, as the node does (`BadProof` otherwise)."""
        payload = call.data + nonce.to_bytes(8, "little")
        signature = bytes(keypair.sign(payload))
        if not bittensor_core.verify(
            payload, signature, keypair.ss58_address, int(keypair.crypto_type)
        ):
            raise pool_rejection("Transaction has a bad signature")
        digest = hashlib.blake2b(payload + signature, digest_size=32).hexdigest()
        return payload + signature, "0x" + digest

    async def sign_extrinsic(
        self, call: Any, keypair: Any, *, nonce: int, period: int
    ) -> tuple[bytes, str]:
        raw, xt_hash = self._sign(call, keypair, nonce)
        self._pending_inner[xt_hash] = (call, keypair.ss58_address, nonce)
        return raw, xt_hash

    async def find_extrinsic(self, extrinsic_hash: str, block_hash: str) -> ExtrinsicResult | None:
        with self._lock:
            return self._blocks[self._block_of(block_hash)].results.get(extrinsic_hash)

    async def submit(
        self,
        call: Any,
        keypair: Any,
        *,
        nonce: int | None = None,
        period: int | None = 64,
        wait_for_inclusion: bool = True,
        wait_for_finalization: bool = True,
    ) -> ExtrinsicResult:
        signer = str(keypair.ss58_address)
        with self._lock:
            expected = self.state.nonces.get(signer, 0)
            nonce = expected if nonce is None else nonce
            try:
                if nonce != expected:
                    raise pool_rejection("Transaction is outdated")
                _, xt_hash = self._sign(call, keypair, nonce)
                self._pool_check(call, signer)
            except SdkChainError as error:
                self.calls.append(
                    SubmittedCall(
                        call.module, call.function, call.params, signer, None, False, error.name
                    )
                )
                return ExtrinsicResult(False, error.message, error=error)
            batch = [(xt_hash, call, signer, False)]
            if (call.module, call.function) == ("MevShield", "submit_encrypted"):
                batch += [
                    (h, inner, who, True)
                    for h, (inner, who, n) in self._pending_inner.items()
                    if who == signer and n == nonce + 1
                ]
            block = self._produce(batch)
            self._pending_inner.clear()
            if not wait_for_inclusion and not wait_for_finalization:
                return ExtrinsicResult(True, "Submitted (not waiting).")
            return block.results[xt_hash]

    def _pool_check(self, call: FakeCall, signer: str) -> None:
        """What the node refuses before a block: the weights rate limit (Custom error 6)."""
        s = self.state
        uid = s.uid(signer)
        weights = call.function in ("set_mechanism_weights", "commit_timelocked_mechanism_weights")
        if not (weights and uid is not None and s.weights_rate_limit and s.last_update[uid]):
            return
        if self.head + 1 - s.last_update[uid] < s.weights_rate_limit:
            raise pool_rejection("Custom error: 6")

    async def submit_signed(
        self,
        extrinsic: Any,
        keypair: Any,
        *,
        wait_for_inclusion: bool = True,
        wait_for_finalization: bool = True,
    ) -> ExtrinsicResult:
        raise SdkChainError("the in-memory subtensor takes calls, not pre-signed extrinsics")

    async def prepare(self, call: Any, *, address: str, **kwargs: Any) -> Any:
        raise SdkChainError("the in-memory subtensor does no out-of-process signing")

    async def submit_signature(self, unsigned: Any, signature: Any, **kwargs: Any) -> Any:
        raise SdkChainError("the in-memory subtensor does no out-of-process signing")

    def multisig_account(self, signatories: list[str], threshold: int) -> Any:
        raise SdkChainError("the in-memory subtensor has no multisig")

    async def submit_multisig(
        self, call: Any, keypair: Any, multisig_account: Any, **kw: Any
    ) -> Any:
        raise SdkChainError("the in-memory subtensor has no multisig")
