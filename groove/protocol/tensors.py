"""Tensor payload codec: raw little-endian bytes, dtype and shape in the header.

torch is imported lazily so that importing ``groove.protocol`` (as the relay does) never
loads it.
"""

from __future__ import annotations

import math
import sys
import warnings

from .errors import BAD_PAYLOAD, ProtocolError

ITEMSIZE = {"float32": 4, "bfloat16": 2, "float16": 2, "int8": 1}
# Hidden states quantized per token for slow links (as distributed-llama's q80 buffers):
# a float32 scale for each vector along the last dimension, then one int8 per element.
Q8 = "q8"
WIRE_DTYPES = ("float32", "bfloat16", "float16", Q8)


def _torch_dtype(name: str):
    import torch

    return {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16, "int8": torch.int8}[name]


def dtype_name(tensor) -> str:
    return str(tensor.dtype).removeprefix("torch.")


def payload_size(dtype: str, shape: list[int]) -> int:
    if dtype == Q8:
        return math.prod(shape) + 4 * math.prod(shape[:-1])
    return math.prod(shape) * ITEMSIZE[dtype]


def check_payload(dtype: str, shape: list[int], payload_len: int) -> None:
    if dtype not in ITEMSIZE and dtype != Q8:
        raise ProtocolError(BAD_PAYLOAD, f"unsupported tensor dtype {dtype!r}")
    if any(d < 0 for d in shape) or (dtype == Q8 and not shape):
        raise ProtocolError(BAD_PAYLOAD, f"bad tensor shape {shape} for {dtype}")
    expected = payload_size(dtype, shape)
    if expected != payload_len:
        raise ProtocolError(BAD_PAYLOAD, f"payload is {payload_len} bytes but {dtype}{shape} needs {expected}")


def to_bytes(tensor) -> tuple[str, list[int], memoryview]:
    """Serialize a tensor to (dtype, shape, bytes) without a copy when it is contiguous on CPU."""
    import torch

    t = tensor.detach()
    if t.device.type != "cpu":
        t = t.to("cpu")
    t = t.contiguous()
    if sys.byteorder != "little":  # pragma: no cover - no big-endian hosts to test on
        raise RuntimeError("big-endian hosts are not supported")
    name = dtype_name(t)
    raw = t.view(torch.uint8) if t.dtype != torch.uint8 else t
    return name, list(t.shape), memoryview(raw.numpy()).cast("B")


def to_wire(tensor, wire: str) -> tuple[str, list[int], memoryview]:
    """Hidden states as they cross a link: cast to a float ``wire`` dtype, or quantized to
    ``q8`` (per-vector absmax scale: a quarter of float32's bytes, half of bfloat16's)."""
    import torch

    if wire != Q8:
        return to_bytes(tensor.to(_torch_dtype(wire)))
    t = tensor.detach().to("cpu", torch.float32)
    scales = t.abs().amax(dim=-1).clamp(min=1e-12) / 127.0
    q = torch.round(t / scales.unsqueeze(-1)).clamp(-127, 127).to(torch.int8)
    _, _, raw_scales = to_bytes(scales)
    _, _, raw_q = to_bytes(q)
    return Q8, list(t.shape), memoryview(bytes(raw_scales) + bytes(raw_q))


def from_bytes(payload, dtype: str, shape: list[int]):
    """Zero-copy view of a payload as a tensor (validated against its header first); a
    ``q8`` payload is dequantized to float32."""
    import torch

    check_payload(dtype, shape, len(payload))
    if dtype == Q8:
        vectors = math.prod(shape[:-1])
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)
            scales = torch.frombuffer(payload, dtype=torch.float32, count=vectors) if vectors else torch.empty(0)
            q = torch.frombuffer(payload, dtype=torch.int8, offset=4 * vectors) if math.prod(shape) else torch.empty(0, dtype=torch.int8)
        return q.view(shape).to(torch.float32) * scales.view(*shape[:-1], 1)
    if len(payload) == 0:
        return torch.empty(shape, dtype=_torch_dtype(dtype))
    with warnings.catch_warnings():
        # Frames arrive as immutable bytes; the layers never write into their input.
        warnings.simplefilter("ignore", UserWarning)
        return torch.frombuffer(payload, dtype=_torch_dtype(dtype)).view(shape)
