"""The node's fast linear layers: packed bfloat16 is bit-identical, int8 stays close."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from groove.node import linears

from .conftest import c_compiler_on_x86, cpu_info
from groove.node.linears import (
    Int8Linear,
    PackedLinear,
    Packer,
    RowExact,
    canonical,
    linear_converter,
    make_row_exact,
    packing_available,
    replace_linears,
    row_layout,
    settle,
)


@pytest.mark.skipif(not packing_available(torch.device("cpu"), torch.bfloat16), reason="oneDNN is not available")
@pytest.mark.parametrize("shape", [(64, 96), (192, 64), (1000, 64)])
@pytest.mark.parametrize("m", [1, 5, 300])
def test_packed_bfloat16_is_bit_identical(shape, m):
    torch.manual_seed(0)
    lin = nn.Linear(shape[1], shape[0], bias=False).to(torch.bfloat16)
    x = torch.randn(1, m, shape[1], dtype=torch.bfloat16)
    assert torch.equal(PackedLinear(lin)(x), lin(x))


@pytest.mark.skipif(not packing_available(torch.device("cpu"), torch.bfloat16), reason="oneDNN is not available")
def test_layers_with_a_bias_are_packed_only_where_they_round_like_addmm():
    """A fused bias rounds like addmm on some CPUs and not on others: either way the
    converted layer gives nn.Linear's results."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(896, 128, bias=True), nn.Linear(896, 896, bias=False)).to(torch.bfloat16)
    plain = [nn.Linear(896, n, bias=m.bias is not None).to(torch.bfloat16) for n, m in ((128, model[0]), (896, model[1]))]
    for p, m in zip(plain, model):
        p.load_state_dict(m.state_dict())
    convert, weights = linear_converter("none", True, torch.device("cpu"), torch.bfloat16)
    replace_linears(model, convert)
    assert weights == "packed" and isinstance(model[1], PackedLinear)
    g = torch.Generator().manual_seed(1)
    with torch.inference_mode():
        for n in [1] * 40 + [2, 7, 32, 33, 100]:
            x = torch.randn(1, n, 896, generator=g).to(torch.bfloat16)
            for layer, want in zip(model, plain):
                assert torch.equal(layer(x), want(_fresh(x)))


def _fresh(x: torch.Tensor) -> torch.Tensor:
    """The same values in a tensor of their own, as the layer before would hand them over."""
    return torch.empty(x.shape, dtype=x.dtype).copy_(x)


@pytest.mark.skipif(not packing_available(torch.device("cpu"), torch.bfloat16), reason="oneDNN is not available")
@pytest.mark.parametrize("shape", [(896, 896), (4864, 896), (896, 4864)])  # Qwen2.5-0.5B's o, gate/up, down
def test_packed_layers_round_like_nn_linear_at_every_call_size(shape):
    """Whatever layout the probe picks and whatever sizes it packs, every call gives
    nn.Linear's result: on a CPU with AMX the one-row layout differs from 33 rows on, and
    the down projection's packed one-row calls differ for about one input in ten."""
    torch.manual_seed(0)
    linear = nn.Linear(shape[1], shape[0], bias=False).to(torch.bfloat16)
    packed = Packer(settle_s=30.0)(linear)
    g = torch.Generator().manual_seed(1)
    with torch.inference_mode():
        x = torch.randn(1, 64, shape[1], generator=g).to(torch.bfloat16)
        for j in range(64):  # one-row calls, as decoding makes them
            assert torch.equal(packed(_fresh(x[:, j : j + 1])), linear(_fresh(x[:, j : j + 1]))), j
        for n in [*range(2, 41), 64, 65, 80, 300]:
            for _ in range(3):  # sizes past the load-time checks settle on their first calls, then go packed
                x = torch.randn(1, n, shape[1], generator=g).to(torch.bfloat16)
                assert torch.equal(packed(x), linear(_fresh(x))), n


def test_canonical_gives_a_slice_the_strides_of_a_tensor_of_its_own():
    x = torch.randn(1, 50, 16)
    piece = canonical(x[:, 10:17])
    assert piece.stride() == _fresh(piece).stride() and torch.equal(piece, x[:, 10:17])
    assert piece.data_ptr() == x[:, 10:17].data_ptr()  # a view, not a copy


