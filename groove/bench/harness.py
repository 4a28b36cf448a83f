"""Run a workload through a real local pipeline and through transformers, side by side.

Every figure comes from this one invocation: the memory bandwidth it is normalised by, the
single-process baseline, and the pipeline (a relay and N node processes).
"""

from __future__ import annotations

import asyncio
import json
import math
import random
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from ..models import checkpoint, info
from ..models.checkpoint import EMBED_KEY, HEAD_KEY

DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}


@dataclass
class Workload:
    model: Path
    nodes: int
    dtype: str
    prompt_tokens: int
    new_tokens: int
    repeat: int
    node_args: list[str]
    quantize: str = "none"
    link_latency_ms: float = 0.0


def weight_bytes_per_token(ckpt: checkpoint.Checkpoint, dtype: str, quantize: str = "none") -> int:
    """Bytes of weights one decode step reads: every tensor except the embedding (a lookup
    reads one row), plus the LM head, which is the embedding matrix when tied. With int8,
    matrices take one byte per element (their per-row scales are negligible)."""
    shapes = [t.shape for name, t in ckpt.tensors.items() if name != EMBED_KEY]
    if HEAD_KEY not in ckpt.tensors and EMBED_KEY in ckpt.tensors:
        shapes.append(ckpt.tensors[EMBED_KEY].shape)
    return sum(math.prod(shape) * (1 if quantize == "int8" and len(shape) == 2 else DTYPE_BYTES[dtype]) for shape in shapes)


def node_ranges(ckpt: checkpoint.Checkpoint, nodes: int) -> list[tuple[int, int]]:
    """The layer ranges of ``nodes`` nodes with the bytes balanced, as ``groove info`` splits."""
    embed, head = info.edge_bytes(ckpt)
    return [tuple(r) for r in info.balanced_split(info.layer_bytes(ckpt), embed, head, nodes)]


def prompt_ids(vocab: int, n: int, seed: int = 0) -> list[int]:
    rng = random.Random(seed)
    return [rng.randrange(min(vocab, 30000)) for _ in range(n)]


def fetch_status(address: str) -> dict:
    from ..consumer.commands import fetch_status as fetch

    return fetch(address, timeout=10)


def run_baseline(w: Workload, prompt: list[int]) -> dict:
    import tempfile

    import torch

    with tempfile.TemporaryDirectory() as tmp:
        logits_path = Path(tmp) / "logits.pt"
        cmd = [sys.executable, "-m", "groove.bench.baseline", "--model", str(w.model), "--dtype", w.dtype,
               "--prompt", ",".join(map(str, prompt)), "--new-tokens", str(w.new_tokens), "--repeat", str(w.repeat),
               "--logits-out", str(logits_path)]
        out = subprocess.run(cmd, capture_output=True, text=True)
        if out.returncode != 0:
            raise RuntimeError(f"baseline failed:\n{out.stderr[-2000:]}")
        result = json.loads(out.stdout.strip().splitlines()[-1])
        result["logits"] = torch.load(logits_path)
    return result


async def _first_logits(address: str, model: str, prompt: list[int]):
    """The pipeline's logits after the prompt (float32, from the last node)."""
    from ..consumer.client import Client
    from ..protocol.messages import Sampling

    async with Client(address) as c:
        s = await c.open_session(model, Sampling(temperature=0), wait=30)
        steps = [step async for step in c.generate(s, prompt, 1, want_logits=True)]
        await c.close_session(s)
    return steps[-1].logits


def logits_error(got, want) -> dict:
    """How far the pipeline's logits are from the baseline's: the largest difference, as
    is and as a share of the baseline's range, and whether the top token is the same."""
    err = float((got.float() - want.float()).abs().max())
    return {"logits_max_abs_error": err, "logits_error_of_range": err / max(float(want.max() - want.min()), 1e-12),
            "top_token_equal": int(got.argmax()) == int(want.argmax())}


async def _timed_generation(address: str, model: str, prompt: list[int], n: int) -> tuple[float, float, list[int]]:
    """(time to first token, time from first to last token, tokens)."""
    from ..consumer.client import Client
    from ..protocol.messages import Sampling

    async with Client(address) as c:
        s = await c.open_session(model, Sampling(temperature=0), wait=30)
        t0 = time.perf_counter()
        first = None
        tokens = []
        async for step in c.generate(s, prompt, n, ignore_eos=True):
            if first is None:
                first = time.perf_counter()
            tokens.append(step.token)
        end = time.perf_counter()
        await c.close_session(s)
    return first - t0, end - first, tokens


