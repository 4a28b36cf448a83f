"""Frames: ``[u32 little-endian header length][msgpack header][raw payload]``.

The relay decodes only the header (a few dozen bytes) and forwards the frame bytes as they
arrived, so tensor payloads are never copied or parsed on the way through.
"""

from __future__ import annotations

import struct

import msgspec

from .errors import BAD_FRAME, BAD_HEADER, BAD_VERSION, ProtocolError
from .messages import PROTOCOL_VERSION, Message

_LEN = struct.Struct("<I")
MAX_HEADER_BYTES = 1 << 20
DEFAULT_MAX_FRAME_BYTES = 256 << 20

_encoder = msgspec.msgpack.Encoder()
_decoder = msgspec.msgpack.Decoder(Message)


class _VersionProbe(msgspec.Struct):
    v: int = -1
    type: str = ""


_probe = msgspec.msgpack.Decoder(_VersionProbe)


def encode(msg: Message, payload: bytes | bytearray | memoryview = b"") -> bytes:
    header = _encoder.encode(msg)
    return b"".join((_LEN.pack(len(header)), header, payload))


def decode(frame: bytes | bytearray | memoryview, max_frame: int = DEFAULT_MAX_FRAME_BYTES) -> tuple[Message, memoryview]:
    """Return the validated header and a zero-copy view of the payload."""
    view = memoryview(frame)
    if len(view) > max_frame:
        raise ProtocolError(BAD_FRAME, f"frame of {len(view)} bytes exceeds the limit of {max_frame}")
    if len(view) < _LEN.size:
        raise ProtocolError(BAD_FRAME, f"frame of {len(view)} bytes is shorter than its length prefix")
    (hlen,) = _LEN.unpack_from(view)
    if hlen > MAX_HEADER_BYTES or _LEN.size + hlen > len(view):
        raise ProtocolError(BAD_FRAME, f"header length {hlen} does not fit in a frame of {len(view)} bytes")
    header = view[_LEN.size : _LEN.size + hlen]
    try:
        msg = _decoder.decode(header)
    except (msgspec.ValidationError, msgspec.DecodeError) as exc:
        _raise_version_error(header)
        raise ProtocolError(BAD_HEADER, f"invalid header: {exc}") from None
    if msg.v != PROTOCOL_VERSION:
        raise ProtocolError(BAD_VERSION, f"protocol version {msg.v} is not supported (this peer speaks {PROTOCOL_VERSION})")
    return msg, view[_LEN.size + hlen :]


def _raise_version_error(header: memoryview) -> None:
    # A peer of another protocol version may use fields this one does not know; report the
    # version mismatch rather than the schema error it causes.
    try:
        probe = _probe.decode(header)
    except (msgspec.ValidationError, msgspec.DecodeError):
        return
    if probe.v != PROTOCOL_VERSION and probe.v != -1:
        raise ProtocolError(BAD_VERSION, f"protocol version {probe.v} is not supported (this peer speaks {PROTOCOL_VERSION})")
