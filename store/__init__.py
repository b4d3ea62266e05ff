"""Checkpoints of the global model and miners' contributions: one store, two backends.

    from store import open_store, Provenance, Compression, Rejected
    store = open_store(cfg.store)          # a local folder (default) or the Hugging Face Hub

A checkpoint is a plain Hugging Face model folder plus ``tensormine.json`` (provenance and
the sha256 of every file), one immutable revision per window and a ``latest`` ref; it
loads with ``transformers`` alone. A contribution is one safetensors file of
pseudo-gradient tensors plus a manifest signed by the miner's hotkey. Everything read
back is verified (signatures, hashes, sizes, the safetensors header parsed by hand,
expected names/shapes/dtypes) and nothing is ever unpickled. See `store.api` for the
interface, `store.local` and `store.hub` for the two backends, `store.cli` for
``tensormine pull`` and ``tensormine store ls``.

Importing the package is cheap: `StoreConfig` and the errors load at once (the run
config imports them), everything that needs torch loads on first use.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from store.config import StoreConfig
from store.errors import NotFound, Rejected, RemoteError, StoreConflict, StoreError

if TYPE_CHECKING:
    from store.api import (
        PulledCheckpoint,
        Store,
        VerifiedContribution,
        expected_specs,
        open_source,
        open_store,
    )
    from store.backend import CheckpointRef, ContributionRef
    from store.checkpoint import (
        Contributor,
        Provenance,
        read_provenance,
        verify_checkpoint_folder,
        write_checkpoint_folder,
    )
    from store.manifest import Compression, ContributionManifest
    from store.safetensors_check import TensorSpec

_LAZY = {
    "PulledCheckpoint": "store.api",
    "Store": "store.api",
    "VerifiedContribution": "store.api",
    "expected_specs": "store.api",
    "open_source": "store.api",
    "open_store": "store.api",
    "CheckpointRef": "store.backend",
    "ContributionRef": "store.backend",
    "Contributor": "store.checkpoint",
    "Provenance": "store.checkpoint",
    "read_provenance": "store.checkpoint",
    "verify_checkpoint_folder": "store.checkpoint",
    "write_checkpoint_folder": "store.checkpoint",
    "Compression": "store.manifest",
    "ContributionManifest": "store.manifest",
    "TensorSpec": "store.safetensors_check",
}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'store' has no attribute {name!r}")


__all__ = [
    "CheckpointRef",
    "Compression",
    "ContributionManifest",
    "ContributionRef",
    "Contributor",
    "NotFound",
    "Provenance",
    "PulledCheckpoint",
    "Rejected",
    "RemoteError",
    "Store",
    "StoreConfig",
    "StoreConflict",
    "StoreError",
    "TensorSpec",
    "VerifiedContribution",
    "expected_specs",
    "open_source",
    "open_store",
    "read_provenance",
    "verify_checkpoint_folder",
    "write_checkpoint_folder",
]
