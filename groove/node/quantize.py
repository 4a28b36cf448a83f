"""Weight-only int8 quantization of a node's linear layers (``--quantize int8``).

Each output channel keeps one scale (symmetric, absmax / 127), and activations stay in the
compute dtype, so decoding reads a quarter of float32's bytes or half of bfloat16's.
torch's ``_weight_int8pack_mm`` does the matmul without dequantizing the whole matrix.
"""

from __future__ import annotations

import torch
from torch import nn


class Int8Linear(nn.Module):
    def __init__(self, linear: nn.Linear, compute_dtype: torch.dtype):
        super().__init__()
        w = linear.weight.detach().float()
        scales = w.abs().amax(dim=1).clamp(min=1e-12) / 127.0
        self.register_buffer("weight", torch.round(w / scales[:, None]).clamp(-127, 127).to(torch.int8).contiguous())
        self.register_buffer("scales", scales.to(device=w.device, dtype=compute_dtype))
        self.bias = linear.bias
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self._packed_op = True

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        lead = x.shape[:-1]
        flat = x.reshape(-1, x.shape[-1]).contiguous()
        if self._packed_op:
            try:
                y = torch.ops.aten._weight_int8pack_mm(flat, self.weight, self.scales)
            except (RuntimeError, NotImplementedError):
                # Some device/dtype pairs lack the fused kernel: dequantize per call instead.
                self._packed_op = False
                y = self._dequantized(flat)
        else:
            y = self._dequantized(flat)
        y = y.reshape(*lead, self.out_features)
        return y + self.bias if self.bias is not None else y

    def _dequantized(self, flat: torch.Tensor) -> torch.Tensor:
        return flat @ (self.weight.to(flat.dtype) * self.scales[:, None].to(flat.dtype)).T


def quantize_int8(model: nn.Module, compute_dtype: torch.dtype) -> int:
    """Replace every nn.Linear under ``model`` in place; returns how many were replaced."""
    targets = [(name, mod) for name, mod in model.named_modules() if isinstance(mod, nn.Linear)]
    for name, linear in targets:
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, child, Int8Linear(linear, compute_dtype))
    return len(targets)