def _node_counters(address: str) -> dict[str, tuple[int, float]]:
    time.sleep(0.6)  # nodes report compute time in heartbeats, at most 0.25 s after work
    return {n["id"]: (n["bytes_in"] + n["bytes_out"], n["compute_s"]) for n in fetch_status(address)["nodes"]}


def run_pipeline(w: Workload, ckpt: checkpoint.Checkpoint, prompt: list[int]) -> dict:
    from ..launch import LocalCluster

    ranges = node_ranges(ckpt, w.nodes)
    t_start = time.perf_counter()
    with LocalCluster(w.model, ranges, dtype=w.dtype, node_args=w.node_args, link_latency_ms=w.link_latency_ms) as cluster:
        ready_s = time.perf_counter() - t_start
        name = ckpt.ref.name
        client = cluster.client_address
        asyncio.run(_timed_generation(client, name, prompt[:8], 4))  # warm-up
        ttfts, rates, per_token_bytes, overheads, tokens = [], [], [], [], []
        for _ in range(w.repeat):
            c0 = _node_counters(cluster.address)
            ttft1, _, _ = asyncio.run(_timed_generation(client, name, prompt, 1))
            c1 = _node_counters(cluster.address)
            ttft, decode_s, tokens = asyncio.run(_timed_generation(client, name, prompt, w.new_tokens))
            c2 = _node_counters(cluster.address)
            ttfts.append(ttft1)
            rates.append((w.new_tokens - 1) / decode_s)
            # A run of N tokens minus a run of 1: what decoding N-1 tokens added.
            per_token_bytes.append({nid: ((c2[nid][0] - c1[nid][0]) - (c1[nid][0] - c0[nid][0])) / (w.new_tokens - 1) for nid in c2})
            compute = sum((c2[nid][1] - c1[nid][1]) - (c1[nid][1] - c0[nid][1]) for nid in c2) / (w.new_tokens - 1)
            overheads.append(decode_s / (w.new_tokens - 1) - compute)
        status = fetch_status(cluster.address)
        logits = asyncio.run(_first_logits(client, name, prompt))
    nodes = sorted(status["nodes"], key=lambda n: n["layers"][0])
    link_bytes = {n["id"]: statistics.median(b[n["id"]] for b in per_token_bytes) for n in nodes}
    return {
        "ranges": [list(r) for r in ranges],
        "ttft_s": statistics.median(ttfts),
        "decode_tok_s": statistics.median(rates),
        "token_ids": tokens,
        "logits": logits,
        "bytes_per_token_per_link": [{"node": n["id"], "layers": n["layers"], "bytes": round(link_bytes[n["id"]], 1)} for n in nodes],
        # Per token, the tokens travels relay->node for each node and node->relay from the last.
        "overhead_per_token_ms": statistics.median(overheads) * 1000,
        "relay_hop_ms_p50": status["relay"]["hop_ms_p50"],
        "relay_hop_ms_p99": status["relay"]["hop_ms_p99"],
        "nodes": [{"id": n["id"], "layers": n["layers"], "peak_rss_bytes": n["peak_rss_bytes"], "load_s": n["load_s"],
                   "kernels": n["kernels"]} for n in nodes],
        "cluster_ready_s": ready_s,
    }


