"""The `Chain` interface on Bittensor's subtensor, through the official SDK.

`chain.factory.open_chain` imports this package only for ``chain.backend: bittensor``,
so the local ledger never loads the SDK. One concept a file:

- ``chain.py``       `BittensorChain`: connecting, and the writes (SDK intents)
- ``reads.py``       `SubtensorReads`: time, metagraph, weights, balances, commitments
- ``connection.py``  which endpoint ``chain.network`` names; bounded connection retries
- ``paths.py``       the SDK's caches redirected into the run folder, never ``~``
- ``signing.py``     our `Identity` as the wallet the SDK signs with
- ``errors.py``      SDK failures -> `chain.errors` classes and `Receipt`s
- ``metagraph.py``   the SDK's metagraph and weight rows -> `chain.types`
- ``commitments.py`` commitment limits, and contribution commitments inside one commitment
"""

from chain.bittensor.chain import BittensorChain
from chain.bittensor.paths import redirect_sdk_caches

__all__ = ["BittensorChain", "redirect_sdk_caches"]
