"""The relay's I/O: one aiohttp server with the WebSocket (``/ws``) and HTTP on one port.

Each connection gets a bounded outbound queue drained by its own writer task, so a slow
reader applies backpressure to whoever routes frames to it instead of growing memory.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import statistics
import time
from collections import deque

from aiohttp import WSMsgType, web

from ..protocol.framing import DEFAULT_MAX_FRAME_BYTES
from .core import Relay, Send

log = logging.getLogger("groove.relay")

OUTBOUND_QUEUE = 1024


class RelayServer:
    def __init__(self, max_frame: int = DEFAULT_MAX_FRAME_BYTES, heartbeat_s: float = 5.0, node_timeout: float = 5.0,
                 session_ttl: float = 600.0):
        self.relay = Relay(max_frame=max_frame, node_timeout=node_timeout, session_ttl=session_ttl)
        self.max_frame = max_frame
        self.heartbeat_s = heartbeat_s
        self.queues: dict[str, asyncio.Queue] = {}
        self.sockets: dict[str, web.WebSocketResponse] = {}
        self._ids = itertools.count(1)
        self.io: dict[str, list[int]] = {}  # conn -> [bytes in, bytes out]
        # Time from a frame's arrival to its departure on the next link: the relay's own
        # cost per hop, kept for the most recent frames.
        self.hop_s: deque[float] = deque(maxlen=4096)

    def app(self) -> web.Application:
        app = web.Application(client_max_size=1 << 20)
        app.router.add_get("/ws", self.ws_handler)
        app.router.add_get("/status", self.status_handler)
        app.router.add_get("/", self.index_handler)
        return app

    async def status_handler(self, request: web.Request) -> web.Response:
        return web.json_response(self.status())

    def status(self) -> dict:
        status = self.relay.status()
        for node in status["nodes"]:
            info = self.relay.registry.nodes.get(node["id"])
            node["bytes_in"], node["bytes_out"] = self.io.get(info.conn, [0, 0]) if info else (0, 0)
        hops = sorted(self.hop_s)
        status["relay"]["frames_routed"] = len(hops)
        status["relay"]["hop_ms_p50"] = round(statistics.median(hops) * 1000, 4) if hops else None
        status["relay"]["hop_ms_p99"] = round(hops[int(len(hops) * 0.99)] * 1000, 4) if hops else None
        return status

    async def index_handler(self, request: web.Request) -> web.Response:
        return web.Response(text="Groove relay. WebSocket at /ws, JSON status at /status.\n")

    async def dispatch(self, sends: list[Send], received: float | None = None) -> None:
        for send in sends:
            q = self.queues.get(send.conn)
            if q is not None:
                await q.put((send.frame, received))

    async def ws_handler(self, request: web.Request) -> web.WebSocketResponse:
        ws = web.WebSocketResponse(max_msg_size=self.max_frame, heartbeat=self.heartbeat_s)
        await ws.prepare(request)
        conn = f"conn-{next(self._ids)}"
        queue: asyncio.Queue = asyncio.Queue(OUTBOUND_QUEUE)
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
                    await ws.close(code=4000, message=b"heartbeat timeout")

    async def _writer(self, ws: web.WebSocketResponse, queue: asyncio.Queue, io: list[int]) -> None:
        try:
            while True:
                frame, received = await queue.get()
                await ws.send_bytes(frame)
                io[1] += len(frame)
                if received is not None:
                    self.hop_s.append(time.perf_counter() - received)
        except (ConnectionError, RuntimeError, asyncio.CancelledError):
            pass


async def serve(host: str, port: int, *, node_timeout: float = 5.0, session_ttl: float = 600.0) -> None:
    server = RelayServer(node_timeout=node_timeout, session_ttl=session_ttl)
    runner = web.AppRunner(server.app(), access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, host, port)
    await site.start()
    print(f"groove relay listening on ws://{host}:{port}/ws (status: http://{host}:{port}/status)", flush=True)
    housekeeping = asyncio.create_task(server.housekeeping())
    try:
        await asyncio.Event().wait()
    finally:
        housekeeping.cancel()
        await runner.cleanup()