def test_converter_choice():
    cpu = torch.device("cpu")
    assert linear_converter("none", True, cpu, torch.float32) == (None, "")  # float32 stays on MKL
    assert linear_converter("none", False, cpu, torch.bfloat16) == (None, "")
    assert linear_converter("int8", True, cpu, torch.float32)[1] == "int8"


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("m", [1, 7, 64])
def test_int8_matches_its_dequantized_weights(dtype, m):
    torch.manual_seed(0)
    lin = nn.Linear(128, 300, bias=True).to(dtype)
    q = Int8Linear(lin, dtype)
    assert q.weight.dtype == torch.int8 and q.scales.shape == (300,)
    x = torch.randn(2, m, 128, dtype=dtype)
    deq = (q.weight.float() * q.scales.float()[:, None])
    expected = x.float() @ deq.T + lin.bias.float()
    tol = 1e-4 if dtype == torch.float32 else 5e-2
    assert torch.allclose(q(x).float(), expected, atol=tol, rtol=tol)
    # and quantization error against the original weights is small
    rel = (q(x).float() - lin(x).float()).norm() / lin(x).float().norm()
    assert rel < 0.02


def test_int8_quantizes_in_row_blocks_exactly_like_all_at_once():
    torch.manual_seed(1)
    lin = nn.Linear(16, 9000)  # more rows than one block
    q = Int8Linear(lin, torch.float32)
    w = lin.weight.detach()
    scales = w.abs().amax(1) / 127
    assert torch.equal(q.weight, torch.round(w / scales[:, None]).clamp(-127, 127).to(torch.int8))


def _kernel_expected_here() -> bool:
    """A C compiler and an x86 CPU with AVX2 or AVX-512: the int8 kernel must build."""
    flags = cpu_info()
    return c_compiler_on_x86() and (" avx512f" in flags or (" avx2" in flags and " fma" in flags))


@pytest.mark.skipif(not _kernel_expected_here(), reason="no C compiler or no AVX2/AVX-512 here")
@pytest.mark.parametrize("k,n", [(896, 300), (100, 33), (70, 5)])
def test_int8_kernel_builds_and_gives_each_row_the_same_result_in_any_batch(k, n):
    from groove.node import cpu_kernels

    fn = cpu_kernels.load("q8")
    assert fn is not None, "the int8 kernel did not build"
    torch.manual_seed(k)
    lin = nn.Linear(k, n, bias=True)
    bf16 = Int8Linear(lin.to(torch.bfloat16), torch.bfloat16)
    assert bf16.kernel is fn
    x = torch.randn(1, 32, k, dtype=torch.bfloat16)
    exact = x[0].double() @ (bf16.weight.double() * bf16.scales32.double()[:, None]).T + lin.bias.double()
    # Float32 sums of exact products, rounded once to bfloat16 (and the bias added there).
    whole = bf16(x)[0]
    assert torch.allclose(whole.double(), exact, rtol=2e-2, atol=2e-2)
    # bfloat16 rows (vdpbf16ps where the CPU has it): a row's bits do not depend on its call.
    # Rounding to bfloat16 hides a float32 sum's last bits, so the rows carry two large
    # inputs whose products cancel (inputs 2 and 98 meet opposite weight columns): the small
    # products summed between them are lost, and a change of summation order with the call
    # size would change which.
    rows_x = x.clone()
    if k >= 128:
        bf16 = Int8Linear(nn.Linear(k, n, bias=True).to(torch.bfloat16), torch.bfloat16)
        bf16.weight[:, 98] = -bf16.weight[:, 2]
        rows_x[..., 2] = rows_x[..., 98] = 2.0 ** 20
        whole = bf16(rows_x)[0]
    for rows in (1, 2, 3, 4, 5, 9, 31):
        for start in range(0, 32 - rows + 1, rows):
            got = bf16(rows_x[:, start : start + rows])
            assert torch.equal(got, whole[start : start + rows].unsqueeze(0)), (rows, start)
    # In float32 every bit of the sums shows: a row's result must not depend on its call.
    q = Int8Linear(lin.float(), torch.float32)
    x = x.float()
    out = q(x)[0]
    assert torch.allclose(out.double(), x[0].double() @ (q.weight.double() * q.scales32.double()[:, None]).T
                          + lin.bias.double(), rtol=1e-4, atol=1e-4)
    for rows in (1, 2, 3, 4, 5, 9, 31):
        for start in range(0, 32 - rows + 1, rows):
            assert torch.equal(q(x[:, start : start + rows]), out[start : start + rows].unsqueeze(0)), (rows, start)


