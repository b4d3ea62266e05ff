"""Matchmaking among admitted peers only.

Only peer ids that the directory (`averaging.dht.PeerDirectory`) ties to a registered
hotkey may lead, join or be grouped: a leader refuses their join requests (and requests
whose metadata does not parse, `averaging.gather`), a follower neither asks an unadmitted
leader nor stays in a group that contains a stranger. The admission table travels to the
averager's process before each round (`averaging.averager`), so the ledger is read in the
caller's process only.

The group key is fixed per round: the window's bits (`averaging.round.window_bits`).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

from hivemind.averaging.key_manager import GroupKeyManager
from hivemind.averaging.matchmaking import Matchmaking, MatchmakingException
from hivemind.p2p import PeerID
from hivemind.proto import averaging_pb2

from averaging.gather import parse_gather

logger = logging.getLogger(__name__)


class _WindowKeyManager(GroupKeyManager):  # type: ignore[misc]
    """Group bits name the window; hivemind would reshuffle them after every group, which
    would scatter the retry of a failed round over several keys."""

    async def update_key_on_group_assembled(self, group_info: Any) -> None:
        return None


class LedgerMatchmaking(Matchmaking):  # type: ignore[misc]
    """Matchmaking that only deals with admitted peers with well-formed metadata."""

    group_key_manager: Any

    def __init__(self, *args: Any, admitted: Callable[[PeerID], bool], **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._admitted = admitted
        self.group_key_manager = _WindowKeyManager(
            self.group_key_manager.dht,
            self.group_key_manager.prefix,
            self.group_key_manager.group_bits,
            self.group_key_manager.target_group_size,
        )

    def set_target_group_size(self, size: int | None) -> None:
        self.target_group_size = size
        self.potential_leaders.target_group_size = size
        self.group_key_manager.target_group_size = size

    def _check_reasons_to_reject(self, request: Any, context: Any) -> Any:
        if not self._admitted(context.remote_id):
            logger.info("refused join request from unadmitted peer %s", context.remote_id)
            return averaging_pb2.MessageFromLeader(code=averaging_pb2.PROTOCOL_VIOLATION)
        try:
            parse_gather(request.gather)
        except ValueError as exc:
            logger.info("refused join request from %s: %s", context.remote_id, exc)
            return averaging_pb2.MessageFromLeader(code=averaging_pb2.PROTOCOL_VIOLATION)
        return super()._check_reasons_to_reject(request, context)

    async def _request_join_group(self, leader: PeerID) -> Any:
        if not self._admitted(leader):
            logger.debug("not joining unadmitted leader %s", leader)
            return None
        return await super()._request_join_group(leader)

    async def follower_assemble_group(self, leader: PeerID, msg: Any) -> Any:
        strangers = [p for p in map(PeerID, msg.ordered_peer_ids) if not self._admitted(p)]
        if strangers:
            raise MatchmakingException(f"leader {leader} grouped us with unadmitted {strangers}")
        return await super().follower_assemble_group(leader, msg)
