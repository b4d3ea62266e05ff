"""`BittensorChain` against a real subtensor node. Skipped unless configured:

    TENSORMINE_CHAIN_ENDPOINT=ws://127.0.0.1:9944 \\
    TENSORMINE_CHAIN_NETUID=2 \\
    TENSORMINE_CHAIN_WALLET=validator TENSORMINE_CHAIN_HOTKEY=default \\
    TENSORMINE_CHAIN_WALLET_PATH=~/.bittensor/wallets \\
    TENSORMINE_COLDKEY_PASSWORD=... \\
    .venv/bin/pytest -m chain tests/chain/test_live_chain.py

``TENSORMINE_CHAIN_ENDPOINT`` is a ``chain.network`` value (a ws:// URL, or ``local`` /
``test``); the wallet is a btcli wallet (`chain.wallet.load_wallet`) whose coldkey holds
enough TAO to register when the hotkey is not registered yet (the coldkey password is
only needed then). A local subtensor (``localnet.sh``, fast blocks) is the intended
target; on testnet the weights rate limit can make a rerun wait or skip.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from chain.bittensor import BittensorChain
from chain.config import ChainConfig, WalletConfig
from chain.errors import RateLimited
from chain.wallet import load_wallet

ENDPOINT = os.environ.get("TENSORMINE_CHAIN_ENDPOINT")

pytestmark = [
    pytest.mark.chain,
    pytest.mark.skipif(not ENDPOINT, reason="TENSORMINE_CHAIN_ENDPOINT is not set"),
]


@pytest.fixture(scope="module")
def chain(tmp_path_factory: pytest.TempPathFactory) -> Iterator[BittensorChain]:
    wallet = WalletConfig(
        name=os.environ.get("TENSORMINE_CHAIN_WALLET", "default"),
        hotkey=os.environ.get("TENSORMINE_CHAIN_HOTKEY", "default"),
        path=Path(os.environ.get("TENSORMINE_CHAIN_WALLET_PATH", "~/.bittensor/wallets")),
    )
    config = ChainConfig(
        backend="bittensor",
        network=str(ENDPOINT),
        netuid=int(os.environ.get("TENSORMINE_CHAIN_NETUID", "1")),
        wallet=wallet,
        cache_dir=tmp_path_factory.mktemp("bittensor"),
    )
    handle = BittensorChain.connect(config, load_wallet(wallet))
    yield handle
    handle.close()


def test_head_and_blocks(chain: BittensorChain) -> None:
    head = chain.block_number()
    info = chain.block(head)
    assert head > 0 and info is not None and len(info.hash) == 64
    assert chain.tempo > 0 and chain.block_time_s > 0


def test_register_set_weights_and_read_them_back(chain: BittensorChain) -> None:
    uid = chain.register()
    assert chain.uid_of(chain.signer().address) == uid
    try:
        receipt = chain.set_weights([uid], [1.0])
    except RateLimited as refused:
        pytest.skip(f"weights rate limit on this chain: {refused}")
    assert receipt.ok and receipt.block > 0
    rows = chain.weights()
    if chain.client.subnets.commit_reveal_enabled(chain.netuid):
        pending = chain.client.weights.timelocked_weight_commits(chain.netuid)
        hotkeys = {entry["hotkey"] for commits in pending.values() for entry in commits}
        assert chain.signer().address in hotkeys
    else:
        assert rows[uid] == [(uid, 65535)]


def test_commit_and_read_the_commitment(chain: BittensorChain) -> None:
    chain.register()
    address = chain.signer().address
    body = {**chain.commitment_fields(address), "live_test": int(time.time())}
    text = json.dumps(body, sort_keys=True, separators=(",", ":"))
    try:
        receipt = chain.commit(text)
    except RateLimited as refused:
        pytest.skip(f"commitment space used up this epoch: {refused}")
    assert chain.commitments()[address] == (text, receipt.block)
    assert chain.commitment_fields(address)["live_test"] == body["live_test"]
