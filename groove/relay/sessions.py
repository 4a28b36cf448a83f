"""Relay-side session state: the chain, the token history, and the turn in progress.

The relay keeps every session's token ids (cheap), which is what lets a later turn send
only new tokens, and lets a session be replayed onto another chain.
"""

from __future__ import annotations

import secrets
import time
from dataclasses import dataclass, field

from ..drafting.length import DraftLength
from ..drafting.ngram import NgramDrafter
from ..protocol.messages import Sampling


@dataclass
class Turn:
    step: int  # seq of the step in flight; Results with another seq are stale
    max_tokens: int
    generated: int = 0
    want_logits: bool = False
    ignore_eos: bool = False
    speculative: str = ""  # "ngram": the relay drafts every step
    given: list[int] = field(default_factory=list)  # the consumer's drafts, for the first step
    given_dists: list = field(default_factory=list)  # and the distributions it drew them from
    one_step: bool = False  # the consumer drives: the turn ends after one step
    drafts: list[int] = field(default_factory=list)  # the guesses in the step in flight
    fed_at: float | None = None  # when the step in flight (a decode step) went out: what guessing costs is timed


@dataclass
class Session:
    id: str
    consumer: str  # consumer connection id
    model: str
    fingerprint: str
    chain: list[str]  # node ids, in layer order
    vocab_size: int
    sampling: Sampling = field(default_factory=Sampling)
    tokens: list[int] = field(default_factory=list)
    processed: int = 0  # tokens already sent into the pipeline (in every node's cache)
    turn: Turn | None = None
    next_seq: int = 1
    # Steps numbered below this were sent to a chain that has since been replaced: their
    # frames are dropped wherever they turn up.
    first_live_seq: int = 0
    failovers: int = 0
    ngrams: NgramDrafter | None = None
    draft_length: DraftLength | None = None
    last_used: float = field(default_factory=time.monotonic)

    def take_seq(self) -> int:
        seq = self.next_seq
        self.next_seq += 1
        return seq


class SessionTable:
    def __init__(self) -> None:
        self.sessions: dict[str, Session] = {}

    @staticmethod
    def new_id() -> str:
        return secrets.token_urlsafe(16)

    def add(self, s: Session) -> None:
        self.sessions[s.id] = s

    def get(self, sid: str) -> Session | None:
        return self.sessions.get(sid)

    def remove(self, sid: str) -> Session | None:
        return self.sessions.pop(sid, None)

    def of_consumer(self, conn: str) -> list[Session]:
        return [s for s in self.sessions.values() if s.consumer == conn]

    def using_node(self, node_id: str) -> list[Session]:
        return [s for s in self.sessions.values() if node_id in s.chain]
