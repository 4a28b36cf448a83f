"""The command-line contract: exact flags and JSON fields, and one clear line (never a
traceback) with a non-zero exit for every kind of bad input."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

import psutil
import pytest

from groove.launch import spawn

from .conftest import ROOT, groove_cli, reference_generate

PROMPT = "The meaning of life is"


def no_traceback(proc):
    assert "Traceback" not in proc.stderr and "Traceback" not in proc.stdout, proc.stderr


@pytest.fixture(scope="module")
def two_nodes(model_paths):
    from groove.launch import LocalCluster

    with LocalCluster(model_paths["llama"], [(0, 2), (3, 5)]) as c:
        yield c


def test_generate_json_contract(two_nodes, model_paths):
    from transformers import PreTrainedTokenizerFast

    proc = groove_cli("generate", "--relay", two_nodes.address, "--model", str(model_paths["llama"]), "--prompt", PROMPT,
                      "--max-tokens", "12", "--temperature", "0", "--json")
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout)  # exactly one JSON object
    assert set(out) >= {"model", "prompt_tokens", "completion_tokens", "token_ids", "text", "finish_reason", "ttft_s", "tokens_per_s"}
    tok = PreTrainedTokenizerFast.from_pretrained(str(model_paths["llama"]))
    prompt_ids = tok.encode(PROMPT)
    assert out["model"] == "llama" and out["prompt_tokens"] == len(prompt_ids)
    assert out["token_ids"] == reference_generate(model_paths["llama"], prompt_ids, 12)
    assert out["completion_tokens"] == len(out["token_ids"]) and out["finish_reason"] in ("stop", "length")
    assert out["text"] == tok.decode(out["token_ids"], skip_special_tokens=True)
    assert out["ttft_s"] > 0


def test_generate_streams_text_and_reads_prompt_files(two_nodes, model_paths, tmp_path):
    f = tmp_path / "prompt.txt"
    f.write_text(PROMPT)
    proc = groove_cli("generate", "--relay", two_nodes.address, "--model", str(model_paths["llama"]), "--prompt-file", str(f),
                      "--max-tokens", "8", "--seed", "3")
    assert proc.returncode == 0, proc.stderr
    assert "tokens" in proc.stderr and "tok/s" in proc.stderr


def test_status_json_contract(two_nodes):
    proc = groove_cli("status", "--relay", two_nodes.address, "--json")
    assert proc.returncode == 0, proc.stderr
    st = json.loads(proc.stdout)
    (model,) = st["models"]
    assert model["model"] == "llama" and model["num_layers"] == 6 and model["coverage"] == [[0, 5]] and model["complete"]
    assert sorted(n["layers"] for n in st["nodes"]) == [[0, 2], [3, 5]]
    human = groove_cli("status", "--relay", two_nodes.address)
    assert human.returncode == 0 and "0-2" in human.stdout and "llama" in human.stdout


def test_chat_keeps_the_conversation(two_nodes, model_paths):
    proc = groove_cli("chat", "--relay", two_nodes.address, "--model", str(model_paths["llama"]), "--temperature", "0",
                      "--max-tokens", "6", input="hello there\nand again\n")
    assert proc.returncode == 0, proc.stderr
    assert proc.stderr.count("tok/s") == 2


def test_info_json_contract(model_paths):
    proc = groove_cli("info", str(model_paths["qwen2"]), "--json")
    assert proc.returncode == 0, proc.stderr
    info = json.loads(proc.stdout)
    assert info["architecture"] == "Qwen2ForCausalLM" and info["num_layers"] == 4
    assert info["hidden_size"] == 64 and info["vocab_size"] == 512
    assert info["num_parameters"] > 0 and info["bytes_per_layer"] > 0 and info["embedding_bytes"] == 512 * 64 * 4
    assert set(info["splits"]) == {"2", "3", "4"}
    for n, ranges in info["splits"].items():
        assert len(ranges) == int(n) and ranges[0][0] == 0 and ranges[-1][1] == 3
        assert all(b + 1 == c for (_, b), (c, _) in zip(ranges, ranges[1:]))
    human = groove_cli("info", str(model_paths["qwen2"]))
    assert human.returncode == 0 and "recommended splits" in human.stdout


def test_info_balances_by_bytes_counting_embedding_and_head(models_dir):
    from groove.models.info import balanced_split

    # The embedding (first node) and head (last node) weigh three layers each.
    assert balanced_split([1] * 8, 3, 3, 2) == [[0, 3], [4, 7]]
    assert balanced_split([1] * 9, 3, 0, 2) == [[0, 2], [3, 8]]
    assert balanced_split([1] * 3, 0, 0, 4) is None


def test_python_dash_m_works():
    proc = subprocess.run([sys.executable, "-m", "groove", "--version"], capture_output=True, text=True)
    assert proc.returncode == 0 and proc.stdout.startswith("groove ")


@pytest.mark.parametrize("args,needle", [
    (["node", "--model", "./no/such/model", "--layers", "0-1"], "not found"),
    (["node", "--model", "{llama}", "--layers", "4-9"], "outside the model"),
    (["node", "--model", "{llama}", "--layers", "three-five"], "not a range"),
    (["generate", "--model", "./no/such/model", "--prompt", "x"], "not found"),
    (["generate", "--model", "{llama}", "--prompt", "x", "--top-p", "7"], "--top-p"),
    (["generate", "--model", "{llama}", "--prompt", "x", "--relay", "127.0.0.1:1"], "unreachable"),
    (["status", "--relay", "127.0.0.1:1"], "unreachable"),
    (["info", "./no/such/model"], "not found"),
])
def test_bad_input_gets_one_clear_line(model_paths, args, needle):
    args = [a.replace("{llama}", str(model_paths["llama"])) for a in args]
    proc = groove_cli(*args, timeout=60)
    assert proc.returncode != 0
    no_traceback(proc)
    assert needle in proc.stderr, proc.stderr
    assert proc.stderr.strip().startswith("error:")


def test_unsupported_architecture_is_named(models_dir):
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel

    path = models_dir / "gpt2"
    torch.manual_seed(0)
    GPT2LMHeadModel(GPT2Config(n_layer=2, n_embd=32, n_head=2, vocab_size=64)).save_pretrained(str(path))
    proc = groove_cli("node", "--model", str(path), "--layers", "0-1", "--relay", "127.0.0.1:1")
    assert proc.returncode != 0
    no_traceback(proc)
    assert "unsupported architecture GPT2LMHeadModel" in proc.stderr


def test_pickle_only_checkpoints_are_refused(models_dir, model_paths):
    import shutil

    path = models_dir / "pickled"
    path.mkdir()
    shutil.copy(model_paths["llama"] / "config.json", path / "config.json")
    (path / "pytorch_model.bin").write_bytes(b"not loaded")
    proc = groove_cli("node", "--model", str(path), "--layers", "0-1", "--relay", "127.0.0.1:1")
    assert proc.returncode != 0 and "safetensors only" in proc.stderr
    no_traceback(proc)


def test_waiting_consumer_names_missing_layers_and_overlaps(cluster_factory, model_paths):
    path = str(model_paths["qwen3"])
    cluster = cluster_factory(path, [(0, 1)])
    start = time.monotonic()
    proc = groove_cli("generate", "--relay", cluster.address, "--model", path, "--prompt", "hi", "--wait", "1.5")
    assert proc.returncode != 0 and "layers 2-3" in proc.stderr, proc.stderr
    assert time.monotonic() - start >= 1.5
    no_traceback(proc)
    cluster.start_node(1, 3)
    proc = groove_cli("generate", "--relay", cluster.address, "--model", path, "--prompt", "hi", "--wait", "0")
    assert proc.returncode != 0 and "overlap" in proc.stderr, proc.stderr
    proc = groove_cli("generate", "--relay", cluster.address, "--model", "nobody/serves-this", "--prompt", "hi", "--wait", "0")
    assert proc.returncode != 0


def test_waiting_consumer_succeeds_when_the_pipeline_completes(cluster_factory, model_paths):
    path = str(model_paths["qwen3"])
    cluster = cluster_factory(path, [(0, 1)])
    consumer = subprocess.Popen([sys.executable, "-m", "groove", "generate", "--relay", cluster.address, "--model", path,
                                 "--prompt", "hi", "--max-tokens", "3", "--wait", "60", "--json"],
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    time.sleep(1)
    cluster.start_node(2, 3)
    out, err = consumer.communicate(timeout=90)
    assert consumer.returncode == 0, err
    assert json.loads(out)["completion_tokens"] >= 1


def test_node_retries_an_unreachable_relay_with_backoff(model_paths):
    from groove.launch import free_port

    port = free_port()
    node = spawn("node", ["node", "--model", str(model_paths["qwen2"]), "--layers", "0-3", "--relay", f"127.0.0.1:{port}", "--dtype", "float32"])
    try:
        first = node.wait_for("unreachable", 60)
        second = node.wait_for("unreachable", 10)
        assert "retrying in 0.5s" in first and "retrying in 1.0s" in second
        assert node.popen.poll() is None  # still trying, not crashed
        # Bring the relay up on that port: the node registers by itself.
        relay = spawn("relay", ["relay", "--host", "127.0.0.1", "--port", str(port)])
        try:
            relay.wait_for("listening", 30)
            node.wait_for("registered as", 30)
        finally:
            relay.stop()
    finally:
        node.stop()
    assert "Traceback" not in "\n".join(node.lines)


@pytest.fixture
def torchless_env(tmp_path):
    """PYTHONPATH with a ``torch`` that cannot be imported: commands that run no model must not need it."""
    fake = tmp_path / "notorch" / "torch"
    fake.mkdir(parents=True)
    (fake / "__init__.py").write_text("raise ImportError('torch must not be imported here')\n")
    return {"PYTHONPATH": f"{fake.parent}{os.pathsep}{ROOT}"}


def test_relay_status_generate_and_chat_never_import_torch(two_nodes, model_paths, torchless_env):
    relay = spawn("relay", ["relay", "--host", "127.0.0.1", "--port", "0"], torchless_env)
    try:
        relay.wait_for("listening", 30)
    finally:
        relay.stop()
    common = ["--relay", two_nodes.address, "--model", str(model_paths["llama"]), "--max-tokens", "3"]
    gen = groove_cli("generate", *common, "--prompt", "hi", "--json", env=torchless_env)
    assert gen.returncode == 0, gen.stderr
    chat = groove_cli("chat", *common, env=torchless_env, input="hi\n")
    assert chat.returncode == 0, chat.stderr
    st = groove_cli("status", "--relay", two_nodes.address, env=torchless_env)
    assert st.returncode == 0, st.stderr


def test_relay_is_light(tmp_path):
    from groove.launch import free_port

    port = free_port()
    relay = spawn("relay", ["relay", "--host", "127.0.0.1", "--port", str(port)])
    try:
        relay.wait_for("listening", 30)
        time.sleep(0.5)
        proc = psutil.Process(relay.popen.pid)
        rss = proc.memory_info().rss
        assert rss < 100 * 2**20, f"relay uses {rss / 2**20:.0f} MiB"
        maps = "\n".join(m.path for m in proc.memory_maps())
        assert "libtorch" not in maps
    finally:
        relay.stop()


def test_relay_port_in_use_is_a_clear_error():
    from groove.launch import free_port

    port = free_port()
    first = spawn("relay", ["relay", "--host", "127.0.0.1", "--port", str(port)])
    try:
        first.wait_for("listening", 30)
        proc = groove_cli("relay", "--host", "127.0.0.1", "--port", str(port), timeout=30)
        assert proc.returncode != 0 and "cannot listen" in proc.stderr
        no_traceback(proc)
    finally:
        first.stop()


def test_setup_sh_info_and_status_flags(model_paths, two_nodes):
    info = subprocess.run(["bash", str(ROOT / "setup.sh"), "--info", str(model_paths["llama"])], capture_output=True, text=True, timeout=300)
    assert info.returncode == 0, info.stderr
    assert "recommended splits" in info.stdout
    status = subprocess.run(["bash", str(ROOT / "setup.sh"), "--status", two_nodes.address], capture_output=True, text=True, timeout=300)
    assert status.returncode == 0 and "0-2" in status.stdout
    bad = subprocess.run(["bash", str(ROOT / "setup.sh"), "--frobnicate"], capture_output=True, text=True, timeout=300)
    assert bad.returncode == 2 and "unknown flag" in bad.stderr


def test_consumer_with_another_checkpoint_of_the_same_name_is_refused(two_nodes, models_dir):
    from groove.models.synthetic import build_checkpoint

    other = build_checkpoint(models_dir / "elsewhere" / "llama", "llama", num_layers=6, hidden_size=32, seed=9)
    proc = groove_cli("generate", "--relay", two_nodes.address, "--model", str(other), "--prompt", "hi", "--wait", "0")
    assert proc.returncode != 0
    assert "fingerprint" in proc.stderr and "'llama'" in proc.stderr, proc.stderr
    no_traceback(proc)
