"""Selective loading keeps a node's memory to its slice; the demo runs and cleans up."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import psutil
import pytest

from groove.launch import LocalCluster

from .conftest import run_async
from .test_pipeline import generate, status


@pytest.fixture(scope="module")
def big_sharded_model(tmp_path_factory):
    """A ~430 MB float32 Llama in 100 MB shards: big enough for the slice to show in RSS."""
    from groove.models.synthetic import build_checkpoint

    path = tmp_path_factory.mktemp("big") / "big-llama"
    build_checkpoint(path, "llama", vocab_size=8192, hidden_size=1024, intermediate_size=2816, num_layers=8,
                     num_heads=16, num_kv_heads=16, max_shard_size="100MB", initializer_range=0.02)
    assert (path / "model.safetensors.index.json").is_file()
    return path


def full_model_peak_rss(path) -> int:
    code = (
        "import torch\n"
        "from transformers import AutoModelForCausalLM\n"
        "from groove.node.worker import peak_rss_bytes\n"
        f"m = AutoModelForCausalLM.from_pretrained({str(path)!r}, dtype=torch.float32)\n"
        # transformers may leave weights mapped from the file: read them all, as a forward
        # pass would, so that every page is resident and counted (as the nodes' are).
        "sum(float(p.sum()) for p in m.parameters())\n"
        "print(peak_rss_bytes())\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    return int(out.stdout.strip().splitlines()[-1])


@pytest.mark.skipif(sys.platform != "linux", reason="peak RSS via getrusage in KiB is Linux's convention")
def test_half_a_model_costs_half_the_memory(big_sharded_model):
    from groove.models import checkpoint

    total = sum(t.nbytes for t in checkpoint.load(str(big_sharded_model)).tensors.values())
    full = full_model_peak_rss(big_sharded_model)
    with LocalCluster(big_sharded_model, [(0, 3), (4, 7)]) as cluster:
        # Weights are memory-mapped from the checkpoint: generate once so every page of
        # the slice is touched and counted, then read the peaks the nodes report.
        steps = run_async(generate(cluster.address, "big-llama", [1, 2, 3, 4], 2))
        assert len(steps) == 2
        time.sleep(1.5)
        nodes = status(cluster.address)["nodes"]
    peaks = [n["peak_rss_bytes"] for n in nodes]
    mib = 2**20
    report = f"model {total / mib:.0f} MiB, full load peak {full / mib:.0f} MiB, node peaks {[p // mib for p in peaks]} MiB"
    # Each node holds half the layers: its peak must sit well under a whole-model load,
    # by at least a third of the model's size.
    for peak in peaks:
        assert peak < full - total / 3, report


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="ru_maxrss surviving exec is Linux's behaviour")
def test_a_processes_peak_memory_is_its_own_not_its_parents():
    """getrusage's peak survives exec: a node started by this (large) test process used to
    report this process's size as its own peak. VmHWM does not carry over."""
    ballast = b"x" * (1 << 30)  # written, so resident: this process is now over 1 GiB
    code = ("import resource\n"
            "from groove.node.worker import peak_rss_bytes\n"
            "print(peak_rss_bytes(), resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)\n")
    own, maxrss = map(int, subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split())
    del ballast
    # The child imports torch (a few hundred MB); ru_maxrss says at least this process's GiB.
    assert own < 1 << 30, f"reported {own >> 20} MiB (ru_maxrss: {maxrss >> 20} MiB)"


def _descendants_alive(pids) -> list[int]:
    return [p for p in pids if psutil.pid_exists(p) and psutil.Process(p).status() != psutil.STATUS_ZOMBIE]


