"""The ledger's errors. Each one means: nothing was changed, and here is why."""


class ChainError(Exception):
    """Base class: an extrinsic or a ledger operation was refused."""


class BadSignature(ChainError):
    """The signature does not verify against the signer's address."""


class BadNonce(ChainError):
    """A replayed (stale) or out-of-order (future) nonce."""


class NotRegistered(ChainError):
    """The hotkey has no UID on this subnet."""


class AlreadyRegistered(ChainError):
    """The hotkey already holds a UID."""


class InvalidWeights(ChainError):
    """Weights that the chain cannot accept (unknown UIDs, negative, NaN, all zero...)."""


class NoValidatorPermit(ChainError):
    """The signer is not among the top validators by stake, or below the minimum stake."""


class RateLimited(ChainError):
    """The signer set weights too recently."""


class AlreadyCommitted(ChainError):
    """The hotkey already committed a contribution for this round; a commitment is final."""


class InsufficientFunds(ChainError):
    """Not enough free balance or stake for the operation."""


class InvalidCall(ChainError):
    """An unknown call or malformed arguments."""


class CorruptLedger(ChainError):
    """The database file is not a tensormine ledger, is damaged, or fails verification."""


class NotIncluded(ChainError):
    """An extrinsic was accepted into the pool but no block included it in time."""
