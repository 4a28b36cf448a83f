"""``groove demo``: a relay and two nodes on this machine, one generation streamed through
them, and the proof that it equals a single-process transformers run."""

from __future__ import annotations

import asyncio
import sys
import time
from pathlib import Path

DEFAULT_PROMPT = "The meaning of life is"


DEMO_MODEL = Path(__file__).resolve().parent / "assets" / "demo-model"


def default_demo_model() -> Path:
    """The built-in demo checkpoint: a small Llama trained on Python's own documentation
    by ``scripts/train_demo_model.py``, shipped inside the package."""
    return DEMO_MODEL


def reference_tokens(model: Path, prompt_ids: list[int], max_tokens: int) -> list[int]:
    import torch
    from transformers import AutoModelForCausalLM
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    ref = AutoModelForCausalLM.from_pretrained(str(model), dtype=torch.float32)
    ids = torch.tensor([prompt_ids])
    out = ref.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_tokens, do_sample=False)
    return out[0, len(prompt_ids):].tolist()


def run(args) -> int:
    from .consumer.client import Client, GrooveError
    from .consumer.commands import stream_turn
    from .consumer.tokenizer import load_tokenizer
    from .launch import LocalCluster, ProcessFailed
    from .models import checkpoint, info
    from .protocol.messages import Sampling

    try:
        model = Path(args.model) if args.model else default_demo_model()
        ckpt = checkpoint.load(str(model))
    except checkpoint.ModelError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    embed, head = info.edge_bytes(ckpt)
    ranges = [tuple(r) for r in info.balanced_split(info.layer_bytes(ckpt), embed, head, 2)]
    prompt = args.prompt or DEFAULT_PROMPT
    tokenizer = load_tokenizer(ckpt.ref)
    prompt_ids = tokenizer.encode(prompt)

    print(f"model: {ckpt.ref.name} ({ckpt.config.get('model_type')}, {ckpt.num_layers} layers) from {model}")
    try:
        with LocalCluster(model, ranges, dtype="float32") as cluster:
            print(f"relay: ws://{cluster.address}/ws (pid {cluster.relay.popen.pid})")
            for (a, b), node in zip(ranges, cluster.nodes):
                registered = next(l for l in node.lines if "registered as" in l)
                node_id = registered.split()[2]
                print(f"node {node_id}: layers {a}-{b}, pid {node.popen.pid}, dialing out to {cluster.address}")
            print(f"prompt: {prompt!r}")
            print("output: ", end="", flush=True)

            async def generate():
                async with Client(cluster.address) as client:
                    session = await client.open_session(ckpt.ref.name, Sampling(temperature=0), wait=10)
                    return await stream_turn(client, session, tokenizer, prompt_ids, args.max_tokens,
                                             lambda t: (sys.stdout.write(t), sys.stdout.flush()))

            result = asyncio.run(generate())
            print()
            print(f"{len(result.token_ids)} tokens, {result.tokens_per_s:.1f} tokens/s, first token after {result.ttft_s * 1000:.0f} ms")
    except (ProcessFailed, GrooveError) as exc:
        print(f"\nerror: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("\ninterrupted; relay and nodes stopped", file=sys.stderr)
        return 130
    t0 = time.perf_counter()
    expected = reference_tokens(model, prompt_ids, args.max_tokens)
    same = expected == result.token_ids
    verdict = "yes" if same else "NO"
    print(f"distributed tokens equal a single-process transformers run ({time.perf_counter() - t0:.1f}s): {verdict} "
          f"({len(result.token_ids)} vs {len(expected)} tokens)")
    return 0 if same else 1
