"""The relay's logic, Sans-I/O: frames in, frames out, no sockets.

``Relay.receive(conn, frame)`` returns the frames to send and to which connection. The
server (``server.py``) only moves bytes. The path of one generated token reads top to
bottom: the last node's RESULT is passed to the consumer unchanged, and its token goes
straight back to the first node as the next FORWARD, without a round trip to the consumer.
Hidden-state FORWARDs between nodes are passed on as the same bytes: the relay reads the
header only and never touches a tensor.
"""

from __future__ import annotations

import logging
import secrets
import time
from dataclasses import dataclass

from .. import __version__
from ..protocol import errors as E
from ..protocol.errors import ProtocolError
from ..protocol.framing import DEFAULT_MAX_FRAME_BYTES, decode, encode
from ..protocol.tensors import WIRE_DTYPES, check_payload
from ..protocol.messages import (
    Cancel,
    CloseSession,
    Error,
    Forward,
    Generate,
    Heartbeat,
    Hello,
    Message,
    NodeRegister,
    OpenSession,
    PipelineConfig,
    Placement,
    PlacementRequest,
    Range,
    Registered,
    Result,
    SessionOpened,
    TokenizerFiles,
    TurnEnd,
    Welcome,
)
from ..drafting.length import LIMIT, DraftLength
from ..drafting.ngram import NgramDrafter
from ..models.checkpoint import TOKENIZER_PATTERNS
from .placement import PlacementError, Shape, place
from .auth import Tokens
from .metrics import TokenRate
from .planner import coverage, explain_gap, plan
from .registry import NodeInfo, Registry
from .sessions import Session, SessionTable, Turn

log = logging.getLogger("groove.relay")

MAX_NEW_TOKENS = 1 << 16
MAX_DRAFT_TOKENS = LIMIT
MAX_DRAFT_SUPPORT = 256  # tokens in a sampled guess's distribution


@dataclass
class Send:
    conn: str
    frame: bytes
    close: bool = False  # close the connection once this frame is sent


@dataclass
class Peer:
    conn: str
    role: str = ""  # "" until HELLO, then "node" or "consumer"
    id: str = ""
    connected_at: float = 0.0


