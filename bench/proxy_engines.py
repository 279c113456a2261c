"""Micro-benchmark of splice engines and event loops in gateway-proxy (not a test).

Owns a plain-TCP comparison that isolates the proxy's own cost: after a real ClientHello (which
the proxy routes on) the bytes are not TLS, so the endpoints spend almost nothing and the proxy's
CPU per GB, added round trip and memory per idle connection stand out. Engines come from
``proxy_variants.py``; the Go proxy and the direct path are measured in the same run.
Writes ``bench/results/proxy-engines.md`` and ``.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import socket
import ssl
import statistics
import struct
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).parent))
import proxy_bench as pb

HELLO: bytes = b""


def client_hello() -> bytes:
    context = ssl.create_default_context()
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
    tls = context.wrap_bio(incoming, outgoing, server_hostname=pb.SERVER_NAME)
    try:
        tls.do_handshake()
    except ssl.SSLWantReadError:
        pass
    return outgoing.read()


def role_raw_server(args: argparse.Namespace) -> None:
    """Plain TCP: skip the one-record ClientHello, then ``E`` echo / ``D`` n / ``U`` n."""
    pb.raise_nofile()
    listener = socket.create_server(("127.0.0.1", 0), backlog=4096)
    print(listener.getsockname()[1], flush=True)
    payload = memoryview(os.urandom(4 << 20))

    def serve(conn: socket.socket) -> None:
        conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        try:
            header = pb._recv_exactly(conn, 5)
            pb._recv_exactly(conn, int.from_bytes(header[3:5], "big"))
            mode = pb._recv_exactly(conn, 1)
            if mode == b"E":
                buf = bytearray(1 << 16)
                view = memoryview(buf)
                while n := conn.recv_into(buf):
                    conn.sendall(view[:n])
            elif mode == b"D":
                (left,) = struct.unpack("!Q", pb._recv_exactly(conn, 8))
                while left > 0:
                    n = min(left, len(payload))
                    conn.sendall(payload[:n])
                    left -= n
                conn.recv(1)
            elif mode == b"U":
                (left,) = struct.unpack("!Q", pb._recv_exactly(conn, 8))
                buf = bytearray(4 << 20)
                while left > 0:
                    n = conn.recv_into(buf)
                    if not n:
                        return
                    left -= n
                conn.sendall(b"K")
                conn.recv(1)
        except OSError:
            pass
        finally:
            conn.close()

    while True:
        conn, _ = listener.accept()
        threading.Thread(target=serve, args=(conn,), daemon=True).start()


def raw_connect(port: int) -> socket.socket:
    conn = socket.create_connection(("127.0.0.1", port), timeout=60)  # a broken engine fails
    conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    conn.sendall(HELLO)
    return conn


def bulk(port: int, direction: str, streams: int, size: int) -> float:
    barrier = threading.Barrier(streams + 1)
    ends: list[float] = []

    def one() -> None:
        conn = raw_connect(port)
        barrier.wait()
        if direction == "down":
            conn.sendall(b"D" + struct.pack("!Q", size))
            buf = bytearray(4 << 20)
            left = size
            while left > 0:
                n = conn.recv_into(buf)
                if not n:
                    raise ConnectionError("closed early")
                left -= n
        else:
            conn.sendall(b"U" + struct.pack("!Q", size))
            data = memoryview(os.urandom(4 << 20))
            left = size
            while left > 0:
                n = min(left, len(data))
                conn.sendall(data[:n])
                left -= n
            assert conn.recv(1) == b"K"
        ends.append(time.perf_counter())
        conn.close()

    threads = [threading.Thread(target=one) for _ in range(streams)]
    for thread in threads:
        thread.start()
    barrier.wait()
    start = time.perf_counter()
    for thread in threads:
        thread.join()
    if len(ends) < streams:
        raise ConnectionError(f"{streams - len(ends)} of {streams} streams failed")
    return streams * size / (max(ends) - start) / 1e6


def latency(port: int, count: int) -> tuple[float, float]:
    conn = raw_connect(port)
    conn.sendall(b"E")
    msg = os.urandom(64)
    samples = []
    for i in range(count + 300):
        start = time.perf_counter()
        conn.sendall(msg)
        got = 0
        while got < 64:
            got += len(conn.recv(65536))
        if i >= 300:
            samples.append(time.perf_counter() - start)
    conn.close()
    samples.sort()
    return statistics.median(samples) * 1e6, samples[int(len(samples) * 0.99)] * 1e6


def idle_kib(port: int, pid: int, count: int) -> float:
    conns = []
    before = pb.rss_kib(pid)
    for _ in range(count):
        conn = raw_connect(port)
        conn.sendall(b"Ex")
        assert conn.recv(1) == b"x"
        conns.append(conn)
    time.sleep(0.5)
    after = pb.rss_kib(pid)
    for conn in conns:
        conn.close()
    return (after - before) / count


def main() -> None:
    global HELLO
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--role", default="main", help=argparse.SUPPRESS)
    parser.add_argument("--target", help=argparse.SUPPRESS)
    parser.add_argument(
        "--engines",
        nargs="+",
        default=["shipped", "copy", "splice", "protocols", "streams", "sock"],
    )
    parser.add_argument("--loops", nargs="+", default=["uvloop", "asyncio"])
    parser.add_argument("--mb", type=int, default=512, help="MiB per bulk run (split in streams)")
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--idle", type=int, default=3000)
    parser.add_argument("--out", default=str(pb.RESULTS / "proxy-engines"))
    args = parser.parse_args()
    if args.role == "raw-server":
        role_raw_server(args)
        return
    if args.role == "feed":
        pb.role_feed(args)
        return
    pb.raise_nofile()
    HELLO = client_hello()
    children: list[subprocess.Popen] = []

    def spawn(role: str, *extra: str) -> int:
        proc = subprocess.Popen(
            [sys.executable, __file__, "--role", role, *extra],
            stdout=subprocess.PIPE, text=True, start_new_session=True,
        )  # fmt: skip
        children.append(proc)
        assert proc.stdout is not None
        return int(proc.stdout.readline())

    server_port = spawn("raw-server")
    feed_port = spawn("feed", "--target", f"tls://127.0.0.1:{server_port}")
    bench = pb.Bench.__new__(pb.Bench)
    bench.feed_port = feed_port
    bench.args = argparse.Namespace(engine="")
    configs: list[tuple[str, Any]] = [("direct", None)]
    for engine in args.engines:
        for loop in args.loops:
            configs.append((f"{engine} / {loop}", (engine, loop)))
    binary = pb.go_proxy_binary()
    if binary:
        configs.append(("Go proxy", "go"))
    results: dict[str, Any] = {}
    size = args.mb << 20
    try:
        for name, config in configs:
            print(f"- {name}", flush=True)
            proc = None
            port = server_port
            if config == "go":
                assert binary is not None
                proc, port = start_go_raw(binary, feed_port)
            elif config is not None:
                engine, loop = config
                bench.args.engine = engine
                proc, port = bench.start_ours(loop)
            row: dict[str, Any] = {}
            try:
                for direction in ("down", "up"):
                    for streams in (1, 4):
                        runs, cpu = [], []
                        for _ in range(args.reps):
                            before = pb.cpu_seconds(proc.pid) if proc else 0.0
                            runs.append(bulk(port, direction, streams, size // streams))
                            if proc:
                                cpu.append((pb.cpu_seconds(proc.pid) - before) / (size / 1e9))
                        row[f"{direction}{streams}_mb_s"] = statistics.median(runs)
                        if cpu:
                            row[f"{direction}{streams}_cpu_s_gb"] = statistics.median(cpu)
                lat = [latency(port, 3000) for _ in range(args.reps)]
                row["rtt_median_us"] = statistics.median(x[0] for x in lat)
                row["rtt_p99_us"] = statistics.median(x[1] for x in lat)
                if proc and args.idle:
                    row["idle_kib_per_conn"] = idle_kib(port, proc.pid, args.idle)
            except (OSError, AssertionError) as exc:
                row["failed"] = f"{type(exc).__name__}: {exc}"
            finally:
                results[name] = row
                print(json.dumps(row), flush=True)
                if proc is not None:
                    proc.send_signal(signal.SIGTERM)
                    try:
                        proc.wait(10)
                    except subprocess.TimeoutExpired:
                        proc.kill()
                        proc.wait()
    finally:
        for child in children:
            os.killpg(child.pid, signal.SIGKILL)
            child.wait()
    out = Path(args.out)
    out.with_suffix(".json").write_text(
        json.dumps({"args": vars(args), "results": results}, indent=2) + "\n"
    )
    out.with_suffix(".md").write_text(render(results, args))
    print(render(results, args))


def start_go_raw(binary: str, feed_port: int) -> tuple[subprocess.Popen, int]:
    port = pb.free_port()
    proc = subprocess.Popen(
        [binary, "-address", f"127.0.0.1:{port}", "-tcp-address", f"127.0.0.1:{port}",
         "-api-url", f"http://127.0.0.1:{feed_port}/api/v1/routes", "-log-level", "WARN",
         "-is-child-process"],
        env={**os.environ, "DASK_GATEWAY_PROXY_TOKEN": pb.TOKEN}, stdin=subprocess.PIPE,
    )  # fmt: skip
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        try:
            conn = raw_connect(port)
            conn.sendall(b"Ex")
            conn.settimeout(1)
            if conn.recv(1) == b"x":
                conn.close()
                return proc, port
        except OSError:
            pass
        time.sleep(0.05)
    raise RuntimeError("the Go proxy never routed")


def render(results: dict[str, Any], args: argparse.Namespace) -> str:
    lines = [
        "# Splice engines and event loops (plain TCP after a real ClientHello)",
        "",
        f"`python bench/proxy_engines.py`; {os.cpu_count()} CPUs; medians of {args.reps} runs; "
        f"{args.mb} MiB per bulk run; idle = RSS growth per connection over {args.idle}.",
        "",
        "| engine / loop | down 1 MB/s | down 4 MB/s | up 1 MB/s | up 4 MB/s | "
        "CPU s/GB (down 4) | CPU s/GB (up 4) | RTT median µs | RTT p99 µs | KiB/idle conn |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for name, r in results.items():

        def fmt(key: str, digits: int = 0, r: dict[str, Any] = r) -> str:
            return f"{r[key]:.{digits}f}" if key in r else "—"

        if "failed" in r:
            lines.append(f"| {name} | failed: {r['failed']} |" + " |" * 8)
            continue
        lines.append(
            f"| {name} | {fmt('down1_mb_s')} | {fmt('down4_mb_s')} | {fmt('up1_mb_s')} | "
            f"{fmt('up4_mb_s')} | {fmt('down4_cpu_s_gb', 2)} | {fmt('up4_cpu_s_gb', 2)} | "
            f"{fmt('rtt_median_us', 1)} | {fmt('rtt_p99_us', 1)} | {fmt('idle_kib_per_conn', 2)} |"
        )
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