def run(w: Workload) -> dict:
    from .bandwidth import read_bandwidth

    ckpt = checkpoint.load(str(w.model))
    prompt = prompt_ids(int(ckpt.config["vocab_size"]), w.prompt_tokens)
    bandwidth = read_bandwidth()
    weight_bytes = weight_bytes_per_token(ckpt, w.dtype, w.quantize)
    baseline = run_baseline(w, prompt)
    pipeline = run_pipeline(w, ckpt, prompt)
    limit = bandwidth / weight_bytes
    baseline_limit = bandwidth / weight_bytes_per_token(ckpt, w.dtype)
    return {
        "model": ckpt.ref.name,
        "nodes": w.nodes,
        "dtype": w.dtype,
        "quantize": w.quantize,
        "node_args": w.node_args,
        "link_latency_ms": w.link_latency_ms,
        "prompt_tokens": w.prompt_tokens,
        "new_tokens": w.new_tokens,
        "repeat": w.repeat,
        "read_bandwidth_gb_s": bandwidth / 1e9,
        "weight_bytes_per_token": weight_bytes,
        "bandwidth_limit_tok_s": limit,
        "baseline": {**{k: v for k, v in baseline.items() if k not in ("token_ids", "logits")}, "bandwidth_fraction": baseline["decode_tok_s"] / baseline_limit},
        "groove": {**{k: v for k, v in pipeline.items() if k not in ("token_ids", "logits")}, "bandwidth_fraction": pipeline["decode_tok_s"] / limit},
        # A hidden state's payload per token in the nodes' compute dtype: what --wire-dtype saves on.
        "uncompressed_payload_bytes": int(ckpt.config["hidden_size"]) * DTYPE_BYTES[w.dtype],
        **logits_error(pipeline["logits"], baseline["logits"]),
        "decode_ratio": pipeline["decode_tok_s"] / baseline["decode_tok_s"],
        "ttft_ratio": pipeline["ttft_s"] / baseline["ttft_s"],
        "same_tokens_as_baseline": pipeline["token_ids"] == baseline["token_ids"],
        # With a lossy --wire-dtype or --quantize: how far greedy output follows the baseline.
        "tokens_before_divergence": next((i for i, (a, b) in enumerate(zip(pipeline["token_ids"], baseline["token_ids"])) if a != b),
                                         min(len(pipeline["token_ids"]), len(baseline["token_ids"]))),
    }


def render(result: dict) -> None:
    from rich.console import Console
    from rich.table import Table

    g, b = result["groove"], result["baseline"]
    console = Console()
    quant = ", int8 nodes" if result.get("quantize") == "int8" else ""
    if result.get("link_latency_ms"):
        quant += f", {result['link_latency_ms']:g} ms added each way on every link"
    console.print(f"[bold]{result['model']}[/bold] {result['dtype']}{quant}, {result['nodes']} nodes {g['ranges']}, prompt "
                  f"{result['prompt_tokens']} tokens, {result['new_tokens']} new tokens, median of {result['repeat']}")
    console.print(f"read bandwidth {result['read_bandwidth_gb_s']:.1f} GB/s, {result['weight_bytes_per_token'] / 1e9:.3f} GB of "
                  f"weights per token: limit {result['bandwidth_limit_tok_s']:.1f} tok/s")
    t = Table()
    for col in ("figure", "groove", "transformers", "ratio"):
        t.add_column(col, justify="right" if col != "figure" else "left")
    t.add_row("decode tokens/s", f"{g['decode_tok_s']:.2f}", f"{b['decode_tok_s']:.2f}", f"{result['decode_ratio']:.2f}x")
    t.add_row("time to first token", f"{g['ttft_s'] * 1000:.0f} ms", f"{b['ttft_s'] * 1000:.0f} ms", f"{result['ttft_ratio']:.2f}x")
    t.add_row("bandwidth limit reached", f"{g['bandwidth_fraction']:.0%}", f"{b['bandwidth_fraction']:.0%}", "")
    t.add_row("network + relay per token", f"{g['overhead_per_token_ms']:.2f} ms", "", "")
    t.add_row("relay hop (p50 / p99)", f"{g['relay_hop_ms_p50']:.3f} / {g['relay_hop_ms_p99']:.3f} ms", "", "")
    for link in g["bytes_per_token_per_link"]:
        t.add_row(f"bytes/token, relay<->node {link['layers'][0]}-{link['layers'][1]}", f"{link['bytes']:.0f}", "", "")
    t.add_row("hidden state payload uncompressed", f"{result['uncompressed_payload_bytes']} B/token", "", "")
    t.add_row("logits after the prompt: max error", f"{result['logits_max_abs_error']:.3g} ({result['logits_error_of_range']:.2%} of range)",
              "", "same top token" if result["top_token_equal"] else "TOP TOKEN DIFFERS")
    for n in g["nodes"]:
        t.add_row(f"node {n['layers'][0]}-{n['layers'][1]} peak memory / load", f"{n['peak_rss_bytes'] / 2**20:.0f} MiB / {n['load_s']:.1f} s", "",
                  ", ".join(n["kernels"]) or "torch kernels only")
    t.add_row("greedy tokens equal", "yes" if result["same_tokens_as_baseline"] else
              f"NO (first {result['tokens_before_divergence']} of {result['new_tokens']} equal)", "", "")
    console.print(t)
