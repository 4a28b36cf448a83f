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


@dataclass
class Slot:
    """One piece of a pass: ``count`` positions of ``work`` from ``offset``."""

    work: Work
    offset: int
    count: int

    @property
    def ends_step(self) -> bool:
        return self.offset + self.count == self.work.msg.count


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
        decodes = [w for w in heads.values() if w.left == 1]
        prompts = [w for w in heads.values() if w.left > 1]
        batch = [Slot(w, w.done, 1) for w in decodes[: self.max_batch]]
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
    streams keep their pace on any hardware (a GPU takes far longer chunks than a CPU)."""

    def __init__(self, fixed: int = 0, ratio: float = 1.5, initial: int = 64, low: int = MIN_PIECE, high: int = 4096):
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

    def size(self, alone: bool) -> int:
        """``alone``: no other session holds a cache here, so nobody waits on this prompt."""
        if self.fixed:
            return self.fixed
        if alone:
            return self.high
        if self.decode_s is None or self.token_s is None:
            return self.initial
        return int(min(self.high, max(self.low, self.ratio * self.decode_s / self.token_s)))
