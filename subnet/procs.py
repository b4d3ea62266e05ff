"""Child processes of the subnet, each in its own process group, and how to stop them.

    children = Children(pidfile=run_dir / "subnet.pids")
    children.start("miner-0", ["python", "-m", "train.miner", ...], log=logs / "miner-0.log")
    ...
    children.stop_all(grace_s=5)        # SIGINT, then SIGTERM, then SIGKILL, per group

Every child starts a new session (`start_new_session`), so the terminal's Ctrl+C reaches
the orchestrator alone and the orchestrator decides the order of shutdown; signalling the
whole group also reaches what a child started itself (accelerate's worker processes).
The pid file lists every live group so `tensormine subnet down` can end a run whose
orchestrator was killed with SIGKILL, and so a second `subnet up` refuses to start next
to a run that is still alive.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import signal
import subprocess
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

logger = logging.getLogger(__name__)


@dataclass
class Child:
    """One started child: its name, its process (= group leader) and its log file."""

    name: str
    role: str
    proc: subprocess.Popen[bytes]
    log: Path
    started: float = field(default_factory=time.monotonic)

    @property
    def pid(self) -> int:
        return self.proc.pid

    def poll(self) -> int | None:
        return self.proc.poll()


def start_time(pid: int) -> int | None:
    """The process's start time in clock ticks since boot (Linux), to tell a recorded pid
    from a later process that reused it; None where /proc cannot say."""
    fields = _proc_stat(Path(f"/proc/{pid}"))
    # starttime is field 22 of the whole line, the 20th after the command name.
    return int(fields[19]) if fields is not None and len(fields) > 19 else None


def _proc_stat(entry: Path) -> list[str] | None:
    """Fields of /proc/PID/stat after the command name: state, ppid, pgrp, ..."""
    try:
        stat = (entry / "stat").read_text()
    except OSError:
        return None
    return stat[stat.rfind(")") + 2 :].split()


def group_alive(pgid: int) -> bool:
    """Whether a process of group `pgid` still runs. Zombies do not count: a grandchild
    reparented to init may wait a while to be reaped, but it runs nothing."""
    proc = Path("/proc")
    if not proc.is_dir():  # no procfs (macOS): ask the kernel, zombies included
        try:
            os.killpg(pgid, 0)
        except ProcessLookupError:
            return False
        except PermissionError:
            return True
        return True
    for entry in proc.iterdir():
        fields = _proc_stat(entry) if entry.name.isdigit() else None
        if fields and len(fields) > 2 and fields[2] == str(pgid) and fields[0] not in "ZX":
            return True
    return False


def _signal_group(pgid: int, sig: signal.Signals) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.killpg(pgid, sig)


def stop_groups(
    pgids: Iterable[int],
    *,
    grace_s: float,
    reap: Mapping[int, subprocess.Popen[bytes]] | None = None,
) -> list[int]:
    """End every group: SIGINT (clean exit: state saved, W&B run closed), SIGTERM after
    70 % of the grace period (a clean exit closes a W&B run and a hivemind node, which
    takes a few seconds on a busy machine), SIGKILL after the rest. Returns the groups
    that needed SIGKILL.

    `reap` maps a group to its leader's `Popen` when it is our child: it must be waited
    for, or the group never looks empty (a zombie keeps its group id)."""
    pending = [p for p in pgids if group_alive(p)]
    reap = reap or {}
    steps = ((signal.SIGINT, 0.7 * grace_s), (signal.SIGTERM, 0.3 * grace_s), (signal.SIGKILL, 5.0))
    killed: list[int] = []
    for sig, wait_s in steps:
        if not pending:
            break
        if sig == signal.SIGKILL:
            killed = list(pending)
            logger.warning("SIGKILL to process groups %s after %.1fs", killed, grace_s)
        for pgid in pending:
            _signal_group(pgid, sig)
        deadline = time.monotonic() + wait_s
        while pending and time.monotonic() < deadline:
            for proc in reap.values():
                proc.poll()
            pending = [p for p in pending if group_alive(p)]
            if pending:
                time.sleep(0.05)
    for proc in reap.values():
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(timeout=1.0)
    return killed


class Children:
    """The orchestrator's children, recorded in a pid file while they live."""

    def __init__(self, pidfile: Path) -> None:
        self.pidfile = pidfile
        self.children: dict[str, Child] = {}

    def start(
        self,
        name: str,
        role: str,
        argv: list[str],
        *,
        log: Path,
        env: Mapping[str, str] | None = None,
        cwd: Path | None = None,
    ) -> Child:
        log.parent.mkdir(parents=True, exist_ok=True)
        with log.open("ab") as fh:
            fh.write(f"\n==== {time.strftime('%Y-%m-%d %H:%M:%S')} {' '.join(argv)}\n".encode())
            fh.flush()
            proc = subprocess.Popen(
                argv,
                stdin=subprocess.DEVNULL,
                stdout=fh,
                stderr=subprocess.STDOUT,
                env=dict(env) if env is not None else None,
                cwd=cwd,
                start_new_session=True,
            )
        child = Child(name=name, role=role, proc=proc, log=log)
        self.children[name] = child
        self._write_pidfile()
        logger.info("started %s (pid %d), log %s", name, proc.pid, log)
        return child

    def running(self, role: str | None = None) -> list[Child]:
        return [
            c
            for c in self.children.values()
            if c.poll() is None and (role is None or c.role == role)
        ]

    def stop(self, names: Iterable[str], grace_s: float) -> list[str]:
        """Stop the named children (and their groups); returns those that needed SIGKILL."""
        chosen = [self.children[n] for n in names if n in self.children]
        reap = {c.pid: c.proc for c in chosen}
        killed = stop_groups(reap, grace_s=grace_s, reap=reap)
        self._write_pidfile()
        return [c.name for c in chosen if c.pid in killed]

    def stop_all(self, grace_s: float, *, last: Iterable[str] = ()) -> list[str]:
        """Stop everyone, the children named in `last` (the block producer) after the rest."""
        keep = set(last)
        killed = self.stop([n for n in self.children if n not in keep], grace_s)
        killed += self.stop([n for n in self.children if n in keep], grace_s)
        return killed

    def _write_pidfile(self) -> None:
        live = {
            c.name: [c.pid, start_time(c.pid)] for c in self.children.values() if group_alive(c.pid)
        }
        if not live:
            self.pidfile.unlink(missing_ok=True)
            return
        self.pidfile.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.pidfile.with_suffix(".tmp")
        me = [os.getpid(), start_time(os.getpid())]
        tmp.write_text(json.dumps({"orchestrator": me, "groups": live}))
        tmp.replace(self.pidfile)


