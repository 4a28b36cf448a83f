"""Faster linear layers for a node's slice: prepacked bfloat16 and weight-only int8.

**Prepacked bfloat16** (default on CPU, ``--no-pack`` turns it off). An ``nn.Linear`` in
bfloat16 on CPU reorders its weight into oneDNN's blocked layout on every call; at batch 1
that reorder costs as much as the matmul. Packing each weight once at load time (what
inductor's ``freezing`` does) streams the weights 1.3-1.6x faster. But the packed kernel
is not always the one ``nn.Linear`` takes, and then it sums in another order: on a CPU
with AMX, for calls of 33 rows and more, for a few sizes near 80 rows, and for one-row
calls of the 4864 -> 896 down projection, where only about one input in ten shows it in
its 896 outputs. Which blocked layout is fastest depends on the CPU too (with AMX, the one
oneDNN picks for 16 rows; without, the one for a single row). So:

- ``choose_hint`` times the candidate layouts on the first layer of each shape, each with
  oneDNN's kernel and (where it reads that layout) groove's own one-row kernel ``bf16.c``,
  and keeps the fastest whose one-row calls round like ``nn.Linear``'s.
- Each call size takes the packed weight only once calls of that size have matched
  ``nn.Linear`` on the unpacked weight over ``COMPARED_OUTPUTS`` outputs (decode sizes
  up to ``CHECKED_ROWS`` at load, for what fits ``settle``'s time; any size on its first
  calls, prompts and their chunks included); a size that ever differs keeps
  ``nn.Linear``'s kernel, which unpacks the weight for each call.

Results are then bit-for-bit those of ``nn.Linear`` at every size. Layers with a bias
(Qwen2's q/k/v projections) go through the same checks with the bias fused into the
packed kernel: on some CPUs that rounds like ``addmm`` (all 300 inputs tried on one with
AMX), on others it does not, and the checks then keep ``addmm``. float32 is left alone:
``nn.Linear`` uses MKL there and oneDNN rounds differently.

**groove's bfloat16 kernel.** ``bf16.c`` reads the packed weight in place and sums each
output in the order oneDNN's one-row kernel does on a CPU with AVX-512 BF16 (found by
probing ``nn.Linear``), so its results are ``nn.Linear``'s bit for bit there, 1.2-1.9x
faster than oneDNN's kernel for calls of up to ``OWN_KERNEL_ROWS`` rows (measured from
memory on Qwen2.5-0.5B's shapes). It goes through the same checks as oneDNN's packed
kernel: a CPU where oneDNN sums otherwise keeps oneDNN's.

**Input strides.** ``nn.Linear`` in bfloat16 rounds a slice ``x[:, a:b]`` of a longer
sequence unlike a tensor of its own with the same values (oneDNN sees the slice's batch
stride): every call here goes through ``canonical`` first, so a piece of a batched pass is
rounded as the same rows alone would be.

**Weight-only int8** (``--quantize int8``). Each output channel keeps one scale
(symmetric, absmax / 127) and activations stay in the compute dtype, so decoding reads half
of bfloat16's bytes. Decode-sized calls multiply by the int8 weights directly: in
groove's own kernel (``q8.c``, compiled on the node's machine by ``cpu_kernels``), else in
torch's ``_weight_int8pack_mm``.
"""

from __future__ import annotations

import threading
import time
from contextlib import contextmanager
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from . import cpu_kernels


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


def canonical(x: torch.Tensor) -> torch.Tensor:
    """``x`` with the strides a tensor of its own shape has (a slice of a longer sequence
    keeps its parent's stride in the batch dimension of size 1, and oneDNN rounds by it)."""
    return x.view(x.shape)


# oneDNN's batch-size hint for the packed layout: the layout it picks for one row, and the
# one it picks for a block of rows (AMX tiles are 16 rows).
PACK_HINTS = (1, 16)
# Call sizes settled at load: decode batches (RowExact sends at most 32 rows per call where
# sizes round differently). Prompt sizes are settled on first use.
CHECKED_ROWS = 32
# Outputs compared equal before a call size takes the packed weight. The rarest difference
# seen (the down projection's one-row calls) shows in about one output in 8,000, so a
# size that differs is caught with odds of about 3,000 to 1.
COMPARED_OUTPUTS = 1 << 16


