"""A miner's side of proof of work: answer validators' challenges from the kept states.

    responder = Responder(store, keypair, keeper, shards, chain=chain,
                          backend=cfg.store.backend)
    responder.start()            # a daemon thread that polls every `interval` seconds
    ...
    responder.stop()

    answered = responder.answer_pending(validators)   # one pass, for tests and tools

For every window the `TrajectoryKeeper` still holds, the responder looks for a challenge
from each validator (the hotkeys with a validator permit on the ledger, read in that
validator's committed store location, else our own store) at
`store.layout.challenge_path`. It checks the challenge (signed by that validator, for us,
for that window, segments within our trajectory) and writes the answer into our own
contributions location: one segment file per challenged segment (the state at its start,
the parameters at its end: `store.proofs.segment_tensors`) and the signed ``answer.json``
last. Each challenge is answered once. A challenge that is malformed or not signed by its
validator is logged and ignored; it costs us nothing (a validator that cannot write a
valid challenge cannot fail us for not answering it).
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Mapping, Sequence
from pathlib import Path

from chain.interface import Chain, SigningKey
from store import layout
from store.api import Store
from store.errors import Rejected, StoreError
from store.proofs import (
    ANSWER_FILE,
    Answer,
    Challenge,
    SegmentAnswer,
    message_bytes,
    parse_message,
    segment_file_name,
    segment_tensors,
    sign_message,
)
from store.sources import parse_contributions_location
from train.trajectory import TrajectoryKeeper, moment_names, tensors_digest

logger = logging.getLogger(__name__)


class Responder:
    """Answers the challenges to one miner (its main process)."""

    def __init__(
        self,
        store: Store,
        keypair: SigningKey,
        keeper: TrajectoryKeeper,
        shards: Sequence[Sequence[str]],
        *,
        chain: Chain | None = None,
        backend: str = "local",
        interval: float = 0.5,
    ) -> None:
        self.store, self.keypair, self.keeper = store, keypair, keeper
        self.shards = shards
        self.chain, self.backend, self.interval = chain, backend, interval
        self.answered: set[tuple[int, str]] = set()  # (window, validator hotkey)
        self.known: set[str] | None = None  # the validators the last pass looked at
        self.bytes_sent = 0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()

    # ---- the thread --------------------------------------------------------------------
    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="pow-responder", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=10)

    def linger(self, window: int, timeout: float) -> bool:
        """Wait (at most `timeout` seconds) until every validator's challenge of `window`
        is answered: a miner that stops after its last window still proves that window's
        work. Returns whether all were answered."""
        waited = 0.0
        while waited < timeout:
            known = self.known
            if known is not None and all((window, v) in self.answered for v in known):
                return True  # (no validator at all: nobody will ask)
            self._stop.wait(self.interval)
            waited += self.interval
        return False

    def _run(self) -> None:
        assert self.chain is not None
        ledger: Chain | None = None
        while not self._stop.wait(self.interval):
            try:
                ledger = ledger or self.chain.reopen()
                validators = self.validators(ledger)
                self.known = set(validators)
                self.answer_pending(validators)
            except Exception:
                logger.exception("answering challenges failed; retrying")
        if ledger is not None:
            ledger.close()

    def validators(self, ledger: Chain) -> dict[str, str]:
        """hotkey -> store location of every validator on the chain."""
        own = self.store.contributions_location
        commitments = ledger.commitments()
        out = {}
        for n in ledger.neurons():
            if not n.validator_permit:
                continue
            entry = commitments.get(n.hotkey)
            location = (
                parse_contributions_location(entry[0], backend=self.backend) if entry else None
            )
            if location is not None and self.backend == "local":
                location = str(Path(location).resolve())
            out[n.hotkey] = location or own
        return out

    # ---- one pass ----------------------------------------------------------------------
    def answer_pending(self, validators: Mapping[str, str]) -> int:
        """Answer every new challenge from `validators` (hotkey -> location) for the kept
        windows; returns how many were answered."""
        count = 0
        with self._lock:
            for window in self.keeper.windows():
                for validator, location in validators.items():
                    if (window, validator) in self.answered:
                        continue
                    challenge = self._read_challenge(window, validator, location)
                    if challenge is None:
                        continue
                    self.answered.add((window, validator))
                    if self.answer(challenge):
                        count += 1
                known = self.known
                if known and all((window, v) in self.answered for v in known):
                    # Every validator has its answer: the states have done their job.
                    self.keeper.prune_window(window)
        return count

    def _read_challenge(self, window: int, validator: str, location: str) -> Challenge | None:
        path = layout.challenge_path(window, self.keypair.address, validator)
        try:
            got = self.store.fetch_file(location, path, 1 << 16)
            if got is None:
                return None
            challenge = parse_message(Challenge, got.read_bytes(), signer=validator)
        except Rejected as exc:
            logger.warning("ignoring the challenge %s: %s", path, exc)
            self.answered.add((window, validator))
            return None
        except (StoreError, OSError) as exc:
            logger.debug("cannot read %s yet: %s", path, exc)
            return None
        if challenge.window != window or challenge.miner != self.keypair.address:
            logger.warning("ignoring the challenge %s: it names another window or miner", path)
            self.answered.add((window, validator))
            return None
        return challenge

    def answer(self, challenge: Challenge) -> bool:
        """Write the answer to `challenge` from the kept states; False when we cannot
        (the window's states are gone, or a segment is out of range)."""
        window = challenge.window
        meta = self.keeper.meta(window)
        if meta is None:
            logger.warning("window %d: challenged, but its states are no longer kept", window)
            return False
        shard, bounds = meta
        names = list(self.shards[shard])
        if any(i >= len(bounds) - 1 for i in challenge.segments):
            logger.warning("window %d: challenge names segments %s", window, challenge.segments)
            return False
        from safetensors.torch import save

        files: dict[str, bytes | Path] = {}
        answers = []
        for index in challenge.segments:
            start = None if bounds[index] == 0 else self.keeper.load(window, bounds[index])
            end = self.keeper.load(window, bounds[index + 1])
            if end is None or (bounds[index] != 0 and start is None):
                logger.warning("window %d: a state of segment %d is missing", window, index)
                return False
            data = save(segment_tensors(start, end, names))
            name = segment_file_name(index)
            files[name] = data
            answers.append(
                SegmentAnswer(
                    index=index, file=name, size=len(data),
                    end_moments=tensors_digest(end, moment_names(names)),
                )
            )  # fmt: skip
        answer = sign_message(
            Answer(
                window=window, miner=self.keypair.address, validator=challenge.validator,
                segments=tuple(answers),
            ),
            self.keypair,
        )  # fmt: skip
        files[ANSWER_FILE] = message_bytes(answer)  # last: readers look for it
        folder = layout.answer_dir(window, challenge.validator, self.keypair.address)
        try:
            self.store.put_files(folder, files, message=f"answer {folder}")
        except StoreError as exc:
            logger.warning("window %d: cannot write our answer: %s", window, exc)
            self.answered.discard((window, challenge.validator))
            return False
        sent = sum(len(v) for v in files.values() if isinstance(v, bytes))
        self.bytes_sent += sent
        logger.info(
            "window %d: answered %s's challenge (segments %s, %d bytes)",
            window, challenge.validator[:8], list(challenge.segments), sent,
        )  # fmt: skip
        return True
