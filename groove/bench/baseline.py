"""The baseline: transformers ``generate`` on the whole checkpoint in one process.

Run as ``python -m groove.bench.baseline`` by the harness so it has a process (and memory)
of its own, like each node; it prints one JSON object.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", required=True)
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--prompt", required=True, help="comma-separated token ids")
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--logits-out", default=None, help="save the logits after the prompt here (float32, torch.save)")
    args = ap.parse_args()

    import torch
    from transformers import AutoModelForCausalLM
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    t0 = time.perf_counter()
    model = AutoModelForCausalLM.from_pretrained(args.model, dtype=getattr(torch, args.dtype)).eval()
    # Never stop early, and never forbid EOS either: the same rule as the pipeline's ignore_eos.
    model.generation_config.eos_token_id = None
    load_s = time.perf_counter() - t0
    ids = torch.tensor([[int(t) for t in args.prompt.split(",")]])
    mask = torch.ones_like(ids)

    def run(n: int) -> tuple[float, list[int]]:
        start = time.perf_counter()
        out = model.generate(ids, attention_mask=mask, max_new_tokens=n, do_sample=False)
        return time.perf_counter() - start, out[0, ids.shape[1]:].tolist()

    if args.logits_out:
        with torch.inference_mode():
            torch.save(model(ids, attention_mask=mask, logits_to_keep=1).logits[0, -1].float(), args.logits_out)
    run(2)  # warm-up: first-call allocations and lazy initialisation
    ttft, decode, tokens = [], [], []
    for _ in range(args.repeat):
        t1, _ = run(1)
        tn, tokens = run(args.new_tokens)
        ttft.append(t1)
        decode.append((args.new_tokens - 1) / max(tn - t1, 1e-9))
    print(json.dumps({"ttft_s": statistics.median(ttft), "decode_tok_s": statistics.median(decode), "load_s": load_s,
                      "token_ids": tokens}))


if __name__ == "__main__":
    main()
