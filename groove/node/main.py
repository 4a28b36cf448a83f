"""``groove node``: load a slice of a checkpoint and serve it to a relay."""

from __future__ import annotations

import asyncio
import json
import logging
import sys
import time

from ..models import checkpoint
from ..models.architectures import check_supported
from ..models.checkpoint import ModelError
from .worker import FatalNodeError


async def ask_for_layers(args, ckpt, dtype) -> tuple[int, int]:
    """Describe this node's memory and the model's layer sizes (in the dtype it will run)
    to the relay, and get the range to load."""
    import psutil

    from ..models import info
    from ..protocol.messages import PlacementRequest
    from ..relay.auth import local_token
    from ..relay.placement import parse_size
    from .worker import request_placement

    budget = parse_size(args.max_memory) if args.max_memory else int(psutil.virtual_memory().available * 0.8)
    stored = {"F32": 4, "F16": 2, "BF16": 2}.get(next(iter(ckpt.tensors.values())).dtype, 2)
    scale = dtype.itemsize / stored
    linear_scale = 1 / stored if args.quantize == "int8" else scale  # int8 covers linears, not the embedding
    embed, head = info.edge_bytes(ckpt)
    request = PlacementRequest(model=ckpt.ref.name, fingerprint=ckpt.fingerprint(), num_layers=ckpt.num_layers,
                               layer_bytes=[int(b * linear_scale) for b in info.layer_bytes(ckpt)],
                               embed_bytes=int(embed * scale), head_bytes=int(head * linear_scale), max_memory=budget)
    return await request_placement(args.relay, request, local_token("node", args.token), args.tls_ca)


def _glibc():
    """The C library where it is glibc (whose allocator the calls below tune), else None."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        import ctypes

        libc = ctypes.CDLL("libc.so.6")
        return libc if hasattr(libc, "mallopt") and hasattr(libc, "malloc_trim") else None
    except OSError:
        return None


def set_mmap_threshold(nbytes: int) -> None:
    """glibc raises its mmap threshold each time a large block is freed, after which freed
    weights stay in the heap instead of going back to the system: loading and converting a
    slice left a node 240 MB larger (measured). While loading, a 1 MiB threshold keeps every
    weight-sized block mapped on its own, so it is returned when freed; afterwards a 32 MiB
    threshold lets activations reuse heap memory instead of faulting in fresh pages (a 1 MiB
    threshold made a 512-token prefill 10% slower). Setting it freezes the trim threshold
    too, which ``set_trim_threshold`` then raises: without that, freed activations still go
    back to the system."""
    libc = _glibc()
    if libc is not None:
        libc.mallopt(-3, nbytes)  # M_MMAP_THRESHOLD


def set_trim_threshold(nbytes: int) -> None:
    """Setting the mmap threshold also freezes glibc's trim threshold at 128 KiB, so every
    prompt's freed activations (and an int8 layer's dequantized blocks) went back to the
    system and were faulted in again on the next call. A 64 MiB threshold keeps them in the
    heap: a 512-token prompt through 12 layers of Qwen2.5-0.5B and its LM head took 590
    instead of 840 ms in int8 and 555 instead of 630 ms in bfloat16 (32 MiB: 610 ms in
    int8; 16 MiB: 785). A node holds up to that much more between prompts; the bfloat16
    nodes' peaks did not change, the first int8 node's rose by about 40 MiB."""
    libc = _glibc()
    if libc is not None:
        libc.mallopt(-1, nbytes)  # M_TRIM_THRESHOLD


# Entries in each of oneDNN's kernel caches (its primitive cache and ideep's, in front of
# it): about 1 MiB apiece here, and both default to 1,024. Every call size of every layer
# shape makes an entry, so a node serving prompts of many lengths grew by about 5 MiB per
# new length, toward a gigabyte. Decode steps make none where groove's kernels serve them; a
# prompt length makes one per layer shape (four or five), and about as many again the
# first time, for the exactness check against the plain weight. 32 holds the sizes of a
# pass with several prompt pieces of different lengths; 64 left the last node of
# Qwen2.5-0.5B 35-60 MiB larger (measured), with no faster prompts or decode steps.
KERNEL_CACHE_ENTRIES = 32


def bound_kernel_caches(entries: int = KERNEL_CACHE_ENTRIES) -> None:
    """Cap oneDNN's kernel caches unless the user set them; both read these variables at
    their first kernel, so this must run before any torch work."""
    import os

    for name in ("ONEDNN_PRIMITIVE_CACHE_CAPACITY", "LRU_CACHE_CAPACITY"):
        os.environ.setdefault(name, str(entries))


def release_free_memory() -> None:
    """Hand the heap's free pages back to the system (glibc keeps them otherwise): what
    the load-time checks freed does not stay resident for the node's life."""
    libc = _glibc()
    if libc is not None:
        libc.malloc_trim(0)


