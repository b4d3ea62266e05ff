"""The store's errors: one base class, and a rejection that carries a machine-readable reason.

    try:
        tensors = store.load_contribution(ref, expect=expect)
    except Rejected as exc:
        ledger_note = exc.reason          # "bad_signature", "sha256_mismatch", ...
        logger.info("uid %d rejected: %s", uid, exc)

`StoreError` is what the CLI turns into one line and exit status 2; every error below
derives from it. `Rejected` means "this artifact is bad and nothing from it was loaded";
its `reason` is one of `REASONS`, short and stable so that callers can record and count it.
"""

from __future__ import annotations

from typing import Literal, get_args

from pydantic import ValidationError

from common.errors import TensormineError

Reason = Literal[
    "not_found",  # the manifest or a file it names is missing
    "bad_manifest",  # manifest is not valid JSON or misses / mistypes a field
    "path_escape",  # a path in a manifest or provenance leaves the store or checkpoint folder
    "bad_signature",  # signature missing or not the hotkey's Ed25519 signature of the manifest
    "wrong_hotkey",  # manifest signed by another hotkey than the one expected for the UID
    "wrong_uid",
    "wrong_window",
    "wrong_shard",
    "too_large",  # a file over the configured size limit
    "size_mismatch",  # the file's size differs from the size its manifest or provenance states
    "sha256_mismatch",
    "not_safetensors",  # pickle, zip (torch.save), .bin/.pt/... or bytes that are no safetensors
    "header_too_large",  # safetensors header longer than the configured limit
    "bad_header",  # safetensors header that lies: offsets, sizes, dtypes, extra or missing data
    "manifest_mismatch",  # tensors in the file differ from the tensors the manifest lists
    "name_mismatch",  # tensor names differ from what the caller expects
    "shape_mismatch",
    "dtype_mismatch",
    "not_finite",  # a NaN or infinity in a floating-point tensor
    "bad_answer",  # a proof-of-work challenge or answer that is not a valid document
]

REASONS: frozenset[str] = frozenset(get_args(Reason))


class StoreError(TensormineError):
    """Base class of every error the store raises on purpose."""


class NotFound(StoreError):
    """A store, window, revision or contribution that does not exist."""


class StoreConflict(StoreError):
    """A write that would contradict what is stored, e.g. publishing a window twice."""


class RemoteError(StoreError):
    """The Hub kept failing (429/5xx/network) after the configured retries, or refused."""


class Rejected(StoreError):
    """An artifact failed verification; nothing from it was loaded.

    `reason` is one of `REASONS` (stable, for machines); `detail` says what was wrong
    (for people). `str(exc)` is ``"<reason>: <detail>"``.
    """

    def __init__(self, reason: Reason, detail: str) -> None:
        if reason not in REASONS:
            raise ValueError(f"unknown rejection reason {reason!r}")
        self.reason: Reason = reason
        self.detail = detail
        super().__init__(f"{reason}: {detail}")


def first_problem(exc: ValidationError, what: str) -> str:
    """``<field path>: <message>`` of the first problem pydantic found in a document
    (`what` stands for the path when the document itself is the problem)."""
    first = exc.errors()[0]
    where = ".".join(str(p) for p in first["loc"]) or what
    return f"{where}: {first['msg']}"
