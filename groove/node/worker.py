"""A compute node's network side: connect out to the relay, register, serve steps.

The node dials the relay (so it works behind NAT), reconnecting with exponential backoff
whenever the link drops. Steps wait in the scheduler (``scheduler.py``), which hands the
compute thread one batch at a time: every session's next decode step plus a chunk of any
waiting prompt, run as one forward pass (``shard.py``). The event loop stays free for
heartbeats, and each session's pieces run in the order the relay routed them.
"""

from __future__ import annotations

import asyncio
import logging
import os
import sys
import time
from concurrent.futures import ThreadPoolExecutor

import aiohttp
import psutil

from .. import __version__
from ..protocol import errors as E
from ..protocol.errors import ProtocolError
from ..protocol.framing import DEFAULT_MAX_FRAME_BYTES, decode, encode
from ..protocol.messages import (
    CloseSession,
    Error,
    Forward,
    Heartbeat,
    Hello,
    NodeRegister,
    PipelineConfig,
    Placement,
    PlacementRequest,
    Range,
    Registered,
    TokenizerFiles,
    TurnEnd,
    Result,
    Welcome,
)
from ..models.checkpoint import files_digest
from ..protocol.address import client_ssl, relay_url
from ..protocol.tensors import from_bytes, to_bytes, to_wire
from .sampling import end_of_turn, sample, verify
from .scheduler import Arrivals, ChunkSizer, Scheduler, Slot, Work
from .shard import Piece, Shard, SessionState

log = logging.getLogger("groove.node")

HEARTBEAT_S = 1.0
# At most this many decode passes' time is spent waiting for a group to fill: enough for
# two groups half a cycle apart to merge into one.
GATHER = 2.0
# Short enough that a restarted relay has its nodes back within seconds.
MAX_BACKOFF_S = 5.0


def compute_thread() -> ThreadPoolExecutor:
    """The one thread that runs torch in a node, loading included.

    Loading in one thread and computing in another leaves two OpenMP thread teams in the
    process; on a 2-core machine that made each decode step 1.5x slower (measured), so the
    node does all of its torch work on this thread.
    """
    return ThreadPoolExecutor(max_workers=1, thread_name_prefix="groove-compute")


class FatalNodeError(Exception):
    """The relay refused this node for good (bad layer range, version): retrying is pointless."""


def machine_id() -> str:
    """The same for every node on this machine (network namespaces included: they share
    its processors), different across machines; hashed, so nothing identifying leaves."""
    import hashlib
    import platform
    import uuid

    try:
        raw = open("/etc/machine-id").read().strip()
    except OSError:
        raw = ""
    return hashlib.sha256((raw or f"{platform.node()}-{uuid.getnode()}").encode()).hexdigest()[:12]


