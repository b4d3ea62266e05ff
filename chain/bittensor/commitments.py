"""Commitments on subtensor: what one holds, how often it may change, and how our
per-window contribution commitment lives inside it.

Subtensor's ``Commitments`` pallet keeps ONE commitment per (netuid, hotkey):
``CommitmentOf = {deposit, block, info: {fields: [Data, ...]}}``, replaced whole by
``Commitments.set_commitment(netuid, info)`` (hotkey-signed; the hotkey must hold a UID,
else ``AccountNotAllowedCommit``). ``block`` is the block that included the last
``set_commitment``. Its limits:

- a ``Raw`` field holds at most 128 bytes: the runtime's ``Data`` enum has variants
  ``Raw0`` .. ``Raw128`` (the variant names the length; the SDK decodes them in
  ``bittensor/metagraph.py:_field_items``/``_decode_fields``, concatenating the Raw
  fields of one commitment). The SDK ships no metadata, so this bound is ours
  (`RAW_FIELD_BYTES`, from subtensor's ``Data`` type; a ``Raw129`` has no variant to
  encode to);
- at most ``MaxFields`` fields per commitment: a runtime constant
  (``bittensor/_generated/constants.py: Commitments.MaxFields``), read from the chain
  (subtensor sets 3: 384 bytes of UTF-8 text);
- a byte budget per hotkey and epoch: each ``set_commitment`` uses
  max(100, bytes of its fields) of ``MaxSpace`` (storage ``Commitments.MaxSpace``,
  3,100 by default), tracked in ``Commitments.UsedSpaceOf[netuid, hotkey] =
  {last_epoch, used_space}`` and renewed when the subnet's epoch index moves on; over
  budget the chain refuses with ``SpaceLimitExceeded``, "Space Limit Exceeded for the
  current interval" (``bittensor/error_descriptions/commitments.py``,
  ``_generated/errors.py``). No block-count rate limit is left in the pallet's errors.
  Our early check compares ``last_epoch`` with ``SubtensorModule.SubnetEpochIndex``;
  should the runtime count epochs otherwise, the check passes and the chain decides.

Contribution commitments. Subtensor has no pallet for tensormine's per-window sha256
commitment (the local ledger's ``commit_contribution`` call), so it lives in the
hotkey's one commitment, a JSON object whose keys belong to components (the averaging's
DHT address, the miner's contributions location): key `CONTRIBUTION_KEY` holds
``[round, digest]``. `BittensorChain.commit_contribution` reads the object, sets the
key and commits the whole object again; `contribution_commitments(round, block=)` reads
commitments as of `block` (callers pass the window's deadline) and keeps those whose
key names `round`, with the commitment's inclusion block. What this costs:

- only the latest window is on chain at any block: a hotkey's window-w commitment is
  visible in the state of blocks from its inclusion until its next ``set_commitment``,
  so reading a past window needs the state at that window's deadline (an archive
  endpoint, ``chain.archive_network``, once the node prunes it);
- any other component re-committing its keys moves the commitment's block later (the
  contribution key is carried over), so a contribution's block is the block of the
  latest commitment that still names it: never earlier than its real inclusion, which
  keeps "before the deadline" checks sound;
- every window spends at least 100 bytes of the hotkey's ``MaxSpace`` per epoch (and
  the whole object's size when larger): with 3,100 bytes and a ~300-byte object,
  about ten commitments per hotkey per epoch, all components together; windows
  shorter than a tenth of the tempo do not fit;
- the object shares the 384 bytes with every other key (DHT multiaddrs and proof,
  contributions location); ``[round, digest]`` takes about 80.

`BittensorChain.commit` refuses early, before signing: `CommitmentTooLong` over
``MaxFields`` × 128 bytes, `RateLimited` when the chain's tracker says this epoch's
budget cannot take it.
"""

from __future__ import annotations

import json
import re
from typing import Any

from chain.errors import AlreadyCommitted, CommitmentTooLong, InvalidCall

