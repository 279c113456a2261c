"""Benchmark of the HTTP face: direct vs gateway-proxy vs an aiohttp reverse proxy vs the Go proxy.

Owns a small run (not a test) behind the choice of httptools for the HTTP face: requests per
second and per-request latency for small keep-alive GETs (the dashboard's pattern), and a large
streamed download, through each path. The aiohttp row is a minimal reverse proxy on aiohttp's
low-level server and client, the alternative the issue allowed. Writes
``bench/results/proxy-http.md`` and ``.json``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import socket
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).parent))
import proxy_bench as pb

SMALL = b"x" * 2000
BIG_MB = 256


# -- the upstream: a fast HTTP server (uvloop, httptools) ---------------------------------------


def role_upstream(args: argparse.Namespace) -> None:
    import httptools
    import uvloop

    small_head = b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nContent-Length: %d\r\n\r\n" % (
        len(SMALL)
    )
    chunk = os.urandom(1 << 20)
    big_head = b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % (BIG_MB << 20)

    class Server(asyncio.Protocol):
        def connection_made(self, transport: Any) -> None:
            self.transport = transport
            self.parser = httptools.HttpRequestParser(self)
            self.url = b""
            self.paused = False
            self.big_left = 0
            transport.get_extra_info("socket").setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

        def data_received(self, data: bytes) -> None:
            self.parser.feed_data(data)

        def on_url(self, url: bytes) -> None:
            self.url = url

        def on_message_complete(self) -> None:
            if self.url.endswith(b"/big"):
                self.transport.write(big_head)
                self.big_left = BIG_MB << 20
                self.resume_writing()
            else:
                self.transport.write(small_head + SMALL)

        def pause_writing(self) -> None:
            self.paused = True

        def resume_writing(self) -> None:
            self.paused = False
            while self.big_left and not self.paused:
                n = min(self.big_left, len(chunk))
                self.transport.write(chunk[:n])
                self.big_left -= n

    async def main() -> None:
        server = await asyncio.get_running_loop().create_server(Server, "127.0.0.1", 0)
        print(server.sockets[0].getsockname()[1], flush=True)
        await asyncio.Event().wait()

    uvloop.run(main())


# -- the alternative: a reverse proxy on aiohttp's low-level server and client -----------------


def role_aiohttp_proxy(args: argparse.Namespace) -> None:
    import aiohttp
    import uvloop
    from aiohttp import web

    hop = {"connection", "keep-alive", "transfer-encoding", "upgrade", "te", "trailer", "host"}

    async def main() -> None:
        session = aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(limit=0), auto_decompress=False
        )
        target = f"http://127.0.0.1:{args.target_port}"

        async def handler(request: web.BaseRequest) -> web.StreamResponse:
            headers = {k: v for k, v in request.headers.items() if k.lower() not in hop}
            async with session.request(
                request.method,
                target + request.rel_url.path_qs,
                headers=headers,
                data=request.content if request.can_read_body else None,
                allow_redirects=False,
            ) as upstream:
                response = web.StreamResponse(status=upstream.status)
                for key, value in upstream.headers.items():
                    if key.lower() not in hop:
                        response.headers[key] = value
                await response.prepare(request)
                async for data in upstream.content.iter_any():
                    await response.write(data)
                await response.write_eof()
                return response

        server = web.Server(handler, access_log=None)
        loop = asyncio.get_running_loop()
        listener = await loop.create_server(server, "127.0.0.1", 0)
        print(listener.sockets[0].getsockname()[1], flush=True)
        await asyncio.Event().wait()

    uvloop.run(main())


# -- load generation -----------------------------------------------------------------------------


def _read_response(sock: socket.socket, buf: bytearray, view: memoryview) -> int:
    """Read one response with a Content-Length; returns its body length."""
    got = 0
    while True:
        n = sock.recv_into(view[got:])
        if not n:
            raise ConnectionError("closed")
        got += n
        end = buf.find(b"\r\n\r\n", 0, got)
        if end >= 0:
            break
    head = bytes(buf[:end]).lower()
    start = head.index(b"content-length:") + 15
    length = int(head[start : head.index(b"\r\n", start) if b"\r\n" in head[start:] else None])
    body = got - end - 4
    while body < length:
        n = sock.recv_into(view[: min(len(view), length - body)])
        if not n:
            raise ConnectionError("closed")
        body += n
    return length


def role_load(args: argparse.Namespace) -> None:
    """``conns`` processes, each one keep-alive connection doing GETs for ``seconds``."""
    import multiprocessing

    mp = multiprocessing.get_context("fork")
    out = mp.Queue()
    barrier = mp.Barrier(args.conns + 1)
    request = f"GET {args.path} HTTP/1.1\r\nHost: bench\r\n\r\n".encode()

    def worker() -> None:
        sock = socket.create_connection(("127.0.0.1", args.port))
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        buf = bytearray(1 << 20)
        view = memoryview(buf)
        samples = []
        barrier.wait()
        deadline = time.perf_counter() + args.seconds
        while (now := time.perf_counter()) < deadline:
            sock.sendall(request)
            _read_response(sock, buf, view)
            samples.append(time.perf_counter() - now)
        sock.close()
        out.put(samples)

    procs = [mp.Process(target=worker) for _ in range(args.conns)]
    for proc in procs:
        proc.start()
    barrier.wait()
    start = time.perf_counter()
    samples = [s for _ in procs for s in out.get(timeout=120)]
    elapsed = time.perf_counter() - start
    for proc in procs:
        proc.join()
    samples.sort()
    print(
        json.dumps(
            {
                "rps": len(samples) / elapsed,
                "median_us": statistics.median(samples) * 1e6,
                "p99_us": samples[int(len(samples) * 0.99)] * 1e6,
            }
        )
    )


def role_big(args: argparse.Namespace) -> None:
    sock = socket.create_connection(("127.0.0.1", args.port))
    buf = bytearray(1 << 20)
    start = time.perf_counter()
    sock.sendall(f"GET {args.path} HTTP/1.1\r\nHost: bench\r\n\r\n".encode())
    length = _read_response(sock, buf, memoryview(buf))
    print(json.dumps({"mb_s": length / (time.perf_counter() - start) / 1e6}))


# -- orchestration -------------------------------------------------------------------------------


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--role", default="main", help=argparse.SUPPRESS)
    parser.add_argument("--port", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--target-port", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--target", help=argparse.SUPPRESS)
    parser.add_argument("--path", default="/clusters/bench/status", help=argparse.SUPPRESS)
    parser.add_argument("--seconds", type=float, default=3.0)
    parser.add_argument("--conns", type=int, default=4, help="keep-alive client connections")
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--out", default=str(pb.RESULTS / "proxy-http"))
    args = parser.parse_args()
    roles = {
        "upstream": role_upstream,
        "aiohttp-proxy": role_aiohttp_proxy,
        "load": role_load,
        "big": role_big,
    }
    if args.role in roles:
        roles[args.role](args)
        return
    if args.role == "feed":
        pb.role_feed(args)
        return
    children: list[subprocess.Popen] = []

    def spawn(role: str, *extra: str) -> tuple[subprocess.Popen, int]:
        proc = subprocess.Popen(
            [sys.executable, __file__, "--role", role, *extra],
            stdout=subprocess.PIPE, text=True, start_new_session=True,
        )  # fmt: skip
        children.append(proc)
        assert proc.stdout is not None
        return proc, int(proc.stdout.readline())

    results: dict[str, Any] = {}
    try:
        _, up = spawn("upstream")
        _, feed_port = spawn("feed", "--target", f"http://127.0.0.1:{up}")
        paths: dict[str, tuple[subprocess.Popen | None, int, str]] = {
            "direct": (None, up, "/status")
        }
        bench = pb.Bench.__new__(pb.Bench)
        bench.feed_port = feed_port
        bench.args = argparse.Namespace(engine="")
        proc, port = bench.start_ours("uvloop")
        paths["gateway-proxy (uvloop)"] = (proc, port, args.path)
        proc, port = spawn("aiohttp-proxy", "--target-port", str(up))
        paths["aiohttp reverse proxy (uvloop)"] = (proc, port, "/status")
        binary = pb.go_proxy_binary()
        if binary:
            proc, port = start_go_http(binary, feed_port, args.path)
            paths["dask-gateway-proxy (Go)"] = (proc, port, args.path)
        for name in paths:
            results[name] = {"rps": [], "median_us": [], "p99_us": [], "big_mb_s": []}
        for rep in range(args.reps):
            for name, (_proc, port, path) in paths.items():
                print(f"- round {rep + 1}/{args.reps}: {name}", flush=True)
                row = results[name]
                load = run_json(
                    "load", "--port", str(port), "--path", path,
                    "--seconds", str(args.seconds), "--conns", str(args.conns),
                )  # fmt: skip
                for key in ("rps", "median_us", "p99_us"):
                    row[key].append(load[key])
                big = run_json("big", "--port", str(port), "--path", path.replace("status", "big"))
                row["big_mb_s"].append(big["mb_s"])
        for proc, _, _ in paths.values():
            if proc is not None and proc not in children:
                proc.send_signal(signal.SIGTERM)
                proc.wait(10)
    finally:
        for child in children:
            os.killpg(child.pid, signal.SIGKILL)
            child.wait()
    summary = {
        name: {key: statistics.median(values) for key, values in row.items()}
        for name, row in results.items()
    }
    out = Path(args.out)
    payload = {"args": vars(args), "runs": results, "results": summary}
    out.with_suffix(".json").write_text(json.dumps(payload, indent=2) + "\n")
    table = render(summary, args)
    out.with_suffix(".md").write_text(table)
    print(table)


def run_json(role: str, *extra: str) -> dict[str, Any]:
    out = subprocess.run(
        [sys.executable, __file__, "--role", role, *extra],
        capture_output=True, text=True, timeout=300, check=False,
    )  # fmt: skip
    if out.returncode:
        raise RuntimeError(f"{role} failed: {out.stderr[-2000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def start_go_http(binary: str, feed_port: int, path: str) -> tuple[subprocess.Popen, int]:
    port = pb.free_port()
    proc = subprocess.Popen(
        [binary, "-address", f"127.0.0.1:{port}", "-tcp-address", f"127.0.0.1:{pb.free_port()}",
         "-api-url", f"http://127.0.0.1:{feed_port}/api/v1/routes", "-log-level", "WARN",
         "-is-child-process"],
        env={**os.environ, "DASK_GATEWAY_PROXY_TOKEN": pb.TOKEN}, stdin=subprocess.PIPE,
    )  # fmt: skip
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=1) as sock:
                sock.sendall(f"GET {path} HTTP/1.1\r\nHost: b\r\n\r\n".encode())
                if sock.recv(12).startswith(b"HTTP/1.1 200"):
                    return proc, port
        except OSError:
            pass
        time.sleep(0.05)
    raise RuntimeError("the Go proxy never routed")


def render(summary: dict[str, Any], args: argparse.Namespace) -> str:
    lines = [
        "# Proxy benchmark: the HTTP face",
        "",
        f"`python bench/proxy_http_bench.py`; {os.cpu_count()} vCPUs shared by every process; "
        f"medians of {args.reps} interleaved rounds. Small: {args.conns} keep-alive connections "
        f"(one client process each) doing GETs of a {len(SMALL)}-byte body for {args.seconds:g} s; "
        f"big: one GET of a {BIG_MB} MiB body.",
        "",
        "| path | small GETs req/s | median µs | p99 µs | big GET MB/s |",
        "|---|---|---|---|---|",
    ]
    for name, r in summary.items():
        lines.append(
            f"| {name} | {r['rps']:.0f} | {r['median_us']:.0f} | {r['p99_us']:.0f} | "
            f"{r['big_mb_s']:.0f} |"
        )
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
