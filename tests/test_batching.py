"""Continuous batching on the nodes is invisible to results: sessions of different lengths
join and leave mid-stream, a long prompt is prefilled in chunks between other sessions'
decode steps, and every session's greedy tokens are still its solo run's (which are
transformers'). The node counters show the passes really held several sessions."""

from __future__ import annotations

import asyncio
import time

from groove.consumer.client import Client
from groove.consumer.commands import fetch_status
from groove.launch import LocalCluster
from groove.protocol.messages import Sampling

from .conftest import reference_generate, run_async

# (prompt, new tokens, start when the first session has this many tokens)
SESSIONS = [
    ([5, 17, 33, 100, 7, 9], 40, 0),
    (list(range(40, 110)), 12, 4),  # 70 tokens: five chunks of 16 rows or so
    ([300, 2, 2, 41], 24, 8),
    (list(range(200, 233)), 6, 8),
    ([11, 12], 30, 14),
]


def test_sessions_joining_and_leaving_get_their_solo_tokens(model_paths):
    path = model_paths["llama"]
    expected = [reference_generate(path, prompt, n) for prompt, n, _ in SESSIONS]
    with LocalCluster(path, [(0, 2), (3, 5)], node_args=["--prefill-chunk", "16"]) as cluster:
        before = {n["layers"][0]: n for n in fetch_status(cluster.address)["nodes"]}
        starts = {}

        async def run():
            async with Client(cluster.address) as client:
                first_tokens: list[int] = []

                async def one(i: int, prompt: list[int], n: int, after: int) -> list[int]:
                    while len(first_tokens) < after:
                        await asyncio.sleep(0.002)
                    session = await client.open_session("llama", Sampling(temperature=0), wait=10)
                    starts[i] = len(first_tokens)
                    out = first_tokens if i == 0 else []
                    async for step in client.generate(session, prompt, n, ignore_eos=True):
                        out.append(step.token)
                    await client.close_session(session)
                    return out

                return await asyncio.gather(*(one(i, p, n, a) for i, (p, n, a) in enumerate(SESSIONS)))

        got = run_async(run())
        time.sleep(1.5)  # node counters arrive with heartbeats
        after = {n["layers"][0]: n for n in fetch_status(cluster.address)["nodes"]}
    for i, (tokens, want) in enumerate(zip(got, expected)):
        assert tokens == want, f"session {i} (prompt of {len(SESSIONS[i][0])}) differs from its solo run"
    assert all(starts[i] < SESSIONS[0][1] for i in starts), starts  # every one joined while the first was streaming
    for first, node in after.items():
        steps = node["steps"] - before[first]["steps"]
        pieces = node["pieces"] - before[first]["pieces"]
        assert pieces > steps, f"node {first}: {pieces} pieces in {steps} passes: nothing was batched"
        # each position once: prompts, then every generated token but the last of each session
        assert node["tokens_processed"] - before[first]["tokens_processed"] == sum(len(p) + n - 1 for p, n, _ in SESSIONS)


def test_a_long_prompt_alone_and_chunked_gives_the_same_tokens(model_paths):
    path = model_paths["qwen3"]
    prompt = list(range(3, 103))
    expected = reference_generate(path, prompt, 8)
    with LocalCluster(path, [(0, 1), (2, 3)], node_args=["--prefill-chunk", "24"]) as cluster:
        async def run():
            async with Client(cluster.address) as client:
                idle = await client.open_session("qwen3", Sampling(temperature=0), wait=10)
                _ = [s async for s in client.generate(idle, [1, 2, 3], 1)]
                session = await client.open_session("qwen3", Sampling(temperature=0), wait=10)
                return [s.token async for s in client.generate(session, prompt, 8, ignore_eos=True)]

        before = sum(n["steps"] for n in fetch_status(cluster.address)["nodes"])
        assert run_async(run()) == expected
        time.sleep(1.5)
        passes = sum(n["steps"] for n in fetch_status(cluster.address)["nodes"]) - before
    # On each node: one pass for the short prompt; 100 tokens as 24 + 24 + 24 + 28 (no stub
    # of 4 rows is left); then 7 decode steps (the 8th token is never fed back).
    assert passes == 2 * (1 + 4 + 7)


def test_automatic_chunks_while_a_session_streams(model_paths):
    """The default --prefill-chunk auto, on two nodes of one machine (they take turns): a
    long prompt arrives while another session streams, is chunked by the nodes' own
    timings, and both sessions still get their solo tokens."""
    path = model_paths["llama"]
    long_prompt = [(7 * i) % 500 for i in range(400)]
    expected = [reference_generate(path, [5, 6, 7], 60), reference_generate(path, long_prompt, 4)]
    with LocalCluster(path, [(0, 2), (3, 5)]) as cluster:
        async def run():
            async with Client(cluster.address) as client:
                streamed: list[int] = []

                async def stream():
                    s = await client.open_session("llama", Sampling(temperature=0), wait=10)
                    async for step in client.generate(s, [5, 6, 7], 60, ignore_eos=True):
                        streamed.append(step.token)
                    return streamed

                async def newcomer():
                    while len(streamed) < 20:
                        await asyncio.sleep(0.002)
                    s = await client.open_session("llama", Sampling(temperature=0), wait=10)
                    before = len(streamed)
                    got = [step.token async for step in client.generate(s, long_prompt, 4, ignore_eos=True)]
                    return got, len(streamed) - before

                return await asyncio.gather(stream(), newcomer())

        first = fetch_status(cluster.address)["nodes"]
        streamed, (got, streamed_meanwhile) = run_async(run())
        time.sleep(1.5)
        passes = sum(n["steps"] for n in fetch_status(cluster.address)["nodes"]) - sum(n["steps"] for n in first)
    assert streamed == expected[0] and got == expected[1]
    assert streamed_meanwhile > 0  # the stream went on beside the newcomer
    assert passes >= 2 * 60  # every one of the stream's steps was a pass on each node, whatever joined it
