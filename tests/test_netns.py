"""Several hosts on one machine: each node in its own network namespace with its own
address, the relay on another; a node's link is cut mid-generation."""

from __future__ import annotations

import os
import shutil
import subprocess
import time

import pytest

from groove.consumer.client import Client
from groove.launch import spawn
from groove.protocol.messages import Sampling

from .conftest import reference_generate, run_async
from .test_pipeline import status

PROMPT = [5, 17, 33, 100, 7, 9]


def _ip(*args: str) -> None:
    subprocess.run(["ip", *args], check=True, capture_output=True, text=True)


class Hosts:
    """A bridge on this host (the relay's address) and one namespace per node, joined by
    veth pairs. Everything is removed on exit."""

    def __init__(self, count: int):
        tag = os.getpid() % 200
        self.net = f"10.231.{tag}"
        self.bridge = f"gbr{tag}"
        self.names = [f"gns{tag}x{i}" for i in range(count)]
        self.links = [f"gv{tag}x{i}" for i in range(count)]

    @property
    def relay_ip(self) -> str:
        return f"{self.net}.1"

    def __enter__(self) -> "Hosts":
        try:
            _ip("link", "add", self.bridge, "type", "bridge")
            _ip("addr", "add", f"{self.relay_ip}/24", "dev", self.bridge)
            _ip("link", "set", self.bridge, "up")
            for i, (ns, link) in enumerate(zip(self.names, self.links)):
                _ip("netns", "add", ns)
                _ip("netns", "exec", ns, "ip", "link", "set", "lo", "up")
                _ip("link", "add", link, "type", "veth", "peer", "name", f"{link}p")
                _ip("link", "set", f"{link}p", "netns", ns)
                _ip("link", "set", link, "master", self.bridge)
                _ip("link", "set", link, "up")
                _ip("netns", "exec", ns, "ip", "addr", "add", f"{self.net}.{i + 2}/24", "dev", f"{link}p")
                _ip("netns", "exec", ns, "ip", "link", "set", f"{link}p", "up")
        except BaseException:
            self.__exit__()
            raise
        return self

    def __exit__(self, *exc) -> None:
        for ns in self.names:
            subprocess.run(["ip", "netns", "del", ns], capture_output=True)
        subprocess.run(["ip", "link", "del", self.bridge], capture_output=True)

    def prefix(self, i: int) -> list[str]:
        return ["ip", "netns", "exec", self.names[i]]

    def cut(self, i: int) -> None:
        _ip("link", "set", self.links[i], "down")


def _namespaces_work() -> str | None:
    if shutil.which("ip") is None:
        return "the ip command (iproute2) is not installed"
    if os.geteuid() != 0:
        return "creating network namespaces needs root"
    probe = subprocess.run(["ip", "netns", "add", f"gprobe{os.getpid()}"], capture_output=True, text=True)
    if probe.returncode != 0:
        return f"ip netns add failed: {probe.stderr.strip()}"
    subprocess.run(["ip", "netns", "del", f"gprobe{os.getpid()}"], capture_output=True)
    return None


def test_cutting_a_nodes_link_fails_over_to_a_replica_on_another_host(model_paths):
    reason = _namespaces_work()
    if reason:
        pytest.skip(f"multi-host test needs network namespaces: {reason}")
    path = model_paths["llama"]
    procs = []
    with Hosts(3) as hosts:
        try:
            relay = spawn("relay", ["relay", "--host", hosts.relay_ip, "--port", "8770", "--node-timeout", "2"])
            procs.append(relay)
            relay.wait_for("listening", 30)
            address = f"{hosts.relay_ip}:8770"
            ranges = [(0, 2), (3, 5), (3, 5)]
            for i, (a, b) in enumerate(ranges):
                procs.append(spawn(f"node {i}", ["node", "--model", str(path), "--layers", f"{a}-{b}", "--relay", address,
                                                 "--dtype", "float32", "--device", "cpu"], prefix=hosts.prefix(i)))
            node_ids = [p.wait_for("registered as", 120).split()[2] for p in procs[1:]]
            n = 150
            expected = reference_generate(path, PROMPT, n)

            async def run():
                async with Client(address) as c:
                    s = await c.open_session("llama", Sampling(temperature=0), wait=10)
                    victim = node_ids.index(s.pipeline[1])
                    tokens, stamps = [], []
                    async for step in c.generate(s, PROMPT, n):
                        tokens.append(step.token)
                        stamps.append(time.monotonic())
                        if len(tokens) == 10:
                            hosts.cut(victim)
                            cut_at = time.monotonic()
                    return tokens, [t for t in stamps if t > cut_at][0] - cut_at

            tokens, gap = run_async(run())
            print(f"\ntime from cutting the link to the next token: {gap:.2f} s")
            assert tokens == expected
            assert gap < 10
            st = status(address)
            assert st["relay"]["failovers"] == 1 and len(st["nodes"]) == 2
        finally:
            for p in procs:
                p.stop()