def test_int8_without_the_kernel_still_runs_any_width(monkeypatch):
    """GROOVE_INT8_KERNEL=0 keeps torch's kernel, whose crash on inputs not a multiple of 16
    wide is avoided by dequantizing instead."""
    from groove.node import cpu_kernels

    monkeypatch.setenv("GROOVE_INT8_KERNEL", "0")
    monkeypatch.setattr(cpu_kernels, "_loaded", {})
    torch.manual_seed(3)
    for k in (100, 128):
        lin = nn.Linear(k, 40, bias=False).to(torch.bfloat16)
        q = Int8Linear(lin, torch.bfloat16)
        assert q.kernel is None and q._packed_op == (k % 16 == 0)
        x = torch.randn(1, 3, k, dtype=torch.bfloat16)
        expected = x.float() @ (q.weight.float() * q.scales.float()[:, None]).T
        assert torch.allclose(q(x).float(), expected, atol=5e-2, rtol=5e-2)


def test_int8_kernel_unbuildable_leaves_torchs_kernel(monkeypatch, tmp_path):
    """A cache directory that cannot be made (or no compiler) is not an error: the node
    keeps torch's int8 kernel."""
    from groove.node import cpu_kernels

    blocker = tmp_path / "file"
    blocker.write_text("")
    monkeypatch.setenv("XDG_CACHE_HOME", str(blocker / "cache"))  # below a file: mkdir fails
    monkeypatch.setattr(cpu_kernels, "_loaded", {})
    assert cpu_kernels.build("q8") is None and cpu_kernels.load("q8") is None
    monkeypatch.setattr(cpu_kernels, "_loaded", {})
    monkeypatch.setenv("CC", str(tmp_path / "no-such-compiler"))
    assert cpu_kernels.build("q8") is None
    q = Int8Linear(nn.Linear(64, 8, bias=False), torch.float32)
    assert q.kernel is None and q(torch.randn(1, 2, 64)).shape == (1, 2, 8)


def _bf16_kernel_expected_here() -> bool:
    """A C compiler, oneDNN, and an x86 CPU with AVX-512 BF16: the bfloat16 kernel must build."""
    return (_kernel_expected_here() and " avx512_bf16" in cpu_info()
            and packing_available(torch.device("cpu"), torch.bfloat16))