def peak_rss_bytes() -> int:
    """This process's own peak resident memory. On Linux it is VmHWM: getrusage's
    ``ru_maxrss`` survives exec, so a node started by a larger process (a test runner, a
    benchmark) reported that process's size at the fork as its own peak."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass  # not Linux
    try:
        import resource
    except ImportError:  # Windows
        return int(getattr(psutil.Process().memory_info(), "peak_wset", 0))
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if sys.platform == "darwin" else peak * 1024


async def expect(ws, kind):
    """The next frame from the relay, which must be a ``kind``; errors end the handshake."""
    msg = await ws.receive(timeout=30)
    if msg.type != aiohttp.WSMsgType.BINARY:
        raise aiohttp.ClientError(f"relay closed the connection during the handshake ({msg.type.name})")
    header, _ = decode(msg.data)
    if isinstance(header, Error):
        if header.fatal or header.code in (E.REJECTED, E.BAD_VERSION, E.UNAUTHORIZED):
            raise FatalNodeError(f"relay refused this node: {header.message}")
        raise aiohttp.ClientError(f"relay error: {header.message}")
    if not isinstance(header, kind):
        raise aiohttp.ClientError(f"unexpected {type(header).__name__} during the handshake")
    return header


class NodeWorker:
    def __init__(self, shard: Shard, *, model: str, fingerprint: str, relay: str, eos_ids: set[int], hidden_size: int, vocab_size: int,
                 pool: ThreadPoolExecutor, token: str = "", tls_ca: str | None = None, max_positions: int = 0,
                 tokenizer: dict[str, bytes] | None = None, prefill_chunk: int = 0, max_batch: int = 64, wire_dtype: str = ""):
        self.shard = shard
        self.model = model
        self.fingerprint = fingerprint
        self.url = relay_url(relay)
        self.relay = relay
        self.eos_ids = eos_ids
        self.hidden_size = hidden_size
        self.vocab_size = vocab_size
        self.sessions: dict[str, SessionState] = {}
        self.tokens_processed = 0
        self.compute_s = 0.0
        self.steps = 0
        self.pieces = 0
        self.node_id = ""
        self.pool = pool
        self.token = token
        self.ssl = client_ssl(relay, tls_ca)
        self.proc = psutil.Process(os.getpid())
        self.max_positions = max_positions
        self.tokenizer = tokenizer or {}
        self.tokenizer_digest = files_digest(self.tokenizer)
        self.scheduler = Scheduler(max_batch)
        self.wire_dtype = wire_dtype  # "" sends hidden states in the compute dtype
        self.chunks = ChunkSizer(prefill_chunk)
        self.arrivals = Arrivals()
        self.groups = 1  # machines in the chain of the latest session

    # --- connection -------------------------------------------------------------------

    async def run_forever(self) -> None:
        delay = 0.5
        first = True
        async with aiohttp.ClientSession() as http:
            while True:
                try:
                    async with http.ws_connect(self.url, max_msg_size=DEFAULT_MAX_FRAME_BYTES, heartbeat=5.0, ssl=self.ssl) as ws:
                        delay = 0.5
                        await self._serve(ws, first)
                        first = False
                    reason = "connection closed"
                except FatalNodeError:
                    raise
                except (aiohttp.ClientError, OSError, asyncio.TimeoutError) as exc:
                    reason = _short(exc)
                if self.sessions:
                    log.warning("dropping %d sessions after losing the relay", len(self.sessions))
                    self.sessions.clear()
                self.scheduler.queue.clear()
                print(f"relay {self.relay} unreachable ({reason}); retrying in {delay:.1f}s", file=sys.stderr, flush=True)
                await asyncio.sleep(delay)
                delay = min(delay * 2, MAX_BACKOFF_S)

    async def _serve(self, ws: aiohttp.ClientWebSocketResponse, first: bool) -> None:
        await ws.send_bytes(encode(Hello(role="node", token=self.token, software=f"groove {__version__}")))
        await expect(ws, Welcome)
        s = self.shard.s
        kernels = self.shard.kernels()
        await ws.send_bytes(encode(NodeRegister(
            model=self.model, fingerprint=self.fingerprint, num_layers=s.num_layers, layers=Range(s.first, s.last),
            device=str(s.device), dtype=dtype_str(s.dtype), hidden_size=self.hidden_size,
            vocab_size=self.vocab_size, weights=s.weights, kernels=kernels, load_s=s.load_s, rss_bytes=self.proc.memory_info().rss,
            peak_rss_bytes=peak_rss_bytes(), max_positions=self.max_positions, tokenizer_digest=self.tokenizer_digest,
            machine=machine_id())))
        reg = await expect(ws, Registered)
        self.node_id = reg.node_id
        if reg.send_tokenizer and self.tokenizer:
            await ws.send_bytes(encode(TokenizerFiles(model=self.model, fingerprint=self.fingerprint, files=self.tokenizer)))
        rss = self.proc.memory_info().rss / 2**20
        print(f"registered as {self.node_id} with relay {self.relay}: {self.model} layers {s.first}-{s.last} "
              f"on {s.device} ({dtype_str(s.dtype)}{', ' + s.weights + ' weights' if s.weights else ''}), loaded in {s.load_s:.2f}s, resident memory {rss:.0f} MiB"
              f"{f', {len(self.shard.row_exact)} layers kept in one-row calls for exact batching' if self.shard.row_exact else ''}"
              f", {'groove kernels ' + ', '.join(kernels) if kernels else 'torch kernels only'}",
              flush=True)
        jobs: asyncio.Queue = asyncio.Queue()
        tasks = [asyncio.create_task(self._compute_loop(ws, jobs)), asyncio.create_task(self._heartbeat_loop(ws))]
        try:
            async for msg in ws:
                if msg.type != aiohttp.WSMsgType.BINARY:
                    continue
                await self._on_frame(ws, msg.data, jobs)
        finally:
            for t in tasks:
                t.cancel()

    # --- frames -----------------------------------------------------------------------

    async def _on_frame(self, ws, frame: bytes, jobs: asyncio.Queue) -> None:
        try:
            msg, payload = decode(frame)
        except ProtocolError as exc:
            log.warning("bad frame from relay: %s", exc.message)
            return
        if isinstance(msg, (PipelineConfig, Forward, CloseSession)):
            # One queue for steps and session changes, so a session closed and reopened
            # (after a failover) never has an old step run against its new cache.
            await jobs.put((msg, payload))
        elif isinstance(msg, TurnEnd):
            self.arrivals.left(msg.session, time.perf_counter(), more=False)
        elif isinstance(msg, Error):
            log.warning("relay error %s: %s", msg.code, msg.message)

    async def _compute_loop(self, ws, jobs: asyncio.Queue) -> None:
        """Admit whatever has arrived, run one pass over the scheduler's next batch, send
        its results, repeat: sessions join and leave between passes."""
        loop = asyncio.get_running_loop()
        while True:
            if not self.scheduler:
                await self._admit(ws, *await jobs.get())
            await self._admit_waiting(ws, jobs)
            batch = await self._gather(ws, jobs, self._next_batch())
            if batch and not any(s.decode for s in batch) and not self.chunks.fixed:
                batch = await self._prompt_only(ws, jobs, batch)
            for slot in [s for s in batch if not self.sessions[s.work.session].can_start(s.work.msg.start + s.offset)]:
                held = self.sessions.pop(slot.work.session).tokens_seen
                self.scheduler.drop(slot.work.session)
                batch.remove(slot)
                await ws.send_bytes(self._error(slot.work.msg, E.NODE_FAILED, f"step starts at position {slot.work.msg.start + slot.offset} "
                                                                              f"but this node's cache holds {held} positions"))
            if not batch:
                continue
            t0 = time.perf_counter()
            try:
                frames = await loop.run_in_executor(self.pool, self._run, batch)
            except Exception as exc:  # a failed pass must reach its consumers, not kill the node
                log.exception("a pass over %d sessions failed", len(batch))
                frames = []
                for slot in batch:
                    self.sessions.pop(slot.work.session, None)
                    self.scheduler.drop(slot.work.session)
                    frames.append(self._error(slot.work.msg, E.NODE_FAILED, f"{type(exc).__name__}: {exc}"))
            else:
                elapsed = time.perf_counter() - t0
                self.compute_s += elapsed
                self.steps += 1
                self.pieces += len(batch)
                self.chunks.observe(elapsed, sum(s.count for s in batch if not s.decode))
                self.scheduler.finish(batch)
                now = time.perf_counter()
                for slot in batch:
                    msg = slot.work.msg
                    if slot.ends_step and msg.final:
                        # On the last node a token ends the session's turn at EOS; elsewhere
                        # that is unknown until the step fails to come back (see Arrivals).
                        self.arrivals.left(msg.session, now, more=msg.remaining > 1)
            for frame in frames:
                await ws.send_bytes(frame)

    async def _gather(self, ws, jobs: asyncio.Queue, batch: list[Slot]) -> list[Slot]:
        """Streaming sessions settle into groups that travel the pipeline together. With one
        group per machine of the chain, each machine has a group to work on while the others
        work on theirs; nodes that share a machine instead take turns with one group, each
        with all its cores (computing at once, their thread teams thrash). A pass short of
        its share of the streaming sessions waits (a pass or two at most) for steps that
        are due, so that small groups merge. Only the first node of a chain waits: groups
        keep together through the others, and two nodes each holding one group for the
        other would only wait each other out."""
        decodes = sum(1 for s in batch if s.decode)
        if not decodes or self.chunks.decode_s is None or not self.shard.is_first:
            return batch
        now = time.perf_counter()
        expected = self.arrivals.expected(now)
        share = -(-(decodes + len(expected)) // max(self.groups, 1))
        deadline = now + GATHER * self.chunks.decode_s
        while decodes < share and (left := deadline - time.perf_counter()) > 0:
            if not await self._wait_and_admit(ws, jobs, left):
                break
            batch = self._next_batch()
            decodes = sum(1 for s in batch if s.decode)
        return batch

    async def _prompt_only(self, ws, jobs: asyncio.Queue, batch: list[Slot]) -> list[Slot]:
        """A pass of prompt chunks only, while streaming sessions may be on their way back.
        A step that arrives during a pass waits for it, so: on a chain of several machines
        the chunk is sized to end before the next step is due (or the node waits for that
        step when not even a short chunk would); on a chain whose nodes share one machine
        the first node leaves the cores to the others while a step is on its way, and takes
        the next chunk with that step."""
        if self.groups == 1 and self.shard.is_first:
            deadline = time.perf_counter() + 1.0
            while self.arrivals.expected(time.perf_counter()) and (left := deadline - time.perf_counter()) > 0:
                if not await self._wait_and_admit(ws, jobs, left):
                    break
                batch = self._next_batch()
                if any(s.decode for s in batch):
                    break
            return batch
        fit = self.chunks.fit(self.arrivals.due_in(time.perf_counter()))
        if fit == 0:  # a streaming session's step is due before any chunk could finish
            await self._wait_and_admit(ws, jobs, 0.05)
            batch = self._next_batch()
            return batch if any(s.decode for s in batch) else self._next_batch(self.chunks.low)
        if fit is not None:
            return self._next_batch(min(fit, self.chunks.size(alone=False)))
        return batch

    def _next_batch(self, chunk: int | None = None) -> list[Slot]:
        """The scheduler's next batch, with prompt tokens up to ``chunk`` (default: the
        chunk sizer's, taking a prompt whole when no other session holds a cache here)."""
        return self.scheduler.next_batch(chunk or self.chunks.size(alone=len(self.sessions) <= 1))

    async def _admit_waiting(self, ws, jobs: asyncio.Queue) -> None:
        while not jobs.empty():
            await self._admit(ws, *jobs.get_nowait())

    async def _wait_and_admit(self, ws, jobs: asyncio.Queue, timeout: float) -> bool:
        """Wait up to ``timeout`` for the next frame, then admit it and all that came with
        it; False if none came."""
        try:
            await self._admit(ws, *await asyncio.wait_for(jobs.get(), timeout=timeout))
        except asyncio.TimeoutError:
            return False
        await self._admit_waiting(ws, jobs)
        return True

    def _error(self, msg: Forward, code: str, message: str) -> bytes:
        return encode(Error(session=msg.session, seq=msg.seq, src=self.node_id, code=code, message=message))

    async def _admit(self, ws, msg, payload) -> None:
        if isinstance(msg, PipelineConfig):
            self.scheduler.drop(msg.session)  # steps of an earlier chain for this session
            self.sessions[msg.session] = self.shard.new_session(msg.sampling)
            self.groups = msg.groups or msg.length
        elif isinstance(msg, CloseSession):
            self.sessions.pop(msg.session, None)
            self.scheduler.drop(msg.session)
            self.arrivals.forget(msg.session)
        elif msg.session not in self.sessions:
            # Closed sessions' queued steps end here; the relay ignores the error for
            # those, and for any other it tells the consumer instead of leaving it waiting.
            await ws.send_bytes(self._error(msg, E.UNKNOWN_SESSION, f"node {self.node_id} holds no session {msg.session}"))
        else:
            problem = self._check(msg, payload)
            if problem is not None:
                self.sessions.pop(msg.session, None)
                self.scheduler.drop(msg.session)
                await ws.send_bytes(self._error(msg, problem.code, problem.message))
            else:
                self.arrivals.arrived(msg.session, time.perf_counter())
                self.scheduler.add(Work(msg, payload))

    def _check(self, msg: Forward, payload) -> ProtocolError | None:
        if msg.draft_dists and len(msg.draft_dists) != len(msg.drafts):
            return ProtocolError(E.BAD_REQUEST, "one distribution per guess")
        if msg.drafts and (len(msg.drafts) >= msg.count or not all(0 <= t < self.vocab_size for t in msg.drafts)):
            return ProtocolError(E.BAD_REQUEST, f"{len(msg.drafts)} guesses in a step of {msg.count} positions, or guesses outside the vocabulary")
        if msg.drafts and self.shard.is_first and msg.tokens is not None and msg.tokens[len(msg.tokens) - len(msg.drafts) :] != msg.drafts:
            return ProtocolError(E.BAD_REQUEST, "the guesses must be the step's last tokens")
        if self.shard.is_first:
            if msg.tokens is None or len(msg.tokens) != msg.count or msg.count < 1:
                return ProtocolError(E.BAD_REQUEST, "the first node needs token ids")
        elif msg.shape != [1, msg.count, self.hidden_size] or msg.count < 1:
            return ProtocolError(E.BAD_PAYLOAD, f"hidden states of shape {msg.shape} do not match [1, {msg.count}, {self.hidden_size}]")
        return None

    def _run(self, batch: list[Slot]) -> list[bytes]:
        """One forward pass over the batch (on the compute thread); the frames it produces."""
        shard = self.shard
        pieces = []
        for slot in batch:
            msg, state = slot.work.msg, self.sessions[slot.work.session]
            start = msg.start + slot.offset
            if shard.is_first:
                pieces.append(Piece(state, start, tokens=msg.tokens[slot.offset : slot.offset + slot.count]))
            else:
                hidden = from_bytes(slot.work.payload, msg.dtype, msg.shape)
                pieces.append(Piece(state, start, hidden=hidden[:, slot.offset : slot.offset + slot.count]))
            pieces[-1].want_output = slot.ends_step and msg.final
            pieces[-1].drafts = len(msg.drafts)
        outs = shard.run(pieces)
        frames = []
        for slot, out in zip(batch, outs):
            msg = slot.work.msg
            self.tokens_processed += slot.count
            if not shard.is_last:
                # Each chunk goes on at once, so the next node starts on a long prompt
                # while this one is still working through it.
                dtype, shape, raw = to_wire(out, self.wire_dtype or dtype_str(shard.s.dtype))
                frames.append(encode(Forward(session=msg.session, seq=msg.seq, src=self.node_id, start=msg.start + slot.offset,
                                             count=slot.count, dtype=dtype, shape=shape, remaining=msg.remaining,
                                             want_logits=msg.want_logits, ignore_eos=msg.ignore_eos,
                                             final=msg.final and slot.ends_step, drafts=msg.drafts,
                                             draft_dists=msg.draft_dists), raw))
            elif out is not None:
                frames.append(self._result(msg, self.sessions[msg.session], out))
        return frames

    def _result(self, msg: Forward, state: SessionState, logits) -> bytes:
        if msg.drafts:
            produced = verify(logits, msg.drafts, state.sampling, state.generator, msg.draft_dists)
        else:
            produced = [sample(logits, state.sampling, state.generator)]
        produced, finish = end_of_turn(produced, set() if msg.ignore_eos else self.eos_ids, msg.remaining)
        header = Result(session=msg.session, seq=msg.seq, src=self.node_id, token=produced[-1], accepted=produced[:-1], finish=finish)
        if msg.want_logits:
            header.dtype, header.shape, raw = to_bytes(logits)
            return encode(header, raw)
        return encode(header)

    async def _heartbeat_loop(self, ws) -> None:
        last_sent = None
        last_time = 0.0
        while True:
            await asyncio.sleep(0.25)
            state = (len(self.sessions), self.tokens_processed, self.compute_s)
            # Report promptly after work, and at least every HEARTBEAT_S while idle.
            if state != last_sent or time.monotonic() - last_time >= HEARTBEAT_S:
                await ws.send_bytes(encode(Heartbeat(src=self.node_id, sessions=state[0], tokens_processed=state[1], compute_s=state[2], steps=self.steps, pieces=self.pieces,
                                                     rss_bytes=self.proc.memory_info().rss, peak_rss_bytes=peak_rss_bytes())))
                last_sent, last_time = state, time.monotonic()