RAW_FIELD_BYTES = 128
MIN_SPACE_PER_COMMIT = 100
CONTRIBUTION_KEY = "c"
# The most a window's ``"c": [round, digest]`` adds to the commitment object (a comma,
# the key, the largest round SQLite and the local ledger accept, a sha256 in hex): the
# room `BittensorChain.max_commitment_bytes` keeps free for it, so the other components'
# keys can never leave a window's contribution without space.
CONTRIBUTION_RESERVE_BYTES = len(',"c":[' + str(2**63 - 1) + ',"' + "0" * 64 + '"]')
I64_MAX = 2**63 - 1
_SHA256_HEX = re.compile(r"[0-9a-f]{64}")


def raw_fields(data: str, max_fields: int, *, where: str) -> list[dict[str, bytes]]:
    """`data` as the ``fields`` of a ``CommitmentInfo``: UTF-8 bytes cut into ``RawN``
    fields of at most `RAW_FIELD_BYTES`. `CommitmentTooLong` when they would need more
    than `max_fields` fields, before anything is signed."""
    body = data.encode("utf-8")
    limit = RAW_FIELD_BYTES * max_fields
    if len(body) > limit:
        raise CommitmentTooLong(
            f"a commitment on {where} holds at most {limit} bytes ({max_fields} fields of "
            f"{RAW_FIELD_BYTES}); this one has {len(body)} bytes"
        )
    chunks = [body[i : i + RAW_FIELD_BYTES] for i in range(0, len(body), RAW_FIELD_BYTES)]
    return [{f"Raw{len(chunk)}": chunk} for chunk in chunks or [b""]]


def space_cost(fields: list[dict[str, bytes]]) -> int:
    """Bytes of ``MaxSpace`` one ``set_commitment`` of `fields` uses."""
    used = sum(len(value) for field in fields for value in field.values())
    return max(MIN_SPACE_PER_COMMIT, used)


def space_left(usage: Any, max_space: Any, epoch_index: int) -> int | None:
    """Bytes a hotkey may still commit this epoch, from ``UsedSpaceOf`` and ``MaxSpace``
    (None when the chain does not say). A tracker from an older epoch counts as empty."""
    if max_space is None:
        return None
    if not isinstance(usage, dict) or int(usage.get("last_epoch") or 0) != epoch_index:
        return int(max_space)
    return int(max_space) - int(usage.get("used_space") or 0)


def check_contribution(round: int, digest: str) -> None:
    """The local ledger's rules for ``commit_contribution`` arguments (`InvalidCall`)."""
    if not 0 <= round <= I64_MAX:
        raise InvalidCall(f"commit_contribution: round must be in 0..{I64_MAX} (got {round})")
    if _SHA256_HEX.fullmatch(digest) is None:
        raise InvalidCall(
            "commit_contribution: digest must be a sha256 digest, 64 lowercase hex "
            f"characters (got {digest[:80]!r})"
        )


def contribution_in(fields: dict[str, Any]) -> tuple[int, str] | None:
    """The ``(round, digest)`` a commitment object names, or None."""
    entry = fields.get(CONTRIBUTION_KEY)
    if not (isinstance(entry, list) and len(entry) == 2):
        return None
    round, digest = entry
    if not isinstance(round, int) or isinstance(round, bool) or not isinstance(digest, str):
        return None
    if _SHA256_HEX.fullmatch(digest) is None:
        return None
    return round, digest


def contribution_body(
    fields: dict[str, Any], round: int, digest: str, *, hotkey: str, where: str
) -> str:
    """The commitment text that adds ``(round, digest)`` to `hotkey`'s current object
    `fields`, keeping every other key. Refuses what the local ledger refuses: bad
    arguments (`InvalidCall`), a second commitment for the round (`AlreadyCommitted`);
    and a round older than the one already committed (`InvalidCall`: windows move on,
    and committing it would hide the newer one)."""
    check_contribution(round, digest)
    current = contribution_in(fields)
    if current is not None and current[0] == round:
        raise AlreadyCommitted(
            f"{hotkey} already committed a contribution for round {round} on {where}; "
            "a hotkey commits once per round"
        )
    if current is not None and current[0] > round:
        raise InvalidCall(
            f"{hotkey} already committed round {current[0]} on {where}; round {round} is past"
        )
    body = {**fields, CONTRIBUTION_KEY: [round, digest]}
    return json.dumps(body, sort_keys=True, separators=(",", ":"))