def _same_process(pid: int, started: int | None) -> bool:
    """`pid` still names the process recorded (its group lives and it was not reused)."""
    if not group_alive(pid):
        return False
    now = start_time(pid)
    # A leader that exited leaves its group id to its children: start_time is then None.
    return started is None or now is None or now == started


def read_pidfile(pidfile: Path) -> dict[str, int]:
    """name -> process group of the children a run left in its pid file that still live."""
    try:
        data = json.loads(pidfile.read_text())
        groups = {str(k): (int(v[0]), v[1]) for k, v in data["groups"].items()}
    except FileNotFoundError:
        return {}
    except (ValueError, TypeError, KeyError, IndexError, AttributeError) as exc:
        logger.warning("ignoring unreadable pid file %s: %s", pidfile, exc)
        return {}
    return {name: pgid for name, (pgid, st) in groups.items() if _same_process(pgid, st)}


def orchestrator_alive(pidfile: Path) -> int | None:
    """The pid of the `subnet up` that wrote `pidfile`, if that process still runs."""
    try:
        pid, started = json.loads(pidfile.read_text())["orchestrator"]
        pid = int(pid)
    except (FileNotFoundError, ValueError, KeyError, TypeError):
        return None
    if pid == os.getpid():
        return None
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return None
    except PermissionError:
        return pid
    fields = _proc_stat(Path(f"/proc/{pid}"))
    if fields is not None and fields[0] in "ZX":
        return None  # exited, not yet reaped
    now = start_time(pid)
    return pid if started is None or now is None or now == started else None
