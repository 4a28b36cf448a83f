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
    return int(torch.multinomial(probabilities(logits, sampling), 1, generator=generator))


def verify(logits: torch.Tensor, drafts: list[int], sampling: Sampling, generator: torch.Generator, dists=()) -> list[int]:
    """Speculative decoding's check on the last node. ``logits[i]`` follows the step's
    real token (i = 0) or its i-th guess; returns the guesses kept, then one more token.

    Greedy: keep each guess that is the argmax, then add the argmax where they part, so
    the tokens are exactly those of decoding one at a time. Sampling: speculative sampling
    (Leviathan et al., Chen et al., 2023) keeps a guess drawn from q with probability
    min(1, p/q) and otherwise draws from the residual max(0, p - q) normalised, so each
    token is distributed exactly as ``sample`` would draw it. ``dists[i]`` (ids, probs) is
    the q a draft model sampled guess i from; without it a guess is certain (q one-hot:
    keep it with probability p(guess), else draw from p without it)."""
    out: list[int] = []
    for i, guess in enumerate(drafts):
        if sampling.temperature <= 0:
            token = int(torch.argmax(logits[i]))
            out.append(token)
            if token != guess:
                return out
            continue
        p = probabilities(logits[i], sampling)
        q = torch.zeros_like(p)
        if i < len(dists):
            q[torch.tensor(dists[i].ids)] = torch.tensor(dists[i].probs, dtype=p.dtype)
        else:
            q[guess] = 1.0
        if float(torch.rand((), generator=generator)) < min(1.0, float(p[guess]) / float(q[guess])):
            out.append(guess)
            continue
        residual = (p - q).clamp(min=0)
        if float(residual.sum()) <= 0:  # p == q up to rounding: any draw from p is right
            residual = p
        out.append(int(torch.multinomial(residual, 1, generator=generator)))  # multinomial normalises
        return out
    out.append(sample(logits[len(drafts)], sampling, generator))
    return out


def end_of_turn(produced: list[int], eos_ids: set[int], remaining: int) -> tuple[list[int], str]:
    """The tokens of a step that belong to the turn, and how the turn ends: 'stop' at the
    first stop token, 'length' at ``remaining`` tokens, '' if it goes on."""
    for i, token in enumerate(produced):
        if token in eos_ids:
            return produced[: i + 1], "stop"
        if i + 1 >= remaining:
            return produced[: i + 1], "length"
    return produced, ""


def probabilities(logits: torch.Tensor, sampling: Sampling) -> torch.Tensor:
    """The distribution ``sample`` draws from: temperature, then top-k, then top-p."""
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
    return scores.softmax(-1)
