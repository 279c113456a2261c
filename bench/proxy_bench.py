"""Benchmark of the TLS-SNI path: direct vs through gateway-proxy vs through the original Go proxy.

Owns the whole run (not a test): a TLS endpoint process, a fake route feed process, the proxies
under test as processes, load-generating client processes, and the tables written to
``bench/results/proxy.md`` and ``proxy.json``. Run ``python bench/proxy_bench.py --help``.

Measured per path, in one run: bulk throughput (MB/s over several TLS streams, each way),
small-message round-trip latency (median, p99), new TLS connections per second, and proxy memory
per open idle TLS connection (RSS delta / N on a freshly started proxy).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import resource
import shutil
import signal
import socket
import ssl
import statistics
import struct
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results"
SNI_NAME = "bench"
SERVER_NAME = f"daskgateway-{SNI_NAME}"
TOKEN = "bench-token-0123456789abcdef"
CHUNK = 1 << 20


def raise_nofile() -> int:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    return resource.getrlimit(resource.RLIMIT_NOFILE)[0]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


# ============================================================================================
# Role: the TLS endpoint (its own process)
# ============================================================================================


def role_server(args: argparse.Namespace) -> None:
    """A threaded TLS server. First byte of a connection picks the mode:
    ``E`` echo; ``D`` + u64 n: send n bytes; ``U`` + u64 n: read n bytes, answer ``K``."""
    raise_nofile()
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(args.cert, args.key)
    listener = socket.create_server(("127.0.0.1", 0), backlog=4096)
    # Worker processes share the listener, so one interpreter's lock does not pace every stream.
    for _ in range(args.workers - 1):
        if os.fork() == 0:
            break
    else:
        print(listener.getsockname()[1], flush=True)
    payload = memoryview(os.urandom(CHUNK))

    def serve(raw: socket.socket) -> None:
        raw.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        try:
            with context.wrap_socket(raw, server_side=True) as conn:
                mode = conn.recv(1)
                if mode == b"E":
                    buf = bytearray(1 << 16)
                    view = memoryview(buf)
                    while n := conn.recv_into(buf):
                        conn.sendall(view[:n])
                elif mode == b"D":
                    (left,) = struct.unpack("!Q", _recv_exactly(conn, 8))
                    while left > 0:
                        n = min(left, CHUNK)
                        conn.sendall(payload[:n])
                        left -= n
                    conn.recv(1)
                elif mode == b"U":
                    (left,) = struct.unpack("!Q", _recv_exactly(conn, 8))
                    buf = bytearray(1 << 18)
                    while left > 0:
                        n = conn.recv_into(buf)
                        if not n:
                            return
                        left -= n
                    conn.sendall(b"K")
                    conn.recv(1)
        except (OSError, ssl.SSLError):
            pass

    while True:
        raw, _ = listener.accept()
        threading.Thread(target=serve, args=(raw,), daemon=True).start()


def _recv_exactly(conn: socket.socket, n: int) -> bytes:
    out = b""
    while len(out) < n:
        chunk = conn.recv(n - len(out))
        if not chunk:
            raise ConnectionError("closed early")
        out += chunk
    return out


# ============================================================================================
# Role: the route feed (its own process), in the format of PROTOCOL.md
# ============================================================================================


def role_feed(args: argparse.Namespace) -> None:
    from aiohttp import web

    async def routes(request: web.Request) -> web.StreamResponse:
        if request.headers.get("Authorization") != f"token {TOKEN}":
            return web.json_response({"error": "bad token"}, status=401)
        if args.target.startswith("http"):  # the HTTP benchmark's cluster dashboard
            route = {"kind": "PATH", "path": f"/clusters/{SNI_NAME}", "target": args.target}
        else:
            route = {"kind": "SNI", "sni": SNI_NAME, "target": args.target}
        if not request.query.get("watch"):
            return web.json_response({"routes": [route], "id": 1})
        response = web.StreamResponse(headers={"Content-Type": "application/json"})
        await response.prepare(request)
        await asyncio.Event().wait()  # no changes during a benchmark
        return response

    async def main() -> None:
        app = web.Application()
        app.router.add_get("/api/v1/routes", routes)
        runner = web.AppRunner(app, access_log=None)
        await runner.setup()
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        print(site._server.sockets[0].getsockname()[1], flush=True)  # type: ignore[union-attr]
        await asyncio.Event().wait()

    asyncio.run(main())


# ============================================================================================
# Role: load generators (their own process; print one JSON line)
# ============================================================================================


def client_context(ca: str) -> ssl.SSLContext:
    context = ssl.create_default_context(cafile=ca)
    context.check_hostname = False  # the same cert serves every path; the SNI is what matters
    return context


def connect(args: argparse.Namespace, context: ssl.SSLContext) -> ssl.SSLSocket:
    raw = socket.create_connection((args.host, args.port))
    raw.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return context.wrap_socket(raw, server_hostname=SERVER_NAME)


def role_bulk(args: argparse.Namespace) -> None:
    """``streams`` processes (not threads: one interpreter lock would pace them all), each one
    TLS stream moving ``mb`` MiB; MB/s from the common start to the last stream's end."""
    import multiprocessing

    mp = multiprocessing.get_context("fork")
    barrier = mp.Barrier(args.streams + 1)
    ends = mp.Queue()
    size = args.mb * (1 << 20)

    def stream() -> None:
        conn = connect(args, client_context(args.ca))
        buf = bytearray(1 << 18)
        barrier.wait()
        if args.direction == "down":
            conn.sendall(b"D" + struct.pack("!Q", size))
            left = size
            while left > 0:
                n = conn.recv_into(buf)
                if not n:
                    raise ConnectionError("closed early")
                left -= n
        else:
            conn.sendall(b"U" + struct.pack("!Q", size))
            data = memoryview(os.urandom(CHUNK))
            left = size
            while left > 0:
                n = min(left, CHUNK)
                conn.sendall(data[:n])
                left -= n
            if conn.recv(1) != b"K":
                raise ConnectionError("no ack")
        ends.put(time.perf_counter())
        conn.close()

    procs = [mp.Process(target=stream) for _ in range(args.streams)]
    for proc in procs:
        proc.start()
    barrier.wait()
    start = time.perf_counter()
    machine_start = machine_cpu_seconds()
    done = [ends.get(timeout=300) for _ in procs]
    machine_cpu = machine_cpu_seconds() - machine_start
    for proc in procs:
        proc.join()
        if proc.exitcode:
            raise SystemExit(f"a stream failed with {proc.exitcode}")
    elapsed = max(done) - start
    print(
        json.dumps(
            {
                "mb_s": args.streams * size / elapsed / 1e6,
                "seconds": elapsed,
                "machine_cpu_s": machine_cpu,
            }
        )
    )


