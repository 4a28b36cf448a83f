"""The KV cache whose full-attention layers grow in place holds what transformers' own
holds, and a shard decoding through it gives transformers' cache's logits bit for bit."""

from __future__ import annotations

import random

import pytest
import torch
from transformers import DynamicCache
from transformers.cache_utils import DynamicLayer

from groove.node import kv_cache
from groove.node.kv_cache import GrowingLayer, session_cache
from groove.protocol.messages import Sampling


def test_growing_layer_holds_what_dynamic_layer_holds_through_growth_and_crops():
    rng = random.Random(0)
    ours, theirs = GrowingLayer(), DynamicLayer()
    for step in range(200):
        if step % 7 == 6 and theirs.get_seq_length() > 1:
            drop = -rng.randint(1, min(40, theirs.get_seq_length() - 1))
            ours.crop(drop)
            theirs.crop(drop)
        else:
            n = rng.choice([1, 1, 1, 3, 17, 300])  # past GROWTH_POSITIONS at once, too
            k, v = torch.randn(1, 2, n, 8), torch.randn(1, 2, n, 8)
            got, want = ours.update(k, v), theirs.update(k, v)
            assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1]), step
        assert ours.get_seq_length() == theirs.get_seq_length()
        assert torch.equal(ours.keys, theirs.keys) and torch.equal(ours.values, theirs.values)
    # Room beyond what is held stays bounded: a quarter, or GROWTH_POSITIONS.
    held = ours.get_seq_length()
    assert ours.key_buffer.shape[-2] <= held + max(kv_cache.GROWTH_POSITIONS, held // 4) + 300
    with pytest.raises(ValueError):
        ours.crop(3)


def test_a_reservation_gives_room_before_the_pass_and_never_changes_what_is_held(model_paths):
    """A shard reserves each session's positions before its layers run, so the buffers
    are not allocated between the pass's activations. The update then writes in place;
    where the config's guess of the shapes is wrong, it regrows; and a reservation for a
    layer that holds keys keeps them."""
    from groove.models import checkpoint
    from groove.node.loader import slice_config

    config = slice_config(checkpoint.load(str(model_paths["qwen2"])), 0, 1)
    cache = session_cache(config)
    kv_cache.reserve(cache, 600, config, torch.device("cpu"), torch.float32)
    heads, dim = config.num_key_value_heads, config.hidden_size // config.num_attention_heads
    layer = cache.layers[0]
    assert layer.key_buffer.shape == (1, heads, kv_cache.capacity_for(600), dim) and layer.get_seq_length() == 0
    where = layer.key_buffer.data_ptr()
    k, v = torch.randn(1, heads, 600, dim), torch.randn(1, heads, 600, dim)
    got = layer.update(k, v)
    assert layer.key_buffer.data_ptr() == where and torch.equal(got[0], k) and torch.equal(got[1], v)

    kv_cache.reserve(cache, 5000, config, torch.device("cpu"), torch.float32)  # grows what it holds
    assert layer.key_buffer.shape[-2] >= 5000 and torch.equal(layer.keys, k) and torch.equal(layer.values, v)

    wrong = session_cache(config)  # a guess in the wrong dtype and width: the update regrows
    kv_cache.reserve(wrong, 64, config, torch.device("cpu"), torch.bfloat16)
    k2 = torch.randn(1, heads, 10, dim + 8)
    got = wrong.layers[1].update(k2, k2)
    assert torch.equal(got[0], k2) and wrong.layers[1].key_buffer.dtype == torch.float32


def test_session_cache_grows_full_attention_layers_only(model_paths):
    from groove.models import checkpoint
    from groove.node.loader import slice_config

    config = slice_config(checkpoint.load(str(model_paths["qwen2"])), 0, 3)
    cache = session_cache(config)
    assert len(cache.layers) == 4 and all(isinstance(layer, GrowingLayer) for layer in cache.layers)
    config.layer_types = ["sliding_attention", "full_attention", "sliding_attention", "full_attention"]
    config.sliding_window = 8
    mixed = session_cache(config)
    assert [type(layer) is GrowingLayer for layer in mixed.layers] == [False, True, False, True]


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_shard_logits_through_the_growing_cache_equal_transformers_cache(model_paths, dtype):
    """A prompt, then decode steps past the first growth, a rewind (as after a rejected
    guess), and more steps: every logit is bit for bit what transformers' DynamicCache gives."""
    from groove.models import checkpoint
    from groove.node.loader import load_slice
    from groove.node.shard import Shard

    ckpt = checkpoint.load(str(model_paths["qwen2"]))
    shard = Shard(load_slice(ckpt, 0, 3, torch.device("cpu"), getattr(torch, dtype)))
    ours = shard.new_session(Sampling(temperature=0))
    assert isinstance(ours.cache.layers[0], GrowingLayer)
    theirs = shard.new_session(Sampling(temperature=0))
    theirs.cache = DynamicCache(config=shard.s.config)
    prompt = [(i * 37) % 200 + 3 for i in range(40)]
    assert torch.equal(shard.step(ours, 0, tokens=prompt), shard.step(theirs, 0, tokens=prompt))
    position = len(prompt)
    for i in range(kv_cache.GROWTH_POSITIONS + 20):
        if i == 100:  # drop five positions, as a rejected guess would
            position -= 5
            for state in (ours, theirs):
                state.settled = position
        token = (i * 13) % 200 + 3
        a, b = shard.step(ours, position, tokens=[token]), shard.step(theirs, position, tokens=[token])
        assert torch.equal(a, b), i
        position += 1