def _summed_like_onednns_one_row_kernel(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """The order bf16.c reproduces (oneDNN's one-row kernel on AVX-512 BF16 without AMX),
    spelled out: chunks of 512 inputs, each summed from zero by pairs of inputs (the odd
    one first; each float32 product is exact, each addition rounds), the chunks' sums
    added in order, then the bias, then one rounding to bfloat16. ``x`` [rows, in]."""
    xf, wf = x.float(), weight.float()
    total = None
    for c0 in range(0, xf.shape[1], 512):
        acc = torch.zeros(xf.shape[0], wf.shape[0])
        for k in range(c0, min(xf.shape[1], c0 + 512), 2):
            acc = acc + xf[:, k + 1 : k + 2] * wf[:, k + 1]
            acc = acc + xf[:, k : k + 1] * wf[:, k]
        total = acc if total is None else total + acc
    if bias is not None:
        total = total + bias.float()
    return total.to(torch.bfloat16)


@pytest.mark.skipif(not _bf16_kernel_expected_here(), reason="no C compiler, oneDNN or AVX-512 BF16 here")
@pytest.mark.parametrize("k,n,bias", [(896, 4864, False), (4864, 896, False), (896, 128, True), (1088, 192, True)])
def test_bf16_kernel_sums_each_row_in_onednns_one_row_order(k, n, bias):
    """groove's bfloat16 kernel reads oneDNN's packed weight and sums each row, in a call
    of any size, in the order of oneDNN's one-row kernel, bit for bit. Summing the pairs'
    other input first, or chunks of another size, or rounding before the bias, each fails
    this. Where oneDNN sums that way (AVX-512 BF16 without AMX), that is nn.Linear's own
    one-row result; elsewhere PackedLinear's checks keep oneDNN's kernel (the tests above)."""
    from groove.node import cpu_kernels

    torch.manual_seed(k + n)
    lin = nn.Linear(k, n, bias=bias).to(torch.bfloat16)
    packed = PackedLinear(lin, 1, own_kernel=True)
    if not cpu_kernels.reads_packed_layout(lin.weight.detach(), packed.packed):
        pytest.skip("oneDNN packs another layout on this CPU: the kernel is not used here")
    assert packed.kernel is not None and packed.kernel is cpu_kernels.load("bf16"), "the bfloat16 kernel did not build"
    g = torch.Generator().manual_seed(1)
    x = torch.randn(1, 48, k, generator=g).to(torch.bfloat16)
    want = _summed_like_onednns_one_row_kernel(x[0], lin.weight.detach(), None if lin.bias is None else lin.bias.detach())
    with torch.inference_mode():
        for rows in range(1, linears.OWN_KERNEL_ROWS + 1):
            for start in range(0, 48 - rows + 1, rows):
                got = packed.fast(x[:, start : start + rows])[0]
                assert torch.equal(got, want[start : start + rows]), (rows, start)


@pytest.mark.skipif(not _bf16_kernel_expected_here(), reason="no C compiler, oneDNN or AVX-512 BF16 here")
def test_bf16_kernel_only_where_it_reads_the_packed_layout(monkeypatch):
    from groove.node import cpu_kernels

    torch.manual_seed(5)
    lin = nn.Linear(96, 128, bias=False).to(torch.bfloat16)
    packed = torch.ops.mkldnn._reorder_linear_weight(lin.weight.detach(), 1)
    if not cpu_kernels.reads_packed_layout(lin.weight.detach(), packed):
        pytest.skip("oneDNN packs another layout on this CPU: the kernel is not used here")
    assert not cpu_kernels.reads_packed_layout(lin.weight.detach().flip(0), packed)  # another weight's bytes
    odd = nn.Linear(96, 100, bias=False).to(torch.bfloat16)  # not a whole number of 64-output blocks
    assert PackedLinear(odd, 1, own_kernel=True).kernel is None
    monkeypatch.setenv("GROOVE_BF16_KERNEL", "0")
    monkeypatch.setattr(cpu_kernels, "_loaded", {})
    assert PackedLinear(lin, 1, own_kernel=True).kernel is None
    choice = linears.choose_hint(lin)
    assert choice is not None and choice[1] is False  # oneDNN's kernel, in some layout


@pytest.mark.skipif(not _bf16_kernel_expected_here(), reason="no C compiler, oneDNN or AVX-512 BF16 here")
def test_row_exact_sends_runs_of_single_rows_through_the_bf16_kernel_together():
    """The down projection's multi-row calls round unlike its one-row calls, so a batch's
    decode rows used to go one call each, each reading the whole weight. groove's kernel
    gives a run of single rows their one-row results in one call; a prompt's piece still
    gets nn.Linear's own call of its size."""
    torch.manual_seed(6)
    lin = nn.Linear(4864, 896, bias=False).to(torch.bfloat16)
    packed = PackedLinear(lin, 1, own_kernel=True)
    if packed.kernel is None:
        pytest.skip("oneDNN packs another layout on this CPU: the kernel is not used here")
    packed.reference = lin.weight
    settle(packed, [1])
    packed.reference = None
    if packed.alone_rows() == 0:
        pytest.skip("oneDNN's one-row kernel sums otherwise on this CPU: the kernel is not used here")
    sizes: list[int] = []
    fast = packed.fast

    def counted(x):
        sizes.append(x.numel() // x.shape[-1])
        return fast(x)

    packed.fast = counted
    wrapped = RowExact(packed, safe=1)
    counts = [1] * 5 + [3] + [1] * 4
    x = torch.randn(1, sum(counts), 4864, dtype=torch.bfloat16)
    with torch.inference_mode(), row_layout(counts):
        out = wrapped(x)
    with torch.inference_mode():
        for j in [*range(5), *range(8, 12)]:
            assert torch.equal(out[:, j : j + 1], lin(_fresh(x[:, j : j + 1]))), j
        assert torch.equal(out[:, 5:8], lin(_fresh(x[:, 5:8])))
    assert 5 in sizes and 4 in sizes and 1 not in sizes, sizes


def test_int8_prefill_dequantizes_in_blocks_like_all_at_once(monkeypatch):
    import groove.node.linears as linears

    torch.manual_seed(4)
    lin = nn.Linear(64, 1000, bias=False)
    q = Int8Linear(lin, torch.float32)
    x = torch.randn(1, 40, 64)
    whole = q(x)
    monkeypatch.setattr(linears, "DEQUANTIZED_BLOCK_BYTES", 64 * 4 * 300)  # 300 rows a block: 4 blocks
    assert torch.allclose(q(x), whole, atol=1e-5, rtol=1e-5)


def test_replace_linears_swaps_every_linear_and_frees_the_originals():
    model = nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Sequential(nn.Linear(4, 2)))
    assert replace_linears(model, lambda lin: Int8Linear(lin, torch.float32)) == 2
    assert not any(isinstance(m, nn.Linear) for m in model.modules())
    assert model(torch.randn(3, 4)).shape == (3, 2)


def _down_projection():
    torch.manual_seed(0)
    linear = nn.Linear(4864, 896, bias=False).to(torch.bfloat16)  # Qwen2.5-0.5B's, where oneDNN's one-row path differs
    return PackedLinear(linear) if packing_available(torch.device("cpu"), torch.bfloat16) else linear


def test_row_exact_gives_every_piece_its_solo_result():
    layer = _down_projection()
    x = torch.randn(1, 9, 4864).to(torch.bfloat16)
    counts = [1, 3, 1, 2, 1, 1]
    starts = [sum(counts[:i]) for i in range(len(counts))]
    alone = torch.cat([layer(x[:, a : a + n]) for a, n in zip(starts, counts)], dim=1)
    with row_layout(counts):
        assert torch.equal(RowExact(layer)(x), alone)
    assert torch.equal(RowExact(layer)(x), layer(x))  # outside a pass: one call, as before


def test_make_row_exact_wraps_only_what_the_probe_finds_different():
    model = nn.Sequential(_down_projection(), nn.Linear(896, 896, bias=False).to(torch.bfloat16))
    wrapped = make_row_exact(model, torch.device("cpu"), torch.bfloat16)
    x = torch.randn(1, 5, 4864).to(torch.bfloat16)
    for name in ("0", "1"):
        layer = model.get_submodule(name)
        inner = layer.inner if isinstance(layer, RowExact) else layer
        rows = x if name == "0" else model[0](x)
        together = inner(rows)
        differs = not torch.equal(together, torch.cat([inner(rows[:, j : j + 1]) for j in range(5)], dim=1))
        # A layer is wrapped exactly when its one-row calls round differently (the probe
        # may miss a difference that rare inputs show, never invent one).
        assert (name in wrapped) or not differs


def test_row_exact_batches_single_rows_up_to_the_size_the_probe_found_safe():
    """Decode rows go together in calls no larger than the probe's safe size, prompt pieces
    in calls of their own size: every piece still gets exactly its solo result."""
    from groove.node.linears import rows_like_one

    layer = _down_projection()
    safe = rows_like_one(layer, 4864, "cpu", torch.bfloat16)
    wrapped = RowExact(layer, safe or 512)
    counts = [1] * 40 + [17, 1, 1, 33, 1]
    starts = [sum(counts[:i]) for i in range(len(counts))]
    for _ in range(4):  # some differences show in one output in thousands
        x = torch.randn(1, sum(counts), 4864).to(torch.bfloat16)
        alone = torch.cat([layer(_fresh(x[:, a : a + n])) for a, n in zip(starts, counts)], dim=1)
        with row_layout(counts):
            assert torch.equal(wrapped(x), alone)


def test_a_layer_probed_only_up_to_a_size_has_its_calls_capped_there():
    """An LM head is probed up to 64 rows only: even where every size it tried rounds like
    one row, a batch never gives it a larger call than it tried."""
    class RowByRow(nn.Linear):  # rounds each row alike whatever the call's size
        def forward(self, x):
            return torch.stack([F.linear(x[:, j : j + 1], self.weight)[:, 0] for j in range(x.shape[1])], dim=1)

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 96, bias=False), RowByRow(96, 64, bias=False))
    wrapped = make_row_exact(model, torch.device("cpu"), torch.float32, largest={"1": 8})
    assert "1" in wrapped and 1 <= model[1].safe <= 8
    calls: list[int] = []
    model[1].inner.register_forward_pre_hook(lambda module, args: calls.append(args[0].shape[1]))
    with row_layout([1] * 20):
        model[1](torch.randn(1, 20, 96))
    assert sum(calls) == 20 and max(calls) <= 8


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_transposed_calls_give_each_row_its_one_row_result_where_the_probe_found_a_pad(dtype):
    """Where multi-row calls round unlike one row (the down projection on a CPU with AMX),
    decode rows may go in one transposed call padded to the probe's size: each row must
    still equal its one-row call, for runs of every length, on inputs the probe never saw."""
    from groove.node.linears import transposed_pad, rows_like_one

    torch.manual_seed(0)
    layer = nn.Linear(4864, 896, bias=False).to(dtype)
    safe = rows_like_one(layer, 4864, "cpu", dtype) or 512
    pad = transposed_pad(layer, "cpu", dtype)
    wrapped = RowExact(layer, safe, pad)
    counts = [1] * 70 + [5, 1, 1, 1] + [1] * 3
    starts = [sum(counts[:i]) for i in range(len(counts))]
    calls: list[int] = []
    layer.register_forward_pre_hook(lambda module, args: calls.append(args[0].shape[1]))
    for _ in range(4):  # some differences show in one output in thousands
        x = torch.randn(1, sum(counts), 4864).to(dtype)
        alone = torch.cat([layer(_fresh(x[:, a : a + n])) for a, n in zip(starts, counts)], dim=1)
        calls.clear()
        with row_layout(counts):
            assert torch.equal(wrapped(x), alone)
        assert max(calls) <= max(safe, 5)  # longer runs went through the transposed call
        if pad is not None and safe < 3:
            assert len(calls) < sum(counts) // 2  # not a call per row


