"""Token selection on the last node, with a per-session seeded generator.

The generator lives on the last node whatever the split, and the logits it sees are the
same bits for every split, so a seed reproduces the same tokens on any pipeline.
"""

from __future__ import annotations

import torch

from ..protocol.messages import Sampling


def make_generator(sampling: Sampling) -> torch.Generator:
    g = torch.Generator(device="cpu")
    if sampling.seed is None:
        g.seed()
    else:
        g.manual_seed(sampling.seed)
    return g


def sample(logits: torch.Tensor, sampling: Sampling, generator: torch.Generator) -> int:
    """``logits``: float32 vector over the vocabulary."""
    if sampling.temperature <= 0:
        return int(torch.argmax(logits))
    scores = logits.float().cpu() / sampling.temperature
    if sampling.top_k > 0:
        k = min(sampling.top_k, scores.numel())
        kth = torch.topk(scores, k).values[-1]
        scores = scores.masked_fill(scores < kth, float("-inf"))
    if 0 < sampling.top_p < 1:
        sorted_scores, order = torch.sort(scores, descending=False)
        cumulative = sorted_scores.softmax(-1).cumsum(-1)
        drop = cumulative <= (1 - sampling.top_p)
        drop[-1] = False  # always keep the most likely token
        scores = scores.masked_fill(drop.scatter(0, order, drop), float("-inf"))
    probs = scores.softmax(-1)
    return int(torch.multinomial(probs, 1, generator=generator))
