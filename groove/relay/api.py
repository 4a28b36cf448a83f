"""The OpenAI-compatible API on the relay's port: ``/v1/models``, ``/v1/completions`` and
``/v1/chat/completions``, streamed as server-sent events or not.

Each request is a consumer inside the relay: it opens a session, generates and closes it
through ``Relay.receive`` exactly as a WebSocket consumer does, so the API and the Python
client share one generation path (limits, failover, metrics, the nodes' batching). Only
tokenizing happens here, with the tokenizer files the nodes sent.
"""

from __future__ import annotations

import asyncio
import json
import secrets
import time
from dataclasses import dataclass

from aiohttp import web

from ..consumer.tokenizer import StopFilter, StreamDecoder, render_chat
from ..models.checkpoint import ModelError
from ..protocol import errors as E
from ..protocol.framing import decode, encode
from ..protocol.messages import CloseSession, Error, Generate, OpenSession, Result, Sampling, SessionOpened
from . import auth
from .api_params import ApiError, CompletionParams, parse

# Relay error codes as HTTP statuses: a missing model is the client's to fix (404), a
# pipeline with a gap or a lost node is the network's, for now (503).
STATUS = {E.UNKNOWN_MODEL: 404, E.NO_PIPELINE: 503, E.NODE_LOST: 503, E.BAD_REQUEST: 400, E.TOO_LARGE: 400, E.BUSY: 429,
          E.EXPIRED: 408}


def relay_error(msg: Error) -> ApiError:
    status = STATUS.get(msg.code, 500)
    kind = "invalid_request_error" if status < 500 else "server_error"
    code = "model_not_found" if msg.code == E.UNKNOWN_MODEL else msg.code
    return ApiError(status, msg.message, type=kind, code=code, param="model" if status == 404 else None)


def error_response(exc: ApiError) -> web.Response:
    return web.json_response(exc.body(), status=exc.status)


class LocalConsumer:
    """An in-process consumer connection on the relay: frames in through ``Relay.receive``,
    frames out through the same per-connection queue a WebSocket writer drains."""

    def __init__(self, server):
        self.server = server
        self.conn = server.open_local()
        self.queue: asyncio.Queue = server.queues[self.conn]

    async def send(self, msg) -> None:
        await self.server.dispatch(self.server.relay.receive(self.conn, encode(msg)))

    async def receive(self):
        frame, _, _ = await self.queue.get()
        msg, _ = decode(frame)
        return msg

    async def close(self) -> None:
        await self.server.close_local(self.conn)


@dataclass
class Outcome:
    text: str = ""
    prompt_tokens: int = 0
    completion_tokens: int = 0
    finish_reason: str | None = None


