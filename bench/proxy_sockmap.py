"""An experiment, not shipped: forwarding with an eBPF sockmap against splice and direct.

Owns the evidence for the "Tried and dropped" part of NOTES-proxy.md: a SOCKHASH keyed by
socket cookie and a 12-instruction sk_skb verdict program that redirects each socket's bytes to
its peer's egress, loaded with the bpf() system call through ctypes (no new dependency), then
round-trip latency, one-stream throughput and whole-machine CPU per GB over plain TCP for
direct, sockmap and a splice forwarder. Linux x86_64, root (or CAP_BPF + CAP_NET_ADMIN) only.
``python bench/proxy_sockmap.py [--rounds 4]``. No close path: each forwarder keeps its
connections until the process ends, which is all a measurement needs.
"""

from __future__ import annotations

import argparse
import ctypes
import fcntl
import multiprocessing as mp
import os
import socket
import statistics
import struct
import threading
import time

from proxy_bench import machine_cpu_seconds  # this folder: python bench/proxy_sockmap.py

SYS_BPF = 321  # x86_64
BPF_MAP_CREATE, BPF_MAP_UPDATE_ELEM, BPF_PROG_LOAD, BPF_PROG_ATTACH = 0, 2, 5, 8
BPF_MAP_TYPE_SOCKHASH = 18
BPF_PROG_TYPE_SK_SKB = 14
BPF_SK_SKB_VERDICT = 38
FUNC_GET_SOCKET_COOKIE, FUNC_SK_REDIRECT_HASH = 46, 72
SO_COOKIE = 57
ATTR_SIZE = 144  # sizeof(union bpf_attr) on this kernel's headers
BULK = 1 << 30

_libc = ctypes.CDLL(None, use_errno=True)
_libc.syscall.restype = ctypes.c_long


def bpf(cmd: int, attr: bytes) -> int:
    buf = ctypes.create_string_buffer(attr.ljust(ATTR_SIZE, b"\0"), ATTR_SIZE)
    result = _libc.syscall(SYS_BPF, cmd, buf, ATTR_SIZE)
    if result < 0:
        err = ctypes.get_errno()
        raise OSError(err, f"bpf({cmd}): {os.strerror(err)}")
    return result


def insn(code: int, dst: int = 0, src: int = 0, off: int = 0, imm: int = 0) -> bytes:
    return struct.pack("<BBhi", code, (src << 4) | dst, off, imm)


def load_redirector() -> int:
    """A SOCKHASH (cookie -> peer socket) with the verdict program attached; its fd."""
    map_fd = bpf(BPF_MAP_CREATE, struct.pack("<IIIII", BPF_MAP_TYPE_SOCKHASH, 8, 4, 65536, 0))
    program = b"".join(
        [
            insn(0xBF, 6, 1),  # r6 = skb
            insn(0x85, imm=FUNC_GET_SOCKET_COOKIE),  # r0 = cookie of the receiving socket
            insn(0x7B, 10, 0, -8),  # *(u64 *)(fp - 8) = r0
            insn(0x18, 2, 1, imm=map_fd),  # r2 = the map (a two-slot load)
            insn(0x00),
            insn(0xBF, 1, 6),  # r1 = skb
            insn(0xBF, 3, 10),  # r3 = fp
            insn(0x07, 3, imm=-8),  # r3 = &key
            insn(0xB7, 4, imm=0),  # r4 = 0: the peer's egress
            insn(0x85, imm=FUNC_SK_REDIRECT_HASH),
            insn(0xB7, 0, imm=1),  # SK_PASS: redirected if found, else kept
            insn(0x95),
        ]
    )
    code = ctypes.create_string_buffer(program, len(program))
    license_ = ctypes.create_string_buffer(b"BSD")
    log = ctypes.create_string_buffer(1 << 16)
    attr = struct.pack(
        "<IIQQIIQI",
        BPF_PROG_TYPE_SK_SKB,
        len(program) // 8,
        ctypes.addressof(code),
        ctypes.addressof(license_),
        1,
        len(log),
        ctypes.addressof(log),
        0,
    )
    try:
        prog_fd = bpf(BPF_PROG_LOAD, attr)
    except OSError as exc:
        raise OSError(exc.errno, f"{exc}\n{log.value.decode()}") from None
    bpf(BPF_PROG_ATTACH, struct.pack("<IIII", map_fd, prog_fd, BPF_SK_SKB_VERDICT, 0))
    return map_fd


def pair(map_fd: int, a: socket.socket, b: socket.socket) -> None:
    """Bytes arriving on ``a`` leave through ``b``, and the other way round."""
    for src, dst in ((a, b), (b, a)):
        key = ctypes.create_string_buffer(src.getsockopt(socket.SOL_SOCKET, SO_COOKIE, 8), 8)
        value = ctypes.create_string_buffer(struct.pack("<I", dst.fileno()), 4)
        attr = struct.pack("<IIQQQ", map_fd, 0, ctypes.addressof(key), ctypes.addressof(value), 0)
        bpf(BPF_MAP_UPDATE_ELEM, attr)
    # Bytes that arrived before the sockets joined the map are still queued: setting the
    # low-water mark runs the data-ready path, which now passes them through the verdict.
    for sock in (a, b):
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVLOWAT, 1)


