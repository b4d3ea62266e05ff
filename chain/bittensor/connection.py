"""Reaching subtensor: which endpoint `chain.network` names, and a connection that
gives up after `chain.retries` retries with `ChainUnreachable`.

``chain.network`` is what ``bittensor.SyncClient(network)`` takes: a preset name
(``finney``, ``test``, ``local`` = ws://127.0.0.1:9944 or ``$BT_CHAIN_ENDPOINT``,
``archive``, ``devnet``; see ``bittensor/settings.py: NETWORKS``) or a raw ``ws://`` /
``wss://`` URL. The SDK adds its own fallback pool for finney. ``chain.archive_network``
(a preset name or URL) becomes the client's ``archive_endpoints``: reads of state the
node has pruned are retried there; unset, the SDK's default archive pool for the
network applies (finney has one; test and local have none).

The client connects lazily; `open_client` connects eagerly so a wrong endpoint fails at
start-up, not at the first read, and retries with a doubling delay, logging each reason.
"""

from __future__ import annotations

import logging
import time
from typing import Any

import bittensor as bt
from bittensor.result import BittensorError
from bittensor.settings import NETWORKS, resolve_endpoint

from chain.config import ChainConfig
from chain.errors import ChainError, ChainUnreachable

logger = logging.getLogger(__name__)


def endpoint_of(network: str) -> str:
    """The websocket URL a preset name or URL stands for (`ChainError` if neither)."""
    try:
        return resolve_endpoint(network)[1]
    except ValueError:
        raise ChainError(
            f"chain.network {network!r} is neither a known network ({', '.join(sorted(NETWORKS))}) "
            "nor a ws:// or wss:// URL"
        ) from None


def archive_endpoints(config: ChainConfig) -> list[str] | None:
    """``archive_endpoints`` for the client: the configured archive, or None for the
    SDK's default pool."""
    if config.archive_network is None:
        return None
    return [endpoint_of(config.archive_network)]


def build_client(config: ChainConfig, substrate: object | None = None) -> Any:
    """A cold `bittensor.SyncClient` for `config` (no I/O yet). `substrate` replaces the
    SDK's websocket backend (an in-memory chain in tests)."""
    endpoint_of(config.network)
    return bt.SyncClient(
        config.network,
        archive_endpoints=archive_endpoints(config),
        substrate=substrate,  # type: ignore[arg-type]
    )


def open_client(
    config: ChainConfig, substrate: object | None = None, *, retry_delay_s: float = 1.0
) -> Any:
    """A connected `bittensor.SyncClient`: 1 + ``config.retries`` attempts, the delay
    doubling from `retry_delay_s`, then `ChainUnreachable` naming the endpoint."""
    endpoint = endpoint_of(config.network)
    attempts = 1 + config.retries
    delay = retry_delay_s
    last: BaseException | None = None
    for attempt in range(1, attempts + 1):
        client = build_client(config, substrate)
        try:
            client.connect()
            return client
        except (BittensorError, OSError, TimeoutError) as error:
            last = error
            client.close()
            logger.warning(
                "subtensor at %s: connection attempt %d/%d failed: %s",
                endpoint,
                attempt,
                attempts,
                " ".join(str(error).split()),
            )
        if attempt < attempts:
            time.sleep(delay)
            delay *= 2
    named = "" if config.network == endpoint else f" ({config.network})"
    raise ChainUnreachable(
        f"no answer from subtensor at {endpoint}{named} after {attempts} "
        f"attempts ({' '.join(str(last).split())}); check chain.network (finney | test | "
        "local | ws://host:port) and that the node is up, or raise chain.retries"
    )