class OpenAIApi:
    def __init__(self, server):
        self.server = server

    def routes(self, app: web.Application) -> None:
        app.router.add_get("/v1/models", self.models)
        app.router.add_post("/v1/completions", self.completions)
        app.router.add_post("/v1/chat/completions", self.chat_completions)

    def _check_auth(self, request: web.Request) -> None:
        tokens = self.server.tokens
        token = auth.bearer_token(request.headers).strip()
        if tokens is not None and not tokens.allows("consumer", token):
            why = "wrong API key" if token else "no API key: send 'Authorization: Bearer TOKEN' with the relay's consumer token"
            raise ApiError(401, f"not authorized: {why}", code="invalid_api_key")

    async def models(self, request: web.Request) -> web.Response:
        try:
            self._check_auth(request)
        except ApiError as exc:
            return error_response(exc)
        created = int(self.server.relay.started)
        names = sorted({m["model"] for m in self.server.relay.status()["models"] if m["complete"]})
        return web.json_response({"object": "list", "data": [{"id": n, "object": "model", "created": created, "owned_by": "groove"} for n in names]})

    async def completions(self, request: web.Request) -> web.StreamResponse:
        return await self._serve(request, chat=False)

    async def chat_completions(self, request: web.Request) -> web.StreamResponse:
        return await self._serve(request, chat=True)

    async def _serve(self, request: web.Request, chat: bool) -> web.StreamResponse:
        try:
            self._check_auth(request)
            try:
                body = await request.json(loads=json.loads)
            except (ValueError, UnicodeDecodeError):
                raise ApiError(400, "the request body is not valid JSON") from None
            params = parse(body, chat)
        except ApiError as exc:
            return error_response(exc)
        # API requests count against the same per-address limit as WebSocket connections:
        # each holds a session on the nodes while it runs.
        address = request.remote or "?"
        limit = self.server.max_connections_per_address
        if self.server.per_address[address] >= limit:
            return error_response(ApiError(429, f"more than {limit} connections and requests at once from {address}",
                                           type="rate_limit_error", code="too_many_requests"))
        self.server.per_address[address] += 1
        consumer = LocalConsumer(self.server)
        try:
            return await self._generate(request, consumer, params)
        except ApiError as exc:
            return error_response(exc)
        except ConnectionResetError:  # the client left mid-stream
            return web.Response(status=499)
        finally:
            # Closing the connection closes its session on every node: this is also what
            # cancels the generation when the HTTP client goes away mid-stream.
            self.server.per_address[address] -= 1
            await consumer.close()

    async def _open(self, consumer: LocalConsumer, params: CompletionParams) -> SessionOpened:
        sampling = Sampling(temperature=params.temperature, top_p=params.top_p, top_k=params.top_k, seed=params.seed)
        await consumer.send(OpenSession(id=1, model=params.model, sampling=sampling))
        reply = await consumer.receive()
        if isinstance(reply, Error):
            raise relay_error(reply)
        return reply

    async def _prompt_ids(self, params: CompletionParams, opened: SessionOpened):
        try:
            tokenizer = await self.server.tokenizers.get(opened.model, opened.fingerprint)
        except ModelError as exc:
            raise ApiError(503, str(exc), type="server_error") from None
        if tokenizer is None:
            raise ApiError(503, f"no node serving {opened.model} has sent its tokenizer files, so the API cannot tokenize for it",
                           type="server_error")
        if params.chat:
            ids = await asyncio.to_thread(render_chat, tokenizer, params.messages)
        elif isinstance(params.prompt, str):
            ids = await asyncio.to_thread(tokenizer.encode, params.prompt)
        else:
            ids = params.prompt
        if not ids:
            raise ApiError(400, "the prompt is empty after tokenizing", param="messages" if params.chat else "prompt")
        return tokenizer, ids

    def _budget(self, opened: SessionOpened, prompt_tokens: int, requested: int | None) -> int:
        relay = self.server.relay
        node = relay.registry.nodes.get(opened.pipeline[0])
        limit = relay.max_session_tokens
        if node is not None and node.max_positions:
            limit = min(limit, node.max_positions)
        room = limit - prompt_tokens
        if room < 1 or (requested or 1) > room:
            asked = f" plus max_tokens {requested}" if requested else ""
            raise ApiError(400, f"the prompt's {prompt_tokens} tokens{asked} exceed the {limit}-token context of {opened.model}",
                           code="context_length_exceeded", param="max_tokens" if requested else "messages")
        return requested or room

    async def _generate(self, request: web.Request, consumer: LocalConsumer, params: CompletionParams) -> web.StreamResponse:
        opened = await self._open(consumer, params)
        tokenizer, ids = await self._prompt_ids(params, opened)
        max_tokens = self._budget(opened, len(ids), params.max_tokens)
        speculative = self.server.relay.speculative if params.speculative is None else params.speculative
        await consumer.send(Generate(session=opened.session, tokens=ids, max_tokens=max_tokens, ignore_eos=params.ignore_eos,
                                     speculative=speculative))
        stream = Stream(request, params, opened) if params.stream else None
        outcome = Outcome(prompt_tokens=len(ids))
        decoder, stops = StreamDecoder(tokenizer), StopFilter(params.stop)
        while outcome.finish_reason is None:
            msg = await consumer.receive()
            if isinstance(msg, Error):
                if stream is None or not stream.started:
                    raise relay_error(msg)
                await stream.error(relay_error(msg))
                return stream.response
            if not isinstance(msg, Result) or msg.session != opened.session or msg.token is None:
                continue
            text = ""
            for token in [*msg.accepted, msg.token]:  # several tokens when guesses were verified
                if not stops.stopped:
                    outcome.completion_tokens += 1
                    text += stops.push(decoder.push(token))
            if msg.finish:
                text += stops.push(decoder.flush()) + stops.flush()
                outcome.finish_reason = "length" if msg.finish == "length" else "stop"
            if stops.stopped:
                outcome.finish_reason = "stop"
            outcome.text += text
            if stream is not None and text:
                await stream.delta(text)
            if request.transport is None or request.transport.is_closing():
                return stream.response if stream is not None else web.Response(status=499)
        await consumer.send(CloseSession(session=opened.session))
        if stream is not None:
            await stream.finish(outcome)
            return stream.response
        return web.json_response(response_body(params, opened, outcome))


