"""Build a node's slice of a checkpoint, reading only the tensors that slice needs.

The slice is a transformers ``*ForCausalLM`` built on the meta device from a config cut
down to the slice's layers, so transformers' own forward (masks, rotary embeddings,
sliding windows) runs it, its layers are numbered 0..n-1 and its KV cache is compact.
Its tensors are then read one by one from the safetensors files and assigned in place:
peak memory is the slice plus fixed overhead, never the whole model.

Each tensor's byte range is read into memory the node owns instead of memory-mapping the
file (``safe_open``): mapped pages would count as resident on top of the packed or
quantized copies made from them, doubling the peak, and would fault in during the first
generation instead of at start-up. The one exception is the first node's token embedding
when it is used as stored: a lookup reads one row per token, so its rows are read the
first time a token needs them (``RowsOnDemand``), and only the rows of tokens seen become
resident (a few MB) instead of the whole table (272 MB for Qwen2.5-0.5B's 151,936 x 896).
"""

from __future__ import annotations

import copy
import os
import time
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from ..models.architectures import check_supported
from ..models.checkpoint import EMBED_KEY, HEAD_KEY, LAYER_KEY, NORM_KEY, Checkpoint, ModelError, hub_file, safetensors_layout


@dataclass
class LoadedSlice:
    model: nn.Module  # the *ForCausalLM, pruned to this slice
    config: object  # transformers config of the slice
    first: int
    last: int
    num_layers: int
    is_first: bool
    is_last: bool
    device: torch.device
    dtype: torch.dtype
    load_s: float
    weights: str = ""  # how the linear layers are stored: "packed", "int8" or "" (plain)
    rows: RowsOnDemand | None = None  # the token embedding, where it is read row by row


def pick_device(name: str) -> torch.device:
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise ModelError("--device cuda was requested but torch sees no CUDA device")
    if name == "mps" and not (getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()):
        raise ModelError("--device mps was requested but MPS is not available")
    return torch.device(name)


def cpu_supports_bf16() -> bool:
    cpu = getattr(torch, "cpu", None)
    if cpu is None:
        return False
    native = getattr(cpu, "_is_avx512_bf16_supported", lambda: False)() or getattr(cpu, "_is_amx_tile_supported", lambda: False)()
    # AVX-512 converts bf16 in hardware and oneDNN runs bf16 matmuls on it; decoding is
    # memory-bound, so halving the bytes read wins even without native bf16 arithmetic.
    return bool(native) or torch.backends.cpu.get_cpu_capability().startswith("AVX512")


