"""The hivemind DHT of a participant, its libp2p identity, and who is behind each peer id.

    dht = start_dht(config.dht, run="demo", ledger=chain)            # bootstraps from the chain
    text = commitment_for(dht, chain, hotkey.address, run="demo")
    chain.commit(text)
    publish_identity(dht, hotkey, run="demo", ttl=3600)              # optional second tie
    directory = PeerDirectory(chain, run="demo", dht=dht)
    directory.peers()   # {"12D3KooW…": "5F…hotkey"} for registered hotkeys only
    dht.shutdown()

Every miner and validator runs one `hivemind.DHT` (a p2p daemon plus a Kademlia node).
A newcomer needs nothing but the ledger: each registered hotkey commits a small JSON
object ``{"dht": ["/ip4/…/tcp/…/p2p/<peer id>"], "dht_proof": {"sig": …}}`` (the chain's
commitment: at most 1024 bytes on the local ledger, 384 on subtensor; signed by the
hotkey), and `start_dht` bootstraps from those addresses.

A tie between a peer id and a hotkey needs both keys: the hotkey signs it (the commit
extrinsic, or the record below), and the peer id's own libp2p key signs "I act for
<hotkey> in <run>" (`dht_proof`: an Ed25519 signature, plus the public key for older RSA
identities; `averaging.identity`). libp2p authenticates every stream by its peer id, so a
message arriving from that peer id speaks for that hotkey. A second tie that needs no
block: a record signed by both keys (over {peer_id, hotkey, run, expires}) stored under a
run-scoped DHT key, checked by `IdentityRecordValidator` on every node that stores or
returns it and again on read. `PeerDirectory` merges both, keeps only hotkeys registered
on the ledger now, and ignores every claim without a valid proof by the peer's key, so a
hotkey cannot claim someone else's peer id (and lock it out of the groups). A peer id
that its own key tied to two hotkeys is dropped (its owner made it ambiguous).

The libp2p identity (`identity_path`) is a private key file (Ed25519 when we create it)
written with mode 0600 and reused on restart, so a participant keeps its peer id and its
commitment stays valid. Without one, `start_dht` makes a fresh key per start.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import json
import logging
import os
import re
import tempfile
import time
import weakref
from collections import defaultdict
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import msgpack
from hivemind import DHT
from hivemind.dht.routing import DHTID
from hivemind.dht.validation import DHTRecord, RecordValidatorBase
from hivemind.p2p import P2PDaemonError, PeerID
from hivemind.proto import crypto_pb2
from hivemind.utils.mpfuture import MPFuture
from hivemind.utils.multiaddr import Multiaddr
from hivemind.utils.multiaddr.exceptions import Error as MultiaddrError
from hivemind.utils.serializer import MSGPackSerializer
from hivemind.utils.timed_storage import get_dht_time
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from averaging.identity import PeerKey, b64, peer_message, unb64, verify_peer
from averaging.records import PeerRecordValidator
from averaging.settings import DHTConfig
from chain.factory import ChainSource
from chain.interface import Chain, SigningKey
from chain.keys import is_address, signing_bytes, verify
from common.errors import TensormineError

logger = logging.getLogger(__name__)

RUN_NAME = re.compile(r"^[A-Za-z0-9_-]{1,64}$")
MAX_COMMITTED_MADDRS = 8
_PEER_ID = re.compile(r"^[1-9A-HJ-NP-Za-km-z]{30,128}$")  # base58


class DHTStartError(TensormineError, RuntimeError):
    """The DHT could not start or could not reach any bootstrap peer."""


def check_run_name(run: str) -> str:
    """Run names become DHT keys and hivemind group prefixes, which forbid '.'."""
    if not RUN_NAME.match(run):
        raise ValueError(f"run name {run!r}: use 1-64 letters, digits, '_' or '-'")
    return run


# ---- libp2p identity ----------------------------------------------------------------

# The private key behind each DHT that `start_dht` started (the caller's process only).
_PEER_KEYS: weakref.WeakKeyDictionary[Any, PeerKey] = weakref.WeakKeyDictionary()


def load_identity(path: Path) -> PeerKey:
    """The libp2p key at `path`, creating an Ed25519 key (mode 0600) if missing.

    hivemind would create an RSA key itself, read-only (0400); we write it 0600 like the
    hotkey files, atomically, and refuse a file that others can read. RSA files written
    earlier keep working (and keep their peer id).
    """
    path = Path(path)
    if path.exists():
        mode = path.stat().st_mode & 0o777
        if mode & 0o077:
            raise PermissionError(
                f"{path} has mode {mode:o}; a libp2p identity must be 0600 (chmod 600 {path})"
            )
        return PeerKey(path.read_bytes())
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    key = PeerKey.generate()
    _write_private(path, key.data)
    logger.info("created libp2p identity %s (peer %s)", path, key.peer_id)
    return key


def ensure_identity(path: Path) -> PeerID:
    """The peer id of the libp2p key at `path`, creating the key if missing."""
    return load_identity(path).peer_id


def _write_private(path: Path, data: bytes) -> None:
    tmp = path.with_name(path.name + f".creating-{os.getpid()}")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as fh:
        fh.write(data)
        fh.flush()
        os.fsync(fh.fileno())
    tmp.replace(path)


def peer_key_of(dht: DHT) -> PeerKey:
    """The libp2p private key of a DHT started by `start_dht` in this process."""
    key = _PEER_KEYS.get(dht)
    if key is None:
        raise ValueError("this DHT was not started by averaging.dht.start_dht; its key is unknown")
    return key


# ---- multiaddrs and ledger commitments ----------------------------------------------


def peer_id_of(maddr: str) -> str:
    """The base58 peer id in a multiaddr's /p2p/ component; ValueError if it has none."""
    try:
        peer = Multiaddr(maddr)["p2p"]
        PeerID.from_base58(peer)
    except (MultiaddrError, ValueError, KeyError, TypeError) as exc:
        raise ValueError(f"{maddr!r} is not a multiaddr ending in /p2p/<peer id>") from exc
    if not _PEER_ID.match(peer):
        raise ValueError(f"{maddr!r}: {peer!r} is not a base58 peer id")
    return str(peer)


