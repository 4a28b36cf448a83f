"""groove's own CPU kernels for decode-sized calls, compiled on the node's own machine and
loaded with ctypes:

- ``q8.c``: int8 weights times bfloat16 or float32 rows (``--quantize int8``);
- ``bf16.c``: bfloat16 weights, read in place from oneDNN's packed buffer, summed in the
  order oneDNN's own one-row kernel sums them (the packed bfloat16 path's decode calls);
- ``attend.c``: a bfloat16 decode step's attention, rounded as torch's CPU flash attention
  rounds it (``attention.exact_decode``).

All are optional. Compiling needs a C compiler with OpenMP (``cc``, or ``$CC``) and an x86
CPU with AVX2 or AVX-512 (``bf16.c``: AVX-512 with the BF16 extension; ``attend.c``:
AVX-512). Where any of that is missing, or ``GROOVE_INT8_KERNEL=0`` / ``GROOVE_BF16_KERNEL=0``
/ ``GROOVE_ATTEND_KERNEL=0`` is set, or the node was started with ``--no-compile``
(``disable``), a node keeps torch's kernels. Each library is built once
per source, compiler and CPU, under the user's cache directory, in well under a second.

The kernels run their OpenMP loops in torch's own OpenMP runtime (torch loads
``libgomp.so.1`` first, and the libraries link the same name), so they use the threads torch
was told to use.
"""

from __future__ import annotations

import ctypes
import hashlib
import logging
import os
import platform
import shutil
import subprocess
import tempfile
import threading
from dataclasses import dataclass
from pathlib import Path

import torch

from .. import cache_dir

log = logging.getLogger(__name__)

FLAGS = ["-O3", "-march=native", "-fopenmp", "-shared", "-fPIC"]


@dataclass(frozen=True)
class Kernel:
    source: str  # next to this module
    symbol: str
    argtypes: tuple
    switch: str  # the environment variable that turns it off with "0"
    restype: object = None


_P, _L = ctypes.c_void_p, ctypes.c_long
KERNELS = {
    "q8": Kernel("q8.c", "q8_linear", (_P,) * 5 + (_L,) * 3 + (ctypes.c_int, _P), "GROOVE_INT8_KERNEL"),
    "bf16": Kernel("bf16.c", "bf16_linear", (_P,) * 4 + (_L,) * 3, "GROOVE_BF16_KERNEL"),
    "attend": Kernel("attend.c", "attend_bf16", (_P,) * 5 + (_L,) * 9 + (ctypes.c_float,), "GROOVE_ATTEND_KERNEL",
                     ctypes.c_int),
}

_lock = threading.Lock()
_loaded: dict[str, object] = {}
_disabled = False


def disable() -> None:
    """``--no-compile``: from now on no kernel is built or loaded; torch's serve."""
    global _disabled
    _disabled = True


def _cpu_signature() -> str:
    """What -march=native depends on: the CPU's model and flags."""
    try:
        text = Path("/proc/cpuinfo").read_text()
        lines = [line for line in text.splitlines() if line.startswith(("model name", "flags", "Features"))]
        return "\n".join(sorted(set(lines)))
    except OSError:
        return platform.processor()


def build(name: str) -> Path | None:
    """The compiled library of kernel ``name``, built if needed; None where it cannot be
    built here."""
    compiler = shutil.which(os.environ.get("CC", "cc"))
    if compiler is None or platform.machine().lower() not in ("x86_64", "amd64"):
        return None
    source_path = Path(__file__).with_name(KERNELS[name].source)
    source = source_path.read_bytes()
    key = hashlib.sha256(b"\0".join([source, compiler.encode(), " ".join(FLAGS).encode(), _cpu_signature().encode()]))
    out = cache_dir("kernels") / f"{name}-{key.hexdigest()[:16]}.so"
    if out.is_file():
        return out
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=out.parent) as tmp:
            built = Path(tmp) / out.name
            proc = subprocess.run([compiler, *FLAGS, str(source_path), "-o", str(built)], capture_output=True, text=True,
                                  timeout=120)
            if proc.returncode != 0:
                log.info("%s kernel not built (%s): using torch's", name, proc.stderr.strip().splitlines()[-1:] or proc.returncode)
                return None
            os.replace(built, out)  # atomic: nodes starting together never load a half-written file
    except (OSError, subprocess.TimeoutExpired) as exc:  # no cache directory, or the compiler failed to run
        log.info("%s kernel not built (%s): using torch's", name, exc)
        return None
    return out


def load(name: str):
    """Kernel ``name``'s entry point (a ctypes function), or None where it is unavailable."""
    kernel = KERNELS[name]
    if _disabled or os.environ.get(kernel.switch, "1") == "0":
        return None
    with _lock:
        if name not in _loaded:
            fn = None
            path = build(name)
            if path is not None:
                try:
                    fn = getattr(ctypes.CDLL(str(path)), kernel.symbol)
                    fn.argtypes = list(kernel.argtypes)
                    fn.restype = kernel.restype
                except (OSError, AttributeError) as exc:
                    log.info("%s kernel not loaded (%s): using torch's", name, exc)
                    fn = None
            _loaded[name] = fn
        return _loaded[name]