def _ids(params: CompletionParams) -> tuple[str, str]:
    return ("chatcmpl-" if params.chat else "cmpl-") + secrets.token_hex(12), "chat.completion" if params.chat else "text_completion"


def _usage(outcome: Outcome) -> dict:
    return {"prompt_tokens": outcome.prompt_tokens, "completion_tokens": outcome.completion_tokens,
            "total_tokens": outcome.prompt_tokens + outcome.completion_tokens}


def response_body(params: CompletionParams, opened: SessionOpened, outcome: Outcome) -> dict:
    rid, obj = _ids(params)
    if params.chat:
        choice = {"index": 0, "message": {"role": "assistant", "content": outcome.text}, "logprobs": None, "finish_reason": outcome.finish_reason}
    else:
        choice = {"index": 0, "text": outcome.text, "logprobs": None, "finish_reason": outcome.finish_reason}
    return {"id": rid, "object": obj, "created": int(time.time()), "model": opened.model,
            "system_fingerprint": opened.fingerprint, "choices": [choice], "usage": _usage(outcome)}


class Stream:
    """One server-sent event per text delta, in the chunk format of OpenAI's streaming API."""

    def __init__(self, request: web.Request, params: CompletionParams, opened: SessionOpened):
        self.request = request
        self.params = params
        self.opened = opened
        self.id, obj = _ids(params)
        self.object = obj + ".chunk" if params.chat else obj
        self.created = int(time.time())
        self.response = web.StreamResponse(headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        self.started = False

    async def _event(self, data: dict | str) -> None:
        if not self.started:
            await self.response.prepare(self.request)
            self.started = True
            if self.params.chat:  # the first chunk names the role, as OpenAI's does
                await self._event(self._chunk({"role": "assistant", "content": ""}, None))
        payload = data if isinstance(data, str) else json.dumps(data, ensure_ascii=False)
        await self.response.write(f"data: {payload}\n\n".encode())

    def _chunk(self, delta: dict | str, finish: str | None) -> dict:
        if self.params.chat:
            choice = {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}
        else:
            choice = {"index": 0, "text": delta, "logprobs": None, "finish_reason": finish}
        chunk = {"id": self.id, "object": self.object, "created": self.created, "model": self.opened.model,
                 "system_fingerprint": self.opened.fingerprint, "choices": [choice]}
        if self.params.include_usage:
            chunk["usage"] = None
        return chunk

    async def delta(self, text: str) -> None:
        await self._event(self._chunk({"content": text} if self.params.chat else text, None))

    async def finish(self, outcome: Outcome) -> None:
        await self._event(self._chunk({} if self.params.chat else "", outcome.finish_reason))
        if self.params.include_usage:
            await self._event({"id": self.id, "object": self.object, "created": self.created, "model": self.opened.model,
                               "system_fingerprint": self.opened.fingerprint, "choices": [], "usage": _usage(outcome)})
        await self._event("[DONE]")
        await self.response.write_eof()

    async def error(self, exc: ApiError) -> None:
        await self._event(exc.body())
        await self.response.write_eof()
