"""The start-up every program of a run shares: chain, averaging seat, tokenizer, checkpoint.

    chain = open_run_chain(cfg, identity)                      # StartupError: no chain
    ensure_window_zero(store, chain, cfg, model)               # the first process writes it
    seat = join_averaging(cfg, chain, folder, model, shards)
    tokenizer = load_tokenizer_from(pulled)                    # a pulled checkpoint's
    align_special_tokens(model, tokenizer)
    weights = load_checkpoint_weights(pulled)                  # safetensors only
    momentum = load_checkpoint_momentum(pulled, model)         # {} for window 0
    momentum = adopt_checkpoint(model, pulled)                 # None: θ held already

The miner (`train.miner`), the validator (`validation.validator`) and `tensormine verify`
(`validation.verify`) start the same way: they open the run's chain (`chain.backend`:
the local ledger or Bittensor, behind `chain.interface.Chain`), take a seat in
every shard's hivemind group (`averaging.participant`; the validator as an auxiliary
peer), read the tokenizer published with window 0 and load θ and the outer momentum from
checkpoints the store pulled and verified. This module is that start-up, and it is the
only place programs share it: no program imports another program.

A checkpoint is read from safetensors alone (weights, and the outer momentum published
next to them as `store.checkpoint.OUTER_STATE_FILE`); nothing is ever unpickled.
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from averaging.outer import OuterStateError, load_outer_state
from averaging.participant import Participant
from chain.errors import ChainError
from chain.factory import open_chain
from chain.interface import Chain, Identity
from chain.keys import default_keys_dir, load_key
from common.errors import TensormineError
from store.api import Store
from store.checkpoint import OUTER_STATE_FILE, Provenance
from store.errors import NotFound, StoreConflict
from store.sources import contributions_entry
from tensormine.config import RunConfig
from train.model import model_fingerprint
from train.moe import from_checkpoint_names
from train.shards import shard_state
from train.tokenizer import load_tokenizer

logger = logging.getLogger(__name__)


class StartupError(TensormineError, RuntimeError):
    """A program cannot start: the run's chain or a checkpoint is not usable; the message
    says what to do."""


def resolve_mixed_precision(setting: str) -> str:
    """`auto`: bf16 on a GPU that has it, else full precision (CPU bf16 is slower)."""
    if setting != "auto":
        return setting
    if torch.cuda.is_available() and torch.cuda.is_bf16_supported():
        return "bf16"
    return "no"


def open_run_chain(
    cfg: RunConfig, identity: Identity | None, attempts: int = 3, *, state_dir: Path | None = None
) -> Chain:
    """The run's chain bound to `identity`. A local ledger gets a few retries (1.5 s in
    all) while another process is creating it; a missing ledger is otherwise reported at
    once, not after a long wait. The Bittensor backend retries its endpoint itself
    (`chain.retries`) and raises `ChainUnreachable`. `state_dir`: see
    `chain.factory.open_chain`."""
    if cfg.chain.backend != "local":
        try:
            return open_chain(cfg.chain, identity, state_dir=state_dir)
        except ChainError as exc:
            raise StartupError(str(exc)) from None
    for attempt in range(attempts):
        try:
            return open_chain(cfg.chain, identity, state_dir=state_dir)
        except FileNotFoundError:
            if attempt == attempts - 1:
                raise StartupError(
                    f"no ledger at {cfg.chain.db}; start one with `tensormine chain init` "
                    "and `tensormine chain run` (or point chain.db at it)"
                ) from None
            time.sleep(0.5 * 2.0**attempt)
    raise AssertionError("unreachable")


def load_identity(cfg: RunConfig, name: str, keys_dir: str | Path | None = None) -> Identity:
    """The keys a program signs with. Local ledger: our Ed25519 key `name` from
    `keys_dir` (default ``$TENSORMINE_HOME/keys``), hotkey and coldkey in one. Bittensor:
    the btcli wallet `chain.wallet.name` with hotkey `name` (sr25519; the coldkey only
    when its password is in `chain.wallet.password_env`)."""
    if cfg.chain.backend == "local":
        folder = Path(keys_dir) if keys_dir else default_keys_dir()
        return Identity.single(load_key(folder, name))
    from chain.wallet import load_wallet

    return load_wallet(cfg.chain.wallet.model_copy(update={"hotkey": name}))


def register_hint(cfg: RunConfig, name: str) -> str:
    """How to register hotkey `name` on the run's chain, for error messages."""
    if cfg.chain.backend == "local":
        return f"register it with `tensormine chain register --key {name} --db {cfg.chain.db}`"
    w = cfg.chain.wallet
    return (
        f"register it with `btcli subnets register --netuid {cfg.chain.netuid} "
        f"-w {w.name} -H {name} --network {cfg.chain.network}`"
    )


def data_cache(cfg: RunConfig) -> Path:
    """Where tokenizer and pages are cached: `data.cache_dir`, else ``<run.dir>/data``."""
    return cfg.data.cache_dir or cfg.run.dir / "data"


