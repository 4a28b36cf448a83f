"""Perplexity of a checkpoint on held-out text, through a node's own slice code, with and
without ``--quantize int8``: the accuracy cost of quantization in one number.

    python -m groove.bench.perplexity [--model DIR] [--tokens 4096]

The default is the built-in demo model on the held-out end of its training corpus.
"""

from __future__ import annotations

import argparse
import json
import math


def perplexity(model_dir: str, ids: list[int], quantize: str, dtype: str = "float32", window: int = 256) -> float:
    import torch

    from ..models import checkpoint
    from ..node.loader import load_slice
    from ..node.shard import Shard
    from ..protocol.messages import Sampling

    ckpt = checkpoint.load(model_dir)
    shard = Shard(load_slice(ckpt, 0, ckpt.num_layers - 1, torch.device("cpu"), getattr(torch, dtype), quantize=quantize))
    nll, count = 0.0, 0
    for start in range(0, len(ids) - 1, window):
        chunk = ids[start : start + window + 1]
        state = shard.new_session(Sampling(temperature=0))
        # Feed one token at a time: the decode path, the one quantization changes most.
        for i in range(len(chunk) - 1):
            logits = shard.step(state, i, tokens=[chunk[i]])
            nll -= torch.log_softmax(logits, -1)[chunk[i + 1]].item()
            count += 1
    return math.exp(nll / count)


def main() -> None:
    from ..demo import default_demo_model

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=str(default_demo_model()))
    ap.add_argument("--tokens", type=int, default=2048)
    ap.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32",
                    help="compute dtype of both runs (int8 weights multiply rows of this dtype)")
    args = ap.parse_args()
    from ..consumer.tokenizer import load_tokenizer
    from ..models.checkpoint import resolve
    from ..models.synthetic import corpus_text

    tok = load_tokenizer(resolve(args.model))
    ids = tok.encode(corpus_text())[-args.tokens :]  # inside the held-out 5% of the demo model
    base = perplexity(args.model, ids, "none", args.dtype)
    int8 = perplexity(args.model, ids, "int8", args.dtype)
    print(json.dumps({"model": args.model, "tokens": len(ids), f"perplexity_{args.dtype}": round(base, 3),
                      "perplexity_int8": round(int8, 3), "change_pct": round((int8 / base - 1) * 100, 2)}))


if __name__ == "__main__":
    main()
