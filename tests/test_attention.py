"""attend.c: a bfloat16 decode step's attention, held to torch's own SDPA bit for bit."""

import os
import random

import pytest
import torch
import torch.nn.functional as F

from groove.node import attention, cpu_kernels
from groove.node.attention import BIG

from .conftest import c_compiler_on_x86, cpu_info


def _attend_expected_here() -> bool:
    """A C compiler and an x86 CPU with AVX-512 (and no ``GROOVE_ATTEND_KERNEL=0``): attend.c
    must build."""
    return c_compiler_on_x86() and " avx512f" in cpu_info() and os.environ.get("GROOVE_ATTEND_KERNEL", "1") != "0"


def _held_to_torch_here() -> bool:
    """Whether the tests hold attend.c to torch bit for bit here. Its orders were probed on
    an AMD CPU with AVX-512, where MKL takes its generic AVX-512 paths: there it must equal
    torch. On an Intel CPU MKL may take other paths (AMX, say); there the node's own check
    decides, and the tests hold the kernel to torch only where that check lets it in."""
    return _attend_expected_here() and ("AuthenticAMD" in cpu_info() or attention.decode_kernel(14, 2, 64, 0.125) is not None)


needs_attend = pytest.mark.skipif(not _attend_expected_here(), reason="no C compiler or no AVX-512 here")


def _kernel_held_to_torch():
    """attend.c, where ``_held_to_torch_here``."""
    fn = cpu_kernels.load("attend")
    assert fn is not None, "attend.c did not build on an AVX-512 CPU with a C compiler"
    if not _held_to_torch_here():
        pytest.skip("torch's attention sums otherwise on this CPU: nodes keep torch's kernel here")
    return fn


def _sdpa(q, k, v, scale):
    return F.scaled_dot_product_attention(q, k, v, scale=scale, enable_gqa=q.shape[1] != k.shape[1]).transpose(1, 2)


def _same(fn, q, k, v, scale) -> bool:
    """attend.c's output and log-sum-exps equal torch's, bit for bit."""
    lse = torch.empty(q.shape[1])
    got = cpu_kernels.attend(fn, q, k, v, scale, lse)
    return got is not None and torch.equal(got, _sdpa(q, k, v, scale)) and torch.equal(lse, attention.torch_log_sum_exp(q, k, v, scale))


@needs_attend
def test_attend_kernel_gives_sdpas_bits_across_head_layouts_and_lengths():
    """Random head sizes, groupings, magnitudes and key counts: inside the first 16-lane
    block, across the 512-key blocks torch splits into (where later blocks rescale earlier
    ones), and with the keys as views into a longer cache buffer."""
    fn = _kernel_held_to_torch()
    rng = random.Random(7)
    gen = torch.Generator().manual_seed(7)
    for _ in range(120):
        dim = rng.choice([16, 32, 64, 80, 128, 256])
        kv_heads = rng.choice([1, 2, 4])
        heads = kv_heads * rng.choice([2, 7] if kv_heads == 1 else [1, 2, 7])  # one head alone is left to torch
        keys = rng.choice([rng.randint(1, 40), rng.randint(1, 1600)])
        spread = rng.choice([0.3, 1.0, 4.0, 12.0])
        q = torch.randn(1, heads, 1, dim, generator=gen).mul(spread).bfloat16()
        k = torch.randn(1, kv_heads, keys + 50, dim, generator=gen).mul(spread).bfloat16()[:, :, :keys]
        v = torch.randn(1, kv_heads, keys + 50, dim, generator=gen).bfloat16()[:, :, :keys]
        assert _same(fn, q, k, v, dim ** -0.5), (dim, heads, kv_heads, keys, spread)


@needs_attend
def test_attend_kernel_sums_in_torchs_order():
    """Sums whose result shows their order through the bfloat16 output. Random data would
    rarely show it: a different order moves a float32 result by an ulp or so, which the
    final rounding to bfloat16 mostly hides.

    - q . k: each key's row holds BIG, -BIG and 1 at three dimensions (q is all ones), so
      its score is 1 or 0 by the order of the dimensions' sum;
    - p . v: with q = 0 every probability is 1, and each dimension of v holds BIG, -BIG and
      1 at three keys, so that output is 0 or 1 / sum by the order of the keys' sum: in the
      first block, its last keys, and the blocks after;
    - the running exp sum across blocks: a rescale whose fused multiply-add rounds, here,
      unlike a multiply then an add (the scores and value were found by search).

    Two query heads share each key/value head: torch computes a single head outside its
    parallel region, where MKL splits the sums across threads (``exact_decode`` leaves
    that case to torch)."""
    fn = _kernel_held_to_torch()
    rng = random.Random(3)
    dim = 64
    for _ in range(10):  # q . k
        k = torch.zeros(1, 1, dim, dim)
        for j in range(dim):
            a, b, c = rng.sample(range(dim), 3)
            k[0, 0, j, a], k[0, 0, j, b], k[0, 0, j, c] = BIG, -BIG, 1
        q, v = torch.ones(1, 2, 1, dim), torch.eye(dim)[None, None]
        q, k, v = q.bfloat16(), k.bfloat16(), v.bfloat16()
        assert _same(fn, q, k, v, 1.0)
    for keys in (6, 7, 8, 9, 21, 64, 511, 513, 514, 515, 1030, 1100):  # p . v
        for _ in range(3):
            v = torch.zeros(1, 1, keys, dim)
            for d in range(dim):
                a, b, c = rng.sample(range(keys), 3)
                v[0, 0, a, d], v[0, 0, b, d], v[0, 0, c, d] = BIG, -BIG, 1
            q, k, v = torch.zeros(1, 2, 1, dim).bfloat16(), torch.zeros(1, 1, keys, dim).bfloat16(), v.bfloat16()
            assert _same(fn, q, k, v, 1.0), keys
    q = torch.zeros(1, 2, 1, 16)  # the exp sum across three blocks
    q[..., 0] = 1
    k, v = torch.zeros(1, 1, 1025, 16), torch.zeros(1, 1, 1025, 16)
    k[0, 0, 512:1024, 0], k[0, 0, 1024, 0], v[0, 0, 1024] = 1.21875, 2.171875, 1.375
    q, k, v = q.bfloat16(), k.bfloat16(), v.bfloat16()
    assert _same(fn, q, k, v, 1.0)


