"""Wire Protocol v2: pure encoding and validation, no sockets and no asyncio."""

from .errors import ProtocolError
from .framing import decode, encode
from .messages import PROTOCOL_VERSION

__all__ = ["PROTOCOL_VERSION", "ProtocolError", "decode", "encode"]
