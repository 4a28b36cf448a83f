"""Prompt lookup: guess that the text goes on as it did after the last time its final
few tokens appeared. Free (no model), and right surprisingly often on code, lists, quoted
text and anything that repeats itself.

Pure code on token ids, kept incrementally: each new token is filed once, so a lookup
costs a few dictionary reads however long the session grows.
"""

from __future__ import annotations


class NgramDrafter:
    def __init__(self, max_n: int = 3, min_n: int = 1):
        self.max_n, self.min_n = max_n, min_n
        # n-gram -> the position just after its latest occurrence that has a continuation
        self.index: dict[tuple[int, ...], int] = {}
        self.seen = 0

    def _update(self, tokens: list[int]) -> None:
        if len(tokens) < self.seen:  # a different history: start over
            self.index.clear()
            self.seen = 0
        for i in range(max(self.seen, 1), len(tokens)):
            for n in range(self.min_n, min(self.max_n, i) + 1):
                self.index[tuple(tokens[i - n : i])] = i
        self.seen = len(tokens)

    def propose(self, tokens: list[int], k: int) -> list[int]:
        """Up to ``k`` guesses for what follows ``tokens`` (the whole history so far, which
        only ever grows between calls); [] when its ending has not been seen before."""
        self._update(tokens)
        if k <= 0:
            return []
        for n in range(min(self.max_n, len(tokens)), self.min_n - 1, -1):
            pos = self.index.get(tuple(tokens[len(tokens) - n :]))
            if pos is None:
                continue
            drafts: list[int] = []
            for j in range(k):
                # The copy may run into the text it is producing (a repeating pattern whose
                # last repeat is still short): it then copies its own guesses, as LZ77 does.
                src = pos + j
                drafts.append(tokens[src] if src < len(tokens) else drafts[src - len(tokens)])
            return drafts
        return []
