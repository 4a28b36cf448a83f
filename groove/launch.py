"""Start a relay and nodes as real local processes, and stop them all again.

Used by ``groove demo``, the benchmarks and the test suite. Each process is a plain
``python -m groove ...``; readiness is read from its own output line, and every process is
terminated (then killed) on exit, Ctrl-C included.
"""

from __future__ import annotations

import os
import queue
import signal
import socket
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _die_with_parent() -> None:  # pragma: no cover - runs in the child
    # Linux: the child gets SIGTERM if the parent dies, so no relay or node outlives a
    # killed test run or demo. Elsewhere the explicit cleanup below does the job.
    try:
        import ctypes

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass


class ProcessFailed(RuntimeError):
    pass


@dataclass
class Proc:
    name: str
    args: list[str]
    popen: subprocess.Popen
    lines: list[str] = field(default_factory=list)
    _q: queue.Queue = field(default_factory=queue.Queue)

    def _pump(self) -> None:
        for line in self.popen.stdout:
            self.lines.append(line.rstrip("\n"))
            self._q.put(line)
        self._q.put(None)

    def wait_for(self, text: str, timeout: float) -> str:
        deadline = time.monotonic() + timeout
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                raise ProcessFailed(f"{self.name} did not print {text!r} within {timeout:.0f}s; output:\n" + self.output())
            try:
                line = self._q.get(timeout=left)
            except queue.Empty:
                continue
            if line is None:
                raise ProcessFailed(f"{self.name} exited with code {self.popen.wait()} before printing {text!r}; output:\n" + self.output())
            if text in line:
                return line.rstrip("\n")

    def output(self) -> str:
        return "\n".join(self.lines[-40:])

    def stop(self, timeout: float = 5.0) -> None:
        if self.popen.poll() is None:
            self.popen.terminate()
            try:
                self.popen.wait(timeout)
            except subprocess.TimeoutExpired:
                self.popen.kill()
                self.popen.wait()


# Processes launched together share this machine's cores. An idle node's OpenMP workers
# spin-wait after each parallel region by default, stealing the cores the busy node needs:
# with two nodes on 2 cores that cost 25% of decode speed (measured, see BENCHMARKS.md).
# A short spin keeps most of the single-process speed and gives the cores back.
SHARED_CORES_ENV = {"GOMP_SPINCOUNT": "10000", "KMP_BLOCKTIME": "1"}


def spawn(name: str, args: list[str], env: dict | None = None, prefix: list[str] | None = None) -> Proc:
    """Start ``python -m groove ARGS``; ``prefix`` wraps the command (``ip netns exec NS``)."""
    full_env = {**SHARED_CORES_ENV, **os.environ, "PYTHONUNBUFFERED": "1", **(env or {})}
    popen = subprocess.Popen(
        [*(prefix or []), sys.executable, "-m", "groove", *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        stdin=subprocess.DEVNULL,
        text=True,
        env=full_env,
        preexec_fn=_die_with_parent if sys.platform.startswith("linux") else None,
    )
    proc = Proc(name, args, popen)
    threading.Thread(target=proc._pump, daemon=True).start()
    return proc


class LocalCluster:
    """A relay on a free port plus one node per layer range, all local processes."""

    def __init__(self, model: str | Path, ranges: list[tuple[int, int]], *, dtype: str = "float32", device: str = "cpu",
                 threads: int = 0, node_args: list[str] | None = None, relay_args: list[str] | None = None, env: dict | None = None,
                 link_latency_ms: float = 0.0):
        self.model = str(model)
        self.ranges = ranges
        self.dtype, self.device, self.threads = dtype, device, threads
        self.node_args = node_args or []
        self.relay_args = relay_args or []
        self.env = env
        self.port = 0
        self.relay: Proc | None = None
        self.nodes: list[Proc] = []
        # With link latency, every node and the consumer reach the relay through a proxy of
        # their own that delays each direction (bench.latency); status queries go direct.
        self.link_latency_ms = link_latency_ms
        self.proxies: list = []
        self._client_port = 0

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    @property
    def client_address(self) -> str:
        """Where consumers connect: the relay itself, or a delaying proxy in front of it."""
        if self.link_latency_ms and not self._client_port:
            self._client_port = self._proxy()
        return f"127.0.0.1:{self._client_port or self.port}"

    def _proxy(self) -> int:
        from .bench.latency import LatencyProxy

        proxy = LatencyProxy(self.port, self.link_latency_ms / 1000).__enter__()
        self.proxies.append(proxy)
        return proxy.port

    def start_relay(self, timeout: float = 30) -> Proc:
        self.port = free_port()
        self.relay = spawn("relay", ["relay", "--host", "127.0.0.1", "--port", str(self.port), *self.relay_args], self.env)
        self.relay.wait_for("listening", timeout)
        return self.relay

    def start_node(self, first: int, last: int, *, wait: bool = True, timeout: float = 120, extra: list[str] | None = None) -> Proc:
        relay = f"127.0.0.1:{self._proxy()}" if self.link_latency_ms else self.address
        args = ["node", "--model", self.model, "--layers", f"{first}-{last}", "--relay", relay,
                "--device", self.device, "--dtype", self.dtype, *self.node_args, *(extra or [])]
        if self.threads:
            args += ["--threads", str(self.threads)]
        node = spawn(f"node {first}-{last}", args, self.env)
        self.nodes.append(node)
        if wait:
            node.wait_for("registered as", timeout)
        return node

    def __enter__(self) -> "LocalCluster":
        try:
            self.start_relay()
            started = [self.start_node(a, b, wait=False) for a, b in self.ranges]
            for node in started:
                node.wait_for("registered as", 120)
        except BaseException:
            self.stop()
            raise
        return self

    def __exit__(self, *exc) -> None:
        self.stop()

    def stop(self) -> None:
        for p in [*self.nodes, *([self.relay] if self.relay else [])]:
            p.stop()
        for proxy in self.proxies:
            proxy.stop()
