"""``groove bench --speculative ngram`` (or ``--draft-model M``, run in the benchmark's
own process as a consumer would): decoding with and without speculation, on one
local pipeline in the same invocation (best with ``--link-latency-ms``, where every step
pays a round of slow hops that verified guesses save).

The prompt decides how often n-gram guesses hold: ``repetitive`` (code whose lines repeat,
so the model's continuation repeats too) or ``random`` token ids (guesses rarely hold: the
case where speculation must fall back instead of slowing decoding down).
"""

from __future__ import annotations

import asyncio
import random
import statistics
import time
from pathlib import Path

from ..models import checkpoint
from .harness import Workload, fetch_status, node_ranges, prompt_ids

# A doctest that counts, as Python's documentation has many: each line repeats the one
# before with one thing changed, which is what code and lists look like to a model.
CODE = "".join(f">>> print({i})\n{i}\n" for i in range(1, 40))


def repetitive_prompt(model, vocab: int, n: int) -> list[int]:
    """Code whose lines repeat, tokenized by the checkpoint's own tokenizer; a block of
    random ids said over and over where the checkpoint has no tokenizer."""
    from ..consumer.tokenizer import load_tokenizer
    from ..models.checkpoint import ModelError

    try:
        tok = load_tokenizer(checkpoint.resolve(str(model)))
        ids = tok.encode(CODE)
    except (ModelError, OSError, ValueError):
        rng = random.Random(0)
        ids = [rng.randrange(min(vocab, 30000)) for _ in range(24)]
    while len(ids) < n:
        ids = ids + ids
    return ids[-n:]


async def _timed(address: str, model: str, prompt: list[int], n: int, speculative: str, draft_tokens: int,
                 drafter=None) -> tuple[float, list[int], int]:
    """(decode tokens/s after the first token, tokens, pipeline steps)."""
    from ..consumer.client import Client
    from ..protocol.messages import Sampling

    async with Client(address) as c:
        s = await c.open_session(model, Sampling(temperature=0), wait=30)
        first, tokens, steps = None, [], 0
        if drafter is not None:
            stream = c.generate_drafted(s, prompt, n, drafter, ignore_eos=True, draft_tokens=draft_tokens)
        else:
            stream = c.generate(s, prompt, n, ignore_eos=True, speculative=speculative, draft_tokens=draft_tokens)
        async for step in stream:
            if first is None:
                first = time.perf_counter()
            tokens.append(step.token)
            steps += step.last_of_step
        end = time.perf_counter()
        await c.close_session(s)
    return (len(tokens) - 1) / (end - first), tokens, steps


def run(w: Workload, speculative: str, draft_tokens: int = 0, prompt_style: str = "repetitive", draft_model: str = "") -> dict:
    from ..launch import LocalCluster

    drafter = None
    if draft_model:
        from ..drafting.model import DraftModel, DraftModelError

        try:
            drafter = DraftModel(draft_model, dtype=w.dtype)
        except DraftModelError as exc:
            raise RuntimeError(str(exc)) from None
        speculative = f"draft model {Path(draft_model).name}"

    ckpt = checkpoint.load(str(w.model))
    vocab = int(ckpt.config["vocab_size"])
    prompt = (repetitive_prompt(w.model, vocab, w.prompt_tokens) if prompt_style == "repetitive"
              else prompt_ids(vocab, w.prompt_tokens))
    ranges = node_ranges(ckpt, w.nodes)
    name = ckpt.ref.name
    plain_rates, spec_rates, steps, accepted, drafted, same = [], [], [], 0, 0, []
    with LocalCluster(w.model, ranges, dtype=w.dtype, node_args=w.node_args, link_latency_ms=w.link_latency_ms) as cluster:
        client = cluster.client_address
        asyncio.run(_timed(client, name, prompt[:8], 4, "", 0))  # warm-up
        for _ in range(w.repeat):
            rate, plain, _ = asyncio.run(_timed(client, name, prompt, w.new_tokens, "", 0))
            plain_rates.append(rate)
            before = fetch_status(cluster.address)["relay"]
            rate, fast, n = asyncio.run(_timed(client, name, prompt, w.new_tokens, speculative, draft_tokens, drafter))
            after = fetch_status(cluster.address)["relay"]
            spec_rates.append(rate)
            steps.append(n)
            same.append(fast == plain)
            drafted += after["drafted_tokens"] - before["drafted_tokens"]
            accepted += after["accepted_tokens"] - before["accepted_tokens"]
    plain_rate, spec_rate = statistics.median(plain_rates), statistics.median(spec_rates)
    return {
        "model": name,
        "nodes": w.nodes,
        "ranges": [list(r) for r in ranges],
        "dtype": w.dtype,
        "node_args": w.node_args,
        "link_latency_ms": w.link_latency_ms,
        "prompt_style": prompt_style,
        "prompt_tokens": len(prompt),
        "new_tokens": w.new_tokens,
        "repeat": w.repeat,
        "speculative": speculative,
        "draft_tokens": draft_tokens or "adaptive",
        "plain_tok_s": plain_rate,
        "speculative_tok_s": spec_rate,
        "speedup": spec_rate / plain_rate,
        "acceptance_rate": accepted / drafted if drafted else None,
        "drafted_tokens": drafted,
        "tokens_per_step": w.new_tokens / statistics.median(steps),
        "same_tokens": all(same),  # in every repeat
    }


def render(result: dict) -> None:
    from rich.console import Console
    from rich.table import Table

    r = result
    latency = f", {r['link_latency_ms']:g} ms added each way on every link" if r["link_latency_ms"] else ""
    Console().print(f"[bold]{r['model']}[/bold] {r['dtype']}, {r['nodes']} nodes {r['ranges']}{latency}, {r['prompt_style']} prompt of "
                    f"{r['prompt_tokens']} tokens, {r['new_tokens']} new tokens, median of {r['repeat']}")
    t = Table()
    t.add_column("figure")
    t.add_column("value", justify="right")
    t.add_row("decode tokens/s without speculation", f"{r['plain_tok_s']:.2f}")
    t.add_row(f"decode tokens/s with {r['speculative']} ({r['draft_tokens']} guesses)", f"{r['speculative_tok_s']:.2f}")
    t.add_row("speed-up", f"{r['speedup']:.2f}x")
    rate = r["acceptance_rate"]
    t.add_row("guesses kept", f"{rate:.0%} of {r['drafted_tokens']}" if rate is not None else "no guesses made")
    t.add_row("tokens per pipeline step", f"{r['tokens_per_step']:.2f}")
    t.add_row("greedy tokens equal", "yes" if r["same_tokens"] else "NO")
    Console().print(t)