async def request_placement(relay: str, request: PlacementRequest, token: str = "", tls_ca: str | None = None) -> tuple[int, int]:
    """Ask the relay which layers a ``--layers auto`` node should load, retrying with
    backoff until the relay answers."""
    delay = 0.5
    async with aiohttp.ClientSession() as http:
        while True:
            try:
                async with http.ws_connect(relay_url(relay), heartbeat=5.0, ssl=client_ssl(relay, tls_ca)) as ws:
                    await ws.send_bytes(encode(Hello(role="node", token=token, software=f"groove {__version__}")))
                    await expect(ws, Welcome)
                    await ws.send_bytes(encode(request))
                    placement = await expect(ws, Placement)
                    return placement.layers.first, placement.layers.last
            except (aiohttp.ClientError, OSError, asyncio.TimeoutError) as exc:
                print(f"relay {relay} unreachable ({_short(exc)}); retrying in {delay:.1f}s", file=sys.stderr, flush=True)
            await asyncio.sleep(delay)
            delay = min(delay * 2, MAX_BACKOFF_S)


def dtype_str(dtype) -> str:
    return str(dtype).removeprefix("torch.")


def _short(exc: BaseException) -> str:
    text = str(exc) or type(exc).__name__
    return text.splitlines()[0][:200]
