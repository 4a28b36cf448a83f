"""The int8 decode kernel (``q8.c``): compiled on the node's own machine, loaded with ctypes.

It is optional. Compiling needs a C compiler with OpenMP (``cc``, or ``$CC``) and an x86 CPU
with AVX2 or AVX-512; where any of that is missing, or ``GROOVE_INT8_KERNEL=0`` is set, a
node keeps torch's ``_weight_int8pack_mm``. The library is built once per source, compiler
and CPU, under the user's cache directory, in well under a second.

The kernel runs its OpenMP loop in torch's own OpenMP runtime (torch loads ``libgomp.so.1``
first, and the library links the same name), so it uses the threads torch was told to use.
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
from pathlib import Path

import torch

from .. import cache_dir

log = logging.getLogger(__name__)

SOURCE = Path(__file__).with_name("q8.c")
FLAGS = ["-O3", "-march=native", "-fopenmp", "-shared", "-fPIC"]

_lock = threading.Lock()
_loaded: dict[str, object] = {}


def _cpu_signature() -> str:
    """What -march=native depends on: the CPU's model and flags."""
    try:
        text = Path("/proc/cpuinfo").read_text()
        lines = [line for line in text.splitlines() if line.startswith(("model name", "flags", "Features"))]
        return "\n".join(sorted(set(lines)))
    except OSError:
        return platform.processor()


def build() -> Path | None:
    """The compiled library, built if needed; None where it cannot be built here."""
    compiler = shutil.which(os.environ.get("CC", "cc"))
    if compiler is None or platform.machine().lower() not in ("x86_64", "amd64"):
        return None
    source = SOURCE.read_bytes()
    key = hashlib.sha256(b"\0".join([source, compiler.encode(), " ".join(FLAGS).encode(), _cpu_signature().encode()]))
    out = cache_dir("kernels") / f"q8-{key.hexdigest()[:16]}.so"
    if out.is_file():
        return out
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=out.parent) as tmp:
            built = Path(tmp) / out.name
            proc = subprocess.run([compiler, *FLAGS, str(SOURCE), "-o", str(built)], capture_output=True, text=True, timeout=120)
            if proc.returncode != 0:
                log.info("int8 kernel not built (%s): using torch's", proc.stderr.strip().splitlines()[-1:] or proc.returncode)
                return None
            os.replace(built, out)  # atomic: nodes starting together never load a half-written file
    except (OSError, subprocess.TimeoutExpired) as exc:  # no cache directory, or the compiler failed to run
        log.info("int8 kernel not built (%s): using torch's", exc)
        return None
    return out


def load():
    """The kernel's entry point (a ctypes function), or None where it is unavailable."""
    if os.environ.get("GROOVE_INT8_KERNEL", "1") == "0":
        return None
    with _lock:
        if "fn" not in _loaded:
            fn = None
            path = build()
            if path is not None:
                try:
                    fn = ctypes.CDLL(str(path)).q8_linear
                    fn.argtypes = [ctypes.c_void_p] * 5 + [ctypes.c_long] * 3 + [ctypes.c_int, ctypes.c_void_p]
                    fn.restype = None
                except (OSError, AttributeError) as exc:
                    log.info("int8 kernel not loaded (%s): using torch's", exc)
                    fn = None
            _loaded["fn"] = fn
        return _loaded["fn"]


_scratch = threading.local()  # the kernel's work buffer, per calling thread
_DTYPE_CODES = {torch.float32: 0, torch.bfloat16: 1}  # q8_linear's dtype argument


def linear(fn, x: torch.Tensor, weight: torch.Tensor, scales: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """``x`` [M, K] times the int8 ``weight`` [N, K] with float32 per-row ``scales`` [N],
    plus ``bias``: [M, N] in ``x``'s dtype. bfloat16 and float32 go to the kernel as they
    are (it converts, and rounds the sum once); other dtypes through float32."""
    code = _DTYPE_CODES.get(x.dtype)
    if code is None:
        return linear(fn, x.float(), weight, scales, None if bias is None else bias.float()).to(x.dtype)
    x = x.contiguous()
    m, k = x.shape
    n = weight.shape[0]
    y = torch.empty(m, n, dtype=x.dtype)
    work = getattr(_scratch, "buf", None)
    if work is None or work.numel() < m * (k + n):
        work = _scratch.buf = torch.empty(max(m * (k + n), 1 << 16), dtype=torch.float32)
    fn(x.data_ptr(), weight.data_ptr(), scales.data_ptr(), None if bias is None else bias.data_ptr(), y.data_ptr(),
       m, n, k, code, work.data_ptr())
    return y