def test_demo_runs_matches_transformers_and_leaves_nothing_behind(tmp_path):
    env = dict(os.environ, XDG_CACHE_HOME=str(tmp_path / "cache"))
    proc = subprocess.run([sys.executable, "-m", "groove", "demo", "--max-tokens", "16"], capture_output=True, text=True,
                          timeout=300, env=env)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    out = proc.stdout
    assert "relay: ws://127.0.0.1:" in out and out.count("node n-") == 2 and "layers 0-" in out
    assert "prompt:" in out and "tokens/s" in out
    assert "equal a single-process transformers run" in out and ": yes" in out
    pids = [int(line.split("pid ")[1].split()[0].rstrip(",)")) for line in out.splitlines() if "pid " in line]
    assert len(pids) == 3
    assert not _descendants_alive(pids)


def test_demo_ctrl_c_stops_everything(tmp_path):
    env = dict(os.environ, XDG_CACHE_HOME=str(tmp_path / "cache"), PYTHONUNBUFFERED="1")
    demo = subprocess.Popen([sys.executable, "-m", "groove", "demo", "--max-tokens", "20000"], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=env, start_new_session=True)
    lines = []
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        line = demo.stdout.readline()
        if not line:
            break
        lines.append(line)
        if line.startswith("output:"):
            break
    children = [p.pid for p in psutil.Process(demo.pid).children(recursive=True)]
    assert len(children) >= 3, lines
    os.killpg(demo.pid, signal.SIGINT)  # what a terminal's Ctrl-C does: the whole group
    demo.communicate(timeout=60)
    assert demo.returncode != 0
    deadline = time.monotonic() + 15
    while _descendants_alive(children) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not _descendants_alive(children)


def test_the_built_in_demo_model_is_trained():
    """The shipped checkpoint predicts held-out Python documentation far better than chance."""
    import math

    import torch
    from transformers import AutoModelForCausalLM, PreTrainedTokenizerFast

    from groove.demo import default_demo_model
    from groove.models import checkpoint

    path = default_demo_model()
    ckpt = checkpoint.load(str(path))
    assert ckpt.config["model_type"] == "llama" and ckpt.num_layers >= 4
    assert sum(f.stat().st_size for f in path.iterdir()) < 8 * 2**20
    tok = PreTrainedTokenizerFast.from_pretrained(str(path))
    from groove.models.synthetic import corpus_text

    ids = tok.encode(corpus_text())
    held_out = torch.tensor([ids[-1024:]])  # the end of the validation split
    model = AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32)
    with torch.inference_mode():
        loss = model(held_out, labels=held_out).loss.item()
    assert loss < 4.5, loss  # chance is ln(2048) = 7.6
    assert loss < math.log(len(tok)) - 3


def test_node_memory_does_not_grow_with_each_new_prompt_length(model_paths, cluster_factory):
    """oneDNN keeps a kernel per call size and layer shape, in caches of 1,024 entries by
    default: a bfloat16 node grew by about 4 MiB per new prompt length (534 -> 1,387 MiB
    over 200 lengths on this tiny model). The node caps them."""
    cluster = cluster_factory(model_paths["qwen2"], [(0, 3)], dtype="bfloat16")
    node = psutil.Process(cluster.nodes[0].popen.pid)

    async def prompts(lengths):
        for n in lengths:
            assert len(await generate(cluster.address, "qwen2", [5 + i % 400 for i in range(n)], 1)) == 1

    run_async(prompts(range(17, 57)))  # past the caps: from here on, entries are replaced
    before = node.memory_info().rss
    run_async(prompts(range(57, 177)))
    grown = (node.memory_info().rss - before) / 2**20
    assert grown < 40, f"the node grew by {grown:.0f} MiB over 120 new prompt lengths"


