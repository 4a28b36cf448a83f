"""``--draft-model``: a small model on the consumer's own machine guesses the next tokens,
and the pipeline verifies them in one step (``Client.generate_drafted``).

The draft model keeps its own KV cache of the text so far. Each call brings it in step
with the session's tokens (dropping its own rejected guesses, feeding what is new) and
then decodes ``k`` tokens greedily. A greedy guess is a draw from a distribution with all
its mass on one token, which is what the last node's speculative sampling assumes, so the
output's distribution is the big model's whatever the draft model says.
"""

from __future__ import annotations

from pathlib import Path


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

    def propose(self, tokens: list[int], k: int) -> list[int]:
        """Up to ``k`` greedy guesses at what follows ``tokens`` (the session's whole text)."""
        if k <= 0 or not tokens:
            return []
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
                token = int(torch.argmax(out.logits[0, -1]))
                guesses.append(token)
                feed = [token]
        return guesses
