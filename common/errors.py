"""The one error root: every error tensormine raises on purpose derives from
`TensormineError`, so a program (and the `tensormine` command line) catches that one
class, prints its one-line message and exits 2, while a bug still shows a traceback.

Each package declares its own errors next to the code that raises them (`ChainError`
in `chain.errors`, `StoreError` in `store.errors`, `ConfigError`, `MinerError`,
`ValidatorError`, ...), deriving from this root; some also derive from the built-in
class they used to be (`ValueError`, `RuntimeError`) so narrow `except`s keep working.
"""


class TensormineError(Exception):
    """Something the user or a peer got wrong, or a resource that is not there; the
    message says what and, where it can, what to do."""


class ConfigError(TensormineError, ValueError):
    """A config file or override is invalid; the message names the file and the key."""
