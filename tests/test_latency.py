"""The benchmarks' latency proxy delays each direction by at least its setting, keeps
every byte in order, and a pipeline behind such proxies still gives transformers' tokens."""

from __future__ import annotations

import asyncio
import os
import time

from groove.bench.latency import LatencyProxy
from groove.consumer.client import Client
from groove.launch import LocalCluster
from groove.protocol.messages import Sampling

from .conftest import reference_generate, run_async


def test_proxy_delays_both_ways_and_keeps_order():
    async def main():
        async def echo(reader, writer):
            while data := await reader.read(1 << 16):
                writer.write(data)
                await writer.drain()
            writer.close()

        server = await asyncio.start_server(echo, "127.0.0.1", 0)
        port = server.sockets[0].getsockname()[1]
        with LatencyProxy(port, 0.05) as proxy:
            reader, writer = await asyncio.open_connection("127.0.0.1", proxy.port)
            payload = os.urandom(300_000)
            t0 = time.monotonic()
            writer.write(payload)
            await writer.drain()
            got = await reader.readexactly(len(payload))
            elapsed = time.monotonic() - t0
            writer.close()
        server.close()
        return got == payload, elapsed

    same, elapsed = run_async(main())
    assert same and elapsed >= 0.1  # 50 ms out and 50 ms back


def test_a_pipeline_behind_slow_links_gives_the_same_tokens(model_paths):
    prompt = [5, 17, 33, 100, 7, 9]
    with LocalCluster(model_paths["llama"], [(0, 2), (3, 5)], link_latency_ms=10) as cluster:
        async def run():
            async with Client(cluster.client_address) as c:
                s = await c.open_session("llama", Sampling(temperature=0), wait=10)
                t0 = time.monotonic()
                tokens = [x.token async for x in c.generate(s, prompt, 6, ignore_eos=True)]
                return tokens, time.monotonic() - t0

        tokens, elapsed = run_async(run())
    assert tokens == reference_generate(model_paths["llama"], prompt, 6)
    # each token crosses consumer->relay once, then relay->node->relay twice, and back
    assert elapsed >= 6 * 4 * 0.010