_scratch = threading.local()  # q8's work buffer, per calling thread
_DTYPE_CODES = {torch.float32: 0, torch.bfloat16: 1}  # q8_linear's dtype argument


def int8_linear(fn, x: torch.Tensor, weight: torch.Tensor, scales: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """``x`` [..., K] times the int8 ``weight`` [N, K] with float32 per-row ``scales`` [N],
    plus ``bias``: [..., N] in ``x``'s dtype. bfloat16 and float32 go to the kernel as they
    are (it converts, and rounds the sum once); other dtypes through float32."""
    code = _DTYPE_CODES.get(x.dtype)
    if code is None:
        return int8_linear(fn, x.float(), weight, scales, None if bias is None else bias.float()).to(x.dtype)
    if not x.is_contiguous():
        x = x.contiguous()
    k = x.shape[-1]
    m, n = x.numel() // k, weight.shape[0]
    y = torch.empty(x.shape[:-1] + (n,), dtype=x.dtype)
    work = getattr(_scratch, "buf", None)
    if work is None or work.numel() < m * (k + n):
        work = _scratch.buf = torch.empty(max(m * (k + n), 1 << 16), dtype=torch.float32)
    fn(x.data_ptr(), weight.data_ptr(), scales.data_ptr(), None if bias is None else bias.data_ptr(), y.data_ptr(),
       m, n, k, code, work.data_ptr())
    return y


# bf16.c reads the weight as oneDNN packs it for one row on a CPU with AVX-512 BF16:
# blocks of 64 outputs, each the pairs of inputs (k, k + 1) in turn, 64 outputs side by side.
BF16_BLOCK = 64


def bf16_layout(weight: torch.Tensor) -> torch.Tensor:
    """``weight`` [N, K] laid out as ``bf16.c`` reads it: [N / 64][K / 2][64][2]."""
    n, k = weight.shape
    return weight.reshape(n // BF16_BLOCK, BF16_BLOCK, k // 2, 2).permute(0, 2, 1, 3).contiguous()


def packed_address(packed: torch.Tensor) -> int | None:
    """Where a oneDNN-packed weight's bytes start, or None where torch cannot say."""
    try:
        return int(torch.ops.mkldnn.data_ptr(packed))
    except (AttributeError, RuntimeError):
        return None


def reads_packed_layout(weight: torch.Tensor, packed: torch.Tensor) -> bool:
    """Whether ``packed`` (oneDNN's packing of ``weight``) holds exactly ``bf16_layout(weight)``:
    the layout oneDNN picks depends on the CPU and the hint, and ``bf16.c`` assumes one.
    (oneDNN pads the inputs to a multiple of 32, so other widths never match.)"""
    n, k = weight.shape
    address = packed_address(packed)
    if address is None or n % BF16_BLOCK or k % 2 or weight.dtype != torch.bfloat16:
        return False
    try:
        if torch.ops.mkldnn._nbytes(packed) != n * k * 2:
            return False
    except (AttributeError, RuntimeError):
        return False
    raw = torch.frombuffer((ctypes.c_char * (n * k * 2)).from_address(address), dtype=torch.bfloat16)
    rows = BF16_BLOCK * 64  # compared a few MB at a time: no second copy of an LM head
    return all(torch.equal(raw[i * k : (i + rows) * k], bf16_layout(weight[i : i + rows]).view(-1)) for i in range(0, n, rows))


def bf16_linear(fn, x: torch.Tensor, address: int, out_features: int, bias: torch.Tensor | None) -> torch.Tensor:
    """``x`` [..., K] in bfloat16 times the packed weight at ``address`` (see
    ``reads_packed_layout``), plus ``bias`` (bfloat16): [..., N] in bfloat16."""
    if not x.is_contiguous():
        x = x.contiguous()
    k = x.shape[-1]
    y = torch.empty(x.shape[:-1] + (out_features,), dtype=torch.bfloat16)
    fn(x.data_ptr(), address, None if bias is None else bias.data_ptr(), y.data_ptr(), x.numel() // k, out_features, k)
    return y


def attend(fn, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, scale: float,
           lse: torch.Tensor | None = None) -> torch.Tensor | None:
    """One query token's attention: ``query`` [1, heads, 1, dim], ``key``/``value``
    [1, kv_heads, keys, dim], all bfloat16 with unit stride along ``dim``; the output is
    [1, 1, heads, dim], laid out as transformers' attention functions return it. None for
    a shape ``attend.c`` does not take (it refuses head sizes and groupings itself). Each
    head's log-sum-exp goes to ``lse`` (float32 [heads]) where one is given."""
    _, heads, _, dim = query.shape
    kv_heads, keys = key.shape[1], key.shape[2]
    if value.shape != key.shape or query.stride(3) != 1 or key.stride(3) != 1 or value.stride(3) != 1:
        return None
    out = torch.empty(1, 1, heads, dim, dtype=torch.bfloat16)
    rc = fn(query.data_ptr(), key.data_ptr(), value.data_ptr(), out.data_ptr(), None if lse is None else lse.data_ptr(),
            heads, kv_heads, dim, keys, query.stride(1), key.stride(1), key.stride(2), value.stride(1), value.stride(2),
            scale)
    return out if rc == 0 else None
