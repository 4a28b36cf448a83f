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


def client_ssl(address: str, ca_file: str | None = None):
    """TLS settings for dialing ``address``: True (aiohttp's default) for plain ws/http, else
    a context that verifies the relay's certificate (against ``ca_file`` for a private CA)."""
    if not relay_url(address).startswith("wss://"):
        return True
    import ssl

    return ssl.create_default_context(cafile=ca_file) if ca_file else ssl.create_default_context()