def visible_maddrs(dht: DHT) -> list[str]:
    """Multiaddrs (with /p2p/) under which other peers can reach `dht`."""
    return [str(m) for m in dht.get_visible_maddrs(latest=True)]


class PeerProof(BaseModel):
    """A libp2p key's signature (base64), with its public key when the peer id lacks it."""

    model_config = ConfigDict(extra="forbid", strict=True, frozen=True)
    sig: str = Field(min_length=1, max_length=700)
    key: str | None = Field(default=None, min_length=1, max_length=800)

    @classmethod
    def make(cls, key: PeerKey, message: bytes) -> PeerProof:
        public = None if key.embeds_public else b64(key.public)
        return cls(sig=b64(key.sign(message)), key=public)

    def verifies(self, peer_id: str, message: bytes) -> bool:
        try:
            sig = unb64(self.sig)
            public = unb64(self.key) if self.key is not None else None
        except ValueError:
            return False
        return verify_peer(peer_id, message, sig, public)


class DHTCommitment(BaseModel):
    """The part of a hotkey's ledger commitment that says where its DHT listens."""

    model_config = ConfigDict(extra="ignore", strict=True, frozen=True)
    dht: list[str] = Field(min_length=1, max_length=MAX_COMMITTED_MADDRS)
    dht_proof: PeerProof | None = None


def commitment_message(peer_id: str, hotkey: str, run: str) -> bytes:
    """What a peer's libp2p key signs to say "I act for `hotkey` in `run`" on the ledger."""
    return peer_message("ledger-commitment", {"hotkey": hotkey, "peer_id": peer_id, "run": run})


def parse_commitment(data: str) -> list[str]:
    """The valid DHT multiaddrs in a commitment (empty if it has none); one peer id only.
    Good enough to bootstrap from; `committed_peer` says whether the tie is proven."""
    try:
        body = json.loads(data)
        maddrs = DHTCommitment.model_validate(body).dht
        peers = {peer_id_of(m) for m in maddrs}
    except (ValueError, TypeError, ValidationError):
        return []
    return maddrs if len(peers) == 1 else []


