"""Which waiting steps go into a node's next forward pass: continuous batching.

Steps of any sessions wait in one queue in arrival order. Each pass takes every session's
next decode step (they cost little more together than alone) plus prompt tokens up to the
chunk budget, oldest prompt first; a long prompt goes through in chunks over several passes,
so it never holds up the sessions that are streaming. Sessions join and leave between
passes; nothing waits for a batch to drain. A session has at most one piece in a pass, and
its pieces run in the order they arrived.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass

from ..protocol.messages import Forward


# Prompt pieces are at least this long (unless the whole step is shorter). Kernels switch
# paths at small sizes: CPU attention below 16 rows, and a one-row matmul rounds unlike a
# many-row one, so shorter pieces would round a prompt differently from the same prompt
# taken whole.
MIN_PIECE = 16


@dataclass
class Work:
    msg: Forward
    payload: memoryview | bytes = b""
    done: int = 0  # positions of the step already run

    @property
    def session(self) -> str:
        return self.msg.session

    @property
    def left(self) -> int:
        return self.msg.count - self.done

    @property
    def decode(self) -> bool:
        """A decode step: one token, or one token and guesses at the next (never split)."""
        return self.left == 1 or bool(self.msg.drafts)


@dataclass
class Slot:
    """One piece of a pass: ``count`` positions of ``work`` from ``offset``."""

    work: Work
    offset: int
    count: int

    @property
    def ends_step(self) -> bool:
        return self.offset + self.count == self.work.msg.count

    @property
    def decode(self) -> bool:
        return self.count == 1 or bool(self.work.msg.drafts)


class Scheduler:
    def __init__(self, max_batch: int = 64):
        self.max_batch = max_batch
        self.queue: deque[Work] = deque()

    def __bool__(self) -> bool:
        return bool(self.queue)

    def add(self, work: Work) -> None:
        self.queue.append(work)

    def drop(self, session: str) -> None:
        self.queue = deque(w for w in self.queue if w.session != session)

    def next_batch(self, chunk: int) -> list[Slot]:
        heads: dict[str, Work] = {}  # each session's oldest waiting work: the only one that may run
        for w in self.queue:
            heads.setdefault(w.session, w)
        decodes = [w for w in heads.values() if w.decode]
        prompts = [w for w in heads.values() if not w.decode]
        batch = [Slot(w, w.done, w.left) for w in decodes[: self.max_batch]]
        budget = chunk
        for w in prompts:
            if budget <= 0 or len(batch) >= self.max_batch:
                break
            n = max(min(w.left, budget), min(w.left, MIN_PIECE))
            if w.left - n < MIN_PIECE:
                n = w.left  # no stub of a few rows left for later
            batch.append(Slot(w, w.done, n))
            budget -= n
        return batch

    def finish(self, batch: list[Slot]) -> None:
        for slot in batch:
            slot.work.done += slot.count
        self.queue = deque(w for w in self.queue if w.left > 0)


class ChunkSizer:
    """``--prefill-chunk auto``: prompt tokens per pass such that a pass costs about
    ``ratio`` decode passes more than a decode pass alone, from the node's own timings, so
    streams keep their pace on any hardware (a GPU takes far longer chunks than a CPU). A
    decode step arriving mid-pass waits for that pass and then its own, so a streaming
    session feels a chunk about twice per node: half a decode pass keeps it near 2x."""

    def __init__(self, fixed: int = 0, ratio: float = 0.5, initial: int = 64, low: int = MIN_PIECE, high: int = 4096):
        self.fixed = fixed
        self.ratio, self.initial, self.low, self.high = ratio, initial, low, high
        self.decode_s: float | None = None  # a pass of decode steps only
        self.token_s: float | None = None  # each prompt token a pass adds

    def observe(self, seconds: float, prompt_tokens: int) -> None:
        if prompt_tokens == 0:
            self.decode_s = seconds if self.decode_s is None else 0.8 * self.decode_s + 0.2 * seconds
        elif self.decode_s is not None:
            per_token = max(seconds - self.decode_s, 1e-6) / prompt_tokens
            self.token_s = per_token if self.token_s is None else 0.8 * self.token_s + 0.2 * per_token

    def fit(self, due_in: float | None) -> int | None:
        """The longest chunk whose pass ends within ``due_in`` seconds: None when nothing is
        due or the costs are not known yet, 0 when not even the shortest chunk fits."""
        if due_in is None or self.decode_s is None or self.token_s is None:
            return None
        n = int((due_in - self.decode_s) / self.token_s)
        return 0 if n < self.low else min(n, self.high)

    def size(self, alone: bool) -> int:
        """``alone``: no other session holds a cache here, so nobody waits on this prompt."""
        if self.fixed:
            return self.fixed
        if alone:
            return self.high
        if self.decode_s is None or self.token_s is None:
            return self.initial
        return int(min(self.high, max(self.low, self.ratio * self.decode_s / self.token_s)))


class Arrivals:
    """When each streaming session's next step is due back at this node, from how long its
    previous round trip took (through the other nodes and the relay). A node that knows a
    step is due shortly does not start a prompt chunk that would make it wait: it fits the
    chunk into the time left, or waits for the step when not even a small chunk fits."""

    def __init__(self) -> None:
        self.sent: dict[str, float] = {}
        self.rtt: dict[str, float] = {}

    def left(self, session: str, now: float, more: bool) -> None:
        if more:
            self.sent[session] = now
        else:
            self.sent.pop(session, None)

    def arrived(self, session: str, now: float) -> None:
        t = self.sent.pop(session, None)
        if t is not None:
            r = now - t
            self.rtt[session] = r if session not in self.rtt else 0.7 * self.rtt[session] + 0.3 * r

    def forget(self, session: str) -> None:
        self.sent.pop(session, None)
        self.rtt.pop(session, None)

    def expected(self, now: float) -> list[str]:
        """Sessions whose next step is on its way: not overdue past twice its round trip
        (a second, before one is measured), after which it probably ended at EOS."""
        return [s for s, t in self.sent.items() if now - t < (2 * self.rtt[s] if s in self.rtt else 1.0)]

    def due_in(self, now: float) -> float | None:
        """Seconds until the next expected step; None if none is expected. A step overdue by
        more than its own round trip (the session stopped at EOS elsewhere) is not waited for."""
        waits = [t + self.rtt[s] - now for s, t in self.sent.items() if s in self.rtt and now - t < 2 * self.rtt[s]]
        return min(waits) if waits else None