def test_one_query_head_on_several_threads_is_left_to_torch(monkeypatch):
    calls = []
    real = cpu_kernels.attend
    monkeypatch.setattr(cpu_kernels, "attend", lambda *a: calls.append(1) or real(*a))
    gen = torch.Generator().manual_seed(2)
    q = torch.randn(1, 1, 1, 16, generator=gen).bfloat16()
    k, v = (torch.randn(1, 1, 40, 16, generator=gen).bfloat16() for _ in range(2))
    module = torch.nn.Module()
    module.num_key_value_groups = 1
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        out, _ = attention.exact_decode(module, q, k, v, None, scaling=0.25)
    finally:
        torch.set_num_threads(threads)
    assert calls == [] and torch.equal(out, _sdpa(q, k, v, 0.25))


def test_attend_refuses_shapes_it_does_not_take():
    fn = cpu_kernels.load("attend")
    if fn is None:
        pytest.skip("attend.c is not built here")
    q = torch.zeros(1, 4, 1, 18, dtype=torch.bfloat16)  # a head size that is not a multiple of 4
    kv = torch.zeros(1, 2, 5, 18, dtype=torch.bfloat16)
    assert cpu_kernels.attend(fn, q, kv, kv, 0.2) is None
    q = torch.zeros(1, 3, 1, 16, dtype=torch.bfloat16)  # heads not a multiple of the key/value heads
    kv = torch.zeros(1, 2, 5, 16, dtype=torch.bfloat16)
    assert cpu_kernels.attend(fn, q, kv, kv, 0.2) is None


def test_a_kernel_that_rounds_otherwise_is_never_used(monkeypatch):
    """The check before use is what keeps the exact path exact on a CPU or library that
    rounds otherwise: a kernel one ulp off anywhere is refused, and SDPA answers."""
    real = cpu_kernels.attend

    def off_by_one_ulp(fn, query, key, value, scale, lse=None):
        out = real(fn, query, key, value, scale, lse) if fn is not None else _sdpa(query, key, value, scale)
        out.view(torch.int16)[..., 0, 0, 3] += 1
        return out

    monkeypatch.setattr(cpu_kernels, "attend", off_by_one_ulp)
    monkeypatch.setattr(attention, "_checked", {})
    assert attention.decode_kernel(4, 2, 16, 0.25) is None

    gen = torch.Generator().manual_seed(1)
    q = torch.randn(1, 4, 1, 16, generator=gen).bfloat16()
    k, v = (torch.randn(1, 2, 30, 16, generator=gen).bfloat16() for _ in range(2))
    module = torch.nn.Module()
    module.num_key_value_groups = 2
    out, _ = attention.exact_decode(module, q, k, v, None, scaling=0.25)
    assert torch.equal(out, _sdpa(q, k, v, 0.25))


def test_the_attend_switch_turns_the_kernel_off(monkeypatch):
    monkeypatch.setenv("GROOVE_ATTEND_KERNEL", "0")
    monkeypatch.setattr(attention, "_checked", {})
    assert attention.decode_kernel(4, 2, 16, 0.25) is None


def test_a_bfloat16_shard_decodes_past_512_keys_with_transformers_logits(model_paths, monkeypatch):
    """A whole model in one shard against transformers' own forward with its own cache: a
    530-token prompt, then decode steps past torch's 512-key block, every logit bit for bit,
    through attend.c where it is held to torch (through torch's kernel elsewhere)."""
    from transformers import DynamicCache

    from groove.models import checkpoint
    from groove.node.loader import load_slice
    from groove.node.shard import Shard
    from groove.protocol.messages import Sampling

    from .conftest import _reference_model

    path = model_paths["qwen2"]
    ckpt = checkpoint.load(str(path))
    monkeypatch.setattr(attention, "_checked", {})
    shard = Shard(load_slice(ckpt, 0, ckpt.num_layers - 1, torch.device("cpu"), torch.bfloat16))
    config = shard.s.config
    heads, kv_heads = config.num_attention_heads, config.num_key_value_heads
    dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    key = (heads, kv_heads, dim, dim ** -0.5)
    assert key in attention._checked  # checked when the shard was built
    used = _held_to_torch_here()
    assert (attention._checked[key] is not None) == used
    model = _reference_model(str(path), "bfloat16")
    calls = []
    real = cpu_kernels.attend
    monkeypatch.setattr(cpu_kernels, "attend", lambda *a: calls.append(1) or real(*a))
    state = shard.new_session(Sampling(temperature=0))
    cache = DynamicCache(config=model.config)
    prompt = [(i * 37) % 200 + 3 for i in range(530)]
    with torch.inference_mode():
        want = model(torch.tensor([prompt]), cache=cache, use_cache=True).logits[0, -1].float()
        assert torch.equal(shard.step(state, 0, tokens=prompt), want)
        position = len(prompt)
        for i in range(40):
            token = int(want.argmax())
            want = model(torch.tensor([[token]]), cache=cache, use_cache=True).logits[0, -1].float()
            assert torch.equal(shard.step(state, position, tokens=[token]), want), i
            position += 1
    assert len(calls) == (40 * ckpt.num_layers if used else 0)  # every decode step of every layer, where it is used
