"""Faster linear layers for a node's slice: prepacked bfloat16 and weight-only int8.

**Prepacked bfloat16** (default on CPU, ``--no-pack`` turns it off). An ``nn.Linear`` in
bfloat16 on CPU reorders its weight into oneDNN's blocked layout on every call; at batch 1
that reorder costs as much as the matmul. Packing each weight once at load time (what
inductor's ``freezing`` does) streams the weights about 1.5x faster here, and the results
are bit-for-bit those of ``nn.Linear``: it is the same oneDNN kernel without the repeated
reorder. Layers with a bias (Qwen2's q/k/v projections, a few percent of the weights) are
left alone: ``addmm`` adds the bias with other rounding than the fused kernel. So is
float32, where ``nn.Linear`` uses MKL and oneDNN rounds differently.

**Weight-only int8** (``--quantize int8``). Each output channel keeps one scale
(symmetric, absmax / 127) and activations stay in the compute dtype, so decoding reads half
of bfloat16's bytes. torch's ``_weight_int8pack_mm`` does the matmul without dequantizing
the whole matrix.
"""

from __future__ import annotations

import threading
from contextlib import contextmanager
from typing import Callable

import torch
from torch import nn


def replace_linears(model: nn.Module, make: Callable[[nn.Module], nn.Module], kinds: tuple = (nn.Linear,)) -> int:
    """Swap every module of ``kinds`` (nn.Linear) under ``model`` for ``make(module)``;
    returns how many were visited."""
    # Names only: holding the modules would keep every original weight alive until the
    # end, doubling the peak memory of the conversion.
    names = [name for name, mod in model.named_modules() if isinstance(mod, kinds)]
    for name in names:
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, child, make(getattr(parent, child)))
    return len(names)


def packing_available(device: torch.device, dtype: torch.dtype) -> bool:
    return device.type == "cpu" and dtype == torch.bfloat16 and torch.backends.mkldnn.is_available()


class PackedLinear(nn.Module):
    def __init__(self, linear: nn.Linear):
        super().__init__()
        if linear.bias is not None:
            raise ValueError("PackedLinear is bit-exact only without a bias")
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.register_buffer("packed", torch.ops.mkldnn._reorder_linear_weight(linear.weight.detach(), 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.ops.mkldnn._linear_pointwise(x, self.packed, None, "none", [], "")


def linear_converter(quantize: str, pack: bool, device: torch.device, dtype: torch.dtype):
    """What a node does to each loaded nn.Linear, and the name it reports for it:
    int8 quantization, packing (bias-free layers only), or nothing."""
    if quantize == "int8":
        return (lambda linear: Int8Linear(linear, dtype)), "int8"
    if pack and packing_available(device, dtype):
        return (lambda linear: PackedLinear(linear) if linear.bias is None else linear), "packed"
    return None, ""


DEQUANTIZE_ABOVE_ROWS = 32


class Int8Linear(nn.Module):
    def __init__(self, linear: nn.Linear, compute_dtype: torch.dtype):
        super().__init__()
        w = linear.weight.detach()
        q = torch.empty(w.shape, dtype=torch.int8, device=w.device)
        scales = torch.empty(w.shape[0], dtype=torch.float32, device=w.device)
        for i in range(0, w.shape[0], 4096):  # in row blocks: no float32 copy of a whole LM head
            block = w[i : i + 4096].float()
            s = block.abs().amax(dim=1).clamp(min=1e-12) / 127.0
            q[i : i + 4096] = torch.round(block / s[:, None]).clamp(-127, 127).to(torch.int8)
            scales[i : i + 4096] = s
        self.register_buffer("weight", q)
        self.register_buffer("scales", scales.to(compute_dtype))
        self.bias = linear.bias
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self._packed_op = True

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        lead = x.shape[:-1]
        flat = x.reshape(-1, x.shape[-1]).contiguous()
        # The fused int8 kernel wins at decode sizes; for prefill a dequantized matmul is
        # about 3x faster (measured at 512 rows).
        if self._packed_op and flat.shape[0] <= DEQUANTIZE_ABOVE_ROWS:
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


class RowLayout(threading.local):
    """The pieces of the forward pass running on this thread, as row counts: ``None``
    outside a pass. Set by the shard around each pass."""

    counts: list[int] | None = None


LAYOUT = RowLayout()


@contextmanager
def row_layout(counts: list[int]):
    LAYOUT.counts = counts
    try:
        yield
    finally:
        LAYOUT.counts = None


class RowExact(nn.Module):
    """A linear layer whose kernel rounds a one-row call differently from a many-row call
    (oneDNN's bfloat16 matmul does, for Qwen2.5-0.5B's down projection: its one-row path
    sums in another order). In a batched pass, each single-row piece (a decode step) gets
    a one-row call of its own, exactly as it would alone; pieces of several rows go
    together in one call, which rounds each row as a call of its own size would."""

    def __init__(self, inner: nn.Module):
        super().__init__()
        self.inner = inner

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        counts = LAYOUT.counts
        if not counts or len(counts) == 1 or x.dim() != 3 or x.shape[1] != sum(counts) or 1 not in counts:
            return self.inner(x)
        singles, many, row = [], [], 0
        for n in counts:
            (singles if n == 1 else many).extend(range(row, row + n))
            row += n
        parts = [self.inner(x[:, j : j + 1]) for j in singles]
        if many:
            parts.append(self.inner(x[:, many]))
        order = torch.tensor(singles + many, device=x.device)
        out = torch.cat(parts, dim=1)
        return out[:, torch.argsort(order)]


# Row counts the probe tries: kernels pick paths by size (MKL's float32 matmul rounds 5 rows
# unlike 1 where it rounds 24 rows like 1), and a pass's pieces come in all of these.
PROBE_ROWS = (2, 3, 4, 5, 6, 7, 8, 12, 16, 24, 32)


def single_row_differs(linear: nn.Module, in_features: int, device, dtype, rows: tuple[int, ...] = PROBE_ROWS) -> bool:
    """Whether the module's one-row results differ from the same rows in a larger call of
    any of ``rows`` rows. Rounding differences show in a few outputs only, so the probe
    takes many rows."""
    g = torch.Generator(device="cpu").manual_seed(0)
    x = torch.randn(1, max(rows), in_features, generator=g).to(device=device, dtype=dtype)
    with torch.inference_mode():
        alone = torch.cat([linear(x[:, j : j + 1]) for j in range(x.shape[1])], dim=1)
        return any(not torch.equal(linear(x[:, :n]), alone[:, :n]) for n in rows)


def make_row_exact(model: nn.Module, device, dtype) -> list[str]:
    """Wrap every linear layer whose kind fails ``single_row_differs`` in ``RowExact``,
    probing each kind (class, shape, bias) on its first two layers: a kernel's summation
    order does not depend on the weights, but whether it shows in the probe's outputs
    does. Returns the wrapped names."""
    verdicts: dict[tuple, list[bool]] = {}

    def wrap(mod: nn.Module) -> nn.Module:
        kind = (type(mod), mod.in_features, mod.out_features, getattr(mod, "bias", None) is not None)
        seen = verdicts.setdefault(kind, [])
        if len(seen) < 2 and not any(seen):
            seen.append(single_row_differs(mod, mod.in_features, device, dtype))
        return RowExact(mod) if any(seen) else mod

    replace_linears(model, wrap, kinds=(nn.Linear, PackedLinear, Int8Linear))
    return [name for name, mod in model.named_modules() if isinstance(mod, RowExact)]
