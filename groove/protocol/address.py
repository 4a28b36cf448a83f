"""Relay addresses as users type them: ``host:port``, ``ws://``/``wss://`` or ``http(s)://``."""

from __future__ import annotations


def relay_url(address: str) -> str:
    """The relay's WebSocket URL."""
    if address.startswith(("ws://", "wss://")):
        return address if address.rstrip("/").endswith("/ws") else address.rstrip("/") + "/ws"
    if address.startswith(("http://", "https://")):
        return "ws" + address[4:].rstrip("/") + "/ws"
    return f"ws://{address}/ws"


def http_url(address: str, path: str) -> str:
    """An HTTP URL on the relay's port (same host, same TLS)."""
    ws = relay_url(address).removesuffix("/ws")
    return "http" + ws[2:] + path
