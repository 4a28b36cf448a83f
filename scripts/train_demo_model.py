"""Train Groove's built-in demo model: a small Llama that writes Python-documentation prose.

    .venv/bin/python scripts/train_demo_model.py [--out groove/assets/demo-model] [--steps 600]

The corpus is ``pydoc_data.topics`` (about 450 KB of English prose and examples that ships
with every CPython), so training needs no download. A byte-level BPE tokenizer is trained on
the same text with the ``tokenizers`` library. Everything is seeded: the same machine and
library versions give the same checkpoint. The result is an ordinary Hugging Face
checkpoint (safetensors in bfloat16, config, tokenizer files) that loads through exactly
the same code as any other model. The default 600 steps take about 6 minutes on 2 CPU
cores; the step count, not the clock, ends training, so the result does not depend on
the machine's speed. The corpus is small (about 120K tokens), so longer runs overfit:
validation loss bottoms out after roughly 4 epochs, and the best checkpoint is kept.
"""

from __future__ import annotations

import argparse
import json
import math
import random
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
SEED = 1234


def build_tokenizer(text: str, vocab_size: int):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<|endoftext|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator([text[i : i + 8192] for i in range(0, len(text), 8192)], trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>", pad_token="<|endoftext|>")


def batches(data: torch.Tensor, seq: int, batch: int, gen: torch.Generator):
    while True:
        starts = torch.randint(0, len(data) - seq - 1, (batch,), generator=gen)
        x = torch.stack([data[s : s + seq] for s in starts])
        y = torch.stack([data[s + 1 : s + seq + 1] for s in starts])
        yield x, y


@torch.no_grad()
def evaluate(model, data: torch.Tensor, seq: int) -> float:
    model.eval()
    losses = []
    for s in range(0, len(data) - seq - 1, seq):
        x = data[s : s + seq].unsqueeze(0)
        y = data[s + 1 : s + seq + 1].unsqueeze(0)
        logits = model(x).logits
        losses.append(torch.nn.functional.cross_entropy(logits.view(-1, logits.shape[-1]), y.view(-1)).item())
    model.train()
    return sum(losses) / len(losses)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=str(ROOT / "groove" / "assets" / "demo-model"))
    ap.add_argument("--steps", type=int, default=600)
    ap.add_argument("--weight-decay", type=float, default=0.1)
    ap.add_argument("--vocab", type=int, default=2048)
    ap.add_argument("--hidden", type=int, default=192)
    ap.add_argument("--layers", type=int, default=6)
    ap.add_argument("--seq", type=int, default=128)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--lr", type=float, default=3e-3)
    args = ap.parse_args()

    from transformers import LlamaConfig, LlamaForCausalLM

    from groove.models.synthetic import corpus_text
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    random.seed(SEED)
    torch.manual_seed(SEED)
    torch.use_deterministic_algorithms(True)
    text = corpus_text()
    tokenizer = build_tokenizer(text, args.vocab)
    ids = torch.tensor(tokenizer.encode(text), dtype=torch.long)
    split = int(len(ids) * 0.95)
    train, val = ids[:split], ids[split:]
    print(f"corpus: {len(text)} characters, {len(ids)} tokens ({len(train)} train, {len(val)} validation)")

    config = LlamaConfig(
        vocab_size=args.vocab, hidden_size=args.hidden, intermediate_size=args.hidden * 8 // 3 // 32 * 32,
        num_hidden_layers=args.layers, num_attention_heads=args.hidden // 32, num_key_value_heads=2,
        max_position_embeddings=1024, tie_word_embeddings=True, rope_theta=10000.0,
        bos_token_id=tokenizer.eos_token_id, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.eos_token_id,
        attention_dropout=0.0,
    )
    model = LlamaForCausalLM(config)
    n_params = sum(p.numel() for p in model.parameters())
    print(f"model: Llama, {args.layers} layers, hidden {args.hidden}, {n_params / 1e6:.2f}M parameters")

    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, betas=(0.9, 0.95), weight_decay=args.weight_decay)
    gen = torch.Generator().manual_seed(SEED)
    t0 = time.monotonic()
    total_steps, step, best, best_state = args.steps, 0, float("inf"), None
    warmup = 50
    for x, y in batches(train, args.seq, args.batch, gen):
        if step >= total_steps:
            break
        # Linear warm-up, then cosine decay to a tenth of the peak rate.
        lr = args.lr * min(1.0, (step + 1) / warmup) * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * step / total_steps)))
        for g in opt.param_groups:
            g["lr"] = lr
        logits = model(x).logits
        loss = torch.nn.functional.cross_entropy(logits.view(-1, logits.shape[-1]), y.view(-1))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        step += 1
        if step % 100 == 0 or step == total_steps:
            v = evaluate(model, val, args.seq)
            print(f"step {step}: train loss {loss.item():.3f}, validation loss {v:.3f}, {time.monotonic() - t0:.0f}s", flush=True)
            if v < best:
                best, best_state = v, {k: t.detach().clone() for k, t in model.state_dict().items()}

    if best_state is not None:
        model.load_state_dict(best_state)
    final = evaluate(model, val, args.seq)
    print(f"final validation loss {final:.3f} (perplexity {math.exp(final):.1f}) after {step} steps, {time.monotonic() - t0:.0f}s")

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    model.to(torch.bfloat16).save_pretrained(str(out))
    tokenizer.save_pretrained(str(out))
    model.float().eval()
    prompt = "The meaning of life is"
    x = torch.tensor([tokenizer.encode(prompt)])
    sample = model.generate(x, attention_mask=torch.ones_like(x), max_new_tokens=48, do_sample=False)
    text_out = tokenizer.decode(sample[0], skip_special_tokens=True)
    print(f"greedy sample: {text_out!r}")
    (out / "training.json").write_text(json.dumps({
        "corpus": "pydoc_data.topics", "seed": SEED, "steps": step, "parameters": n_params,
        "validation_loss": round(final, 4), "sample": text_out, "args": {k: v for k, v in vars(args).items() if k != "out"},
    }, indent=2))


if __name__ == "__main__":
    main()
