"""How many tokens to draft for the next step, from how the last drafts fared.

A verified guess saves a whole trip round the pipeline; a wrong one costs a little compute
on every node (its row of the forward pass). So guess more while guesses hold, fewer when
they fail, and none for a while when even one guess keeps failing: on text that does not
repeat, decoding then runs as it would without speculation.
"""

from __future__ import annotations

START = 4
MOST = 8
LONGEST_PAUSE = 64


class DraftLength:
    def __init__(self, fixed: int = 0, start: int = START, most: int = MOST):
        self.fixed = fixed  # --draft-tokens K: always K
        self.most = max(most, fixed)
        self.k = fixed or start
        self.pause = 0  # steps left without drafts
        self.backoff = 0  # the next pause
        self.drafted = 0
        self.accepted = 0

    def next(self) -> int:
        if self.fixed:
            return self.fixed
        if self.pause > 0:
            self.pause -= 1
            return 0
        return self.k

    def observe(self, drafted: int, accepted: int) -> None:
        if drafted == 0:
            return
        self.drafted += drafted
        self.accepted += accepted
        if self.fixed:
            return
        if accepted == drafted:
            self.k = min(self.k + 2, self.most)
        else:
            self.k = max(1, self.k - 1)
        if accepted:
            self.backoff = self.pause = 0
        elif self.k == 1:
            self.backoff = min(max(2 * self.backoff, 4), LONGEST_PAUSE)
            self.pause = self.backoff

    @property
    def rate(self) -> float | None:
        return self.accepted / self.drafted if self.drafted else None
