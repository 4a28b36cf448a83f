"""The relay's I/O: one aiohttp server with the WebSocket (``/ws``) and HTTP on one port.

Each connection gets a bounded outbound queue drained by its own writer task. A reader too
slow to drain it is disconnected rather than allowed to grow the relay's memory or to stall
the connections that route frames to it.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import ssl
import statistics
import sys
import time
from collections import Counter, deque
from pathlib import Path

from aiohttp import WSMsgType, web

from ..protocol.framing import DEFAULT_MAX_FRAME_BYTES
from . import auth
from .api import OpenAIApi
from .core import Relay, Send
from .tokenizers import TokenizerCache

log = logging.getLogger("groove.relay")

OUTBOUND_QUEUE = 1024
STATUS_PAGE = (Path(__file__).parent / "status_page.html").read_text(encoding="utf-8")


class RelayServer:
    def __init__(self, *, max_frame: int = DEFAULT_MAX_FRAME_BYTES, heartbeat_s: float = 5.0, node_timeout: float = 5.0,
                 session_ttl: float = 600.0, tokens: auth.Tokens | None = None, max_connections_per_address: int = 64,
                 handshake_timeout: float = 10.0, max_session_tokens: int = 32768, outbound_queue: int = OUTBOUND_QUEUE,
                 max_sessions_per_consumer: int = 64, speculative: str = ""):
        self.relay = Relay(max_frame=max_frame, node_timeout=node_timeout, session_ttl=session_ttl, auth=tokens,
                           handshake_timeout=handshake_timeout, max_session_tokens=max_session_tokens,
                           max_sessions_per_consumer=max_sessions_per_consumer, speculative=speculative)
        self.tokens = tokens
        self.max_frame = max_frame
        self.heartbeat_s = heartbeat_s
        self.max_connections_per_address = max_connections_per_address
        self.outbound_queue = outbound_queue
        self.queues: dict[str, asyncio.Queue] = {}
        self.sockets: dict[str, web.WebSocketResponse] = {}
        self.per_address: Counter[str] = Counter()
        self._ids = itertools.count(1)
        self.io: dict[str, list[int]] = {}  # conn -> [bytes in, bytes out]
        # Time from a frame's arrival to its departure on the next link: the relay's own
        # cost per hop, kept for the most recent frames.
        self.hop_s: deque[float] = deque(maxlen=4096)
        self.tokenizers = TokenizerCache(self.relay.tokenizer_files)

    def open_local(self) -> str:
        """A consumer connection for a request of the HTTP API. Its queue is unbounded: it
        holds small RESULT frames only, at most a session's token limit of them."""
        conn = f"api-{next(self._ids)}"
        self.queues[conn] = asyncio.Queue()
        self.relay.connect_local(conn)
        return conn

    async def close_local(self, conn: str) -> None:
        self.queues.pop(conn, None)
        await self.dispatch(self.relay.disconnect(conn))

    def app(self) -> web.Application:
        app = web.Application(client_max_size=4 << 20)  # the API's prompts; WebSocket frames have their own cap
        app.router.add_get("/ws", self.ws_handler)
        OpenAIApi(self).routes(app)
        app.router.add_get("/status", self.status_handler)
        app.router.add_get("/metrics", self.metrics_handler)
        app.router.add_get("/", self.index_handler)
        return app

    def authorized(self, request: web.Request) -> bool:
        if self.tokens is None:
            return True
        token = auth.bearer_token(request.headers)
        return self.tokens.allows("consumer", token) or self.tokens.allows("node", token)

    async def status_handler(self, request: web.Request) -> web.Response:
        if not self.authorized(request):
            return web.json_response({"error": {"message": "missing or wrong token: send 'Authorization: Bearer TOKEN'",
                                                "type": "unauthorized"}}, status=401)
        return web.json_response(self.status())

    async def metrics_handler(self, request: web.Request) -> web.Response:
        if not self.authorized(request):
            return web.Response(status=401, text="missing or wrong token: send 'Authorization: Bearer TOKEN'\n")
        from .metrics import render

        return web.Response(body=render(self), content_type="text/plain", charset="utf-8")

    def status(self) -> dict:
        status = self.relay.status()
        for node in status["nodes"]:
            info = self.relay.registry.nodes.get(node["id"])
            node["bytes_in"], node["bytes_out"] = self.io.get(info.conn, [0, 0]) if info else (0, 0)
        hops = sorted(self.hop_s)
        status["relay"]["frames_routed"] = len(hops)
        status["relay"]["hop_ms_p50"] = round(statistics.median(hops) * 1000, 4) if hops else None
        status["relay"]["hop_ms_p99"] = round(hops[int(len(hops) * 0.99)] * 1000, 4) if hops else None
        status["relay"]["connections"] = len(self.sockets)
        return status

    async def index_handler(self, request: web.Request) -> web.Response:
        # The page holds no data: its script polls /status with the viewer's token.
        return web.Response(text=STATUS_PAGE, content_type="text/html")

    async def dispatch(self, sends: list[Send], received: float | None = None) -> None:
        for send in sends:
            q = self.queues.get(send.conn)
            if q is None:
                continue
            try:
                q.put_nowait((send.frame, received, send.close))
            except asyncio.QueueFull:
                log.warning("dropping %s: it read none of its last %d frames", send.conn, self.outbound_queue)
                await self.dispatch(self.relay.disconnect(send.conn))
                ws = self.sockets.get(send.conn)
                if ws is not None:
                    await ws.close(code=1008, message=b"too slow to read")

    async def ws_handler(self, request: web.Request) -> web.StreamResponse:
        address = request.remote or "?"
        if self.per_address[address] >= self.max_connections_per_address:
            return web.json_response({"error": {"message": f"more than {self.max_connections_per_address} connections from {address}",
                                                "type": "too_many_connections"}}, status=429)
        # The socket's own cap is twice the protocol's, so a frame a little too large gets an
        # error envelope and the connection lives on; only absurd frames close it.
        ws = web.WebSocketResponse(max_msg_size=2 * self.max_frame, heartbeat=self.heartbeat_s)
        await ws.prepare(request)
        conn = f"conn-{next(self._ids)}"
        self.per_address[address] += 1
        queue: asyncio.Queue = asyncio.Queue(self.outbound_queue)
        self.queues[conn] = queue
        self.sockets[conn] = ws
        self.io[conn] = io = [0, 0]
        self.relay.connect(conn)
        writer = asyncio.create_task(self._writer(ws, queue, io))
        try:
            async for msg in ws:
                if msg.type in (WSMsgType.BINARY, WSMsgType.TEXT):
                    received = time.perf_counter()
                    data = msg.data if msg.type == WSMsgType.BINARY else msg.data.encode()
                    io[0] += len(data)
                    await self.dispatch(self.relay.receive(conn, data), received)
                elif msg.type == WSMsgType.ERROR:
                    break
        finally:
            self.per_address[address] -= 1
            self.queues.pop(conn, None)
            self.sockets.pop(conn, None)
            self.io.pop(conn, None)
            writer.cancel()
            await self.dispatch(self.relay.disconnect(conn))
        return ws

    async def housekeeping(self, interval: float = 0.5) -> None:
        while True:
            await asyncio.sleep(interval)
            sends, dead = self.relay.tick()
            await self.dispatch(sends)
            for conn in dead:
                ws = self.sockets.get(conn)
                if ws is not None:
                    await ws.close(code=4000, message=b"timed out")

    async def _writer(self, ws: web.WebSocketResponse, queue: asyncio.Queue, io: list[int]) -> None:
        try:
            while True:
                frame, received, close = await queue.get()
                await ws.send_bytes(frame)
                io[1] += len(frame)
                if received is not None:
                    self.hop_s.append(time.perf_counter() - received)
                if close:
                    await ws.close()
                    return
        except (ConnectionError, RuntimeError, asyncio.CancelledError):
            pass