def role_latency(args: argparse.Namespace) -> None:
    context = client_context(args.ca)
    conn = connect(args, context)
    conn.sendall(b"E")
    msg = os.urandom(args.size)
    samples = []
    for i in range(args.warmup + args.count):
        start = time.perf_counter()
        conn.sendall(msg)
        got = 0
        while got < len(msg):
            got += len(conn.recv(65536))
        if i >= args.warmup:
            samples.append(time.perf_counter() - start)
    conn.close()
    samples.sort()
    print(
        json.dumps(
            {
                "median_us": statistics.median(samples) * 1e6,
                "p99_us": samples[int(len(samples) * 0.99)] * 1e6,
                "count": len(samples),
            }
        )
    )


def role_cps(args: argparse.Namespace) -> None:
    """``threads`` processes, each: connect, full TLS handshake, 1-byte echo, close; repeat."""
    import multiprocessing

    mp = multiprocessing.get_context("fork")
    counts = mp.Queue()
    barrier = mp.Barrier(args.threads + 1)

    def worker() -> None:
        context = client_context(args.ca)
        done = errors = 0
        barrier.wait()
        deadline = time.perf_counter() + args.seconds
        while time.perf_counter() < deadline:
            try:
                conn = connect(args, context)
                conn.sendall(b"Ex")
                if conn.recv(1) != b"x":
                    raise ConnectionError("bad echo")
                conn.close()
                done += 1
            except OSError:
                errors += 1
        counts.put((done, errors))

    procs = [mp.Process(target=worker) for _ in range(args.threads)]
    for proc in procs:
        proc.start()
    barrier.wait()
    start = time.perf_counter()
    results = [counts.get(timeout=120) for _ in procs]
    elapsed = time.perf_counter() - start
    for proc in procs:
        proc.join()
    print(
        json.dumps(
            {"cps": sum(r[0] for r in results) / elapsed, "errors": sum(r[1] for r in results)}
        )
    )