@functools.lru_cache(maxsize=4096)  # pure; directories re-read every commitment each round
def committed_peer(data: str, *, hotkey: str, run: str) -> str | None:
    """The peer id a commitment ties to `hotkey` in `run`, if the peer's key proved it."""
    maddrs = parse_commitment(data)
    if not maddrs:
        return None
    proof = DHTCommitment.model_validate(json.loads(data)).dht_proof
    peer = peer_id_of(maddrs[0])
    if proof is None or not proof.verifies(peer, commitment_message(peer, hotkey, run)):
        return None
    return peer


def commitment_for(
    dht: DHT,
    ledger: Chain,
    hotkey: str,
    *,
    run: str,
    maddrs: list[str] | None = None,
    key: PeerKey | None = None,
) -> str:
    """The text to commit so that others find `dht` and tie its peer id to `hotkey` in `run`.

    `key` (default: the key `start_dht` used) proves the tie. Other keys of the hotkey's
    current commitment (if it is a JSON object) are kept; only ``"dht"`` and
    ``"dht_proof"`` are replaced. Addresses are dropped from the end until it fits in
    `Chain.max_commitment_bytes` (with an Ed25519 identity the proof takes ~110 bytes,
    with RSA ~770).
    """
    own = dht.peer_id.to_base58()
    key = key if key is not None else peer_key_of(dht)
    if key.peer_id != dht.peer_id:
        raise ValueError(f"key of peer {key.peer_id} cannot prove a tie for peer {own}")
    addrs = maddrs if maddrs is not None else visible_maddrs(dht)
    addrs = [m for m in addrs if peer_id_of(m) == own][:MAX_COMMITTED_MADDRS]
    if not addrs:
        raise ValueError(f"no multiaddr of peer {own} to commit")
    body = ledger.commitment_fields(hotkey)
    limit = ledger.max_commitment_bytes()
    proof = PeerProof.make(key, commitment_message(own, hotkey, check_run_name(run)))
    body["dht_proof"] = proof.model_dump(exclude_none=True)
    while addrs:
        body["dht"] = addrs
        text = json.dumps(body, sort_keys=True, separators=(",", ":"))
        if len(text.encode()) <= limit:
            return text
        addrs = addrs[:-1]
    raise ValueError(
        f"the commitment has no room for a DHT address (other keys fill {limit} bytes)"
    )


def ledger_multiaddrs(
    ledger: Chain, *, exclude: set[str] | None = None, limit: int = 16
) -> list[str]:
    """Multiaddrs committed by registered hotkeys, newest commitments first, `limit` peers."""
    skip = exclude or set()
    rows = sorted(ledger.commitments().items(), key=lambda kv: kv[1][1], reverse=True)
    out: list[str] = []
    peers = 0
    for _hotkey, (data, _block) in rows:
        maddrs = parse_commitment(data)
        if not maddrs or peer_id_of(maddrs[0]) in skip:
            continue
        out.extend(maddrs)
        peers += 1
        if peers >= limit:
            break
    return out


# ---- signed identity records in the DHT ---------------------------------------------


def identity_key(run: str) -> str:
    return f"tensormine.{check_run_name(run)}.identity"


class IdentityClaim(BaseModel):
    """What a hotkey and a peer key both sign: "peer `peer_id` acts for `hotkey` in `run`
    until `expires`"."""

    model_config = ConfigDict(extra="forbid", strict=True, frozen=True)
    peer_id: str = Field(pattern=_PEER_ID.pattern)
    hotkey: str = Field(min_length=40, max_length=60)
    run: str = Field(pattern=RUN_NAME.pattern)
    expires: float

    def message(self) -> bytes:
        return signing_bytes(self.model_dump())

    def peer_message(self) -> bytes:
        return peer_message("dht-identity", self.model_dump())


class SignedIdentity(IdentityClaim):
    signature: str = Field(pattern=r"^[0-9a-f]{128}$")  # by the hotkey
    peer_proof: PeerProof  # by the peer's libp2p key

    def claim(self) -> IdentityClaim:
        return IdentityClaim.model_validate(self.model_dump(exclude={"signature", "peer_proof"}))