class Relay:
    def __init__(self, max_frame: int = DEFAULT_MAX_FRAME_BYTES, max_sessions_per_consumer: int = 64,
                 node_timeout: float = 5.0, session_ttl: float = 600.0, auth: Tokens | None = None,
                 handshake_timeout: float = 10.0, max_session_tokens: int = 32768, speculative: str = "") -> None:
        self.registry = Registry()
        self.sessions = SessionTable()
        self.peers: dict[str, Peer] = {}
        self.max_frame = max_frame
        self.max_sessions_per_consumer = max_sessions_per_consumer
        self.started = time.time()
        self.failovers = 0
        self.sessions_opened = 0
        self.tokens_generated = 0
        self.drafted = 0  # speculative guesses sent to be verified, and those kept
        self.accepted = 0
        self.speculative = speculative  # the HTTP API's default ("ngram" or "")
        self.token_rate = TokenRate()
        self.node_timeout = node_timeout
        self.session_ttl = session_ttl
        self.auth = auth  # None: --insecure-open
        self.handshake_timeout = handshake_timeout
        self.max_session_tokens = max_session_tokens
        # Ranges handed to --layers auto nodes that are still loading: (model, fingerprint,
        # first, last, expiry). They count as served, so two nodes starting together split
        # the model instead of both taking the same gap.
        self.reservations: list[tuple[str, str, int, int, float]] = []
        # Tokenizer files per (model, fingerprint), sent once by a node that has them, for
        # the HTTP API (which tokenizes in the relay); dropped with the last such node.
        self.tokenizer_files: dict[tuple[str, str], dict[str, bytes]] = {}

    # --- connections ------------------------------------------------------------------

    def connect(self, conn: str) -> None:
        self.peers[conn] = Peer(conn, connected_at=time.monotonic())

    def connect_local(self, conn: str) -> None:
        """A consumer inside the relay process (the HTTP API, authorized by the server):
        it skips the HELLO and otherwise goes through exactly the same path as any other."""
        self.peers[conn] = Peer(conn, role="consumer", id="c-" + secrets.token_hex(4), connected_at=time.monotonic())

    def disconnect(self, conn: str) -> list[Send]:
        peer = self.peers.pop(conn, None)
        out: list[Send] = []
        if peer is None:
            return out
        if peer.role == "consumer":
            for s in self.sessions.of_consumer(conn):
                out += self._close_session(s)
        elif peer.role == "node":
            node = self.registry.remove(peer.id)
            if node is not None:
                log.warning("node %s (%s layers %d-%d) lost", node.id, node.model, node.first, node.last)
                for s in self.sessions.using_node(node.id):
                    out += self._failover(s, node)
                if not self.registry.serving(node.model, node.fingerprint):
                    self.tokenizer_files.pop((node.model, node.fingerprint), None)
        return out

    def _failover(self, s: Session, lost: NodeInfo) -> list[Send]:
        """Move a session off a lost node: plan a new chain among the survivors, and replay
        the session's tokens through it so its caches are rebuilt; the turn in progress
        carries on from the step that was lost. Greedy output is unchanged."""
        survivors = self.registry.serving(s.model, s.fingerprint)
        chain = plan(survivors, lost.num_layers) if survivors else None
        if chain is None:
            text, missing = explain_gap(survivors, lost.num_layers) if survivors else (f"layers 0-{lost.num_layers - 1} are not served by any node", [[0, lost.num_layers - 1]])
            error = self._error(s.consumer, E.NODE_LOST, f"node {lost.id} serving layers {lost.first}-{lost.last} of {s.model} was lost "
                                f"and no other node can take over: {text}", session=s.id, missing=[Range(a, b) for a, b in missing])
            return [error, *self._close_session(s, skip=lost.id)]
        out = []
        for node_id in s.chain:  # survivors of the old chain drop the session's caches
            node = self.registry.nodes.get(node_id)
            if node is not None:
                node.sessions.discard(s.id)
                out.append(Send(node.conn, encode(CloseSession(session=s.id))))
        s.chain = [n.id for n in chain]
        out += self._configure(s, chain)
        s.processed = 0
        s.failovers += 1
        self.failovers += 1
        s.first_live_seq = s.next_seq
        log.warning("session %s moved to %s after losing %s; replaying %d tokens", s.id[:8], s.chain, lost.id, len(s.tokens))
        if s.turn is not None:
            s.turn.step = s.take_seq()
            out.append(self._feed(s))
        return out

    def _configure(self, s: Session, chain: list[NodeInfo]) -> list[Send]:
        out = []
        machines = len({n.machine or n.id for n in chain})
        for i, node in enumerate(chain):
            node.sessions.add(s.id)
            out.append(Send(node.conn, encode(PipelineConfig(session=s.id, position=i, length=len(chain), sampling=s.sampling,
                                                             groups=machines))))
        return out

    def tick(self, now: float | None = None) -> tuple[list[Send], list[str]]:
        """Called periodically: nodes silent past the timeout are treated as lost (their
        sessions fail over), idle sessions past the TTL are closed. Returns the frames to
        send and the connections to close."""
        now = time.monotonic() if now is None else now
        out: list[Send] = []
        dead = [n.conn for n in self.registry.nodes.values() if now - n.last_seen > self.node_timeout]
        for conn in dead:
            log.warning("no heartbeat from %s for %.1fs", self.peers[conn].id if conn in self.peers else conn, self.node_timeout)
            out += self.disconnect(conn)
        silent = [p.conn for p in self.peers.values() if not p.role and now - p.connected_at > self.handshake_timeout]
        for conn in silent:
            log.warning("closing %s: no hello within %.0fs", conn, self.handshake_timeout)
            dead.append(conn)
            out += self.disconnect(conn)
        for s in list(self.sessions.sessions.values()):
            if s.turn is None and now - s.last_used > self.session_ttl:
                out.append(self._error(s.consumer, E.EXPIRED, f"session idle for more than {self.session_ttl:.0f}s was closed", session=s.id))
                out += self._close_session(s)
        return out, dead

    # --- frames -----------------------------------------------------------------------

    def receive(self, conn: str, frame: bytes) -> list[Send]:
        peer = self.peers.get(conn)
        if peer is None:
            return []
        if peer.role == "node" and peer.id in self.registry.nodes:
            self.registry.nodes[peer.id].last_seen = time.monotonic()  # any frame proves it is alive
        try:
            msg, payload = decode(frame, self.max_frame)
        except ProtocolError as exc:
            return [self._error(conn, exc.code, exc.message)]
        handler = self._handler(peer, msg)
        if handler is None:
            role = peer.role or "an unidentified peer (send hello first)"
            return [self._error(conn, E.BAD_REQUEST, f"message type {type(msg).__name__.lower()} is not accepted from {role}", ref=msg.id, session=msg.session)]
        try:
            return handler(peer, msg, frame, payload)
        except ProtocolError as exc:
            return [self._error(conn, exc.code, exc.message, ref=msg.id, session=msg.session)]

    def _handler(self, peer: Peer, msg: Message):
        table = {
            "": {Hello: self._on_hello},
            "node": {PlacementRequest: self._on_placement, NodeRegister: self._on_register, TokenizerFiles: self._on_tokenizer, Heartbeat: self._on_heartbeat, Forward: self._on_forward, Result: self._on_result, Error: self._on_node_error},
            "consumer": {OpenSession: self._on_open, Generate: self._on_generate, Cancel: self._on_cancel, CloseSession: self._on_close},
        }
        return table[peer.role].get(type(msg))

    def _on_hello(self, peer: Peer, msg: Hello, frame, payload) -> list[Send]:
        if self.auth is not None and not self.auth.allows(msg.role, msg.token):
            other = "consumer" if msg.role == "node" else "node"
            why = (f"a {other} token cannot connect as a {msg.role}" if self.auth.allows(other, msg.token)
                   else f"missing or wrong {msg.role} token" + ("" if msg.token else " (pass --token)"))
            error = Error(id=msg.id, code=E.UNAUTHORIZED, message=f"not authorized: {why}", fatal=True)
            return [Send(peer.conn, encode(error), close=True)]
        peer.role = msg.role
        peer.id = ("n-" if msg.role == "node" else "c-") + secrets.token_hex(4)
        return [Send(peer.conn, encode(Welcome(id=msg.id, peer_id=peer.id, relay_software=f"groove {__version__}")))]

    def _on_placement(self, peer: Peer, msg: PlacementRequest, frame, payload) -> list[Send]:
        if len(msg.layer_bytes) != msg.num_layers or msg.num_layers < 1:
            raise ProtocolError(E.BAD_REQUEST, f"{len(msg.layer_bytes)} layer sizes for a model of {msg.num_layers} layers")
        now = time.monotonic()
        self.reservations = [r for r in self.reservations if r[4] > now]
        served = [(n.first, n.last) for n in self.registry.serving(msg.model, msg.fingerprint)]
        served += [(a, b) for m, fp, a, b, _ in self.reservations if (m, fp) == (msg.model, msg.fingerprint)]
        try:
            first, last = place(Shape(msg.num_layers, msg.layer_bytes, msg.embed_bytes, msg.head_bytes), msg.max_memory, served)
        except PlacementError as exc:
            return [self._error(peer.conn, E.REJECTED, str(exc), ref=msg.id, fatal=True)]
        self.reservations.append((msg.model, msg.fingerprint, first, last, now + 300))
        log.info("placing a node of %s on layers %d-%d", msg.model, first, last)
        return [Send(peer.conn, encode(Placement(id=msg.id, layers=Range(first, last))))]

    def _on_register(self, peer: Peer, msg: NodeRegister, frame, payload) -> list[Send]:
        if self.registry.nodes.get(peer.id):
            raise ProtocolError(E.BAD_REQUEST, "this connection has already registered a node")
        first, last = msg.layers.first, msg.layers.last
        if not (0 <= first <= last < msg.num_layers):
            return [self._error(peer.conn, E.REJECTED, f"layer range {first}-{last} is outside a model of {msg.num_layers} layers", ref=msg.id, fatal=True)]
        for other in self.registry.serving(msg.model):
            if other.fingerprint != msg.fingerprint:
                log.warning("node %s serves %s with fingerprint %s, unlike node %s (%s): they will never share a pipeline",
                            peer.id, msg.model, msg.fingerprint, other.id, other.fingerprint)
                break
        node = NodeInfo(
            id=peer.id, conn=peer.conn, model=msg.model, fingerprint=msg.fingerprint, num_layers=msg.num_layers,
            first=first, last=last, device=msg.device, dtype=msg.dtype, hidden_size=msg.hidden_size,
            vocab_size=msg.vocab_size, weights=msg.weights, kernels=list(msg.kernels), load_s=msg.load_s, rss_bytes=msg.rss_bytes, peak_rss_bytes=msg.peak_rss_bytes,
            max_positions=msg.max_positions, machine=msg.machine,
        )
        self.registry.add(node)
        taken = next((r for r in self.reservations if r[:4] == (node.model, node.fingerprint, first, last)), None)
        if taken is not None:
            self.reservations.remove(taken)
        log.info("node %s registered: %s layers %d-%d on %s/%s", node.id, node.model, first, last, node.device, node.dtype)
        want = bool(msg.tokenizer_digest) and (node.model, node.fingerprint) not in self.tokenizer_files
        return [Send(peer.conn, encode(Registered(id=msg.id, node_id=node.id, send_tokenizer=want)))]

    def _on_tokenizer(self, peer: Peer, msg: TokenizerFiles, frame, payload) -> list[Send]:
        node = self.registry.nodes.get(peer.id)
        if node is None or (node.model, node.fingerprint) != (msg.model, msg.fingerprint):
            raise ProtocolError(E.BAD_REQUEST, "tokenizer files must follow this node's registration, for its own model")
        unknown = sorted(set(msg.files) - set(TOKENIZER_PATTERNS))
        if unknown:
            raise ProtocolError(E.BAD_REQUEST, f"unexpected tokenizer file names {unknown[:3]}")
        self.tokenizer_files.setdefault((msg.model, msg.fingerprint), dict(msg.files))
        return []

    def _on_heartbeat(self, peer: Peer, msg: Heartbeat, frame, payload) -> list[Send]:
        node = self.registry.nodes.get(peer.id)
        if node is not None:
            node.tokens_processed = msg.tokens_processed
            node.cached_sessions = msg.sessions
            node.compute_s = msg.compute_s
            node.steps = msg.steps
            node.pieces = msg.pieces
            node.rss_bytes, node.peak_rss_bytes = msg.rss_bytes, msg.peak_rss_bytes
        return []

    # --- sessions ---------------------------------------------------------------------

    def _on_open(self, peer: Peer, msg: OpenSession, frame, payload) -> list[Send]:
        if len(self.sessions.of_consumer(peer.conn)) >= self.max_sessions_per_consumer:
            raise ProtocolError(E.BUSY, f"this connection already has {self.max_sessions_per_consumer} open sessions")
        s = msg.sampling
        if not (0 <= s.temperature <= 100 and 0 <= s.top_p <= 1 and s.top_k >= 0):
            raise ProtocolError(E.BAD_REQUEST, f"sampling parameters out of range: temperature {s.temperature}, top_p {s.top_p}, top_k {s.top_k}")
        candidates = self.registry.serving(msg.model, msg.fingerprint or None)
        if not candidates:
            served = sorted({n.model for n in self.registry.nodes.values()})
            detail = f"fingerprint {msg.fingerprint} of " if msg.fingerprint and self.registry.serving(msg.model) else ""
            raise ProtocolError(E.UNKNOWN_MODEL, f"no node serves {detail}model {msg.model!r} (served: {', '.join(served) or 'none'})")
        groups: dict[str, list[NodeInfo]] = {}
        for n in candidates:
            groups.setdefault(n.fingerprint, []).append(n)
        chain, reasons = None, []
        for fp, nodes in groups.items():
            chain = plan(nodes, nodes[0].num_layers)
            if chain:
                break
            reasons.append(explain_gap(nodes, nodes[0].num_layers))
        if chain is None:
            text, missing = reasons[0]
            return [self._error(peer.conn, E.NO_PIPELINE, f"no complete pipeline for {msg.model}: {text}", ref=msg.id, missing=[Range(a, b) for a, b in missing])]
        sid = self.sessions.new_id()
        head = chain[0]
        session = Session(id=sid, consumer=peer.conn, model=msg.model, fingerprint=head.fingerprint,
                          chain=[n.id for n in chain], vocab_size=chain[-1].vocab_size, sampling=msg.sampling)
        self.sessions.add(session)
        self.sessions_opened += 1
        out = self._configure(session, chain)
        out.append(Send(peer.conn, encode(SessionOpened(
            id=msg.id, session=sid, model=msg.model, fingerprint=head.fingerprint,
            pipeline=[n.id for n in chain], ranges=[Range(n.first, n.last) for n in chain]))))
        return out

    def _own_session(self, peer: Peer, msg) -> Session:
        s = self.sessions.get(msg.session)
        if s is None or s.consumer != peer.conn:
            raise ProtocolError(E.UNKNOWN_SESSION, f"no session {msg.session!r} on this connection")
        return s

    def _on_generate(self, peer: Peer, msg: Generate, frame, payload) -> list[Send]:
        s = self._own_session(peer, msg)
        if s.turn is not None:
            raise ProtocolError(E.BUSY, "a generation is already running in this session; cancel it first")
        if not 1 <= msg.max_tokens <= MAX_NEW_TOKENS:
            raise ProtocolError(E.BAD_REQUEST, f"max_tokens must be between 1 and {MAX_NEW_TOKENS}, got {msg.max_tokens}")
        bad = [t for t in msg.tokens if not 0 <= t < s.vocab_size]
        if bad:
            raise ProtocolError(E.BAD_REQUEST, f"token ids {bad[:5]} are outside the vocabulary of {s.vocab_size}")
        total = len(s.tokens) + len(msg.tokens) + msg.max_tokens
        if total > self.max_session_tokens:
            raise ProtocolError(E.TOO_LARGE, f"the session would reach {total} tokens, over this relay's limit of {self.max_session_tokens}")
        self._check_speculation(s, msg)
        if s.processed == len(s.tokens) + len(msg.tokens):
            raise ProtocolError(E.BAD_REQUEST, "nothing to process: send at least one token")
        s.tokens.extend(msg.tokens)
        s.turn = Turn(step=s.take_seq(), max_tokens=msg.max_tokens, want_logits=msg.want_logits, ignore_eos=msg.ignore_eos,
                      speculative=msg.speculative, given=list(msg.drafts), given_dists=list(msg.draft_dists), one_step=msg.one_step)
        if msg.speculative:
            if s.ngrams is None:
                s.ngrams = NgramDrafter()
            if s.draft_length is None or s.draft_length.fixed != msg.draft_tokens:
                s.draft_length = DraftLength(fixed=msg.draft_tokens, timed=DraftLength.clocked(s.sampling))
        s.last_used = time.monotonic()
        return [self._feed(s)]

    def _check_speculation(self, s: Session, msg: Generate) -> None:
        if not (msg.speculative or msg.drafts or msg.draft_tokens):
            return
        if msg.want_logits:
            raise ProtocolError(E.BAD_REQUEST, "want_logits cannot be combined with speculative decoding")
        if msg.speculative and msg.drafts:
            raise ProtocolError(E.BAD_REQUEST, "send drafts or ask the relay for n-gram drafts, not both")
        if not 0 <= msg.draft_tokens <= MAX_DRAFT_TOKENS or len(msg.drafts) > MAX_DRAFT_TOKENS:
            raise ProtocolError(E.BAD_REQUEST, f"at most {MAX_DRAFT_TOKENS} draft tokens per step")
        bad = [t for t in msg.drafts if not 0 <= t < s.vocab_size]
        if bad:
            raise ProtocolError(E.BAD_REQUEST, f"draft token ids {bad[:5]} are outside the vocabulary of {s.vocab_size}")
        if msg.draft_dists:
            if len(msg.draft_dists) != len(msg.drafts):
                raise ProtocolError(E.BAD_REQUEST, f"{len(msg.draft_dists)} draft distributions for {len(msg.drafts)} drafts")
            for guess, d in zip(msg.drafts, msg.draft_dists):
                problem = _dist_problem(guess, d, s.vocab_size)
                if problem:
                    raise ProtocolError(E.BAD_REQUEST, f"draft distribution for token {guess}: {problem}")

    def _feed(self, s: Session) -> Send:
        """Send every token not yet in the caches to the first node, as step ``turn.step``,
        with guesses at the tokens after it when the turn speculates. Only a decode step (one
        pending token) carries guesses: a prompt goes through as it would without them."""
        turn = s.turn
        pending = s.tokens[s.processed :]
        room = turn.max_tokens - turn.generated - 1  # guesses past the turn's end are wasted
        drafts: list[int] = []
        dists: list = []
        if len(pending) == 1 and room > 0:
            if turn.given:
                drafts, dists = turn.given[:room], turn.given_dists[:room]
            elif turn.speculative == "ngram":
                drafts = s.ngrams.propose(s.tokens, min(s.draft_length.next(), room))
        turn.given, turn.given_dists, turn.drafts = [], [], drafts
        turn.fed_at = time.monotonic() if len(pending) == 1 else None
        fwd = Forward(session=s.id, seq=turn.step, start=s.processed, count=len(pending) + len(drafts), tokens=pending + drafts,
                      remaining=turn.max_tokens - turn.generated, want_logits=turn.want_logits,
                      ignore_eos=turn.ignore_eos, drafts=drafts, draft_dists=dists)
        s.processed = len(s.tokens)
        return Send(self.registry.nodes[s.chain[0]].conn, encode(fwd))

    def _position(self, peer: Peer, msg) -> tuple[Session, int] | None:
        s = self.sessions.get(msg.session)
        if s is None or peer.id not in s.chain or msg.seq < s.first_live_seq:
            return None  # closed, or moved to another chain, while the step was in flight
        return s, s.chain.index(peer.id)

    def _on_forward(self, peer: Peer, msg: Forward, frame, payload) -> list[Send]:
        # Every step must reach every node, stale or not, or the caches fall out of step.
        found = self._position(peer, msg)
        if found is None:
            return []
        s, i = found
        if i + 1 >= len(s.chain):
            raise ProtocolError(E.BAD_REQUEST, "the last node of a chain sends results, not forwards")
        node = self.registry.nodes[peer.id]
        try:  # headers only: the payload's length against its declared shape, never its contents
            check_payload(msg.dtype, msg.shape, len(payload))
            if msg.shape != [1, msg.count, node.hidden_size] or msg.dtype not in WIRE_DTYPES:
                raise ProtocolError(E.BAD_PAYLOAD, f"hidden states {msg.dtype}{msg.shape} do not match the model's "
                                                   f"[1, {msg.count}, {node.hidden_size}] in one of {', '.join(WIRE_DTYPES)}")
        except ProtocolError as exc:
            out = [self._error(s.consumer, E.NODE_FAILED, f"node {peer.id} sent a bad step: {exc.message}", session=s.id)]
            return [*out, self._error(peer.conn, exc.code, exc.message, session=s.id), *self._close_session(s)]
        return [Send(self.registry.nodes[s.chain[i + 1]].conn, frame)]

    def _on_result(self, peer: Peer, msg: Result, frame, payload) -> list[Send]:
        found = self._position(peer, msg)
        if found is None:
            return []
        s, i = found
        if i != len(s.chain) - 1:
            raise ProtocolError(E.BAD_REQUEST, "only the last node of a chain sends results")
        turn = s.turn
        if turn is None or msg.seq != turn.step or msg.token is None:
            return []  # the step of a cancelled turn: its token was never shown to anyone
        produced = [*msg.accepted, msg.token]
        if msg.accepted != turn.drafts[: len(msg.accepted)] or turn.generated + len(produced) > turn.max_tokens:
            out = [self._error(s.consumer, E.NODE_FAILED, f"node {peer.id} kept guesses that were not sent, or too many", session=s.id)]
            return out + self._close_session(s)
        out = [Send(s.consumer, frame)]
        s.tokens.extend(produced)
        # The kept guesses are in every node's cache; rejected ones are dropped by the
        # nodes when the next step starts right after the kept ones.
        s.processed += len(msg.accepted)
        self.drafted += len(turn.drafts)
        self.accepted += len(msg.accepted)
        if turn.speculative:
            s.draft_length.observe(len(turn.drafts), len(msg.accepted), time.monotonic() - turn.fed_at if turn.fed_at else None)
        turn.generated += len(produced)
        self.tokens_generated += len(produced)
        for _ in produced:
            self.token_rate.add()
        s.last_used = time.monotonic()
        if msg.finish or turn.one_step:
            s.turn = None
            out.append(self._turn_end(s))
        else:
            turn.step = s.take_seq()
            out.append(self._feed(s))
        return out

    def _on_cancel(self, peer: Peer, msg: Cancel, frame, payload) -> list[Send]:
        s = self._own_session(peer, msg)
        out = [self._turn_end(s)] if s.turn is not None else []
        s.turn = None
        return [Send(peer.conn, encode(Result(id=msg.id, session=s.id, token=None, finish="cancelled"))), *out]

    def _turn_end(self, s: Session) -> Send:
        return Send(self.registry.nodes[s.chain[0]].conn, encode(TurnEnd(session=s.id)))

    def _on_close(self, peer: Peer, msg: CloseSession, frame, payload) -> list[Send]:
        return self._close_session(self._own_session(peer, msg))

    def _on_node_error(self, peer: Peer, msg: Error, frame, payload) -> list[Send]:
        found = self._position(peer, msg)
        if found is None:
            log.warning("node %s reported %s: %s", peer.id, msg.code, msg.message)
            return []
        s, _ = found
        out = [self._error(s.consumer, E.NODE_FAILED, f"node {peer.id} failed: {msg.message}", session=s.id)]
        return out + self._close_session(s)

    def _close_session(self, s: Session, skip: str | None = None) -> list[Send]:
        self.sessions.remove(s.id)
        out = []
        for node_id in s.chain:
            node = self.registry.nodes.get(node_id)
            if node is None:
                continue
            node.sessions.discard(s.id)
            if node_id != skip:
                out.append(Send(node.conn, encode(CloseSession(session=s.id))))
        return out

    # --- helpers ----------------------------------------------------------------------

    @staticmethod
    def _error(conn: str, code: str, message: str, *, ref: int = 0, session: str = "", missing=(), fatal: bool = False) -> Send:
        return Send(conn, encode(Error(id=ref, session=session, code=code, message=message, missing=list(missing), fatal=fatal)))

    def status(self) -> dict:
        models = []
        for (name, fp), nodes in sorted(self.registry.groups().items()):
            num_layers = nodes[0].num_layers
            models.append({
                "model": name,
                "fingerprint": fp,
                "num_layers": num_layers,
                "coverage": coverage(nodes),
                "complete": plan(nodes, num_layers) is not None,
                "redundancy": min(sum(n.first <= layer <= n.last for n in nodes) for layer in range(num_layers)),
                "nodes": len(nodes),
            })
        return {
            "relay": {"version": __version__, "uptime_s": round(time.time() - self.started, 1), "sessions": len(self.sessions.sessions),
                      "failovers": self.failovers, "drafted_tokens": self.drafted, "accepted_tokens": self.accepted},
            "models": models,
            "nodes": [{**n.as_status(), "healthy": time.monotonic() - n.last_seen <= self.node_timeout} for n in sorted(self.registry.nodes.values(), key=lambda n: (n.model, n.first, n.id))],
        }


def _dist_problem(guess: int, d, vocab_size: int) -> str:
    """Why a sampled guess's distribution is unusable ('' if it is fine): the last node
    divides by it and subtracts it from the model's, so it must be a real distribution
    that could have produced the guess."""
    import math

    if not 1 <= len(d.ids) <= MAX_DRAFT_SUPPORT or len(d.probs) != len(d.ids):
        return f"1 to {MAX_DRAFT_SUPPORT} token ids, each with a probability"
    if len(set(d.ids)) != len(d.ids) or not all(0 <= t < vocab_size for t in d.ids):
        return "token ids must be distinct and inside the vocabulary"
    if not all(math.isfinite(p) and p >= 0 for p in d.probs) or abs(sum(d.probs) - 1) > 1e-3:
        return "probabilities must be non-negative and sum to 1"
    if guess not in d.ids or d.probs[d.ids.index(guess)] <= 0:
        return "the guess must have a positive probability in it"
    return ""