def role_idle(args: argparse.Namespace) -> None:
    """Open N TLS connections (each proven end to end by one echo), report, hold until stdin."""
    raise_nofile()
    try:
        import uvloop

        new_loop: Callable[[], asyncio.AbstractEventLoop] = uvloop.new_event_loop
    except ImportError:
        new_loop = asyncio.new_event_loop
    context = client_context(args.ca)

    async def main() -> None:
        gate = asyncio.Semaphore(args.parallel)
        writers: list[asyncio.StreamWriter] = []

        async def one() -> None:
            async with gate:
                for attempt in range(5):
                    try:
                        reader, writer = await asyncio.open_connection(
                            args.host, args.port, ssl=context, server_hostname=SERVER_NAME
                        )
                        break
                    except OSError:
                        if attempt == 4:
                            raise
                        await asyncio.sleep(0.2)
                writer.write(b"Ex")
                await reader.readexactly(1)
                writers.append(writer)

        start = time.perf_counter()
        outcomes = await asyncio.gather(*(one() for _ in range(args.count)), return_exceptions=True)
        failed = sum(isinstance(o, BaseException) for o in outcomes)
        print(json.dumps({"open": len(writers), "failed": failed,
                          "seconds": time.perf_counter() - start}))  # fmt: skip
        sys.stdout.flush()
        await asyncio.get_running_loop().run_in_executor(None, sys.stdin.readline)
        for writer in writers:
            writer.transport.abort()

    loop = new_loop()
    loop.run_until_complete(main())


# ============================================================================================
# The orchestrator
# ============================================================================================


def go_proxy_binary() -> str | None:
    candidates = [os.environ.get("DASK_GATEWAY_PROXY_BIN", "")]
    try:
        import dask_gateway_server

        candidates.append(
            str(Path(dask_gateway_server.__file__).parent / "proxy" / "dask-gateway-proxy")
        )
    except ImportError:
        pass
    candidates.append("/tmp/orig/x/dask_gateway_server/proxy/dask-gateway-proxy")
    for candidate in candidates:
        if candidate and os.access(candidate, os.X_OK):
            return candidate
    return None


def rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise RuntimeError("no VmRSS")


