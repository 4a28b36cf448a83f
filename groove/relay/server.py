"""The relay's I/O: one aiohttp server with the WebSocket (``/ws``) and HTTP on one port.

Each connection gets a bounded outbound queue drained by its own writer task, so a slow
reader applies backpressure to whoever routes frames to it instead of growing memory.
"""

from __future__ import annotations

import asyncio
import itertools
import logging

from aiohttp import WSMsgType, web

from ..protocol.framing import DEFAULT_MAX_FRAME_BYTES
from .core import Relay, Send

log = logging.getLogger("groove.relay")

OUTBOUND_QUEUE = 1024


class RelayServer:
    def __init__(self, max_frame: int = DEFAULT_MAX_FRAME_BYTES, heartbeat_s: float = 5.0):
        self.relay = Relay(max_frame=max_frame)
        self.max_frame = max_frame
        self.heartbeat_s = heartbeat_s
        self.queues: dict[str, asyncio.Queue] = {}
        self._ids = itertools.count(1)

    def app(self) -> web.Application:
        app = web.Application(client_max_size=1 << 20)
        app.router.add_get("/ws", self.ws_handler)
        app.router.add_get("/status", self.status_handler)
        app.router.add_get("/", self.index_handler)
        return app

    async def status_handler(self, request: web.Request) -> web.Response:
        return web.json_response(self.relay.status())

    async def index_handler(self, request: web.Request) -> web.Response:
        return web.Response(text="Groove relay. WebSocket at /ws, JSON status at /status.\n")

    async def dispatch(self, sends: list[Send]) -> None:
        for send in sends:
            q = self.queues.get(send.conn)
            if q is not None:
                await q.put(send.frame)

    async def ws_handler(self, request: web.Request) -> web.WebSocketResponse:
        ws = web.WebSocketResponse(max_msg_size=self.max_frame, heartbeat=self.heartbeat_s)
        await ws.prepare(request)
        conn = f"conn-{next(self._ids)}"
        queue: asyncio.Queue = asyncio.Queue(OUTBOUND_QUEUE)
        self.queues[conn] = queue
        self.relay.connect(conn)
        writer = asyncio.create_task(self._writer(ws, queue))
        try:
            async for msg in ws:
                if msg.type == WSMsgType.BINARY:
                    await self.dispatch(self.relay.receive(conn, msg.data))
                elif msg.type == WSMsgType.TEXT:
                    await self.dispatch(self.relay.receive(conn, msg.data.encode()))
                elif msg.type == WSMsgType.ERROR:
                    break
        finally:
            self.queues.pop(conn, None)
            writer.cancel()
            await self.dispatch(self.relay.disconnect(conn))
        return ws

    @staticmethod
    async def _writer(ws: web.WebSocketResponse, queue: asyncio.Queue) -> None:
        try:
            while True:
                frame = await queue.get()
                await ws.send_bytes(frame)
        except (ConnectionError, RuntimeError, asyncio.CancelledError):
            pass


async def serve(host: str, port: int, ready: asyncio.Event | None = None) -> None:
    server = RelayServer()
    runner = web.AppRunner(server.app(), access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, host, port)
    await site.start()
    print(f"groove relay listening on ws://{host}:{port}/ws (status: http://{host}:{port}/status)", flush=True)
    if ready is not None:
        ready.set()
    try:
        await asyncio.Event().wait()
    finally:
        await runner.cleanup()
