"""``--wire-dtype``: hidden states cross the links in fewer bytes, and the logits move by
no more than the rounding of the activations."""

from __future__ import annotations

import time

import pytest
import torch

from groove.consumer.client import Client
from groove.consumer.commands import fetch_status
from groove.launch import LocalCluster
from groove.protocol.errors import ProtocolError
from groove.protocol.messages import Sampling
from groove.protocol.tensors import Q8, check_payload, from_bytes, to_wire

from .conftest import reference_logits, run_async

PROMPT = list(range(100, 150))  # 50 positions: 50 x 64 hidden values cross the link


@pytest.mark.parametrize("wire", ["float32", "bfloat16", "float16", Q8])
def test_wire_codec_round_trip(wire):
    x = torch.randn(1, 7, 96) * torch.linspace(0.1, 20, 7)[None, :, None]
    dtype, shape, raw = to_wire(x, wire)
    y = from_bytes(raw, dtype, shape).float()
    assert shape == [1, 7, 96] and y.shape == x.shape
    if wire == Q8:
        assert len(raw) == 7 * 96 + 7 * 4
        # each value within half a quantization step of its own vector's scale
        step = x.abs().amax(dim=-1, keepdim=True) / 127
        assert bool(((y - x).abs() <= step / 2 + 1e-6).all())
    else:
        assert torch.allclose(y, x, rtol=1e-2 if wire != "float32" else 0, atol=0)


def test_q8_payload_sizes_are_checked():
    check_payload(Q8, [1, 3, 8], 3 * 8 + 3 * 4)
    for size in (3 * 8, 3 * 8 + 3 * 4 + 1):
        with pytest.raises(ProtocolError):
            check_payload(Q8, [1, 3, 8], size)
    with pytest.raises(ProtocolError):
        check_payload(Q8, [], 0)


def first_token_logits_and_link_bytes(path, wire: str) -> tuple[torch.Tensor, int]:
    with LocalCluster(path, [(0, 2), (3, 5)], node_args=["--wire-dtype", wire]) as cluster:
        def sent_by_first() -> int:
            return next(n["bytes_in"] for n in fetch_status(cluster.address)["nodes"] if n["layers"][0] == 0)

        before = sent_by_first()

        async def run():
            async with Client(cluster.address) as c:
                s = await c.open_session("llama", Sampling(temperature=0), wait=10)
                return [x async for x in c.generate(s, PROMPT, 1, want_logits=True)]

        (step,) = run_async(run())
        time.sleep(1.2)  # heartbeats count too; let one pass so both runs carry the same
        return step.logits, sent_by_first() - before


def test_compressed_links_carry_fewer_bytes_at_a_bounded_cost(model_paths):
    path = model_paths["llama"]
    reference = reference_logits(path, PROMPT)
    results = {wire: first_token_logits_and_link_bytes(path, wire) for wire in ("auto", "bfloat16", "int8")}
    full_logits, full_bytes = results["auto"]
    assert torch.allclose(full_logits, reference, atol=1e-4)
    spread = float(reference.max() - reference.min())
    for wire, bound, ratio in (("bfloat16", 0.02, 0.55), ("int8", 0.05, 0.35)):
        logits, sent = results[wire]
        error = float((logits - reference).abs().max())
        assert 0 < error < bound * spread, (wire, error, spread)
        assert sent < ratio * full_bytes, (wire, sent, full_bytes)  # float32 hidden states: 4 bytes a value