def open_files(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    ticks = os.sysconf("SC_CLK_TCK")
    return (int(fields[11]) + int(fields[12])) / ticks


def machine_cpu_seconds() -> float:
    """Busy CPU-seconds of the whole machine so far (user, nice, system, irq, softirq):
    what every process and the kernel's network stack spent, steal and idle left out."""
    with open("/proc/stat") as fh:
        user, nice, system, _idle, _iowait, irq, softirq = map(int, fh.readline().split()[1:8])
    return (user + nice + system + irq + softirq) / os.sysconf("SC_CLK_TCK")


class Path_:
    """One way to reach the endpoint: direct, or through a proxy process."""

    def __init__(self, name: str, start: Callable[[], tuple[subprocess.Popen | None, int]]):
        self.name = name
        self._start = start
        self.proc: subprocess.Popen | None = None
        self.port = 0

    @contextmanager
    def running(self) -> Iterator[Path_]:
        self.proc, self.port = self._start()
        try:
            yield self
        finally:
            if self.proc is not None:
                self.proc.send_signal(signal.SIGTERM)
                try:
                    self.proc.wait(10)
                except subprocess.TimeoutExpired:
                    self.proc.kill()
                    self.proc.wait()
                self.proc = None


class Bench:
    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.tmp = Path(tempfile.mkdtemp(prefix="proxy-bench-"))
        self.children: list[subprocess.Popen] = []
        self.make_certs()

    def make_certs(self) -> None:
        import trustme

        ca = trustme.CA()
        cert = ca.issue_cert(SERVER_NAME, "127.0.0.1", "localhost")
        self.ca = str(self.tmp / "ca.pem")
        self.cert = str(self.tmp / "cert.pem")
        self.key = str(self.tmp / "key.pem")
        ca.cert_pem.write_to_path(self.ca)
        cert.cert_chain_pems[0].write_to_path(self.cert)
        cert.private_key_pem.write_to_path(self.key)

    def spawn_role(self, role: str, *extra: str) -> tuple[subprocess.Popen, int]:
        proc = subprocess.Popen(
            [sys.executable, __file__, "--role", role, *extra],
            stdout=subprocess.PIPE,
            text=True,
            start_new_session=True,  # its own process group: its forked workers die with it
        )
        self.children.append(proc)
        assert proc.stdout is not None
        return proc, int(proc.stdout.readline())

    def start_endpoints(self) -> None:
        _, self.server_port = self.spawn_role("server", "--cert", self.cert, "--key", self.key)
        target = f"tls://127.0.0.1:{self.server_port}"
        _, self.feed_port = self.spawn_role("feed", "--target", target)

    # -- the paths --------------------------------------------------------------------------

    def paths(self) -> list[Path_]:
        paths = [Path_("direct", lambda: (None, self.server_port))]
        for loop in self.args.loops:
            paths.append(Path_(f"gateway-proxy ({loop})", lambda loop=loop: self.start_ours(loop)))
        if (binary := go_proxy_binary()) is not None:
            paths.append(Path_("dask-gateway-proxy (Go)", lambda: self.start_go(binary)))
        else:
            print("! the original Go proxy was not found: set DASK_GATEWAY_PROXY_BIN")
        return paths

    def start_ours(self, loop: str) -> tuple[subprocess.Popen, int]:
        port = free_port()
        cmd = [sys.executable]
        if self.args.engine:
            cmd += [str(HERE / "proxy_variants.py"), "--engine", self.args.engine, "--"]
        else:
            cmd += ["-m", "gateway_proxy"]
        cmd += [
            "--address", f"127.0.0.1:{port}",
            "--gateway-url", f"http://127.0.0.1:{self.feed_port}",
            "--loop", loop, "--log-level", "warn",
        ]  # fmt: skip
        proc = subprocess.Popen(cmd, env={**os.environ, "GATEWAY_PROXY_TOKEN": TOKEN})
        self.wait_http_ready(f"http://127.0.0.1:{port}/_gateway-proxy/ready", proc)
        return proc, port

    def start_go(self, binary: str) -> tuple[subprocess.Popen, int]:
        port = free_port()
        proc = subprocess.Popen(
            [
                binary,
                "-address",
                f"127.0.0.1:{port}",
                "-tcp-address",
                f"127.0.0.1:{port}",
                "-api-url",
                f"http://127.0.0.1:{self.feed_port}/api/v1/routes",
                "-log-level",
                "WARN",
                "-is-child-process",
            ],
            env={**os.environ, "DASK_GATEWAY_PROXY_TOKEN": TOKEN},
            stdin=subprocess.PIPE,
        )
        self.wait_tls_routed(port, proc)
        return proc, port

    def wait_http_ready(self, url: str, proc: subprocess.Popen) -> None:
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                raise RuntimeError(f"proxy exited with {proc.returncode}")
            try:
                with urllib.request.urlopen(url, timeout=1) as resp:
                    if resp.status == 200:
                        return
            except OSError:
                pass
            time.sleep(0.05)
        raise RuntimeError(f"{url} never became ready")

    def wait_tls_routed(self, port: int, proc: subprocess.Popen) -> None:
        context = client_context(self.ca)
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                raise RuntimeError(f"proxy exited with {proc.returncode}")
            try:
                with (
                    socket.create_connection(("127.0.0.1", port), timeout=1) as raw,
                    context.wrap_socket(raw, server_hostname=SERVER_NAME) as conn,
                ):
                    conn.sendall(b"Ex")
                    if conn.recv(1) == b"x":
                        return
            except (OSError, ssl.SSLError):
                pass
            time.sleep(0.05)
        raise RuntimeError("the Go proxy never routed")

    # -- measurements ---------------------------------------------------------------------------

    def client(self, role: str, port: int, *extra: str, timeout: float = 300) -> dict[str, Any]:
        out = subprocess.run(
            [sys.executable, __file__, "--role", role, "--ca", self.ca,
             "--host", "127.0.0.1", "--port", str(port), *extra],
            capture_output=True, text=True, timeout=timeout, check=False,
        )  # fmt: skip
        if out.returncode != 0:
            raise RuntimeError(f"{role} client failed: {out.stderr[-2000:]}")
        return json.loads(out.stdout.strip().splitlines()[-1])

    def measure_round(self, path: Path_, result: dict[str, Any]) -> None:
        """One run of every throughput, latency and connection-rate measurement on ``path``."""
        args = self.args
        pid = path.proc.pid if path.proc else None
        for direction in ("down", "up"):
            before = cpu_seconds(pid) if pid else 0.0
            run = self.client(
                "bulk", path.port, "--direction", direction,
                "--streams", str(args.streams), "--mb", str(args.mb),
            )  # fmt: skip
            result.setdefault(f"bulk_{direction}_runs", []).append(run["mb_s"])
            gb = args.streams * args.mb * (1 << 20) / 1e9
            result.setdefault(f"machine_cpu_{direction}_runs", []).append(run["machine_cpu_s"] / gb)
            if pid:
                result.setdefault(f"cpu_{direction}_runs", []).append(
                    (cpu_seconds(pid) - before) / gb
                )
        lat = self.client("latency", path.port, "--count", str(args.rtts), "--size", "64")
        result.setdefault("rtt_median_runs", []).append(lat["median_us"])
        result.setdefault("rtt_p99_runs", []).append(lat["p99_us"])
        cps = self.client(
            "cps", path.port, "--seconds", str(args.cps_seconds),
            "--threads", str(args.cps_threads),
        )  # fmt: skip
        result.setdefault("cps_runs", []).append(cps["cps"])
        result["cps_errors"] = result.get("cps_errors", 0) + cps["errors"]

    @staticmethod
    def summarize(result: dict[str, Any]) -> None:
        med = statistics.median
        for direction in ("down", "up"):
            result[f"bulk_{direction}_mb_s"] = med(result[f"bulk_{direction}_runs"])
            result[f"machine_cpu_s_per_gb_{direction}"] = med(
                result[f"machine_cpu_{direction}_runs"]
            )
            if f"cpu_{direction}_runs" in result:
                result[f"proxy_cpu_s_per_gb_{direction}"] = med(result[f"cpu_{direction}_runs"])
        result["rtt_median_us"] = med(result["rtt_median_runs"])
        result["rtt_p99_us"] = med(result["rtt_p99_runs"])
        result["cps"] = med(result["cps_runs"])

    def measure_idle(self, path: Path_, count: int) -> dict[str, Any]:
        """RSS and open files of a fresh proxy process before and after ``count`` idle TLS
        connections (each proven end to end by one echo)."""
        assert path.proc is not None
        pid = path.proc.pid
        self.client("latency", path.port, "--count", "10", "--warmup", "0", "--size", "64")
        time.sleep(0.5)
        before, fds_before = rss_kib(pid), open_files(pid)
        proc = subprocess.Popen(
            [sys.executable, __file__, "--role", "idle", "--ca", self.ca, "--host", "127.0.0.1",
             "--port", str(path.port), "--count", str(count)],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
        )  # fmt: skip
        assert proc.stdout is not None and proc.stdin is not None
        opened = json.loads(proc.stdout.readline() or '{"open": 0, "failed": -1}')
        time.sleep(1.0)
        alive = path.proc.poll() is None
        row: dict[str, Any] = {"asked": count, "open": opened["open"], "proxy_alive": alive}
        if alive and opened["open"]:
            after, fds_after = rss_kib(pid), open_files(pid)
            row.update(
                rss_before_kib=before,
                rss_after_kib=after,
                kib_per_conn=(after - before) / opened["open"],
                files_per_conn=(fds_after - fds_before) / opened["open"],
            )
        proc.stdin.write("close\n")
        proc.stdin.flush()
        proc.wait(120)
        return row

    def run(self) -> dict[str, Any]:
        """Every path runs at once; rounds go path by path so drifting load hits all alike."""
        self.start_endpoints()
        results: dict[str, Any] = {}
        try:
            paths = self.paths()
            with ExitStack() as stack:
                for path in paths:
                    stack.enter_context(path.running())
                    results[path.name] = {}
                for rep in range(self.args.reps):
                    for path in paths:
                        print(f"- round {rep + 1}/{self.args.reps}: {path.name}", flush=True)
                        self.measure_round(path, results[path.name])
            for path in paths:
                self.summarize(results[path.name])
                if path.name == "direct":
                    continue
                for count in sorted({self.args.idle_common, self.args.idle} - {0}):
                    print(f"- {count} idle connections: {path.name}", flush=True)
                    with path.running():
                        results[path.name][f"idle_{count}"] = self.measure_idle(path, count)
                print(path.name, json.dumps(results[path.name]), flush=True)
        finally:
            for child in self.children:
                os.killpg(child.pid, signal.SIGKILL)
                child.wait()
            shutil.rmtree(self.tmp, ignore_errors=True)
        return results


def _idle_cell(row: dict[str, Any] | None) -> str:
    if row is None:
        return "—"
    if not row["proxy_alive"]:
        return f"crashed (opened {row['open']} of {row['asked']})"
    if row["open"] < row["asked"]:
        return f"{row.get('kib_per_conn', float('nan')):.1f} (only {row['open']} opened)"
    return f"{row['kib_per_conn']:.1f} ({row['files_per_conn']:.1f} files)"


def render(results: dict[str, Any], args: argparse.Namespace) -> str:
    direct = results["direct"]
    go = next((v for k, v in results.items() if "Go" in k), None)
    ncpu = os.cpu_count()
    counts = sorted({args.idle_common, args.idle} - {0})
    lines = [
        "# Proxy benchmark: the TLS-SNI path",
        "",
        f"`python bench/proxy_bench.py` on {platform.machine()}, {ncpu} vCPUs, "
        f"Linux {platform.release()}, Python {platform.python_version()}; "
        f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}.",
        "",
        f"Endpoint, clients and proxy are separate processes sharing the same {ncpu} vCPUs; "
        "TLS 1.3 end to end (the proxy never decrypts). Every path runs at once and the "
        f"{args.reps} rounds visit the paths in turn, so load that drifts hits all alike; each "
        "number is the median of the rounds (the spread is in proxy.json).",
        "",
        f"- bulk: {args.streams} TLS streams, one client process each, {args.mb} MiB per stream, "
        "endpoint to client (down) and client to endpoint (up)",
        f"- round trip: one connection, a 64-byte message echoed, {args.rtts} samples per round; "
        "added = path minus direct",
        f"- connections/s: {args.cps_threads} client processes, each looping: TCP connect, full "
        "TLS handshake, 1-byte echo, close",
        "- memory: RSS growth of a freshly started proxy process / N idle TLS connections, and "
        "its open files per connection; N is bounded by RLIMIT_NOFILE (here "
        f"{resource.getrlimit(resource.RLIMIT_NOFILE)[1]}, not raisable)",
        "- proxy CPU: user+system seconds the proxy process spent per GB of bulk data",
        "- machine CPU: busy CPU-seconds of the whole machine (endpoints, clients, proxy, the "
        "kernel's TCP stack) from the streams' common start to the last one's end, per GB of "
        "bulk data, down / up; CPU-bound ceiling = direct's "
        "machine CPU / this path's: the best throughput ratio to direct possible once the CPUs "
        "are saturated, whatever the proxy does in user space",
        "",
        "| path | bulk down MB/s | bulk up MB/s | vs direct (down/up) | RTT median µs | "
        "added µs | RTT p99 µs | conn/s | proxy CPU s/GB | machine CPU s/GB | "
        "CPU-bound ceiling | " + " | ".join(f"KiB/idle conn, N={n}" for n in counts) + " |",
        "|---|---|---|---|---|---|---|---|---|---|---|" + "---|" * len(counts),
    ]
    for name, r in results.items():
        ratio = (
            f"{r['bulk_down_mb_s'] / direct['bulk_down_mb_s']:.2f} / "
            f"{r['bulk_up_mb_s'] / direct['bulk_up_mb_s']:.2f}"
        )
        added = r["rtt_median_us"] - direct["rtt_median_us"]
        cpu = (
            f"{(r['proxy_cpu_s_per_gb_down'] + r['proxy_cpu_s_per_gb_up']) / 2:.2f}"
            if "proxy_cpu_s_per_gb_down" in r
            else "—"
        )
        idle = " | ".join(_idle_cell(r.get(f"idle_{n}")) for n in counts)
        machine = f"{r['machine_cpu_s_per_gb_down']:.2f} / {r['machine_cpu_s_per_gb_up']:.2f}"
        ceiling = (
            f"{direct['machine_cpu_s_per_gb_down'] / r['machine_cpu_s_per_gb_down']:.2f} / "
            f"{direct['machine_cpu_s_per_gb_up'] / r['machine_cpu_s_per_gb_up']:.2f}"
        )
        lines.append(
            f"| {name} | {r['bulk_down_mb_s']:.0f} | {r['bulk_up_mb_s']:.0f} | {ratio} | "
            f"{r['rtt_median_us']:.1f} | {'—' if name == 'direct' else f'{added:.1f}'} | "
            f"{r['rtt_p99_us']:.1f} | {r['cps']:.0f} | {cpu} | {machine} | {ceiling} | {idle} |"
        )
    if go is not None:
        lines += ["", "Goals of issue 3, each of our rows against the Go proxy and direct:", ""]
        go_added = go["rtt_median_us"] - direct["rtt_median_us"]
        for name, r in results.items():
            if not name.startswith("gateway-proxy"):
                continue
            added = r["rtt_median_us"] - direct["rtt_median_us"]
            down = r["bulk_down_mb_s"] / direct["bulk_down_mb_s"]
            up = r["bulk_up_mb_s"] / direct["bulk_up_mb_s"]
            idle = r.get(f"idle_{max(counts)}", {}) if counts else {}
            kib = idle.get("kib_per_conn", float("nan"))
            checks = [
                ("throughput ≥ 0.95 x direct", min(down, up) >= 0.95, f"{down:.2f} / {up:.2f}"),
                (
                    "throughput above Go",
                    r["bulk_down_mb_s"] > go["bulk_down_mb_s"]
                    and r["bulk_up_mb_s"] > go["bulk_up_mb_s"],
                    f"{r['bulk_down_mb_s']:.0f} / {r['bulk_up_mb_s']:.0f} vs "
                    f"{go['bulk_down_mb_s']:.0f} / {go['bulk_up_mb_s']:.0f} MB/s",
                ),
                (
                    "added RTT ≤ 1/3 of Go's",
                    added <= go_added / 3,
                    f"{added:.1f} / {go_added:.1f} µs",
                ),
                (
                    "≤ 20 KiB per idle connection",
                    kib <= 20,
                    f"{kib:.1f} KiB, N={max(counts or [0])}",
                ),
            ]
            for label, ok, detail in checks:
                lines.append(f"- {name}: {label}: **{'met' if ok else 'NOT met'}** ({detail})")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--role", default="main", help=argparse.SUPPRESS)
    # role options
    for name in ("--cert", "--key", "--ca", "--host", "--target", "--direction"):
        parser.add_argument(name, help=argparse.SUPPRESS)
    parser.add_argument("--port", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--count", type=int, default=5000, help=argparse.SUPPRESS)
    parser.add_argument("--warmup", type=int, default=300, help=argparse.SUPPRESS)
    parser.add_argument("--size", type=int, default=64, help=argparse.SUPPRESS)
    parser.add_argument("--seconds", type=float, default=3.0, help=argparse.SUPPRESS)
    parser.add_argument("--threads", type=int, default=4, help=argparse.SUPPRESS)
    parser.add_argument("--parallel", type=int, default=200, help=argparse.SUPPRESS)
    parser.add_argument("--workers", type=int, default=4, help=argparse.SUPPRESS)
    # benchmark options
    parser.add_argument("--streams", type=int, default=4, help="bulk TLS streams (default 4)")
    parser.add_argument("--mb", type=int, default=256, help="MiB per bulk stream (default 256)")
    parser.add_argument("--reps", type=int, default=3, help="runs per measurement (default 3)")
    parser.add_argument("--rtts", type=int, default=5000, help="round trips per latency run")
    parser.add_argument("--cps-seconds", type=float, default=3.0)
    parser.add_argument("--cps-threads", type=int, default=4)
    parser.add_argument(
        "--idle", type=int, default=9000, help="idle connections for the memory test (0: skip)"
    )
    parser.add_argument(
        "--idle-common",
        type=int,
        default=4000,
        help="a smaller idle test every proxy survives (the Go proxy holds 4 files/connection)",
    )
    parser.add_argument(
        "--loops", nargs="+", default=["uvloop", "asyncio"], help="event loops of our proxy"
    )
    parser.add_argument(
        "--engine", default="", help="run our proxy with a bench/proxy_variants.py engine"
    )
    parser.add_argument("--out", default=str(RESULTS / "proxy"), help="results path, no suffix")
    args = parser.parse_args()
    roles = {
        "server": role_server,
        "feed": role_feed,
        "bulk": role_bulk,
        "latency": role_latency,
        "cps": role_cps,
        "idle": role_idle,
    }
    if args.role != "main":
        roles[args.role](args)
        return
    limit = raise_nofile()
    if args.idle and limit < 2 * args.idle + 100:
        print(f"! RLIMIT_NOFILE is {limit}: lowering --idle to {(limit - 100) // 2}")
        args.idle = (limit - 100) // 2
    results = Bench(args).run()
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    payload = {"args": vars(args), "results": results}
    out.with_suffix(".json").write_text(json.dumps(payload, indent=2) + "\n")
    table = render(results, args)
    out.with_suffix(".md").write_text(table)
    print(table)


if __name__ == "__main__":
    main()