class LoadProgress:
    """Start-up progress, one line per quarter of the slice's bytes: reading, packing or
    quantizing a slice takes seconds here and minutes for a large model."""

    def __init__(self, steps: int = 4):
        self.steps, self.shown = steps, 0
        self.t0 = time.perf_counter()

    def __call__(self, done: int, total: int) -> None:
        step = done * self.steps // max(total, 1)
        if step > self.shown:
            self.shown = step
            print(f"  {100 * step // self.steps}% of {total / 1e6:.0f} MB loaded, {time.perf_counter() - self.t0:.1f}s",
                  flush=True)


def eos_ids(ref: checkpoint.ModelRef, config: dict) -> set[int]:
    """The ids that end a generation, as transformers' generate() would use them."""
    gen = checkpoint.hub_file(ref, "generation_config.json", required=False)
    value = None
    if gen is not None:
        value = json.loads(gen.read_text()).get("eos_token_id")
    if value is None:
        value = config.get("eos_token_id")
    if value is None:
        return set()
    return set(value) if isinstance(value, list) else {int(value)}


def run(args) -> int:
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    bound_kernel_caches()
    set_mmap_threshold(1 << 20)
    if args.no_compile:
        from . import cpu_kernels

        cpu_kernels.disable()
    try:
        ckpt = checkpoint.load(args.model, args.model_name)
        check_supported(ckpt.config)
        from .loader import load_slice, parse_layers, pick_device, pick_dtype

        device = pick_device(args.device)
        dtype = pick_dtype(args.dtype, device)
        if args.layers == "auto":
            first, last = asyncio.run(ask_for_layers(args, ckpt, dtype))
            print(f"relay {args.relay} placed this node on layers {first}-{last}", flush=True)
        else:
            first, last = parse_layers(args.layers, ckpt.num_layers)
        from .worker import compute_thread, dtype_str

        print(f"loading layers {first}-{last} of {ckpt.ref.name} on {device} in {dtype_str(dtype)}"
              f"{' (int8 weights)' if args.quantize == 'int8' else ''}", flush=True)
        pool = compute_thread()
        if args.threads:
            import torch

            pool.submit(torch.set_num_threads, args.threads).result()
        loaded = pool.submit(load_slice, ckpt, first, last, device, dtype, pack=not args.no_pack, quantize=args.quantize,
                             fast_attention=args.fast_attention, progress=LoadProgress()).result()
    except (ModelError, ValueError, FatalNodeError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    from ..relay.auth import local_token
    from .shard import Shard
    from .worker import NodeWorker

    # Built on the compute thread: its kernel probes run torch, and torch work on a second
    # thread would leave a second OpenMP thread team in the process (see compute_thread).
    # Still under the loading threshold: the probes' weight-sized scratch tensors are then
    # returned when freed instead of fragmenting the heap (35 MiB lower peak, measured).
    print("checking kernels against torch's", flush=True)
    shard = pool.submit(Shard, loaded, batch_exact=not args.no_batch_exact, max_batch=args.max_batch).result()
    set_mmap_threshold(32 << 20)
    set_trim_threshold(64 << 20)
    release_free_memory()
    worker = NodeWorker(
        shard,
        model=ckpt.ref.name,
        fingerprint=ckpt.fingerprint(),
        relay=args.relay,
        eos_ids=eos_ids(ckpt.ref, ckpt.config),
        hidden_size=int(ckpt.config["hidden_size"]),
        vocab_size=int(ckpt.config["vocab_size"]),
        pool=pool,
        token=local_token("node", args.token),
        tls_ca=args.tls_ca,
        max_positions=int(ckpt.config.get("max_position_embeddings") or 0),
        tokenizer=checkpoint.tokenizer_files(ckpt.ref),
        prefill_chunk=args.prefill_chunk,
        wire_dtype={"auto": "", "int8": "q8"}.get(args.wire_dtype, args.wire_dtype),
        max_batch=args.max_batch,
    )
    try:
        asyncio.run(worker.run_forever())
    except FatalNodeError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0
