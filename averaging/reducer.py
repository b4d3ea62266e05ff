"""One reducer's share of the all-reduce: hivemind's `TensorPartReducer`, made robust and
made to give one answer to all.

- **Robust reduction.** The reducer collects every contribution to a part before
  combining them with `averaging.robust.aggregate` (mean, trimmed mean, or BTARD's
  CenteredClip, arXiv 2106.11257), since a robust rule needs every row at once. Rows are
  weighed by the ledger weight of their sender (`averaging.weights`), never by what the
  sender announces.
- **One answer for all.** It encodes the combined part once and sends the same bytes to
  everyone (itself included), with the set of senders it combined and the set whose rows
  it refused as not what they committed to, as bitmaps over sender indices. Every member
  therefore ends with bit-identical tensors, and knows exactly whose Δ is in them. Plain
  hivemind sends each sender ``average − own part``, so fp16/8-bit rounding leaves members
  with slightly different results.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from hivemind.averaging.partition import (
    AllreduceException,
    BannedException,
    TensorPartReducer,
)
from hivemind.compression import CompressionInfo

from averaging.robust import aggregate
from averaging.settings import RobustConfig
from averaging.wire import decode_part

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class Reduced:
    encoded: Any  # runtime_pb2.Tensor: the part of the average as every peer receives it
    value: torch.Tensor  # decode(encoded)
    contributors: bytes  # bitmap over sender indices
    mismatched: bytes  # bitmap over sender indices: rows refused as not what was committed

    @property
    def bitmaps(self) -> bytes:
        """What travels in the reply's (otherwise unused) `peer_id` field."""
        return self.contributors + self.mismatched


def _bitmap(indices: Sequence[int], size: int) -> bytes:
    out = bytearray((size + 7) // 8)
    for i in indices:
        out[i // 8] |= 1 << (i % 8)
    return bytes(out)


def from_bitmap(bitmap: bytes, size: int) -> list[int]:
    return [i for i in range(size) if i // 8 < len(bitmap) and bitmap[i // 8] >> (i % 8) & 1]


class LedgerPartReducer(TensorPartReducer):  # type: ignore[misc]
    """hivemind's reducer, but it keeps every row of a part and combines them at the end
    with ledger weights and the configured robust rule, then encodes the result once."""

    current_part_future: asyncio.Future[Any]

    def __init__(
        self,
        part_shapes: Sequence[torch.Size],
        num_senders: int,
        *,
        weights: Sequence[float],
        contributes: Sequence[bool],
        robust: RobustConfig,
        codec: Any,
        order: Sequence[int] | None = None,
    ) -> None:
        self.weights, self.contributes = list(weights), list(contributes)
        self.robust, self.codec = robust, codec
        # Rows are combined in this order (senders by hotkey): floating-point sums depend
        # on it, and anyone recomputing the average must find the same bits.
        self.order = list(range(num_senders)) if order is None else list(order)
        self._rows: dict[int, torch.Tensor] = {}
        self._mismatched: set[int] = set()
        super().__init__(part_shapes, num_senders)

    def reset_accumulators(self) -> None:
        if self.current_part_index >= self.num_parts - 1:
            self.finalize()
            return
        self.current_part_index += 1
        self.current_part_accumulated_from = 0
        self.current_part_future = asyncio.Future()
        self.num_current_senders = sum(
            self.current_part_index < failed_after for failed_after in self.sender_failed_after
        )
        self._rows = {}
        self._mismatched = set()

    async def accumulate_part(
        self,
        sender_index: int,
        part_index: int,
        tensor_part: torch.Tensor | None,
        weight: float = 0.0,
        *,
        mismatched: bool = False,
    ) -> Reduced:
        """Add one sender's part (None for an auxiliary peer); await the combined part.

        `weight` is what the sender announced and is ignored. A part of the wrong shape or
        with non-finite values is refused *before* it counts as received, so banning its
        sender never leaves the part waiting for a row that will not come. A `mismatched`
        part (not the bytes its sender committed to) counts as received and adds no row:
        the average goes on without it, and every receiver learns whose it was.
        """
        if not 0 <= sender_index < self.num_senders or not 0 <= part_index < self.num_parts:
            raise AllreduceException(f"part {part_index} of sender {sender_index}: out of range")
        if self.contributes[sender_index] and not mismatched:
            expected = self.part_shapes[part_index]
            if tensor_part is None or tuple(tensor_part.shape) != tuple(expected):
                got = None if tensor_part is None else tuple(tensor_part.shape)
                raise AllreduceException(
                    f"sender {sender_index} sent part {part_index} of shape {got}, "
                    f"expected {tuple(expected)}"
                )
            if not bool(torch.isfinite(tensor_part).all()):
                raise AllreduceException(f"sender {sender_index} sent non-finite values")
        self.num_parts_received[sender_index] += 1

        while part_index > self.current_part_index:
            await asyncio.wait(
                {self.current_part_future, asyncio.create_task(self.finished.wait())},
                return_when=asyncio.FIRST_COMPLETED,
            )
            if self.finished.is_set():
                raise AllreduceException(f"part {part_index} arrived after the reducer finished")
        if self.sender_failed_after[sender_index] != float("inf"):
            raise BannedException(f"sender {sender_index} was banned in background")
        if self.finished.is_set():
            raise AllreduceException(f"part {part_index} arrived after the reducer finished")
        if part_index != self.current_part_index:
            raise AllreduceException(f"part {part_index} arrived twice")

        future = self.current_part_future
        if mismatched:
            self._mismatched.add(sender_index)
        elif self.contributes[sender_index] and tensor_part is not None:
            self._rows[sender_index] = tensor_part
        self.current_part_accumulated_from += 1
        self.check_current_part_finished()
        # Shielded: when one sender's stream is cancelled (its peer died), cancelling its
        # wait must not cancel the part that every other sender is waiting for.
        result: Reduced = await asyncio.shield(future)
        return result

    def check_current_part_finished(self) -> None:
        if self.current_part_accumulated_from < self.num_current_senders:
            return
        future = self.current_part_future
        if future.done():  # cancelled by `finalize`; nobody is left to answer
            return
        try:
            reduced = self._reduce()
        except (ValueError, TypeError, RuntimeError) as exc:
            # Every awaiting sender must learn that this part failed, or it would wait for
            # it until the all-reduce times out.
            future.set_exception(
                AllreduceException(f"part {self.current_part_index} has no average: {exc}")
            )
            # Nobody may await it if every sender has gone; do not warn about that.
            future.exception()
        else:
            future.set_result(reduced)
        self.reset_accumulators()

    def _reduce(self) -> Reduced:
        rows = [i for i in self.order if i in self._rows and self.weights[i] > 0]
        if not rows:
            raise ValueError("no contribution with positive ledger weight")
        stack = torch.stack([self._rows[i].to(torch.float32) for i in rows])
        weights = torch.tensor([self.weights[i] for i in rows], dtype=torch.float64)
        value = aggregate(stack, weights, self.robust)
        encoded = self.codec.compress(value, CompressionInfo.from_tensor(value), False)
        return Reduced(
            encoded,
            decode_part(encoded),
            _bitmap(rows, self.num_senders),
            _bitmap(sorted(self._mismatched), self.num_senders),
        )

    def finalize(self) -> None:
        if not self.finished.is_set():
            if hasattr(self, "current_part_future"):
                self.current_part_future.cancel()
            self._rows = {}
            self.finished.set()
            if self.num_parts and self.num_senders:
                received = sum(self.num_parts_received)
                expected = self.num_parts * self.num_senders
                if received != expected:
                    logger.debug("reducer got %d of %d parts", received, expected)