def tls_context(cert: str | None, key: str | None) -> ssl.SSLContext | None:
    if not cert and not key:
        return None
    if not (cert and key):
        raise ValueError("--tls-cert and --tls-key go together")
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    try:
        ctx.load_cert_chain(cert, key)
    except (OSError, ssl.SSLError) as exc:
        raise ValueError(f"cannot load the TLS certificate or key: {exc}") from None
    return ctx


async def serve(host: str, port: int, *, tokens: auth.Tokens | None, tls: ssl.SSLContext | None = None, **options) -> None:
    server = RelayServer(tokens=tokens, **options)
    runner = web.AppRunner(server.app(), access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, host, port, ssl_context=tls)
    await site.start()
    scheme = "wss" if tls else "ws"
    http = f"{'https' if tls else 'http'}://{host}:{port}"
    print(f"groove relay listening on {scheme}://{host}:{port}/ws (status: {http}/status, OpenAI-compatible API: {http}/v1)", flush=True)
    if tokens is None:
        print("WARNING: --insecure-open: anyone who can reach this port can register nodes and run generations", file=sys.stderr, flush=True)
    housekeeping = asyncio.create_task(server.housekeeping())
    try:
        await asyncio.Event().wait()
    finally:
        housekeeping.cancel()
        await runner.cleanup()
