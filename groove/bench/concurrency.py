"""``groove bench --concurrency N``: many sessions at once through one local pipeline.

The baseline is one session alone on the same cluster, in the same invocation. Every
session records the arrival time of each of its tokens; from those come the aggregate
decode rate (tokens that arrived while every session was decoding, over that window), each
session's own rate, and the inter-token latencies. ``--interfere-prompt L`` also measures
what a newcomer's L-token prompt does to a session that is streaming.
"""

from __future__ import annotations

import asyncio
import statistics
import time
from dataclasses import dataclass, field

from ..models import checkpoint
from .harness import Workload, fetch_status, node_ranges, prompt_ids


@dataclass
class Stream:
    sent: float = 0.0
    times: list[float] = field(default_factory=list)
    tokens: list[int] = field(default_factory=list)

    @property
    def rate(self) -> float:
        return (len(self.times) - 1) / (self.times[-1] - self.times[0]) if len(self.times) > 1 else 0.0

    def gaps(self) -> list[float]:
        return [b - a for a, b in zip(self.times, self.times[1:])]


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


async def _stream(client, model: str, prompt: list[int], n: int, out: Stream, opened: asyncio.Event | None = None) -> None:
    from ..protocol.messages import Sampling

    session = await client.open_session(model, Sampling(temperature=0), wait=30)
    if opened is not None:
        opened.set()
    out.sent = time.perf_counter()
    async for step in client.generate(session, prompt, n, ignore_eos=True):
        out.times.append(time.perf_counter())
        out.tokens.append(step.token)
    await client.close_session(session)


async def _sessions(address: str, model: str, prompts: list[list[int]], n: int) -> list[Stream]:
    from ..consumer.client import Client

    streams = [Stream() for _ in prompts]
    async with Client(address) as client:
        await asyncio.gather(*(_stream(client, model, p, n, s) for p, s in zip(prompts, streams)))
    return streams


def summarize(streams: list[Stream]) -> dict:
    window = (max(s.times[0] for s in streams), min(s.times[-1] for s in streams))
    inside = sum(1 for s in streams for t in s.times if window[0] < t <= window[1])
    gaps = [g for s in streams for g in s.gaps()]
    rates = [s.rate for s in streams]
    return {
        "sessions": len(streams),
        "aggregate_tok_s": inside / (window[1] - window[0]) if window[1] > window[0] else 0.0,
        "session_tok_s": {"min": min(rates), "median": statistics.median(rates), "max": max(rates)},
        "fairness": min(rates) / max(rates) if max(rates) else 0.0,
        "itl_ms": {"p50": percentile(gaps, 0.5) * 1000, "p99": percentile(gaps, 0.99) * 1000},
        "ttft_ms_max": max(s.times[0] - s.sent for s in streams) * 1000,
    }


async def _interference(address: str, model: str, short: list[int], long_prompt: list[int], n: int) -> dict:
    """A session streams alone, then a second session arrives with a long prompt: the
    streaming session's latencies before it, and while the newcomer's prompt is prefilled."""
    from ..consumer.client import Client

    async with Client(address) as client:
        streaming, newcomer = Stream(), Stream()
        task = asyncio.create_task(_stream(client, model, short, 8192, streaming))
        while len(streaming.times) < n and not task.done():
            await asyncio.sleep(0.01)
        arrived = time.perf_counter()
        await _stream(client, model, long_prompt, 2, newcomer)
        target = len(streaming.times) + 5
        while len(streaming.times) < target and not task.done():
            await asyncio.sleep(0.01)
        if task.done():
            task.result()  # its error, if it failed
            raise RuntimeError("the streaming session ended before the long prompt was prefilled")
        task.cancel()
    alone = [b - a for a, b in zip(streaming.times, streaming.times[1:]) if b <= arrived]
    # Every gap that overlaps the prefill, from the newcomer's arrival to its first token.
    during = [b - a for a, b in zip(streaming.times, streaming.times[1:]) if b > arrived and a < newcomer.times[0]]
    p50 = statistics.median(alone)
    return {
        "prompt_tokens": len(long_prompt),
        "itl_ms_p50_alone": p50 * 1000,
        "itl_ms_p50_during_prefill": statistics.median(during) * 1000,
        "itl_ms_p99_during_prefill": percentile(during, 0.99) * 1000,
        "p99_during_over_p50_alone": percentile(during, 0.99) / p50,
        "newcomer_ttft_s": newcomer.times[0] - newcomer.sent,
        "gaps_during_prefill": len(during),
    }


