"""Error codes carried by ERROR envelopes, and the exception the codec raises."""

from __future__ import annotations

BAD_FRAME = "bad_frame"
BAD_HEADER = "bad_header"
BAD_VERSION = "bad_version"
BAD_PAYLOAD = "bad_payload"
BAD_REQUEST = "bad_request"
UNKNOWN_SESSION = "unknown_session"
NO_PIPELINE = "no_pipeline"
UNKNOWN_MODEL = "unknown_model"
NODE_LOST = "node_lost"
NODE_FAILED = "node_failed"
BUSY = "busy"
REJECTED = "rejected"
EXPIRED = "expired"
UNAUTHORIZED = "unauthorized"
TOO_LARGE = "too_large"


class ProtocolError(Exception):
    """A frame or header that cannot be accepted; ``code`` is one of the constants above."""

    def __init__(self, code: str, message: str):
        super().__init__(message)
        self.code = code
        self.message = message