def ensure_window_zero(store: Store, chain: Chain, cfg: RunConfig, model: PreTrainedModel) -> bool:
    """Write the run's window-0 checkpoint (`model` as `build_model` made it from the run
    seed, with the tokenizer trained on the run's data) unless the store has one; returns
    whether this process wrote it. Every process makes the same bytes, so whichever
    writes first, the others find the one model they would have written."""
    try:
        store.resolve(window=0)
        return False
    except NotFound:
        pass
    tokenizer = load_tokenizer(cfg.data, cfg.model.vocab_size, data_cache(cfg))
    align_special_tokens(model, tokenizer)
    prov = Provenance(
        run_id=cfg.run.name, window=0, ledger_block=chain.block_number(),
        run_config=cfg.to_json_dict(), metrics={},
    )  # fmt: skip
    try:
        store.publish_checkpoint(model, tokenizer, prov)
    except StoreConflict:
        logger.info("another process wrote window 0 first")
        return False
    logger.info("wrote the run's window-0 checkpoint to %s", store.location)
    return True


def commit_contributions_location(chain: Chain, location: str) -> bool:
    """Tell validators where this hotkey's contributions are (the ``"contributions"`` key
    of its chain commitment; the other keys, such as the DHT address, are kept). Returns
    whether a commitment was sent; nothing is sent when the commitment already says so.
    It is not waited for: validators need it only once the first window is scored, and
    the next read-modify-write of the commitment (a window's contribution, on Bittensor)
    comes a window later."""
    body = chain.commitment_fields(chain.signer().address)
    entry = contributions_entry(location)
    if all(body.get(k) == v for k, v in entry.items()):
        return False
    text = json.dumps({**body, **entry}, sort_keys=True, separators=(",", ":"))
    room = chain.max_commitment_bytes()
    if len(text.encode()) > room:
        raise StartupError(
            f"the commitment naming the contributions location {location!r} takes "
            f"{len(text.encode())} bytes; {chain.describe} leaves {room} for it: use a "
            "shorter store location (store.root or store.repo_id)"
        )
    chain.commit(text, wait=False)
    logger.info("committing contributions location %s", location)
    return True


def averaging_run_name(run: str) -> str:
    """The run's name as hivemind keys allow it (run names may contain dots)."""
    return run.replace(".", "-")


def join_averaging(
    cfg: RunConfig,
    chain: Chain,
    folder: Path,
    model: PreTrainedModel,
    shards: list[list[str]],
) -> Participant:
    """A participant's seat in every shard's group (its DHT identity kept in `folder`)."""
    return Participant.join(
        cfg.averaging,
        run=averaging_run_name(cfg.run.name),
        chain=chain,
        identity_path=folder / "dht.key",
        templates={i: shard_state(model, names) for i, names in enumerate(shards)},
    )


def load_tokenizer_from(folder: Path) -> PreTrainedTokenizerBase:
    from transformers import AutoTokenizer

    tokenizer: PreTrainedTokenizerBase = AutoTokenizer.from_pretrained(str(folder))
    return tokenizer


def align_special_tokens(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase) -> None:
    """Give the model's config and generation config the tokenizer's special ids, so a
    published checkpoint generates (and stops) correctly with `transformers` alone."""
    for key in ("bos_token_id", "eos_token_id", "pad_token_id"):
        value = getattr(tokenizer, key, None)
        setattr(model.config, key, value)
        if model.generation_config is not None:
            setattr(model.generation_config, key, value)


def load_checkpoint_weights(folder: Path) -> dict[str, torch.Tensor]:
    """A pulled (already verified) checkpoint's weights, from safetensors only."""
    from safetensors.torch import load_file

    index = folder / "model.safetensors.index.json"
    files = (
        sorted(set(json.loads(index.read_text())["weight_map"].values()))
        if index.is_file()
        else ["model.safetensors"]
    )
    weights: dict[str, torch.Tensor] = {}
    for name in files:
        weights.update(load_file(str(folder / name)))
    return {k: v.float() for k, v in from_checkpoint_names(weights).items()}


def load_checkpoint_momentum(folder: Path, model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The outer momentum published with a checkpoint (`store.checkpoint.OUTER_STATE_FILE`),
    checked against `model`'s parameters; empty when the checkpoint has none."""
    path = folder / OUTER_STATE_FILE
    if not path.is_file():
        return {}
    shapes = {n: tuple(p.shape) for n, p in model.named_parameters()}
    try:
        return load_outer_state(path, shapes)
    except OuterStateError as exc:
        raise StartupError(f"{path}: {exc}") from None


def adopt_checkpoint(model: torch.nn.Module, folder: Path) -> dict[str, torch.Tensor] | None:
    """Load a pulled checkpoint's θ into `model` and return the outer momentum published
    with it (θ_{w+1} depends on both: one model means both); None, and `model` untouched,
    when it holds that θ already."""
    weights = load_checkpoint_weights(folder)
    if model_fingerprint(weights) == model_fingerprint(model.state_dict()):
        return None
    model.load_state_dict(weights)
    return load_checkpoint_momentum(folder, model)
