"""Stopping children: every process group ends within the grace period, grandchildren and
stubborn processes included, and the pid file lets `down` finish a run whose launcher died."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil

from subnet.procs import (
    Children,
    group_alive,
    orchestrator_alive,
    read_pidfile,
    start_time,
    stop_groups,
)

# A child that starts a grandchild in its group, then waits; "stubborn" ignores SIGINT and
# SIGTERM so only SIGKILL ends it.
DUMMY = """
import signal, subprocess, sys, time
if sys.argv[1] == "stubborn":
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"])
print("ready", flush=True)
time.sleep(120)
"""


def start(children: Children, name: str, mode: str, logs: Path) -> int:
    child = children.start(
        name, "miner", [sys.executable, "-c", DUMMY, mode], log=logs / f"{name}.log"
    )
    deadline = time.monotonic() + 20
    while b"ready" not in child.log.read_bytes() or len(group_members(child.pid)) < 2:
        assert time.monotonic() < deadline, child.log.read_text()
        time.sleep(0.05)
    return child.pid


def group_members(pgid: int) -> list[psutil.Process]:
    out = []
    for proc in psutil.process_iter():
        try:
            if os.getpgid(proc.pid) == pgid and proc.status() != psutil.STATUS_ZOMBIE:
                out.append(proc)
        except (ProcessLookupError, psutil.NoSuchProcess):
            continue
    return out


def test_stop_all_ends_every_group_within_the_grace(tmp_path: Path) -> None:
    children = Children(tmp_path / "pids.json")
    pgids = [
        start(children, "polite", "polite", tmp_path),
        start(children, "stubborn", "stubborn", tmp_path),
        start(children, "producer", "polite", tmp_path),
    ]
    assert set(read_pidfile(tmp_path / "pids.json")) == {"polite", "stubborn", "producer"}
    started = time.monotonic()
    killed = children.stop_all(1.0, last=["producer"])
    took = time.monotonic() - started
    assert killed == ["stubborn"]
    assert took < 5.0
    assert not any(group_alive(p) for p in pgids)
    assert not (tmp_path / "pids.json").exists()
    assert children.children["polite"].poll() == -signal.SIGINT


def test_down_path_stops_groups_of_a_dead_launcher(tmp_path: Path) -> None:
    """The launcher was SIGKILLed: its pid file still names live groups; stop_groups ends
    them though they are not our children any more (no Popen to reap)."""
    pidfile = tmp_path / "pids.json"
    launcher = subprocess.Popen(
        [sys.executable, "-c",
         "import sys, time; from pathlib import Path; from subnet.procs import Children\n"
         f"c = Children(Path({str(pidfile)!r}))\n"
         f"c.start('m', 'miner', [sys.executable, '-c', {DUMMY!r}, 'stubborn'], "
         f"log=Path({str(tmp_path / 'm.log')!r}))\n"
         "print('up', flush=True); time.sleep(120)"],
        stdout=subprocess.PIPE,
    )  # fmt: skip
    assert launcher.stdout is not None
    assert launcher.stdout.readline().strip() == b"up"
    assert orchestrator_alive(pidfile) == launcher.pid
    launcher.kill()
    launcher.wait()
    assert orchestrator_alive(pidfile) is None
    groups = read_pidfile(pidfile)
    assert list(groups) == ["m"]
    deadline = time.monotonic() + 10
    while len(group_members(groups["m"])) < 2:
        assert time.monotonic() < deadline
        time.sleep(0.05)
    assert stop_groups(groups.values(), grace_s=0.5) == [groups["m"]]
    assert read_pidfile(pidfile) == {}


def test_a_reused_pid_is_not_taken_for_a_child(tmp_path: Path) -> None:
    pidfile = tmp_path / "pids.json"
    # A live group leader, recorded with a start time it never had: a different process.
    # (Not our own group: under `make` its leader may have exited, which reads as "ours".)
    leader = subprocess.Popen(["sleep", "30"], start_new_session=True)
    try:
        for started, expected in ((1, {}), (start_time(leader.pid), {"x": leader.pid})):
            groups = {"x": [leader.pid, started]}
            pidfile.write_text(json.dumps({"orchestrator": [1, 0], "groups": groups}))
            assert read_pidfile(pidfile) == expected
    finally:
        leader.kill()
        leader.wait()
