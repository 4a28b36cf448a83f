"""``--draft-model``: a small model on the consumer's own machine guesses the next tokens,
and the pipeline verifies them in one step (``Client.generate_drafted``).

The draft model keeps its own KV cache of the text so far. Each call brings it in step
with the session's tokens (dropping its own rejected guesses, feeding what is new) and
then decodes ``k`` tokens: greedily for a greedy session, or, when the session samples,
drawn from the draft model's own distribution under the session's sampling settings,
cut to its most likely tokens holding ``MASS`` of it (at most ``SUPPORT`` tokens, so it
stays small on the wire). Each sampled guess goes out with that
distribution q, which the last node's speculative sampling needs: the closer q is to the
big model's p, the more guesses it keeps, and the output's distribution is p's whatever
q is.
"""

from __future__ import annotations

from pathlib import Path


SUPPORT = 256  # the relay's limit
MASS = 0.999


class DraftModelError(Exception):
    pass


class DraftModel:
    def __init__(self, path: str | Path, dtype: str = "float32", threads: int = 0):
        import torch
        from transformers import AutoModelForCausalLM, DynamicCache
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
        if threads:
            torch.set_num_threads(threads)
        try:
            self.model = AutoModelForCausalLM.from_pretrained(str(path), dtype=getattr(torch, dtype))
        except (OSError, ValueError) as exc:
            raise DraftModelError(f"cannot load the draft model {path}: {str(exc).splitlines()[0]}") from None
        self.model.eval()
        self.vocab_size = int(self.model.config.vocab_size)
        self._new_cache = lambda: DynamicCache(config=self.model.config)
        self.cache = self._new_cache()
        self.seen: list[int] = []  # the tokens in self.cache, in order
        self.torch = torch

    def propose(self, tokens: list[int], k: int, sampling=None, generator=None) -> tuple[list[int], list]:
        """Up to ``k`` guesses at what follows ``tokens`` (the session's whole text), and
        for sampled ones the distribution (``DraftDist``) each was drawn from."""
        if k <= 0 or not tokens:
            return [], []
        from ..node.sampling import probabilities
        from ..protocol.messages import DraftDist

        sampled = sampling is not None and sampling.temperature > 0
        dists: list = []
        torch = self.torch
        common = 0
        for a, b in zip(self.seen, tokens):
            if a != b:
                break
            common += 1
        common = min(common, len(tokens) - 1)  # feed at least the last token to get its logits
        if common < len(self.seen):
            if common == 0:
                self.cache = self._new_cache()
            else:
                self.cache.crop(common - len(self.seen))
            self.seen = self.seen[:common]
        guesses: list[int] = []
        feed = tokens[common:]
        with torch.inference_mode():
            for _ in range(k):
                ids = torch.tensor([feed])
                out = self.model(input_ids=ids, cache=self.cache, use_cache=True)
                self.seen += feed
                logits = out.logits[0, -1].float()
                if sampled:
                    q = probabilities(logits, sampling)
                    top = torch.topk(q, min(SUPPORT, q.numel()))
                    enough = int(torch.searchsorted(top.values.cumsum(0), MASS)) + 1
                    keep = (top.values > 0) & (torch.arange(top.values.numel()) < enough)
                    probs = top.values[keep].double()
                    probs = probs / probs.sum()
                    ids = top.indices[keep]
                    token = int(ids[torch.multinomial(probs.float(), 1, generator=generator)])
                    dists.append(DraftDist(ids=ids.tolist(), probs=probs.tolist()))
                else:
                    token = int(torch.argmax(logits))
                guesses.append(token)
                feed = [token]
        return guesses, dists