def sign_identity(keypair: SigningKey, key: PeerKey, run: str, expires: float) -> SignedIdentity:
    claim = IdentityClaim(
        peer_id=key.peer_id.to_base58(), hotkey=keypair.address, run=run, expires=expires
    )
    return SignedIdentity(
        **claim.model_dump(),
        signature=keypair.sign(claim.message()).hex(),
        peer_proof=PeerProof.make(key, claim.peer_message()),
    )


def verify_identity(value: object, *, run: str, hotkey: str | None = None) -> IdentityClaim | None:
    """The claim in `value` if it is well formed, for `run` (and `hotkey`), and signed by its
    hotkey and by its peer's key; None otherwise. Expiry is the DHT's business (records
    expire with it)."""
    try:
        signed = SignedIdentity.model_validate(value)
    except ValidationError:
        return None
    claim = signed.claim()
    if claim.run != run or (hotkey is not None and claim.hotkey != hotkey):
        return None
    if not is_address(claim.hotkey):
        return None
    if not verify(claim.hotkey, claim.message(), bytes.fromhex(signed.signature)):
        return None
    if not signed.peer_proof.verifies(claim.peer_id, claim.peer_message()):
        return None
    return claim


class IdentityRecordValidator(RecordValidatorBase):  # type: ignore[misc]
    """Every DHT node refuses identity records that are malformed, unsigned, mis-keyed or
    that outlive their own `expires`; other keys pass through untouched."""

    def __init__(self, run: str) -> None:
        self.run = check_run_name(run)
        self._key_id = DHTID.generate(source=identity_key(run)).to_bytes()

    def validate(self, record: DHTRecord) -> bool:
        if record.key != self._key_id:
            return True
        try:
            hotkey = MSGPackSerializer.loads(record.subkey)
            value = MSGPackSerializer.loads(record.value)
        except (ValueError, TypeError, msgpack.UnpackException) as exc:
            logger.debug("identity record does not decode: %s", exc)
            return False
        if not isinstance(hotkey, str):
            return False
        claim = verify_identity(value, run=self.run, hotkey=hotkey)
        if claim is None:
            logger.debug("refused identity record for %r", hotkey)
            return False
        return bool(record.expiration_time <= claim.expires)


def publish_identity(dht: DHT, keypair: SigningKey, run: str, ttl: float) -> SignedIdentity:
    """Store this peer's signed identity record under the run's key (subkey: hotkey)."""
    expires = get_dht_time() + ttl
    signed = sign_identity(keypair, peer_key_of(dht), run, expires)
    ok = dht.store(
        identity_key(run),
        signed.model_dump(exclude_none=True),
        expiration_time=expires,
        subkey=keypair.address,
    )
    if not ok:
        raise DHTStartError(f"no DHT node accepted the identity record of {keypair.address}")
    return signed


def fetch_identities(dht: DHT, run: str) -> dict[str, IdentityClaim]:
    """hotkey -> verified claim, from the run's identity key (checked again on read)."""
    found = dht.get(identity_key(run), latest=True)
    if found is None or not isinstance(found.value, dict):
        return {}
    out: dict[str, IdentityClaim] = {}
    for hotkey, item in found.value.items():
        if not isinstance(hotkey, str):
            continue
        claim = verify_identity(getattr(item, "value", None), run=run, hotkey=hotkey)
        if claim is not None:
            out[hotkey] = claim
    return out


class PeerDirectory:
    """Which registered hotkey is behind each peer id, from the ledger (and the DHT)."""

    def __init__(self, chain: Chain | Path | str, *, run: str, dht: DHT | None = None) -> None:
        self.ledger, self.run, self.dht = ChainSource(chain), check_run_name(run), dht

    def peers(self) -> dict[str, str]:
        """peer id (base58) -> hotkey, for hotkeys registered now whose tie the peer's own
        key proved; a peer id that proved ties to two hotkeys is dropped."""
        ledger = self.ledger.get()
        registered = {n.hotkey for n in ledger.neurons()}
        claims: dict[str, set[str]] = defaultdict(set)
        for hotkey, (data, _block) in ledger.commitments().items():
            if hotkey not in registered:
                continue
            peer = committed_peer(data, hotkey=hotkey, run=self.run)
            if peer is not None:
                claims[peer].add(hotkey)
            elif parse_commitment(data):
                logger.debug("commitment of %s has no valid proof by its peer key", hotkey)
        if self.dht is not None:
            for hotkey, claim in fetch_identities(self.dht, self.run).items():
                if hotkey in registered:
                    claims[claim.peer_id].add(hotkey)
        out: dict[str, str] = {}
        for peer, hotkeys in claims.items():
            if len(hotkeys) == 1:
                out[peer] = next(iter(hotkeys))
            else:
                logger.warning("peer %s proved ties to %d hotkeys; refusing it", peer, len(hotkeys))
        return out


