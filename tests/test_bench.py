"""``groove bench`` runs end to end and reports every figure (speed itself is not asserted)."""

from __future__ import annotations

import json

from .conftest import groove_cli


def bench_json(tmp_path, *args: str) -> dict:
    """``groove bench ARGS --json`` with a cache of its own: the result, once it has succeeded."""
    proc = groove_cli("bench", *args, "--json", timeout=300, env={"XDG_CACHE_HOME": str(tmp_path)})
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def test_bench_json_reports_every_figure(tmp_path):
    result = bench_json(tmp_path, "--synthetic", "tiny", "--nodes", "2", "--prompt-tokens", "16", "--new-tokens", "6", "--repeat", "1")
    g, b = result["groove"], result["baseline"]
    assert result["same_tokens_as_baseline"] is True
    assert g["decode_tok_s"] > 0 and b["decode_tok_s"] > 0 and result["decode_ratio"] > 0
    assert g["ttft_s"] > 0 and b["ttft_s"] > 0
    assert result["read_bandwidth_gb_s"] > 0 and 0 < g["bandwidth_fraction"]
    assert [link["layers"] for link in g["bytes_per_token_per_link"]] == [[0, 1], [2, 3]]
    # tiny has hidden size 64: a bf16 hidden state is 128 bytes, plus headers, per hop.
    for link in g["bytes_per_token_per_link"]:
        assert 128 <= link["bytes"] <= 128 + 1024
    assert g["relay_hop_ms_p50"] is not None and len(g["nodes"]) == 2
    # The same dtype on both sides and exact wires: the logits after the prompt are transformers'.
    assert result["top_token_equal"] is True and result["logits_error_of_range"] < 1e-3
    assert result["uncompressed_payload_bytes"] == 64 * 2
    assert all(n["peak_rss_bytes"] > 0 and n["load_s"] > 0 and isinstance(n["kernels"], list) for n in g["nodes"])


def test_bench_rejects_unknown_shapes():
    proc = groove_cli("bench", "--synthetic", "gpt-17", timeout=60)
    assert proc.returncode == 2 and "unknown --synthetic" in proc.stderr


def test_bench_concurrency_reports_every_figure(tmp_path):
    result = bench_json(tmp_path, "--synthetic", "tiny", "--nodes", "2", "--prompt-tokens", "16", "--new-tokens", "24",
                        "--repeat", "1", "--concurrency", "4", "--interfere-prompt", "200")
    assert result["concurrency"] == 4 and result["same_tokens_as_alone"] is True
    assert result["single_tok_s"] > 0 and result["aggregate_tok_s"] > 0 and result["speedup"] > 0
    run = result["runs"][0]
    assert run["sessions"] == 4 and 0 < run["fairness"] <= 1
    assert run["session_tok_s"]["min"] <= run["session_tok_s"]["median"] <= run["session_tok_s"]["max"]
    assert 0 < run["itl_ms"]["p50"] <= run["itl_ms"]["p99"]
    assert all(b is not None and b >= 1 for b in result["mean_batch"])
    i = result["interference"]
    assert i["prompt_tokens"] == 200 and i["gaps_during_prefill"] >= 1 and i["p99_during_over_p50_alone"] > 0


def test_bench_concurrency_flags_are_checked():
    proc = groove_cli("bench", "--synthetic", "tiny", "--interfere-prompt", "100", timeout=60)
    assert proc.returncode == 2 and "--concurrency" in proc.stderr


def test_bench_speculative_compares_with_and_without_guesses(tmp_path, model_paths):
    """Through a latency proxy, with n-gram guesses and with a local draft model: the
    greedy tokens are the same as without, and the figures are all there."""
    for extra in (["--speculative", "ngram"], ["--draft-model", str(model_paths["llama"]), "--draft-tokens", "3"]):
        result = bench_json(tmp_path, "--model", str(model_paths["llama"]), "--dtype", "float32", "--nodes", "2", "--prompt-tokens", "48",
                            "--new-tokens", "24", "--repeat", "1", "--link-latency-ms", "2", *extra)
        assert result["same_tokens"] is True and result["link_latency_ms"] == 2
        assert result["plain_tok_s"] > 0 and result["speculative_tok_s"] > 0 and result["speedup"] > 0
        assert result["drafted_tokens"] > 0 and 0 <= result["acceptance_rate"] <= 1 and result["tokens_per_step"] >= 1
    if result["draft_tokens"] == 3:
        assert result["acceptance_rate"] == 1.0  # the served model is its own draft model here
    proc = groove_cli("bench", "--synthetic", "tiny", "--speculative", "ngram", "--concurrency", "2", timeout=60)
    assert proc.returncode == 2 and "--concurrency" in proc.stderr


def test_bench_reports_what_a_compressed_wire_costs(tmp_path):
    result = bench_json(tmp_path, "--synthetic", "tiny", "--dtype", "float32", "--nodes", "2", "--prompt-tokens", "16",
                        "--new-tokens", "6", "--repeat", "1", "--node-arg=--wire-dtype", "--node-arg=int8")
    assert result["uncompressed_payload_bytes"] == 64 * 4
    for link in result["groove"]["bytes_per_token_per_link"]:  # int8: a byte per value and a 4-byte scale
        assert 64 + 4 <= link["bytes"] <= 64 + 4 + 1024
    assert 0 < result["logits_error_of_range"] < 0.1  # rounded activations move the logits, a little


def test_perplexity_of_int8_weights_in_either_compute_dtype():
    """``python -m groove.bench.perplexity`` on the demo model's held-out text: int8 weights
    change perplexity by well under a percent, with float32 or bfloat16 rows."""
    import subprocess
    import sys

    for dtype in ("float32", "bfloat16"):
        proc = subprocess.run([sys.executable, "-m", "groove.bench.perplexity", "--tokens", "256", "--dtype", dtype],
                              capture_output=True, text=True, timeout=300)
        assert proc.returncode == 0, proc.stderr[-2000:]
        result = json.loads(proc.stdout.strip().splitlines()[-1])
        assert result["tokens"] == 256 and 1 < result[f"perplexity_{dtype}"] < 100
        assert abs(result["change_pct"]) < 1.0, result
