"""How many tokens to draft for the next step, from how the last drafts fared and what
they cost.

A kept guess saves a whole step round the pipeline; every guess, kept or not, costs a row
of the forward pass on every node (and, with a draft model, a pass of that model). Which
wins depends on the link and the hardware: over 20 ms links a step costs about 80 ms more
than its compute, so even a poor guess pays; on one machine with float32 nodes a guessed
row costs about as much as a whole decode step, so only near-certain guesses do. So the
drafter measures both sides, per session:

- ``plain_s``: the time of a step without guesses (relay to relay, or consumer to consumer);
- ``extra_s``: what each guess adds to it;
- ``accept``: the chance that a guess holds, given the ones before it did.

and picks the length ``k`` with the most tokens per second, expected tokens per step
``(1 - a^(k+1)) / (1 - a)`` over ``plain_s + k * extra_s``. Zero means guessing does not pay:
it then stops for a while (4 steps, doubling up to 64) and tries again, so the estimates
follow the text and the load. Until both costs are measured it starts at 4 guesses, grows
by 2 (up to 8) while all hold and shrinks by 1 when one fails.

A seeded sampling session uses that rule alone (``timed=False``): the guesses decide how
the seeded generator is consumed, so lengths that followed the clock would make the same
seed give other text on another run.
"""

from __future__ import annotations

START = 4
MOST = 8
LIMIT = 32  # guesses one step may carry (the relay refuses more)
LONGEST_PAUSE = 64
REMEASURE = 32  # steps between plain steps taken only to time one (the load changes)
DECAY = 0.8  # weight of the past in the running estimates


class DraftLength:
    def __init__(self, fixed: int = 0, start: int = START, most: int = MOST, timed: bool = True):
        self.fixed = fixed  # --draft-tokens K: always K
        self.use_clock = timed
        self.most = max(most, fixed)
        self.k = fixed or start
        self.pause = 0  # steps left without drafts
        self.backoff = 0  # the next pause
        self.probe = False  # after a pause: guess once whatever the estimates say, to refresh them
        self.drafted = 0
        self.accepted = 0
        self.plain_s: float | None = None
        self.extra_s: float | None = None
        self.held = 0.0  # decayed counts of guesses that held and of guesses tried
        self.tried = 0.0
        self.since_plain = 0  # steps with guesses since the last one without
        self.timed: list[tuple[int, float]] = []  # (guesses, seconds) of steps waiting for plain_s

    def next(self) -> int:
        if self.fixed:
            return self.fixed
        if self.pause > 0:
            self.pause -= 1
            if self.pause == 0:
                self.probe = True
            return 0
        if (self.timed and self.plain_s is None) or (self.extra_s is not None and self.since_plain >= REMEASURE):
            return 0  # time a step without guesses: what a guess adds is measured against it
        if self.probe or self.plain_s is None or self.extra_s is None or not self.tried:
            return self.k
        best = self.best()
        if best == 0:
            self.backoff = min(max(2 * self.backoff, 4), LONGEST_PAUSE)
            self.pause = self.backoff
        return best

    def best(self) -> int:
        a = min(self.held / self.tried, 0.999)
        rates = [((1 - a ** (k + 1)) / (1 - a)) / (self.plain_s + k * self.extra_s) for k in range(self.most + 1)]
        return max(range(self.most + 1), key=lambda k: (rates[k], -k))

    def observe(self, drafted: int, accepted: int, seconds: float | None = None) -> None:
        """A step came back: ``drafted`` guesses went with it, ``accepted`` held, and it
        took ``seconds`` (None: not timed)."""
        if not self.use_clock:
            seconds = None
        if drafted == 0:
            self.since_plain = 0
            if seconds is not None:
                self.plain_s = seconds if self.plain_s is None else DECAY * self.plain_s + (1 - DECAY) * seconds
            return
        self.drafted += drafted
        self.accepted += accepted
        self.since_plain += 1
        if self.fixed:
            return
        self.probe = False
        if seconds is not None:
            self.timed.append((drafted, seconds))
        if self.plain_s is not None:
            for n, t in self.timed:  # steps timed before a plain one was
                extra = max(t - self.plain_s, 0.0) / n
                self.extra_s = extra if self.extra_s is None else DECAY * self.extra_s + (1 - DECAY) * extra
            self.timed.clear()
        # Guesses are tried in order until one fails: those kept held, and the first
        # rejected one (if any) did not.
        self.held = DECAY * self.held + accepted
        self.tried = DECAY * self.tried + accepted + (accepted < drafted)
        if accepted == drafted:
            self.k = min(self.k + 2, self.most)
        else:
            self.k = max(1, self.k - 1)
        if accepted:
            self.backoff = self.pause = 0
        elif self.k == 1 and (self.plain_s is None or self.extra_s is None):
            self.backoff = min(max(2 * self.backoff, 4), LONGEST_PAUSE)
            self.pause = self.backoff

    @staticmethod
    def clocked(sampling) -> bool:
        """Whether a session's lengths may follow step timings: not for seeded sampling."""
        return not (sampling is not None and sampling.temperature > 0 and sampling.seed is not None)

    @property
    def rate(self) -> float | None:
        return self.accepted / self.drafted if self.drafted else None