class StaticDirectory:
    """A fixed peer id -> hotkey table (tests, or a config-pinned set of peers)."""

    def __init__(self, table: Mapping[str, str]) -> None:
        self.table = dict(table)

    def peers(self) -> dict[str, str]:
        return dict(self.table)


# ---- starting and stopping ------------------------------------------------------------


def host_maddrs(config: DHTConfig) -> list[str]:
    proto = "ip6" if ":" in config.host else "ip4"
    return [f"/{proto}/{config.host}/tcp/{config.port}"]


def start_dht(
    config: DHTConfig,
    *,
    run: str | None = None,
    ledger: Chain | None = None,
    identity_path: Path | None = None,
) -> DHT:
    """Start a DHT node, bootstrapping from `config.initial_peers` and the ledger's peers.

    Every node refuses averaging records not signed by the peer they name
    (`averaging.records`); with a `run`, it also validates identity records of that run.
    The key is `identity_path`'s (created if missing), else a new one. Bootstrap is retried
    `bootstrap_attempts` times; if only ledger addresses were given and none answers (all
    stale), the node starts alone and says so: its own commitment then lets others join it.
    """
    identity = identity_path if identity_path is not None else config.identity_path
    key = load_identity(identity) if identity is not None else PeerKey.generate()
    own = key.peer_id.to_base58()
    from_ledger: list[str] = []
    if ledger is not None and config.peers_from_ledger:
        from_ledger = ledger_multiaddrs(ledger, exclude={own}, limit=config.max_ledger_peers)
    validators: list[RecordValidatorBase] = [PeerRecordValidator(key)]
    if run is not None:
        validators.append(IdentityRecordValidator(run))
    kwargs: dict[str, Any] = {
        "host_maddrs": host_maddrs(config),
        "startup_timeout": config.startup_timeout_s,
        "record_validators": validators,
    }
    if config.announce_maddrs:
        kwargs["announce_maddrs"] = list(config.announce_maddrs)
    check_free = config.check_identity_free and identity is not None
    if check_free and key.key_type != crypto_pb2.KeyType.RSA:
        # hivemind's check derives the peer id with PeerID.from_identity, RSA keys only.
        logger.warning("check_identity_free: hivemind cannot check a non-RSA identity; skipped")
        check_free = False
    kwargs["check_if_identity_free"] = check_free

    last_error: Exception | None = None
    candidates: list[str] = []
    for attempt in range(1, config.bootstrap_attempts + 1):
        candidates = list(config.initial_peers) + from_ledger
        try:
            return _start(candidates, kwargs, key, identity)
        except (P2PDaemonError, RuntimeError, TimeoutError) as exc:
            last_error = exc
            logger.warning(
                "DHT start %d/%d with %d bootstrap addresses failed: %r",
                attempt,
                config.bootstrap_attempts,
                len(candidates),
                exc,
            )
            if attempt < config.bootstrap_attempts:
                time.sleep(0.5 * attempt)  # peers may be restarting; give them a moment
    if from_ledger and not config.initial_peers:
        logger.warning("no committed DHT peer answered; starting a new DHT alone")
        try:
            return _start([], kwargs, key, identity)
        except (P2PDaemonError, RuntimeError, TimeoutError) as exc:
            last_error = exc
    raise DHTStartError(f"could not start the DHT: {last_error}") from last_error


def join_ledger_peers(dht: DHT, ledger: Chain, *, limit: int = 64, timeout: float = 20.0) -> int:
    """Connect to the committed peers that this node is not connected to; returns how many
    answered a DHT ping (and are now in its routing table).

    Peers that start at the same moment find no commitments yet and each start a DHT of
    their own; calling this now and then (the miner does it every window) joins such
    islands into one network, and brings back peers that restarted on a new address.
    """
    own = dht.peer_id.to_base58()
    return connect_peers(dht, ledger_multiaddrs(ledger, exclude={own}, limit=limit), timeout)


