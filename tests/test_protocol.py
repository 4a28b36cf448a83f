"""Wire Protocol v2, tested without a network (the codec is pure)."""

from __future__ import annotations

import struct

import msgspec
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from groove.protocol import PROTOCOL_VERSION, ProtocolError, decode, encode
from groove.protocol import errors as E
from groove.protocol import messages as M
from groove.protocol.address import http_url, relay_url
from groove.protocol.tensors import check_payload, from_bytes, to_bytes

SAMPLES = [
    M.Hello(role="node", token="t", software="groove"),
    M.Welcome(peer_id="n-1"),
    M.NodeRegister(model="m", fingerprint="f", num_layers=4, layers=M.Range(0, 1), device="cpu", dtype="float32", hidden_size=8, vocab_size=16),
    M.Registered(node_id="n-1"),
    M.Heartbeat(sessions=1, tokens_processed=5),
    M.OpenSession(model="m", sampling=M.Sampling(temperature=0.0, seed=3)),
    M.SessionOpened(session="s", model="m", fingerprint="f", pipeline=["a", "b"], ranges=[M.Range(0, 1), M.Range(2, 3)]),
    M.PipelineConfig(session="s", position=0, length=2, sampling=M.Sampling()),
    M.Generate(session="s", tokens=[1, 2, 3], max_tokens=4),
    M.Forward(session="s", seq=2, start=3, count=1, tokens=[7], remaining=3),
    M.Forward(session="s", seq=2, start=3, count=1, dtype="bfloat16", shape=[1, 1, 8]),
    M.Result(session="s", seq=2, token=9, finish="stop"),
    M.Result(session="s", token=None, finish="cancelled"),
    M.Cancel(session="s"),
    M.CloseSession(session="s"),
    M.Error(code="x", message="y", missing=[M.Range(2, 3)]),
]


@pytest.mark.parametrize("msg", SAMPLES, ids=lambda m: type(m).__name__)
def test_every_message_round_trips(msg):
    payload = b"\x01\x02\x03\x04"
    out, view = decode(encode(msg, payload))
    assert out == msg
    assert bytes(view) == payload
    assert out.v == PROTOCOL_VERSION


def _frame(header: dict, payload: bytes = b"") -> bytes:
    raw = msgspec.msgpack.encode(header)
    return struct.pack("<I", len(raw)) + raw + payload


def _code(frame: bytes, **kw) -> str:
    with pytest.raises(ProtocolError) as info:
        decode(frame, **kw)
    return info.value.code, info.value.message


def test_wrong_version_is_named():
    code, text = _code(_frame({"type": "cancel", "v": 1, "session": "s"}))
    assert code == E.BAD_VERSION and "version 1" in text


def test_wrong_version_with_unknown_fields_still_reports_the_version():
    code, text = _code(_frame({"type": "cancel", "v": 3, "session": "s", "future_field": 1}))
    assert code == E.BAD_VERSION


def test_unknown_message_type():
    code, text = _code(_frame({"type": "launch_missiles", "v": 2}))
    assert code == E.BAD_HEADER and "launch_missiles" in text


def test_wrong_field_type_is_named():
    code, text = _code(_frame({"type": "generate", "v": 2, "session": "s", "tokens": ["a"], "max_tokens": 3}))
    assert code == E.BAD_HEADER and "tokens" in text


def test_missing_field_is_named():
    code, text = _code(_frame({"type": "generate", "v": 2, "session": "s", "tokens": [1]}))
    assert code == E.BAD_HEADER and "max_tokens" in text


def test_unknown_field_is_rejected():
    code, text = _code(_frame({"type": "cancel", "v": 2, "session": "s", "evil": True}))
    assert code == E.BAD_HEADER and "evil" in text


def test_frame_limits():
    assert _code(b"\x01")[0] == E.BAD_FRAME
    assert _code(struct.pack("<I", 1000) + b"abc")[0] == E.BAD_FRAME
    big = encode(M.Cancel(session="s"), b"\0" * 100)
    code, text = _code(big, max_frame=50)
    assert code == E.BAD_FRAME and "limit" in text


def test_payload_must_match_its_header():
    with pytest.raises(ProtocolError) as info:
        check_payload("float32", [1, 2, 8], 10)
    assert info.value.code == E.BAD_PAYLOAD and "64" in info.value.message
    with pytest.raises(ProtocolError):
        check_payload("float64", [1], 8)
    with pytest.raises(ProtocolError):
        check_payload("float32", [-1, 4], 16)


@pytest.mark.parametrize("dtype", ["float32", "bfloat16", "float16"])
def test_tensor_codec_is_lossless(dtype):
    import torch

    t = torch.randn(1, 3, 8).to(getattr(torch, dtype))
    name, shape, raw = to_bytes(t)
    frame = encode(M.Forward(session="s", start=0, count=3, dtype=name, shape=shape), raw)
    header, payload = decode(frame)
    back = from_bytes(payload, header.dtype, header.shape)
    assert back.dtype == t.dtype and torch.equal(back, t)


def test_protocol_package_does_not_import_torch_or_asyncio():
    import subprocess
    import sys

    code = "import sys, groove.protocol, groove.protocol.tensors; print('torch' in sys.modules, 'asyncio' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split()
    assert out == ["False", "False"]


def test_addresses():
    assert relay_url("1.2.3.4:8770") == "ws://1.2.3.4:8770/ws"
    assert relay_url("wss://relay.example:443") == "wss://relay.example:443/ws"
    assert relay_url("https://relay.example") == "wss://relay.example/ws"
    assert http_url("1.2.3.4:8770", "/status") == "http://1.2.3.4:8770/status"
    assert http_url("wss://r:1/ws", "/status") == "https://r:1/status"


@settings(max_examples=500, deadline=None)
@given(st.binary(max_size=256))
def test_arbitrary_bytes_raise_only_protocol_errors(data):
    try:
        decode(data)
    except ProtocolError:
        pass


@settings(max_examples=300, deadline=None)
@given(st.dictionaries(st.sampled_from(["type", "v", "id", "session", "tokens", "max_tokens", "start", "count", "shape", "token"]),
                       st.one_of(st.integers(-5, 5), st.text(max_size=5), st.lists(st.integers(-(2**63), 2**64 - 1), max_size=3), st.none(),
                                 st.sampled_from(["generate", "forward", "result", "hello", "cancel"]))))
def test_arbitrary_headers_raise_only_protocol_errors(header):
    try:
        decode(_frame(header))
    except ProtocolError:
        pass
