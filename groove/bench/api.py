"""``python -m groove.bench.api``: the OpenAI-compatible API against the Python client on
the same local pipeline (the built-in demo model, two nodes), tokens/s end to end.

Both go through the same sessions in the relay; the API adds tokenizing in the relay,
JSON, and for streaming one server-sent event per token.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import time


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--new-tokens", type=int, default=200)
    parser.add_argument("--repeat", type=int, default=5)
    args = parser.parse_args()

    import openai

    from ..consumer.client import Client
    from ..consumer.tokenizer import load_tokenizer_from
    from ..demo import DEMO_MODEL
    from ..launch import LocalCluster
    from ..protocol.messages import Sampling
    from ..relay import auth

    prompt = "The meaning of the with statement is"
    ids = load_tokenizer_from(DEMO_MODEL).encode(prompt)
    n = args.new_tokens
    with LocalCluster(DEMO_MODEL, [(0, 2), (3, 5)]) as cluster:
        api = openai.OpenAI(base_url=f"http://{cluster.address}/v1", api_key=auth.local_token("consumer"), max_retries=0)
        api.completions.create(model=DEMO_MODEL.name, prompt=prompt, max_tokens=4)  # builds the relay's tokenizer

        async def client_run() -> float:
            async with Client(cluster.address) as client:
                session = await client.open_session(DEMO_MODEL.name, Sampling(temperature=0), wait=5)
                t0 = time.perf_counter()
                got = [s async for s in client.generate(session, ids, n, ignore_eos=True)]
                return len(got) / (time.perf_counter() - t0)

        def api_run(stream: bool) -> tuple[float, float]:
            t0 = time.perf_counter()
            kw = dict(model=DEMO_MODEL.name, prompt=prompt, max_tokens=n, temperature=0, extra_body={"ignore_eos": True})
            if not stream:
                reply = api.completions.create(**kw)
                return reply.usage.completion_tokens / (time.perf_counter() - t0), 0.0
            first = None
            for _ in api.completions.create(stream=True, **kw):
                first = first or time.perf_counter()
            return n / (time.perf_counter() - t0), (first - t0) * 1000

        rows = {"python client": [], "API": [], "API streaming": [], "API streaming, first chunk (ms)": []}
        for _ in range(args.repeat):
            rows["python client"].append(asyncio.run(client_run()))
            rows["API"].append(api_run(False)[0])
            rate, first = api_run(True)
            rows["API streaming"].append(rate)
            rows["API streaming, first chunk (ms)"].append(first)
    print(f"demo model, 2 nodes, {n} new tokens, median of {args.repeat} (tokens/s end to end, prefill included)")
    for name, values in rows.items():
        print(f"{name:34s} {statistics.median(values):8.1f}")


if __name__ == "__main__":
    main()
