"""Where the bittensor SDK writes on disk: one folder per run, never the home directory.

The SDK keeps a few caches and address books under ``~/.bittensor`` unless an
environment variable says otherwise. Each path is read from the environment when the
SDK uses it (not at import), so setting the variables before the first client call is
enough. The variables, as the installed SDK (bittensor 11.3) reads them:

    BITTENSOR_RUNTIME_CACHE_DIR   runtime metadata cache      (_transport/runtime.py)
    BTCLI_TOKEN_SYMBOLS_CACHE     subnet token symbols, written on every connect (config.py)
    BTCLI_SUBNET_NAMES_CACHE      subnet names                (config.py)
    BTCLI_CONFIG                  btcli settings              (config.py)
    BTCLI_PROXIES_PATH            proxy book                  (config.py)
    BTCLI_ADDRESSES_PATH          address book                (config.py)
    BTCLI_MULTISIGS_PATH          multisig book               (config.py)
    BTCLI_MULTISIG_CACHE          multisig call cache         (config.py)
    BITTENSOR_EXTENSION_BRIDGE_TOKEN / _PID   browser-extension bridge (extension/*.py)

Wallets are not here: their folder is `chain.config.WalletConfig.path`.

The environment is process-wide, so the last `redirect_sdk_caches` wins; a process
talks to one chain, from one run folder.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

logger = logging.getLogger(__name__)

RUNTIME_CACHE_VARIABLE = "BITTENSOR_RUNTIME_CACHE_DIR"

# Variable -> file name inside the cache folder (the SDK's own default names).
SDK_FILE_VARIABLES: dict[str, str] = {
    "BTCLI_TOKEN_SYMBOLS_CACHE": "btcli_token_symbols.json",
    "BTCLI_SUBNET_NAMES_CACHE": "btcli_subnet_names.json",
    "BTCLI_CONFIG": "btcli.json",
    "BTCLI_PROXIES_PATH": "btcli_proxies.json",
    "BTCLI_ADDRESSES_PATH": "btcli_addresses.json",
    "BTCLI_MULTISIGS_PATH": "btcli_multisigs.json",
    "BTCLI_MULTISIG_CACHE": "btcli_multisig_cache.json",
    "BITTENSOR_EXTENSION_BRIDGE_TOKEN": "extension_bridge.token",
    "BITTENSOR_EXTENSION_BRIDGE_PID": "extension_bridge.pid",
}


def redirect_sdk_caches(folder: Path) -> dict[str, str]:
    """Point every path the bittensor SDK would write under ``~/.bittensor`` into
    `folder` (created if missing): the runtime metadata cache goes to
    ``folder/runtime-cache``, the btcli caches and books to files directly in `folder`.

    Call it before the SDK's first network call (`BittensorChain.connect` does). It
    overwrites variables already set, so a run's files never land in another run's
    folder. Returns the variables it set, for logs and tests.
    """
    folder = Path(folder).expanduser().resolve()
    folder.mkdir(parents=True, exist_ok=True)
    values = {RUNTIME_CACHE_VARIABLE: str(folder / "runtime-cache")}
    values.update({name: str(folder / file) for name, file in SDK_FILE_VARIABLES.items()})
    os.environ.update(values)
    logger.debug("bittensor SDK caches redirected to %s", folder)
    return values