def listener() -> socket.socket:
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    sock.listen(128)
    return sock


def nodelay(*socks: socket.socket) -> None:
    for sock in socks:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)


def endpoint(ports: mp.Queue) -> None:
    """'e': echo until EOF; 'b': send BULK bytes."""
    ls = listener()
    ports.put(ls.getsockname()[1])

    def serve(conn: socket.socket) -> None:
        nodelay(conn)
        kind = conn.recv(1)
        if kind == b"e":
            while data := conn.recv(65536):
                conn.sendall(data)
        elif kind == b"b":
            chunk = b"x" * (1 << 20)
            for _ in range(BULK // len(chunk)):
                conn.sendall(chunk)
            conn.recv(1)
        conn.close()

    while True:
        conn, _ = ls.accept()
        threading.Thread(target=serve, args=(conn,), daemon=True).start()


def sockmap_forwarder(target: int, ports: mp.Queue) -> None:
    map_fd = load_redirector()
    ls = listener()
    ports.put(ls.getsockname()[1])
    held = []
    while True:
        client, _ = ls.accept()
        client.recv(1, socket.MSG_PEEK)  # as the proxy peeks the ClientHello
        upstream = socket.create_connection(("127.0.0.1", target))
        nodelay(client, upstream)
        pair(map_fd, client, upstream)
        held.append((client, upstream))


def splice_forwarder(target: int, ports: mp.Queue) -> None:
    ls = listener()
    ports.put(ls.getsockname()[1])

    def pump(src: socket.socket, dst: socket.socket) -> None:
        r, w = os.pipe()
        fcntl.fcntl(r, 1031, 1 << 20)  # F_SETPIPE_SZ
        while n := os.splice(src.fileno(), w, 1 << 20):
            while n:
                n -= os.splice(r, dst.fileno(), n)

    while True:
        client, _ = ls.accept()
        upstream = socket.create_connection(("127.0.0.1", target))
        nodelay(client, upstream)
        for src, dst in ((client, upstream), (upstream, client)):
            threading.Thread(target=pump, args=(src, dst), daemon=True).start()


def round_trip_us(port: int, count: int) -> float:
    conn = socket.create_connection(("127.0.0.1", port))
    nodelay(conn)
    conn.sendall(b"e")
    msg, samples = b"m" * 64, []
    for _ in range(count):
        start = time.perf_counter_ns()
        conn.sendall(msg)
        got = 0
        while got < len(msg):
            got += len(conn.recv(len(msg) - got))
        samples.append(time.perf_counter_ns() - start)
    conn.close()
    return statistics.median(samples) / 1000


def bulk(port: int) -> tuple[float, float]:
    """(MB/s, whole-machine CPU seconds per GB) for BULK bytes from the endpoint."""
    conn = socket.create_connection(("127.0.0.1", port))
    conn.sendall(b"b")
    buf = bytearray(1 << 20)
    got, start, cpu = 0, time.perf_counter(), machine_cpu_seconds()
    while got < BULK:
        n = conn.recv_into(buf)
        if not n:
            raise ConnectionError(f"closed after {got} bytes")
        got += n
    elapsed, cpu = time.perf_counter() - start, machine_cpu_seconds() - cpu
    conn.sendall(b".")
    conn.close()
    return got / elapsed / 1e6, cpu / (got / 1e9)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--rtts", type=int, default=3000)
    args = parser.parse_args()
    ports: mp.Queue = mp.Queue()
    procs = [mp.Process(target=endpoint, args=(ports,), daemon=True)]
    procs[0].start()
    target = ports.get()
    paths = {"direct": target}
    for name, forwarder in (("sockmap", sockmap_forwarder), ("splice", splice_forwarder)):
        proc = mp.Process(target=forwarder, args=(target, ports), daemon=True)
        proc.start()
        procs.append(proc)
        paths[name] = ports.get()
    results: dict[str, dict[str, list[float]]] = {
        p: {"rtt": [], "mbs": [], "cpu": []} for p in paths
    }
    for _ in range(args.rounds):  # the paths take turns, so drifting load hits all alike
        for name, port in paths.items():
            results[name]["rtt"].append(round_trip_us(port, args.rtts))
            mbs, cpu = bulk(port)
            results[name]["mbs"].append(mbs)
            results[name]["cpu"].append(cpu)
    print("| path | RTT median µs | bulk MB/s (1 stream) | whole-machine CPU s/GB |")
    print("|---|---|---|---|")
    med = statistics.median
    for name, r in results.items():
        print(f"| {name} | {med(r['rtt']):.1f} | {med(r['mbs']):,.0f} | {med(r['cpu']):.2f} |")
    for proc in procs:
        proc.terminate()


if __name__ == "__main__":
    main()