class PackedLinear(nn.Module):
    """A linear layer with its weight packed once, in the layout oneDNN picks for ``hint``
    rows. See the module's docstring for when it takes the packed weight."""

    # (in, out, bias, hint, own kernel) -> {call size: outputs compared equal so far, or -1
    # once one differed}. Kernels depend on shapes, not weights: the count serves every layer
    # of a shape.
    sizes_checked: dict[tuple[int, int, bool, int, bool], dict[int, int]] = {}
    # (in, out, hint) -> whether bf16.c reads oneDNN's packed layout: checked on the first
    # layer of each shape (oneDNN picks the layout by shape, hint and CPU).
    layout_read: dict[tuple[int, int, int], bool] = {}

    def __init__(self, linear: nn.Linear, hint: int = 1, own_kernel: bool = False):
        super().__init__()
        self.in_features, self.out_features, self.hint = linear.in_features, linear.out_features, hint
        self.register_buffer("packed", torch.ops.mkldnn._reorder_linear_weight(linear.weight.detach(), hint))
        self.register_buffer("bias", None if linear.bias is None else linear.bias.detach())
        self.kernel = cpu_kernels.load("bf16") if own_kernel else None
        if self.kernel is not None:
            shape = (self.in_features, self.out_features, hint)
            if shape not in self.layout_read:
                self.layout_read[shape] = cpu_kernels.reads_packed_layout(linear.weight.detach(), self.packed)
            if not self.layout_read[shape]:
                self.kernel = None
        self._address: tuple[torch.Tensor, int] | None = None
        key = (self.in_features, self.out_features, self.bias is not None, hint, self.kernel is not None)
        self.checked = self.sizes_checked.setdefault(key, {})
        # The unpacked weight the checks compare against while loading: the original, so
        # they need no unpacked copy (272 MB for Qwen2.5-0.5B's LM head). None afterwards.
        self.reference: torch.Tensor | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows = x.numel() // self.in_features
        compared = self.checked.get(rows, 0)
        if compared >= COMPARED_OUTPUTS:
            return self.fast(x)
        # The checks below are shared by every layer of this shape: a slice would record
        # nn.Linear's rounding of slices, not of the tensors the other calls pass.
        x = canonical(x)
        want = self.unpacked(x)
        if compared >= 0:
            self.checked[rows] = compared + want.numel() if torch.equal(self.fast(x), want) else -1
        return want

    def settled(self, rows: int) -> bool:
        compared = self.checked.get(rows, 0)
        return compared < 0 or compared >= COMPARED_OUTPUTS

    def unpacks(self, rows: int) -> bool:
        """Whether calls of ``rows`` rows unpack the whole weight each time: the packed
        kernel rounded them unlike ``nn.Linear``, and the original weight is gone."""
        return self.reference is None and self.checked.get(rows, 0) < 0

    def fast(self, x: torch.Tensor) -> torch.Tensor:
        # A decode step makes seven of these calls per layer, and Python's cost around one
        # was as large as a small layer's kernel (see BENCHMARKS.md): buffers are read from
        # ``_buffers`` (nn.Module's ``__getattr__`` is slow) and nothing is reshaped twice.
        bias = self._buffers["bias"]
        if self.kernel is not None and x.numel() <= OWN_KERNEL_ROWS * self.in_features:
            return cpu_kernels.bf16_linear(self.kernel, x, self.address(), self.out_features, bias)
        return torch.ops.mkldnn._linear_pointwise(canonical(x), self._buffers["packed"], bias, "none", [], "")

    def alone_rows(self) -> int:
        """How many rows one call can take while giving each row what a one-row call gives
        it: groove's kernel sums every row alike in calls of up to ``OWN_KERNEL_ROWS``, and
        serves this layer once its one-row calls have matched ``nn.Linear``'s. 0 otherwise."""
        return OWN_KERNEL_ROWS if self.kernel is not None and self.checked.get(1, 0) >= COMPARED_OUTPUTS else 0

    def address(self) -> int:
        """Where the packed weight's bytes are (looked up again should the buffer change)."""
        packed = self._buffers["packed"]
        if self._address is None or self._address[0] is not packed:
            self._address = (packed, cpu_kernels.packed_address(packed))
        return self._address[1]

    def unpacked(self, x: torch.Tensor) -> torch.Tensor:
        weight = self.reference if self.reference is not None else self.packed.to_dense()
        return F.linear(x, weight, self.bias)


