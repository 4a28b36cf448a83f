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


def _torch_dtype(name: str):
    import torch

    return {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16, "int8": torch.int8}[name]


def dtype_name(tensor) -> str:
    return str(tensor.dtype).removeprefix("torch.")


def check_payload(dtype: str, shape: list[int], payload_len: int) -> None:
    if dtype not in ITEMSIZE:
        raise ProtocolError(BAD_PAYLOAD, f"unsupported tensor dtype {dtype!r}")
    if any(d < 0 for d in shape):
        raise ProtocolError(BAD_PAYLOAD, f"negative dimension in tensor shape {shape}")
    expected = math.prod(shape) * ITEMSIZE[dtype]
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


def from_bytes(payload, dtype: str, shape: list[int]):
    """Zero-copy view of a payload as a tensor (validated against its header first)."""
    import torch

    check_payload(dtype, shape, len(payload))
    if len(payload) == 0:
        return torch.empty(shape, dtype=_torch_dtype(dtype))
    with warnings.catch_warnings():
        # Frames arrive as immutable bytes; the layers never write into their input.
        warnings.simplefilter("ignore", UserWarning)
        return torch.frombuffer(payload, dtype=_torch_dtype(dtype)).view(shape)
