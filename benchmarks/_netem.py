"""A shaped star network in network namespaces, for `bench_averaging.py` (root only).

    unshare --net --mount --propagation private -- .venv/bin/python benchmarks/_netem.py \
        --peers 4 --rate 100mbit --delay-ms 50 --check      # build it, measure it, exit

The kernel here has no `netem` qdisc, so the pieces are: a router namespace (the one this
process runs in, made by `unshare`) and one namespace `tm-p<i>` per peer, joined by a veth
pair (MTU 65000, so that few, large packets cross the delay line). Each peer's link is
shaped in both directions by `tbf` at `--rate` (the peer-side end shapes its upload, the
router-side end its download). Every forwarded packet waits `--delay-ms` in the router's
netfilter queue (`iptables -A FORWARD -j NFQUEUE`), released in arrival order by
`delay_line`, which speaks the nfnetlink_queue protocol directly. So peer i → peer j costs
one delay (one-way), a round trip two, and each peer has its own `--rate` up and down.
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import select
import signal
import socket
import struct
import subprocess
import sys
import time
from typing import Any

NETLINK_NETFILTER = 12
NFNL_SUBSYS_QUEUE = 3
NFQNL_MSG_PACKET, NFQNL_MSG_VERDICT_BATCH, NFQNL_MSG_CONFIG = 0, 3, 2
NFQA_PACKET_HDR, NFQA_VERDICT_HDR = 1, 2
NFQA_CFG_CMD, NFQA_CFG_PARAMS, NFQA_CFG_QUEUE_MAXLEN = 1, 2, 3
NFQNL_CFG_CMD_BIND, NFQNL_COPY_META = 1, 1
NLM_F_REQUEST, NLM_F_ACK = 1, 4
NLMSG_ERROR = 2
NF_ACCEPT = 1
NLMSG = struct.Struct("=IHHII")  # length, type, flags, seq, pid
NFGEN = struct.Struct("=BBH")  # family, version, res_id (big-endian, packed by hand)
MTU = 65000


def _attr(kind: int, payload: bytes) -> bytes:
    length = 4 + len(payload)
    return struct.pack("=HH", length, kind) + payload + b"\0" * ((-length) % 4)


def _message(kind: int, queue: int, attrs: bytes, seq: int, flags: int = NLM_F_REQUEST) -> bytes:
    body = NFGEN.pack(socket.AF_UNSPEC, 0, socket.htons(queue)) + attrs
    return NLMSG.pack(NLMSG.size + len(body), (NFNL_SUBSYS_QUEUE << 8) | kind, flags, seq, 0) + body


def _packet_ids(data: bytes) -> list[int]:
    """Ids of the queued packets announced in one netlink datagram; raises on a netlink error."""
    ids, offset = [], 0
    while offset + NLMSG.size <= len(data):
        length, kind, _flags, _seq, _pid = NLMSG.unpack_from(data, offset)
        if length < NLMSG.size:
            break
        if kind == NLMSG_ERROR:
            (errno,) = struct.unpack_from("=i", data, offset + NLMSG.size)
            if errno:
                raise OSError(-errno, f"nfnetlink_queue: {os.strerror(-errno)}")
        elif kind == (NFNL_SUBSYS_QUEUE << 8) | NFQNL_MSG_PACKET:
            pos = offset + NLMSG.size + NFGEN.size
            while pos + 4 <= offset + length:
                alen, atype = struct.unpack_from("=HH", data, pos)
                if alen < 4:
                    break
                if atype & 0x7FFF == NFQA_PACKET_HDR:
                    ids.append(struct.unpack_from("!I", data, pos + 4)[0])
                pos += (alen + 3) & ~3
        offset += (length + 3) & ~3
    return ids


def delay_line(queue: int, delay_s: float) -> None:
    """Hold every packet of netfilter queue `queue` for `delay_s`, then accept it (FIFO)."""
    sock = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, NETLINK_NETFILTER)
    sock.setsockopt(socket.SOL_SOCKET, 33, 64 << 20)  # SO_RCVBUFFORCE: no lost notices
    sock.bind((0, 0))
    cmd = _attr(NFQA_CFG_CMD, struct.pack("!BxH", NFQNL_CFG_CMD_BIND, 0))
    params = _attr(NFQA_CFG_PARAMS, struct.pack("!IB", 0, NFQNL_COPY_META) + b"\0" * 3)
    maxlen = _attr(NFQA_CFG_QUEUE_MAXLEN, struct.pack("!I", 1 << 16))
    for seq, attrs in enumerate((cmd, params + maxlen), start=1):
        sock.send(_message(NFQNL_MSG_CONFIG, queue, attrs, seq, NLM_F_REQUEST | NLM_F_ACK))
        _packet_ids(sock.recv(1 << 16))
    print("ready", flush=True)
    pending: collections.deque[tuple[float, int]] = collections.deque()
    seq = 10
    while True:
        now = time.monotonic()
        wait = max(0.0, pending[0][0] - now) if pending else 1.0
        readable, _, _ = select.select([sock], [], [], wait)
        if readable:
            arrived = time.monotonic()
            for packet in _packet_ids(sock.recv(1 << 20)):
                pending.append((arrived + delay_s, packet))
        now = time.monotonic()
        last = None
        while pending and pending[0][0] <= now:
            last = pending.popleft()[1]
        if last is not None:  # accepts every queued packet up to `last`, in order
            seq += 1
            verdict = _attr(NFQA_VERDICT_HDR, struct.pack("!II", NF_ACCEPT, last))
            sock.send(_message(NFQNL_MSG_VERDICT_BATCH, queue, verdict, seq))


def sh(*args: str) -> None:
    subprocess.run(args, check=True)


def peer_ns(i: int) -> str:
    return f"tm-p{i}"


def peer_ip(i: int) -> str:
    return f"10.77.{i}.2"


def build(peers: int, rate: str, delay_ms: float) -> subprocess.Popen[bytes]:
    """Namespaces, veths, routes, tbf and the delay line; returns the delay-line process."""
    # `ip netns` keeps its files under /run; a tmpfs there, private to this mount namespace
    # (unshare --mount --propagation private), leaves nothing behind on the host.
    sh("mount", "-n", "-t", "tmpfs", "tm-run", "/run")
    sh("ip", "link", "set", "lo", "up")
    with open("/proc/sys/net/ipv4/ip_forward", "w") as f:  # noqa: PTH123 - a sysctl
        f.write("1")
    shape = ["tbf", "rate", rate, "burst", "256kb", "limit", "2mb"]
    for i in range(peers):
        ns, router_end, peer_end = peer_ns(i), f"r{i}", f"e{i}"
        sh("ip", "netns", "add", ns)
        sh(
            "ip",
            "link",
            "add",
            router_end,
            "mtu",
            str(MTU),
            "type",
            "veth",
            "peer",
            "name",
            peer_end,
            "mtu",
            str(MTU),
            "netns",
            ns,
        )
        sh("ip", "addr", "add", f"10.77.{i}.1/24", "dev", router_end)
        sh("ip", "link", "set", router_end, "up")
        sh("tc", "qdisc", "add", "dev", router_end, "root", *shape)
        inside = ["ip", "netns", "exec", ns]
        sh(*inside, "ip", "link", "set", "lo", "up")
        sh(*inside, "ip", "addr", "add", f"{peer_ip(i)}/24", "dev", peer_end)
        sh(*inside, "ip", "link", "set", peer_end, "up")
        sh(*inside, "ip", "route", "add", "default", "via", f"10.77.{i}.1")
        sh(*inside, "tc", "qdisc", "add", "dev", peer_end, "root", *shape)
    sh("iptables", "-A", "FORWARD", "-j", "NFQUEUE", "--queue-num", "0")
    line = subprocess.Popen(
        [sys.executable, __file__, "--delay-line", str(delay_ms)], stdout=subprocess.PIPE
    )
    assert line.stdout is not None
    if line.stdout.readline().strip() != b"ready":
        raise RuntimeError("the delay line did not start")
    return line


def in_peer(i: int, *args: str) -> list[str]:
    return ["ip", "netns", "exec", peer_ns(i), *args]


# ---- measuring the link -----------------------------------------------------------------


def serve(port: int) -> None:
    """Echo one byte per ping; then swallow a bulk transfer and answer when it is complete."""
    server = socket.create_server(("0.0.0.0", port))
    print("ready", flush=True)
    conn, _ = server.accept()
    conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    while (b := conn.recv(1)) == b"p":
        conn.sendall(b"p")
    size = struct.unpack("!Q", b + conn.recv(7))[0]
    got = 0
    while got < size:
        got += len(conn.recv(1 << 20))
    conn.sendall(b"k")


def probe(host: str, port: int, pings: int, nbytes: int) -> None:
    started = time.perf_counter()
    conn = socket.create_connection((host, port))
    connect = time.perf_counter() - started
    conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    rtts = []
    for _ in range(pings):
        t = time.perf_counter()
        conn.sendall(b"p")
        conn.recv(1)
        rtts.append(time.perf_counter() - t)
    t = time.perf_counter()
    conn.sendall(struct.pack("!Q", nbytes))
    conn.sendall(b"\0" * nbytes)
    conn.recv(1)
    seconds = time.perf_counter() - t
    print(
        json.dumps(
            {"connect_s": connect, "rtt_s": sorted(rtts), "bulk_bytes": nbytes, "bulk_s": seconds}
        )
    )


def measure(a: int, b: int, nbytes: int) -> dict[str, Any]:
    """RTT and bulk throughput from peer `a` to peer `b` through the shaped network."""
    port = 5999
    server = subprocess.Popen(
        in_peer(b, sys.executable, __file__, "--serve", str(port)), stdout=subprocess.PIPE
    )
    assert server.stdout is not None
    server.stdout.readline()
    out = subprocess.run(
        in_peer(a, sys.executable, __file__, "--probe", peer_ip(b), str(port), str(nbytes)),
        check=True,
        capture_output=True,
        text=True,
    )
    server.wait(30)
    result: dict[str, Any] = json.loads(out.stdout)
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--peers", type=int, default=4)
    parser.add_argument("--rate", default="100mbit")
    parser.add_argument("--delay-ms", type=float, default=50.0)
    parser.add_argument("--check", action="store_true", help="build, measure, print, exit")
    parser.add_argument("--delay-line", type=float, help=argparse.SUPPRESS)
    parser.add_argument("--serve", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--probe", nargs=3, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.delay_line is not None:
        signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
        delay_line(0, args.delay_line / 1000)
    elif args.serve is not None:
        serve(args.serve)
    elif args.probe is not None:
        probe(args.probe[0], int(args.probe[1]), 10, int(args.probe[2]))
    elif args.check:
        line = build(args.peers, args.rate, args.delay_ms)
        try:
            print(json.dumps(measure(0, 1, 10_000_000)))
        finally:
            line.terminate()
            line.wait(10)


if __name__ == "__main__":
    main()
