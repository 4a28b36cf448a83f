"""A userspace TCP proxy that delays every byte by a fixed time in each direction, for
benchmarks of slow links on one machine (``tc netem`` needs a kernel module this machine
lacks). Order is kept, bandwidth is not limited: it models distance, not a thin pipe.
"""

from __future__ import annotations

import asyncio
import threading
import time


class LatencyProxy:
    """Listens on 127.0.0.1 (a free port) and forwards to ``target_port``, adding
    ``delay_s`` to each direction. Runs its own event loop in a daemon thread."""

    def __init__(self, target_port: int, delay_s: float, target_host: str = "127.0.0.1"):
        self.target = (target_host, target_port)
        self.delay_s = delay_s
        self.port = 0
        self.loop = asyncio.new_event_loop()
        self._ready = threading.Event()
        self._server: asyncio.AbstractServer | None = None
        self._writers: set[asyncio.StreamWriter] = set()
        self.thread = threading.Thread(target=self._run, name="latency-proxy", daemon=True)

    def __enter__(self) -> "LatencyProxy":
        self.thread.start()
        if not self._ready.wait(10):
            raise RuntimeError("the latency proxy did not start")
        return self

    def __exit__(self, *exc) -> None:
        self.stop()

    def stop(self) -> None:
        if self.loop.is_running():
            asyncio.run_coroutine_threadsafe(self._shutdown(), self.loop)
        self.thread.join(timeout=5)
        if not self.thread.is_alive() and not self.loop.is_closed():
            self.loop.close()

    async def _shutdown(self) -> None:
        if self._server is not None:
            self._server.close()
        tasks = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        for w in list(self._writers):
            w.close()
        self.loop.stop()

    def _run(self) -> None:
        asyncio.set_event_loop(self.loop)
        self._server = self.loop.run_until_complete(asyncio.start_server(self._accept, "127.0.0.1", 0))
        self.port = self._server.sockets[0].getsockname()[1]
        self._ready.set()
        self.loop.run_forever()

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            up_reader, up_writer = await asyncio.open_connection(*self.target)
            self._writers.update((writer, up_writer))
            await asyncio.gather(self._pump(reader, up_writer), self._pump(up_reader, writer), return_exceptions=True)
        except OSError:
            writer.close()
        except asyncio.CancelledError:
            # Stopping: asyncio would otherwise log the cancelled connection as an error.
            writer.close()

    async def _pump(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        """Read as data comes; a second task writes each chunk once it is ``delay_s`` old."""
        queue: asyncio.Queue = asyncio.Queue()

        async def deliver() -> None:
            while True:
                due, data = await queue.get()
                wait = due - time.monotonic()
                if wait > 0:
                    await asyncio.sleep(wait)
                if data is None:
                    break
                writer.write(data)
                await writer.drain()

        sender = asyncio.create_task(deliver())
        try:
            while data := await reader.read(1 << 16):
                queue.put_nowait((time.monotonic() + self.delay_s, data))
        finally:
            queue.put_nowait((time.monotonic() + self.delay_s, None))
            try:
                await sender
            finally:
                writer.close()