def pick_dtype(name: str, device: torch.device) -> torch.dtype:
    if name != "auto":
        return {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[name]
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    if device.type == "cpu" and cpu_supports_bf16():
        return torch.bfloat16
    return torch.float32


def parse_layers(spec: str, num_layers: int) -> tuple[int, int]:
    try:
        a, _, b = spec.partition("-")
        first, last = int(a), int(b if b else a)
    except ValueError:
        raise ModelError(f"--layers {spec!r} is not a range like 0-11") from None
    if first < 0 or last < first:
        raise ModelError(f"--layers {spec}: the range is empty or negative")
    if last >= num_layers:
        raise ModelError(f"--layers {spec} is outside the model, which has layers 0-{num_layers - 1}")
    return first, last


def slice_config(ckpt: Checkpoint, first: int, last: int, fast_attention: bool = False):
    from transformers import CONFIG_MAPPING

    model_type = check_supported(ckpt.config)
    full = CONFIG_MAPPING[model_type].from_dict(dict(ckpt.config))
    sub = copy.deepcopy(full)
    sub.num_hidden_layers = last - first + 1
    if getattr(full, "layer_types", None):
        sub.layer_types = list(full.layer_types[first : last + 1])
    sub._attn_implementation = "sdpa"
    if fast_attention:
        from .attention import register

        sub._attn_implementation = register()
    return sub


def tensor_plan(ckpt: Checkpoint, first: int, last: int) -> dict[str, list[str]]:
    """Checkpoint tensor name -> the slice's parameter names it fills."""
    plan: dict[str, list[str]] = defaultdict(list)
    for name in ckpt.tensors:
        m = LAYER_KEY.match(name)
        if m and first <= int(m.group(1)) <= last:
            local = f"model.layers.{int(m.group(1)) - first}." + name[m.end() :]
            plan[name].append(local)
    is_first, is_last = first == 0, last == ckpt.num_layers - 1
    if is_first:
        plan[EMBED_KEY].append("model.embed_tokens.weight")
    if is_last:
        plan[NORM_KEY].append("model.norm.weight")
        plan[HEAD_KEY if HEAD_KEY in ckpt.tensors else EMBED_KEY].append("lm_head.weight")
    missing = [n for n in plan if n not in ckpt.tensors]
    if missing:
        raise ModelError(f"checkpoint {ckpt.ref.source} lacks tensors {missing[:3]}")
    return plan


_ST_DTYPES = {"F32": torch.float32, "BF16": torch.bfloat16, "F16": torch.float16, "F64": torch.float64,
              "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8, "BOOL": torch.bool}


def read_tensors(path, names: list[str]):
    """Yield (name, CPU tensor) for ``names`` from one safetensors file, reading only their bytes."""
    header, base = safetensors_layout(path)
    with open(path, "rb") as f:
        for name in sorted(names, key=lambda n: header[n]["data_offsets"][0]):
            dtype, start, end = _dtype_and_range(header, name)
            t = torch.empty(header[name]["shape"], dtype=dtype)
            if end > start:
                f.seek(base + start)
                if f.readinto(memoryview(t.view(-1).view(torch.uint8).numpy())) != end - start:
                    raise ModelError(f"{path} is truncated (tensor {name})")
            yield name, t


def _dtype_and_range(header: dict, name: str) -> tuple[torch.dtype, int, int]:
    info = header[name]
    if info["dtype"] not in _ST_DTYPES:
        raise ModelError(f"tensor {name} has unsupported dtype {info['dtype']}")
    start, end = info["data_offsets"]
    return _ST_DTYPES[info["dtype"]], start, end


class RowsOnDemand:
    """A 2-D tensor of a safetensors file (the first node's token embedding) whose rows are
    read from the file the first time they are needed (``fetch``), into a table allocated
    but never written elsewhere, so only the rows read become resident. (Mapping the file
    would do the same with less code, but the kernel maps whole page-cache folios on a
    fault: where the file sat in large folios, each lookup made 1.25 MiB resident, 306 MiB
    for 512 tokens of Llama-3.2-1B's 501 MiB table, measured on Linux 6.18.) The file stays
    open for the node's life; a file truncated meanwhile fails the read, not the process."""

    def __init__(self, path, name: str):
        self.path = path
        header, base = safetensors_layout(path)
        dtype, start, end = _dtype_and_range(header, name)
        shape = header[name]["shape"]
        if len(shape) != 2 or shape[0] * shape[1] * dtype.itemsize != end - start:
            raise ModelError(f"tensor {name} in {path} is not a table of rows")
        self.table = torch.empty(shape, dtype=dtype)
        self._bytes = self.table.view(torch.uint8).numpy()  # [rows, bytes per row]
        self.offset = base + start
        self.fetched: set[int] = set()
        self._fd = os.open(path, os.O_RDONLY)

    def fetch(self, ids) -> None:
        """Read the rows of ``ids`` not read yet. Ids outside the table are left to the
        lookup, which rejects them."""
        rows, width = self._bytes.shape
        for i in set(ids) - self.fetched:
            if not 0 <= i < rows:
                continue
            data = os.pread(self._fd, width, self.offset + i * width)
            if len(data) != width:
                raise ModelError(f"{self.path} was truncated while the node ran (row {i})")
            self._bytes[i] = memoryview(data)
            self.fetched.add(i)

    def __del__(self) -> None:
        fd = getattr(self, "_fd", None)
        if fd is not None:
            os.close(fd)


def load_slice(ckpt: Checkpoint, first: int, last: int, device: torch.device, dtype: torch.dtype,
               *, pack: bool = True, quantize: str = "none", fast_attention: bool = False,
               progress: Callable[[int, int], None] | None = None) -> LoadedSlice:
    """``progress(done, total)``, where given, hears the checkpoint bytes read and converted
    so far after each tensor."""
    from transformers import AutoModelForCausalLM

    from .linears import linear_converter

    t0 = time.perf_counter()
    # int8 weights already round far more than the packed-GQA attention does (about 1e-3
    # in bfloat16), so int8 takes that attention too: in a Qwen2.5-0.5B decode step, the
    # default kernel's 5 ms per 12 layers was a quarter of an int8 node's step.
    fast_attention = fast_attention or quantize == "int8"
    config = slice_config(ckpt, first, last, fast_attention)
    is_first, is_last = first == 0, last == ckpt.num_layers - 1
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    body = model.model
    # Drop what this slice never runs, so no meta tensor is left behind in a used module.
    if not is_first:
        body.embed_tokens = None
    if not is_last:
        body.norm = nn.Identity()
        model.lm_head = nn.Identity()

    plan = tensor_plan(ckpt, first, last)
    by_file: dict[str, list[str]] = defaultdict(list)
    for name in plan:
        by_file[ckpt.tensors[name].file].append(name)
    convert, weights = linear_converter(quantize, pack, device, dtype)
    # The embedding is read row by row where it is used as stored: only for lookups (not
    # also as a tied LM head, which reads all of it), on the CPU, in the dtype it runs in.
    rows = None
    if plan.get(EMBED_KEY) == ["model.embed_tokens.weight"] and device.type == "cpu" and _ST_DTYPES.get(ckpt.tensors[EMBED_KEY].dtype) == dtype:
        rows = RowsOnDemand(hub_file(ckpt.ref, ckpt.tensors[EMBED_KEY].file), EMBED_KEY)
        body.embed_tokens.weight = nn.Parameter(rows.table, requires_grad=False)
        by_file[ckpt.tensors[EMBED_KEY].file].remove(EMBED_KEY)
    total, done = sum(ckpt.tensors[name].nbytes for names in by_file.values() for name in names), 0
    # Each tensor goes into its module as soon as it is read, and a linear layer is packed
    # or quantized as soon as its last tensor is in: only one original weight is ever held
    # beside its converted copy, so the peak stays one slice plus its largest tensor.
    for fname, names in by_file.items():
        for name, tensor in read_tensors(hub_file(ckpt.ref, fname), names):
            tensor = tensor.to(device=device, dtype=dtype)
            for local in plan[name]:
                module_name, _, attr = local.rpartition(".")
                module = model.get_submodule(module_name)
                setattr(module, attr, nn.Parameter(tensor, requires_grad=False))
                if convert is not None and isinstance(module, nn.Linear) and not any(p.is_meta for p in module.parameters()):
                    parent_name, _, child = module_name.rpartition(".")
                    setattr(model.get_submodule(parent_name) if parent_name else model, child, convert(module))
            del tensor
            done += ckpt.tensors[name].nbytes
            if progress is not None:
                progress(done, total)
    # inv_freq is computed, not stored in checkpoints: build the rotary embedding for real.
    body.rotary_emb = type(body.rotary_emb)(config=config).to(device)
    left_on_meta = [n for n, p in list(model.named_parameters()) + list(model.named_buffers()) if p.is_meta]
    if left_on_meta:
        raise ModelError(f"tensors missing from the checkpoint for this slice: {left_on_meta[:5]}")
    model.eval()
    return LoadedSlice(
        model=model,
        config=config,
        first=first,
        last=last,
        num_layers=ckpt.num_layers,
        is_first=is_first,
        is_last=is_last,
        device=device,
        dtype=dtype,
        load_s=time.perf_counter() - t0,
        weights=weights,
        rows=rows,
    )