def test_only_plain_bias_free_linears_are_offered_a_transposed_call():
    from groove.node.linears import transposed_pad

    assert transposed_pad(nn.Linear(64, 32, bias=True), "cpu", torch.float32) is None
    packed = PackedLinear(nn.Linear(4864, 896, bias=False).to(torch.bfloat16))  # its weight is not a plain matrix
    assert transposed_pad(packed, "cpu", torch.bfloat16) is None


def test_the_lm_head_is_probed_up_to_the_nodes_batch_size(model_paths):
    """``--max-batch`` above 64: the head is probed that far, so a full batch's rows need
    not be split into capped calls; it is never probed, nor called, past the batch size's
    probe rows."""
    from groove.models import checkpoint
    from groove.node.linears import PROBE_ROWS, rows_like_one
    from groove.node.loader import load_slice
    from groove.node.shard import Shard

    ckpt = checkpoint.load(str(model_paths["qwen2"]))
    for max_batch, probed in ((8, 64), (200, 128)):  # below 64 the head is probed to 64 all the same
        shard = Shard(load_slice(ckpt, 0, ckpt.num_layers - 1, torch.device("cpu"), torch.bfloat16), max_batch=max_batch)
        assert isinstance(shard.head, RowExact)
        head = shard.head.inner
        found = rows_like_one(head, head.in_features, "cpu", torch.bfloat16, tuple(r for r in PROBE_ROWS if r <= probed))
        assert shard.head.safe == (probed if found is None else found)


@pytest.mark.skipif(not packing_available(torch.device("cpu"), torch.bfloat16), reason="oneDNN is not available")
def test_the_row_probe_never_unpacks_a_weight():
    """On a CPU where a layer's packed 2-row calls round unlike nn.Linear's, such calls
    unpack the whole weight each time. The row probe counts that size as unlike one row
    instead of calling it: probing Llama-3.2-1B's LM head that way copied 501 MiB at load."""
    from groove.node.linears import rows_like_one

    torch.manual_seed(0)
    packed = PackedLinear(nn.Linear(160, 96, bias=False).to(torch.bfloat16))
    unpacked = []
    real = packed.unpacked
    packed.unpacked = lambda x: unpacked.append(x.shape) or real(x)
    saved = dict(packed.checked)
    try:
        settle(packed, [1])  # one-row calls rounded as nn.Linear's, as the packer requires
        packed.checked[2] = -1  # as found on such a CPU; the original weight is gone
        assert packed.unpacks(2) and not packed.unpacks(1)
        unpacked.clear()
        assert rows_like_one(packed, 160, "cpu", torch.bfloat16) == 1
        assert unpacked == []
    finally:
        packed.checked.clear()
        packed.checked.update(saved)