def test_first_node_keeps_only_the_embedding_rows_it_reads(tmp_path, cluster_factory):
    """The first node reads its token embedding row by row as tokens need it: a 128 MiB
    table costs it only the rows of the tokens it has seen. Nodes 0 and 1 hold equal layers, and
    node 0 the embedding besides."""
    from groove.models.synthetic import build_checkpoint

    from .conftest import reference_generate

    path = build_checkpoint(tmp_path / "wide", "qwen2", vocab_size=32768, hidden_size=2048, intermediate_size=2048,
                            num_layers=3, num_heads=16, num_kv_heads=4, dtype="bfloat16", tokenizer=False, seed=7)
    cluster = cluster_factory(path, [(0, 0), (1, 1), (2, 2)], dtype="bfloat16")
    prompt = [3 + 97 * i % 32000 for i in range(40)]
    steps = run_async(generate(cluster.address, "wide", prompt, 4))
    assert [s.token for s in steps] == reference_generate(path, prompt, 4, dtype="bfloat16")
    time.sleep(1.5)  # a heartbeat carries the peaks
    peaks = {tuple(n["layers"]): n["peak_rss_bytes"] / 2**20 for n in status(cluster.address)["nodes"]}
    assert peaks[(0, 0)] < peaks[(1, 1)] + 32, f"peak resident MiB per node: {peaks}"


def test_embedding_rows_are_read_the_first_time_a_token_needs_them(tmp_path):
    """The first node's table is read a row at a time: rows it never needs cost nothing,
    ids outside the table are left to the lookup to reject, and a checkpoint truncated
    under a running node fails the read with a clear error."""
    import torch
    from safetensors.torch import save_file

    from groove.models.checkpoint import ModelError
    from groove.node.loader import RowsOnDemand

    table = torch.randn(32768, 1024, dtype=torch.bfloat16)  # 64 MiB
    path = tmp_path / "model.safetensors"
    save_file({"model.norm.weight": torch.ones(1024), "model.embed_tokens.weight": table}, str(path))
    me = psutil.Process()
    before = me.memory_info().rss
    rows = RowsOnDemand(path, "model.embed_tokens.weight")
    rows.fetch([7, 3, 7, 32768, -1, 30000])
    assert rows.fetched == {3, 7, 30000}
    for i in (3, 7, 30000):
        assert torch.equal(rows.table[i], table[i])
    assert (me.memory_info().rss - before) / 2**20 < 8, "rows never read became resident"
    with pytest.raises(IndexError):
        torch.nn.functional.embedding(torch.tensor([32768]), rows.table)

    os.truncate(path, path.stat().st_size - 1024 * 2 * 100)  # the last 100 rows
    rows.fetch([10])
    with pytest.raises(ModelError, match="truncated"):
        rows.fetch([32767])


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's allocator")
def test_a_freed_prompt_sized_block_stays_in_the_nodes_heap():
    """Setting the mmap threshold freezes glibc's trim threshold at 128 KiB: a freed 16 MiB
    block (a prompt's activations, an int8 layer's dequantized block) went back to the
    system and was faulted in again on the next prompt. With the node's trim threshold it
    stays. Run in a process of its own, whose allocator this may tune."""
    code = """
import ctypes, psutil
from groove.node.main import set_mmap_threshold, set_trim_threshold
libc = ctypes.CDLL("libc.so.6")
libc.malloc.restype = ctypes.c_void_p
libc.malloc.argtypes = [ctypes.c_size_t]
libc.free.argtypes = [ctypes.c_void_p]
set_mmap_threshold(32 << 20)
p = psutil.Process()
def kept():  # MiB still resident after a 16 MiB block is written and freed
    r0 = p.memory_info().rss
    block = libc.malloc(16 << 20)
    ctypes.memset(block, 1, 16 << 20)
    libc.free(block)
    return (p.memory_info().rss - r0) >> 20
before = kept()
set_trim_threshold(64 << 20)
print(before, kept(), kept())
"""
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    before, first, again = map(int, proc.stdout.split())
    assert before <= 1, "without the trim threshold the freed block goes back to the system"
    assert first >= 12, (before, first, again)  # now it stays in the heap...
    assert again <= 1, (before, first, again)  # ...and the next block of that size reuses it
