"""The ledger's errors. Each one means: nothing was changed, and here is why."""

from common.errors import TensormineError


class ChainError(TensormineError):
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


class ChainUnreachable(ChainError):
    """No answer from the chain's endpoint after the configured retries."""


class PastStateUnavailable(ChainError):
    """The chain cannot serve state at that past block (a pruning node, no archive)."""


class WalletError(ChainError):
    """A wallet or key file that cannot be used: missing, wrong mode, wrong password."""


class CommitmentTooLong(InvalidCall):
    """A commitment larger than the chain stores."""


class CommitRevealEnabled(ChainError):
    """Plain `set_weights` on a ledger that runs commit-reveal: commit, then reveal."""


class CommitRevealDisabled(ChainError):
    """A weights commit or reveal on a ledger without commit-reveal: use `set_weights`."""


class NoWeightsCommitFound(ChainError):
    """A weights reveal, but the signer has no pending commit (never made, replaced,
    already revealed, or expired long ago)."""


class InvalidRevealCommitHashNotMatch(ChainError):
    """The revealed weights and salt hash to none of the signer's pending commits."""


class RevealTooEarly(ChainError):
    """A weights reveal before its commit's reveal window."""


class ExpiredWeightCommit(ChainError):
    """A weights reveal after its commit's reveal window: the commit counts for nothing."""