def settle(linear: PackedLinear, sizes, seconds: float | None = None, seed: int = 0) -> None:
    """Compare calls of each of ``sizes`` rows (random inputs) until they are settled, for
    at most ``seconds``; what is left is settled by the first real calls."""
    g = torch.Generator(device="cpu").manual_seed(seed)
    end = None if seconds is None else time.perf_counter() + seconds
    with torch.inference_mode():
        for rows in sizes:
            while not linear.settled(rows):
                if end is not None and time.perf_counter() > end:
                    return
                linear(torch.randn(1, rows, linear.in_features, generator=g).to(linear.packed.dtype))


def choose_hint(linear: nn.Linear, hints: tuple[int, ...] = PACK_HINTS, calls: int = 5) -> tuple[int, bool] | None:
    """The packed layout and kernel (oneDNN's, or groove's own: True) whose one-row call is
    fastest among those that round one-row calls like ``nn.Linear``; None when none does."""
    g = torch.Generator(device="cpu").manual_seed(0)
    x = torch.randn(1, 1, linear.in_features, generator=g).to(dtype=linear.weight.dtype)
    best: tuple[float, int, bool] | None = None
    with torch.inference_mode():
        for hint in hints:
            for own in (False, True):
                packed = PackedLinear(linear, hint, own_kernel=own)
                if own and packed.kernel is None:
                    continue  # no own kernel here, or it does not read this layout
                packed.reference = linear.weight
                settle(packed, [1])
                if packed.checked.get(1, 0) >= 0:
                    seconds = float("inf")
                    for _ in range(calls):
                        t0 = time.perf_counter()
                        packed.fast(x)
                        seconds = min(seconds, time.perf_counter() - t0)
                    best = min(best or (seconds, hint, own), (seconds, hint, own))
                del packed  # before the next layout is packed: one packed copy at a time
    return best[1:] if best else None


# Calls of up to this many rows take groove's own kernel where a layer has it. It reads the
# weight once per three rows, and from about 12 rows on oneDNN's blocked kernel is as fast
# (measured cold on Qwen2.5-0.5B's shapes: 1.2-1.4x oneDNN's speed at 1-3 rows, 1.1x at 8).
OWN_KERNEL_ROWS = 8

# The row probe's sizes settled at load, while the original weight is there: up to the LM
# head's probe cap (Shard's ``largest``). Only smaller layers are probed at larger sizes,
# and an unpacked copy of one of those is small.
SETTLED_FOR_PROBE = 64


class Packer:
    """The load-time converter for bfloat16 on CPU: packs each linear layer in the layout
    ``choose_hint`` picked for the first layer of its shape (and bias or not), and settles
    that shape's decode call sizes for up to ``settle_s`` seconds."""

    def __init__(self, settle_s: float = 0.5):
        self.settle_s = settle_s
        self.hints: dict[tuple[int, int, bool], tuple[int, bool] | None] = {}

    def __call__(self, linear: nn.Module) -> nn.Module:
        shape = (linear.in_features, linear.out_features, linear.bias is not None)
        first = shape not in self.hints
        if first:
            self.hints[shape] = choose_hint(linear)
        choice = self.hints[shape]
        if choice is None:
            return linear
        packed = PackedLinear(linear, *choice)
        if first:
            packed.reference = linear.weight
            # The sizes the row probe will call (make_row_exact) first, whatever they cost:
            # settled now, they need no unpacked copy of the weight later.
            settle(packed, [n for n in PROBE_ROWS if n <= SETTLED_FOR_PROBE])
            settle(packed, range(2, CHECKED_ROWS + 1), self.settle_s)
            packed.reference = None
        return packed


