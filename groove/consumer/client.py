"""The Python client: open sessions on a relay and stream tokens from them.

    async with Client("127.0.0.1:8770") as c:
        session = await c.open_session("my-model", Sampling(temperature=0), wait=30)
        async for step in c.generate(session, prompt_ids, max_tokens=64):
            print(step.token)

One WebSocket carries any number of sessions; replies are matched to requests by message
id and session id.
"""

from __future__ import annotations

import asyncio
import itertools
import time
from dataclasses import dataclass
from typing import AsyncIterator

import aiohttp

from .. import __version__
from ..protocol import errors as E
from ..protocol.errors import ProtocolError
from ..protocol.framing import DEFAULT_MAX_FRAME_BYTES, decode, encode
from ..protocol.messages import Cancel, CloseSession, Error, Generate, Hello, OpenSession, Result, Sampling, SessionOpened, Welcome
from ..protocol.address import client_ssl, relay_url


class GrooveError(Exception):
    def __init__(self, code: str, message: str, missing: list[list[int]] | None = None):
        super().__init__(message)
        self.code = code
        self.message = message
        self.missing = missing or []


@dataclass
class SessionInfo:
    id: str
    model: str
    fingerprint: str
    pipeline: list[str]
    ranges: list[list[int]]


@dataclass
class Step:
    token: int | None
    finish: str
    logits: object = None  # float32 tensor when requested
    last_of_step: bool = False  # the last token of a pipeline step (a step yields several with speculation)