def connect_peers(dht: DHT, maddrs: list[str], timeout: float = 20.0) -> int:
    """Dial each peer of `maddrs` (``…/p2p/<peer id>``) that this node is not connected to
    and ping it; returns how many answered (they are now in its routing table). A peer
    that knows only its bootstrap peer sees nobody else's group-key declarations yet: dial
    everyone right before matchmaking, or the first round may split into smaller groups."""
    own = dht.peer_id.to_base58()
    targets: dict[str, list[str]] = {}
    for maddr in maddrs:
        peer = peer_id_of(maddr)
        if peer != own:
            targets.setdefault(peer, []).append(maddr)
    if not targets:
        return 0
    future = dht.run_coroutine(functools.partial(_connect_and_ping, targets), return_future=True)
    try:
        answered: int = future.result(timeout=timeout)
    except TimeoutError:
        future.cancel()
        logger.warning("joining %d peers took over %.0fs; going on", len(targets), timeout)
        return 0
    return answered


async def _connect_and_ping(targets: dict[str, list[str]], _dht: DHT, node: Any) -> int:
    """Runs inside the DHT's process (hivemind's `run_coroutine`)."""
    connected = {str(info.peer_id) for info in await node.p2p.list_peers()}
    answered = 0
    for peer, maddrs in targets.items():
        if peer in connected:
            continue
        peer_id = PeerID.from_base58(peer)
        try:
            # hivemind's P2P has no public call to dial a new address after start; the
            # daemon wants the transport address without the /p2p/<peer id> suffix.
            transports = [Multiaddr(m.split("/p2p/")[0]) for m in maddrs]
            await asyncio.wait_for(node.p2p._client.connect(peer_id, transports), timeout=5)
        except (TimeoutError, P2PDaemonError, OSError, ValueError) as exc:
            logger.debug("could not reach %s: %r", peer, exc)  # ControlFailure: unreachable
            continue
        if await node.protocol.call_ping(peer_id) is not None:
            answered += 1
    if answered:
        logger.info("joined %d peer(s) from the ledger's commitments", answered)
    return answered


def _reap_failed_node(dht: DHT) -> None:
    """End the process of a DHT node that failed to start, and its p2p daemon.

    The node's process exits by itself after a failed start: give it the time to. Killing
    it while it sends a result can leave hivemind's MPFuture update lock (shared by every
    process this one forks) held forever, and then every later node's start here hangs
    until its timeout: seen when several peers restart at once (their committed peers are
    all gone, so each start fails). If it must be killed, hivemind's futures get fresh
    locks (`MPFuture.reset_backend`), which no DHT of this process is using yet.
    """
    dht.join(10)
    if dht.is_alive():
        dht.terminate()
        dht.join(5)
        logger.warning(
            "a DHT node that failed to start had to be killed; resetting hivemind's futures"
        )
        MPFuture.reset_backend()


def _start(
    initial_peers: list[str], kwargs: dict[str, Any], key: PeerKey, identity: Path | None
) -> DHT:
    with contextlib.ExitStack() as stack:
        if identity is None:
            # The daemon reads its key from a file; this one lives only while it starts.
            folder = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="tm-p2p-")))
            identity = folder / "p2p.key"
            _write_private(identity, key.data)
        dht = DHT(
            initial_peers=initial_peers or None,
            start=False,
            identity_path=str(identity),
            **kwargs,
        )
        try:
            # hivemind waits forever for a node that never gets ready unless told otherwise.
            dht.run_in_background(await_ready=True, timeout=kwargs["startup_timeout"])
        except BaseException:
            _reap_failed_node(dht)
            raise
    if dht.peer_id != key.peer_id:
        dht.shutdown()
        raise DHTStartError(f"the daemon runs as {dht.peer_id}, not as its key's {key.peer_id}")
    _PEER_KEYS[dht] = key
    logger.info("DHT %s listening on %s", dht.peer_id, visible_maddrs(dht))
    return dht
