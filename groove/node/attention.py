"""Attention for a node's decode steps and batches.

``exact_decode`` (the default): a bfloat16 decode step through ``attend.c``, which rounds as
torch's own CPU flash attention does, where that has been checked on this machine.

``--fast-attention``: single-token decode steps attend per key/value head.

With grouped-query attention, transformers calls SDPA with ``enable_gqa`` for a decode
step; on CPU that kernel costs about 330 us per layer for one query token (Qwen2.5-0.5B
shape, 512 cached tokens). Folding each group's query heads into query positions of their
shared key/value head (transformers' own ``pack_gqa``, which it uses where ``enable_gqa`` is
unavailable) computes the same attention in about 28 us. The rounding differs from the
default path (about 1e-3 in bfloat16), so greedy output is no longer guaranteed to be
bit-identical to transformers' default: it is opt-in.
"""

from __future__ import annotations

import logging
import threading

import torch
import torch.nn.functional as F

from . import cpu_kernels

log = logging.getLogger(__name__)

NAME = "groove_packed_gqa"


def packed_gqa_attention(module, query, key, value, attention_mask, dropout=0.0, scaling=None, is_causal=None, **kwargs):
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    groups = getattr(module, "num_key_value_groups", 1)
    if query.shape[2] != 1 or groups == 1 or attention_mask is not None or kwargs.get("position_bias") is not None:
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                      is_causal=is_causal, **kwargs)
    batch, heads, _, dim = query.shape
    packed = query.reshape(batch, heads // groups, groups, dim)
    out = F.scaled_dot_product_attention(packed, key, value, scale=scaling)
    return out.reshape(batch, heads, 1, dim).transpose(1, 2).contiguous(), None


# Key counts the check runs: one, within the first 16-lane block, its tail, one full
# 512-key block of torch's kernel and past it (where later blocks rescale earlier ones).
CHECK_KEYS = (1, 7, 16, 37, 100, 512, 515, 1100)
BIG = 2.0 ** 25  # 1 + BIG rounds back to BIG in float32: a 1 survives only if added after BIG and -BIG cancel
_checked: dict[tuple, object] = {}
_check_lock = threading.Lock()


def decode_kernel(heads: int, kv_heads: int, dim: int, scale: float):
    """``attend.c`` for this head layout and scale, once its outputs and log-sum-exps have
    equalled torch's bit for bit on every input of ``check_inputs``; None where it is
    unavailable or differs (another CPU, MKL or torch may round otherwise)."""
    key = (heads, kv_heads, dim, scale)
    if key in _checked:  # every decode step of every layer asks: no lock once checked
        return _checked[key]
    with _check_lock:
        if key not in _checked:
            fn = cpu_kernels.load("attend")
            if fn is not None and not _same_as_sdpa(fn, heads, kv_heads, dim, scale):
                log.info("attend.c rounds unlike torch's attention for %s: using torch's", key)
                fn = None
            _checked[key] = fn
        return _checked[key]


def check_inputs(heads: int, kv_heads: int, dim: int, scale: float, gen: torch.Generator):
    """(q, k, v, scale) that show a kernel's rounding through its bfloat16 output.

    Random data alone would rarely show a different order of summation (it moves a float32
    sum by an ulp or so, which the final rounding mostly hides), so most inputs are built
    to make it show: in q . k, each key's row holds BIG, -BIG and 1 at three dimensions
    (q all ones), so its score is 1 or 0 by the order of its sum; in p . v (q = 0, so every
    probability is 1), each dimension of v holds BIG, -BIG and 1 at three keys."""
    room = max(CHECK_KEYS) + 64  # keys and values as the cache holds them: views into a longer buffer

    def triples(n: int, count: int) -> torch.Tensor:
        picks = torch.stack([torch.randperm(n, generator=gen)[:3] for _ in range(count)])
        out = torch.zeros(count, n)
        out.scatter_(1, picks, torch.tensor([BIG, -BIG, 1.0]).expand(count, 3))
        return out

    for keys in CHECK_KEYS:
        q = torch.randn(1, heads, 1, dim, generator=gen).mul(3).bfloat16()
        k = torch.randn(1, kv_heads, room, dim, generator=gen).mul(3).bfloat16()[:, :, :keys]
        v = torch.randn(1, kv_heads, room, dim, generator=gen).bfloat16()[:, :, :keys]
        yield q, k, v, scale
        if keys >= 3:
            v = torch.stack([triples(keys, dim).T for _ in range(kv_heads)])[None].bfloat16()
            yield torch.zeros(1, heads, 1, dim, dtype=torch.bfloat16), torch.zeros_like(v), v, 1.0
    if dim >= 3:
        k = torch.stack([triples(dim, dim) for _ in range(kv_heads)])[None].bfloat16()
        v = torch.eye(dim).expand(1, kv_heads, dim, dim).bfloat16()
        yield torch.ones(1, heads, 1, dim, dtype=torch.bfloat16), k, v, 1.0


def torch_log_sum_exp(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float) -> torch.Tensor | None:
    """Each head's log-sum-exp from torch's CPU flash attention (the kernel SDPA runs here),
    or None where torch does not expose it. It shows an exp sum's rounding, which the
    bfloat16 output mostly hides."""
    try:
        _, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(q, k, v, 0.0, False, attn_mask=None, scale=scale)
    except (AttributeError, RuntimeError, TypeError):
        return None
    return lse.reshape(-1)


def prepare_decode(module, config):
    """Run ``decode_kernel``'s check for a layer's head layout ahead of the first step;
    the kernel its decode steps will take, or None for torch's."""
    heads, kv_heads = config.num_attention_heads, getattr(config, "num_key_value_heads", None) or config.num_attention_heads
    dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    scale = getattr(module, "scaling", None)
    if scale is not None and heads > 1:
        return decode_kernel(heads, kv_heads, dim, scale)
    return None


def _same_as_sdpa(fn, heads: int, kv_heads: int, dim: int, scale: float) -> bool:
    gen = torch.Generator().manual_seed(0)
    with torch.inference_mode():
        for q, k, v, s in check_inputs(heads, kv_heads, dim, scale, gen):
            want = F.scaled_dot_product_attention(q, k, v, scale=s, enable_gqa=heads != kv_heads).transpose(1, 2)
            want_lse = torch_log_sum_exp(q, k, v, s)
            lse = torch.empty(heads)
            got = cpu_kernels.attend(fn, q, k, v, s, lse)
            if got is None or not torch.equal(got, want) or (want_lse is not None and not torch.equal(lse, want_lse)):
                return False
    return True


def exact_decode(module, query, key, value, attention_mask, dropout=0.0, scaling=None, **kwargs):
    """transformers' SDPA attention; a decode step (one query token, no mask, bfloat16 on
    the CPU) goes through ``attend.c`` where ``decode_kernel`` found it exact. torch's kernel
    spends most of such a step in per-head MKL calls (about 0.4 ms a layer for
    Qwen2.5-0.5B at 512 cached tokens, against 0.05 ms here)."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    # With one query head on more than one thread, torch runs its only head outside its
    # parallel region, and MKL then splits each sum across threads: another order.
    if (query.shape[0] == 1 and query.shape[2] == 1 and attention_mask is None and not dropout
            and query.dtype == key.dtype == value.dtype == torch.bfloat16 and query.device.type == "cpu"
            and kwargs.get("softcap") is None and kwargs.get("position_bias") is None
            and (query.shape[1] > 1 or torch.get_num_threads() == 1)):
        scale = scaling if scaling is not None else query.shape[-1] ** -0.5
        fn = decode_kernel(query.shape[1], key.shape[1], query.shape[-1], scale)
        if fn is not None:
            out = cpu_kernels.attend(fn, query, key, value, scale)
            if out is not None:
                return out, None
    return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, **kwargs)


def register() -> str:
    from transformers import AttentionInterface

    AttentionInterface.register(NAME, packed_gqa_attention)
    return NAME


BATCHED = "groove_batched"


class Batch:
    """Where each session's piece lies in a batched sequence. Passed to the decoder layers
    as their ``cache`` (``update`` files each piece's new keys and values in its session's
    own cache) and as their ``attention_mask`` (read back by ``batched_attention``)."""

    def __init__(self, inner: str):
        self.inner = inner
        self.caches: list = []
        self.starts: list[int] = []
        self.offsets: list[int] = []
        self.counts: list[int] = []
        self.full: list[tuple[torch.Tensor, torch.Tensor]] = []  # this layer's whole keys/values per piece

    def add(self, cache, start: int, offset: int, count: int) -> None:
        self.caches.append(cache)
        self.starts.append(start)
        self.offsets.append(offset)
        self.counts.append(count)

    def update(self, key: torch.Tensor, value: torch.Tensor, layer_idx: int, *args, **kwargs):
        if len(self.caches) == 1:
            self.full = [self.caches[0].update(key, value, layer_idx)]
        else:
            self.full = [cache.update(key[:, :, a : a + n], value[:, :, a : a + n], layer_idx)
                         for cache, a, n in zip(self.caches, self.offsets, self.counts)]
        return key, value

    def mask(self, i: int, device, sliding_window: int | None) -> torch.Tensor | None:
        """The mask transformers would build for this piece alone: none where SDPA's own
        causal flag (or no mask at all, for one query) says the same."""
        start, n = self.starts[i], self.counts[i]
        windowed = sliding_window is not None and start + n > sliding_window
        if (start == 0 or n == 1) and not windowed:
            return None
        q = torch.arange(start, start + n, device=device)[:, None]
        k = torch.arange(start + n, device=device)[None, :]
        allowed = k <= q
        if sliding_window is not None:
            allowed &= q - k < sliding_window
        return allowed[None, None]


def batched_attention(module, query, key, value, attention_mask, dropout=0.0, scaling=None, **kwargs):
    """Each piece attends to its own session's cache, with the attention function the node
    would use for that piece alone; the outputs are laid end to end again."""
    batch: Batch = attention_mask
    inner = packed_gqa_attention if batch.inner == NAME else exact_decode
    window = kwargs.pop("sliding_window", None)
    outs = []
    for i, (k, v) in enumerate(batch.full):
        a, n = batch.offsets[i], batch.counts[i]
        q = query if len(batch.full) == 1 else query[:, :, a : a + n]
        mask = batch.mask(i, query.device, window)
        if mask is not None and window is None and getattr(module, "num_key_value_groups", 1) > 1:
            # A later chunk of a prompt. transformers would repeat the keys for a masked
            # call; SDPA's own grouped-query path is the one the whole prompt takes (with
            # no mask), and it rounds the chunk's rows as that whole-prompt call does.
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scaling, enable_gqa=True)
            outs.append(out.transpose(1, 2).contiguous())
            continue
        out, _ = inner(module, q, k, v, mask, dropout=dropout, scaling=scaling, **kwargs)
        outs.append(out)
    return (outs[0] if len(outs) == 1 else torch.cat(outs, dim=1)), None


def use_batched(config) -> str:
    """Route the model's attention through ``batched_attention``; returns the attention the
    node used before (``sdpa``, or the packed one of ``--fast-attention``) for each piece."""
    from transformers import AttentionInterface

    AttentionInterface.register(BATCHED, batched_attention)
    inner = config._attn_implementation
    config._attn_implementation = BATCHED
    return inner