class Client:
    def __init__(self, relay: str, token: str | None = None, tls_ca: str | None = None):
        from ..relay.auth import local_token

        self.relay = relay
        self.url = relay_url(relay)
        self.token = local_token("consumer", token)
        self.ssl = client_ssl(relay, tls_ca)
        self._http: aiohttp.ClientSession | None = None
        self._ws: aiohttp.ClientWebSocketResponse | None = None
        self._reader: asyncio.Task | None = None
        self._ids = itertools.count(1)
        self._waiting: dict[int, asyncio.Future] = {}
        self._streams: dict[str, asyncio.Queue] = {}
        self.peer_id = ""

    async def __aenter__(self) -> "Client":
        await self.connect()
        return self

    async def __aexit__(self, *exc) -> None:
        await self.close()

    async def connect(self) -> None:
        self._http = aiohttp.ClientSession()
        try:
            self._ws = await self._http.ws_connect(self.url, max_msg_size=DEFAULT_MAX_FRAME_BYTES, heartbeat=10.0, ssl=self.ssl)
        except (aiohttp.ClientError, OSError) as exc:
            await self._http.close()
            raise GrooveError("unreachable", f"relay {self.relay} is unreachable: {exc}") from None
        self._reader = asyncio.create_task(self._read())
        try:
            welcome = await self._request(Hello(role="consumer", token=self.token, software=f"groove {__version__}"))
        except GrooveError:
            await self.close()
            raise
        assert isinstance(welcome, Welcome)
        self.peer_id = welcome.peer_id

    async def close(self) -> None:
        if self._reader:
            self._reader.cancel()
        if self._ws is not None:
            await self._ws.close()
        if self._http is not None:
            await self._http.close()

    async def _read(self) -> None:
        lost = GrooveError("disconnected", f"lost the connection to relay {self.relay}")
        try:
            async for msg in self._ws:
                if msg.type != aiohttp.WSMsgType.BINARY:
                    continue
                try:
                    header, payload = decode(msg.data)
                except ProtocolError:
                    continue
                self._route(header, payload)
        finally:
            for fut in self._waiting.values():
                if not fut.done():
                    fut.set_exception(lost)
            for q in self._streams.values():
                q.put_nowait(lost)

    def _route(self, header, payload) -> None:
        if header.id and header.id in self._waiting:
            fut = self._waiting.pop(header.id)
            if not fut.done():
                fut.set_result(header)
            return
        if header.session in self._streams:
            if isinstance(header, Result):
                logits = None
                if header.dtype:
                    from ..protocol.tensors import from_bytes

                    logits = from_bytes(bytes(payload), header.dtype, header.shape)
                for token in header.accepted:  # guesses the pipeline verified, then its own token
                    self._streams[header.session].put_nowait(Step(token, ""))
                self._streams[header.session].put_nowait(Step(header.token, header.finish, logits, last_of_step=True))
            elif isinstance(header, Error):
                self._streams[header.session].put_nowait(GrooveError(header.code, header.message, [[r.first, r.last] for r in header.missing]))

    async def _request(self, msg):
        msg.id = next(self._ids)
        fut = asyncio.get_running_loop().create_future()
        self._waiting[msg.id] = fut
        await self._ws.send_bytes(encode(msg))
        reply = await fut
        if isinstance(reply, Error):
            raise GrooveError(reply.code, reply.message, [[r.first, r.last] for r in reply.missing])
        return reply

    async def open_session(self, model: str, sampling: Sampling | None = None, *, fingerprint: str = "", wait: float = 0.0) -> SessionInfo:
        """Open a session; while no complete pipeline exists, retry for up to ``wait`` seconds."""
        deadline = time.monotonic() + wait
        while True:
            try:
                reply = await self._request(OpenSession(model=model, fingerprint=fingerprint, sampling=sampling or Sampling()))
                break
            except GrooveError as exc:
                if exc.code not in (E.NO_PIPELINE, E.UNKNOWN_MODEL) or time.monotonic() >= deadline:
                    raise
                await asyncio.sleep(min(0.5, max(0.0, deadline - time.monotonic())))
        assert isinstance(reply, SessionOpened)
        self._streams[reply.session] = asyncio.Queue()
        return SessionInfo(reply.session, reply.model, reply.fingerprint, reply.pipeline, [[r.first, r.last] for r in reply.ranges])

    async def generate(self, session: SessionInfo | str, tokens: list[int], max_tokens: int, *, want_logits: bool = False,
                       ignore_eos: bool = False, speculative: str = "", draft_tokens: int = 0) -> AsyncIterator[Step]:
        """Append ``tokens`` to the session and yield each generated token as it arrives.
        ``speculative="ngram"``: the relay guesses the next tokens from n-grams already in
        the session and the pipeline verifies them, ``draft_tokens`` at a time (0: adaptive);
        greedy output is unchanged, and so is the distribution of sampled output."""
        sid = session.id if isinstance(session, SessionInfo) else session
        queue = self._streams[sid]
        await self._ws.send_bytes(encode(Generate(session=sid, tokens=list(tokens), max_tokens=max_tokens, want_logits=want_logits,
                                                  ignore_eos=ignore_eos, speculative=speculative, draft_tokens=draft_tokens)))
        while True:
            item = await queue.get()
            if isinstance(item, GrooveError):
                raise item
            yield item
            if item.finish:
                return

    async def generate_drafted(self, session: SessionInfo | str, tokens: list[int], max_tokens: int, drafter, *,
                               history: list[int] | None = None, draft_tokens: int = 0, ignore_eos: bool = False,
                               sampling: Sampling | None = None) -> AsyncIterator[Step]:
        """Like ``generate``, with guesses from a model on this machine (``drafter``: a
        ``drafting.model.DraftModel``): each step carries the guesses, the pipeline keeps
        those it would have produced itself, and the draft model guesses again from there.
        ``history``: the session's tokens before this turn (its earlier turns).
        ``sampling``: the session's, when it samples: guesses are then drawn from the draft
        model's distribution, which goes with them."""
        from ..drafting.length import DraftLength
        from ..node.sampling import make_generator

        generator = make_generator(sampling) if sampling is not None and sampling.temperature > 0 else None

        sid = session.id if isinstance(session, SessionInfo) else session
        queue = self._streams[sid]
        text = list(history or []) + list(tokens)
        length = DraftLength(fixed=draft_tokens, timed=DraftLength.clocked(sampling))
        pending, done = list(tokens), 0
        while True:
            left = max_tokens - done
            # The first step carries the prompt, which goes through without guesses.
            k = min(length.next(), left - 1) if not pending else 0
            timed = None if pending else time.monotonic()  # a decode step: what guessing costs, drafting included
            drafts, dists = await asyncio.to_thread(drafter.propose, text, k, sampling, generator) if k > 0 else ([], [])
            await self._ws.send_bytes(encode(Generate(session=sid, tokens=pending, max_tokens=left, drafts=drafts, draft_dists=dists,
                                                      one_step=True, ignore_eos=ignore_eos)))
            pending, kept = [], 0
            while True:
                item = await queue.get()
                if isinstance(item, GrooveError):
                    raise item
                text.append(item.token)
                done += 1
                if not item.last_of_step:
                    kept += 1
                finish = item.finish or ("length" if item.last_of_step and done >= max_tokens else "")
                yield Step(item.token, finish, item.logits, item.last_of_step)
                if finish:
                    return
                if item.last_of_step:
                    break
            length.observe(len(drafts), kept, time.monotonic() - timed if timed is not None else None)

    async def cancel(self, session: SessionInfo | str) -> None:
        """Stop the running generation; returns once the relay has stopped feeding it."""
        sid = session.id if isinstance(session, SessionInfo) else session
        await self._request(Cancel(session=sid))
        queue = self._streams.get(sid)
        while queue is not None and not queue.empty():  # steps that arrived before the cancel
            queue.get_nowait()

    async def close_session(self, session: SessionInfo | str) -> None:
        sid = session.id if isinstance(session, SessionInfo) else session
        self._streams.pop(sid, None)
        if self._ws is not None and not self._ws.closed:
            await self._ws.send_bytes(encode(CloseSession(session=sid)))