def linear_converter(quantize: str, pack: bool, device: torch.device, dtype: torch.dtype):
    """What a node does to each loaded nn.Linear, and the name it reports for it:
    int8 quantization, packing, or nothing."""
    if quantize == "int8":
        return (lambda linear: Int8Linear(linear, dtype)), "int8"
    if pack and packing_available(device, dtype):
        return Packer(), "packed"
    return None, ""


DEQUANTIZE_ABOVE_ROWS = 32
# Prefill dequantizes the weight a block of rows at a time: a whole LM head in bfloat16
# (272 MB, twice over while scaling) would make the peak of a node that quantized to save memory.
DEQUANTIZED_BLOCK_BYTES = 16 << 20


class Int8Linear(nn.Module):
    """Weight-only int8 (see the module's docstring). Calls of up to
    ``DEQUANTIZE_ABOVE_ROWS`` rows take the int8 weights as they are: in groove's own kernel
    (``cpu_kernels``) where it could be built, else in torch's ``_weight_int8pack_mm``.
    Longer calls dequantize.

    The own kernel is used for every shape, not only where it wins a one-layer timing: a
    layer timed alone sits in the CPU's cache, where torch's kernel looks as fast, but a
    decode step streams each weight from memory once. Through the last 12 layers and LM
    head of Qwen2.5-0.5B a decode step took 22.4 ms with the own kernel everywhere, 23.5 ms
    where it was kept only for the shapes it won, and 29.7 ms with torch's (AMD EPYC)."""

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
        # torch's kernel crashes the process (no exception) for inputs not a multiple of 16 wide.
        self._packed_op = self.in_features % 16 == 0
        self.kernel = None
        if q.device.type == "cpu":
            self.kernel = cpu_kernels.load("q8")
            if self.kernel is not None:
                self.register_buffer("scales32", scales)  # the kernel scales in float32

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # The int8 kernels win at decode sizes; for prefill a dequantized matmul is about
        # 3x faster (measured at 512 rows). The kernel's call is kept as lean as
        # PackedLinear.fast's, for the same reason.
        if self.kernel is not None and x.numel() <= DEQUANTIZE_ABOVE_ROWS * self.in_features:
            bias = self._parameters.get("bias")
            if bias is not None and (bias.dtype != x.dtype or not bias.is_contiguous()):
                bias = bias.to(x.dtype).contiguous()
            return cpu_kernels.int8_linear(self.kernel, x, self._buffers["weight"], self._buffers["scales32"], bias)
        lead = x.shape[:-1]
        flat = x.reshape(-1, x.shape[-1]).contiguous()
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
        rows = max(1, DEQUANTIZED_BLOCK_BYTES // (self.in_features * flat.element_size()))
        parts = [flat @ (self.weight[i : i + rows].to(flat.dtype) * self.scales[i : i + rows, None].to(flat.dtype)).T
                 for i in range(0, self.out_features, rows)]
        return parts[0] if len(parts) == 1 else torch.cat(parts, dim=1)


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
    """A linear layer whose kernel rounds a row differently depending on how many rows the
    call has (oneDNN's bfloat16 one-row path sums in another order; on a CPU with AMX its
    calls of 33 rows or more round unlike smaller ones; MKL's float32 varies by size too).
    In a batched pass every piece gets the rounding it would get alone: each piece of
    several rows (a prompt chunk, or a speculative step's rows, which the shard lays out
    as single rows) gets a call of its own size, and decode steps (single rows) go together
    in calls of at most ``safe`` rows, the largest size whose rows the probe found equal
    to one-row calls (1 where even two rows differ).

    Where even that is small, groove's bfloat16 kernel, where it serves the layer
    (``PackedLinear.alone_rows``), takes runs of up to ``OWN_KERNEL_ROWS`` single rows in one
    call: it sums each row as a one-row call does. Else ``pad`` (from ``transposed_pad``)
    may offer a way round: runs of more than ``safe`` and at most ``pad`` single rows go
    in one transposed call, weight times rows, padded to ``pad`` rows, whose kernel the
    probe found to sum each row like the one-row call. (On a CPU with AMX, oneDNN's one-row
    kernel for the 4864 -> 896 down projection rounds unlike every multi-row call, but like
    the transposed product of 33-128 rows: one call instead of a call per row.)"""

    def __init__(self, inner: nn.Module, safe: int = 1, pad: int | None = None):
        super().__init__()
        self.inner = inner
        self.safe = max(1, safe)
        self.pad = pad if pad is not None and pad > self.safe else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        counts = LAYOUT.counts
        if not counts or len(counts) == 1 or x.dim() != 3 or x.shape[1] != sum(counts):
            return self.inner(x)
        parts: list[torch.Tensor] = []
        row = run = 0  # run: single rows waiting to go out together, just before ``row``

        pad = self.pad if x.shape[0] == 1 else None
        # Single rows a call of groove's bfloat16 kernel gives their one-row results together.
        alone = self.inner.alone_rows() if isinstance(self.inner, PackedLinear) and x.shape[0] == 1 else 0

        def flush() -> None:
            if self.safe < run <= alone:
                parts.append(self.inner.fast(canonical(x[:, row - run : row])))
            elif run > self.safe:
                parts.append(transposed(self.inner.weight, x[:, row - run : row], pad))
            elif run:
                parts.append(self.inner(canonical(x[:, row - run : row])))

        most = max(pad or self.safe, alone)
        for n in counts:
            if n == 1:
                run += 1
                row += 1
                if run == most:
                    flush()
                    run = 0
            else:
                flush()
                run = 0
                parts.append(self.inner(canonical(x[:, row : row + n])))
                row += n
        flush()
        return parts[0] if len(parts) == 1 else torch.cat(parts, dim=1)


# Row counts the probe tries: kernels pick paths by size, and a pass's pieces come in all of
# these. MKL's float32 matmul rounds 5 rows unlike 1 where it rounds 24 rows like 1; on a
# CPU with AMX, oneDNN's bfloat16 matmul rounds 33 rows and more unlike 1 (measured).
PROBE_ROWS = (2, 3, 4, 5, 6, 7, 8, 12, 16, 24, 32, 33, 48, 64, 128, 256, 512)


def one_row_results(linear: nn.Module, in_features: int, device, dtype, extra: int = 0, least: int = 8,
                    seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """The probes' sample: random rows ``x`` [1, need + extra, in], and the one-row results
    of the first ``need`` of them [1, need, out]. Some differences show in one output in
    thousands, so ``need`` rows hold at least ``COMPARED_OUTPUTS`` outputs (``least`` rows at
    least; an LM head's rows hold enough outputs that a few do)."""
    need = max(least, -(-COMPARED_OUTPUTS // getattr(linear, "out_features", 1)))
    g = torch.Generator(device="cpu").manual_seed(seed)
    x = torch.randn(1, need + extra, in_features, generator=g).to(device=device, dtype=dtype)
    with torch.inference_mode():
        alone = torch.cat([linear(canonical(x[:, j : j + 1])) for j in range(need)], dim=1)
    return x, alone


def rows_like_one(linear: nn.Module, in_features: int, device, dtype, rows: tuple[int, ...] = PROBE_ROWS,
                  least: int = 8) -> int | None:
    """The largest call size (of ``rows``) up to which every call gives each row the
    result of a one-row call: None if all sizes do, 1 if even two rows differ. Calls of
    each size are laid end to end over ``one_row_results``'s sample."""
    x, alone = one_row_results(linear, in_features, device, dtype, extra=max(rows), least=least)
    need = alone.shape[1]
    safe = 1
    with torch.inference_mode():
        for n in sorted(rows):
            if isinstance(linear, PackedLinear) and linear.unpacks(n):
                # Counted as unlike one row without a call: a batch should never make such
                # calls anyway, and probing one would copy the weight (Llama-3.2-1B's LM head:
                # a 501 MiB copy at load, measured, when its 2-row calls rounded otherwise).
                return safe
            for start in range(0, need, n):
                together = linear(canonical(x[:, start : start + n]))
                m = min(n, need - start)
                if not torch.equal(together[:, :m], alone[:, start : start + m]):
                    return safe
                # Freed before the next size's call, not after it: an LM head's 64 rows are 19 MB.
                del together
            safe = n
    return None


def transposed(weight: torch.Tensor, x: torch.Tensor, pad: int) -> torch.Tensor:
    """``F.linear(x, weight)`` for ``x`` of shape [1, n, in], computed as weight times the
    rows, padded with zeros to ``pad`` rows (the size the probe checked: a kernel's
    summation order depends on the call's sizes, and each output column only on its own row)."""
    n = x.shape[1]
    rows = x.new_zeros(pad, x.shape[2])
    rows[:n] = x[0]
    return torch.mm(weight, rows.t()).t()[:n].unsqueeze(0)


# Padded sizes ``transposed_pad`` tries, largest first (one call then serves the most rows).
TRANSPOSED_PADS = (64, 48, 33, 32, 16, 8)


def transposed_pad(linear: nn.Module, device, dtype, pads: tuple[int, ...] = TRANSPOSED_PADS,
                   least: int = 8) -> int | None:
    """The largest of ``pads`` whose transposed calls (``transposed``) give every row the
    result of the layer's one-row call, over at least ``COMPARED_OUTPUTS`` outputs and
    with runs of several lengths; None if none does, or the layer is not a plain
    bias-free matmul on a weight it holds."""
    weight = getattr(linear, "weight", None)
    if type(linear) is not nn.Linear or linear.bias is not None or weight is None or weight.dim() != 2:
        return None
    x, alone = one_row_results(linear, linear.in_features, device, dtype, least=least, seed=1)
    need = alone.shape[1]
    with torch.inference_mode():
        for pad in pads:
            lengths = (pad, 2, pad // 2 + 1)  # runs come in every length up to the pad
            start = i = 0
            while start < need:
                n = min(lengths[i % len(lengths)], need - start)
                if not torch.equal(transposed(weight, x[:, start : start + n], pad), alone[:, start : start + n]):
                    break
                start, i = start + n, i + 1
            else:
                return pad
    return None


def kernels_in_use(model: nn.Module) -> list[str]:
    """groove's compiled kernels among the model's linear layers: ``bf16.c`` where a packed
    layer's one-row calls passed its checks with it, ``q8.c`` where an int8 layer has it."""
    mods = list(model.modules())
    found = []
    if any(isinstance(m, PackedLinear) and m.alone_rows() for m in mods):
        found.append("bf16.c")
    if any(isinstance(m, Int8Linear) and m.kernel is not None for m in mods):
        found.append("q8.c")
    return found


def make_row_exact(model: nn.Module, device, dtype, largest: dict[str, int] | None = None) -> list[str]:
    """Wrap every linear layer whose kind (class, shape, bias) rounds rows by call size in
    ``RowExact``, with the safe size the probe found on the kind's first layer (a kernel's
    summation order depends on shapes, not weights; the probe compares enough outputs per
    size that the weights do not hide a difference). ``largest`` names layers probed only
    up to a size (an LM head, whose 512-row probe would cost seconds and a copy of its
    weight): their calls are capped at that size. Returns the wrapped names."""
    kinds = (nn.Linear, PackedLinear, Int8Linear)
    largest = largest or {}

    def kind(mod: nn.Module) -> tuple:
        return (type(mod), mod.in_features, mod.out_features, getattr(mod, "bias", None) is not None)

    safe: dict[tuple, int | None] = {}  # per kind probed: None where every size rounds alike
    pads: dict[tuple, int | None] = {}
    for name, mod in [(n, m) for n, m in model.named_modules() if isinstance(m, kinds)]:
        if kind(mod) in safe:
            continue
        cap = largest.get(name)
        rows = PROBE_ROWS if cap is None else tuple(r for r in PROBE_ROWS if r <= cap)
        found = rows_like_one(mod, mod.in_features, device, dtype, rows)
        safe[kind(mod)] = max(rows) if found is None and cap is not None else found
        if found is not None and cap is None:
            pads[kind(mod)] = transposed_pad(mod, device, dtype, tuple(p for p in TRANSPOSED_PADS if p > found))

    def wrap(mod: nn.Module) -> nn.Module:
        k = kind(mod)
        return mod if safe.get(k) is None else RowExact(mod, safe[k], pads.get(k))

    replace_linears(model, wrap, kinds=kinds)
    return [name for name, mod in model.named_modules() if isinstance(mod, RowExact)]