def run(w: Workload, concurrency: int, interfere_prompt: int = 0) -> dict:
    from ..launch import LocalCluster

    ckpt = checkpoint.load(str(w.model))
    vocab = int(ckpt.config["vocab_size"])
    prompts = [prompt_ids(vocab, w.prompt_tokens, seed=i) for i in range(concurrency)]
    ranges = node_ranges(ckpt, w.nodes)
    name = ckpt.ref.name
    with LocalCluster(w.model, ranges, dtype=w.dtype, node_args=w.node_args, link_latency_ms=w.link_latency_ms) as cluster:
        address = cluster.client_address
        asyncio.run(_sessions(address, name, prompts[:1], 4))  # warm-up
        single, many, same = [], [], True
        for _ in range(w.repeat):
            alone = asyncio.run(_sessions(address, name, prompts[:1], w.new_tokens))
            single.append(summarize(alone))
            streams = asyncio.run(_sessions(address, name, prompts, w.new_tokens))
            many.append(summarize(streams))
            same = same and streams[0].tokens == alone[0].tokens  # batching must not change a session's tokens
        interference = None
        if interfere_prompt:
            long_prompt = prompt_ids(vocab, interfere_prompt, seed=10_000)
            interference = asyncio.run(_interference(address, name, prompts[0], long_prompt, w.new_tokens))
        nodes = fetch_status(cluster.address)["nodes"]
    best = max(many, key=lambda r: r["aggregate_tok_s"])  # of the repeats, each figure from one run
    median_many = statistics.median(r["aggregate_tok_s"] for r in many)
    median_single = statistics.median(r["aggregate_tok_s"] for r in single)
    return {
        "model": name, "nodes": w.nodes, "ranges": [list(r) for r in ranges], "dtype": w.dtype, "node_args": w.node_args,
        "prompt_tokens": w.prompt_tokens, "new_tokens": w.new_tokens, "repeat": w.repeat, "concurrency": concurrency,
        "single_tok_s": median_single,
        "aggregate_tok_s": median_many,
        "speedup": median_many / median_single,
        "runs": many,
        "best_run": best,
        "same_tokens_as_alone": same,
        "interference": interference,
        "mean_batch": [round(n.get("pieces", 0) / n["steps"], 2) if n.get("steps") else None for n in nodes],
    }


def render(result: dict) -> None:
    from rich.console import Console
    from rich.table import Table

    console = Console()
    console.print(f"[bold]{result['model']}[/bold] {result['dtype']}, {result['nodes']} nodes {result['ranges']}, "
                  f"{result['concurrency']} sessions x {result['new_tokens']} new tokens after {result['prompt_tokens']}-token prompts, "
                  f"median of {result['repeat']}")
    t = Table()
    for col in ("figure", f"{result['concurrency']} sessions", "1 session", "ratio"):
        t.add_column(col, justify="left" if col == "figure" else "right")
    t.add_row("aggregate decode tokens/s", f"{result['aggregate_tok_s']:.1f}", f"{result['single_tok_s']:.1f}", f"{result['speedup']:.2f}x")
    for r in result["runs"]:
        s = r["session_tok_s"]
        t.add_row("  per session tokens/s (min / median / max)", f"{s['min']:.1f} / {s['median']:.1f} / {s['max']:.1f}", "",
                  f"{r['fairness']:.2f}")
        t.add_row("  inter-token latency p50 / p99", f"{r['itl_ms']['p50']:.0f} / {r['itl_ms']['p99']:.0f} ms", "", "")
    t.add_row("greedy tokens of a session equal to its run alone", "yes" if result["same_tokens_as_alone"] else "NO", "", "")
    t.add_row("mean sessions per forward pass, per node", " / ".join(str(x) for x in result["mean_batch"]), "", "")
    i = result.get("interference")
    if i:
        t.add_row(f"streaming session while a {i['prompt_tokens']}-token prompt prefills: p50 alone",
                  f"{i['itl_ms_p50_alone']:.0f} ms", "", "")
        t.add_row("  p50 / p99 during the prefill", f"{i['itl_ms_p50_during_prefill']:.0f} / {i['itl_ms_p99_during_prefill']:.0f} ms", "",
                  f"{i['p99_during_over_p50_alone']:.2f}x")
        t.add_row("  newcomer's time to first token", f"{i['newcomer_ttft_s']:.2f} s", "", "")
    console.print(t)
