"""``GET /metrics`` parses as Prometheus text and its counters move with the work done."""

from __future__ import annotations

import time
import urllib.error
import urllib.request

import pytest
from prometheus_client.parser import text_string_to_metric_families

from groove.consumer.client import Client
from groove.launch import LocalCluster
from groove.protocol.messages import Sampling
from groove.relay import auth

from .conftest import run_async

PROMPT = [5, 17, 33, 100, 7, 9]


def scrape(address: str) -> dict:
    token = auth.local_token("consumer")
    req = urllib.request.Request(f"http://{address}/metrics", headers={"Authorization": f"Bearer {token}"})
    with urllib.request.urlopen(req, timeout=5) as r:
        text = r.read().decode()
    out = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            key = (sample.name, tuple(sorted(sample.labels.items())))
            out[key] = sample.value
    return out


def value(metrics: dict, name: str, **labels) -> float:
    return metrics[(name, tuple(sorted(labels.items())))]


def test_metrics_parse_and_move(model_paths):
    with LocalCluster(model_paths["qwen2"], [(0, 1), (2, 3)]) as cluster:
        with pytest.raises(urllib.error.HTTPError) as info:
            urllib.request.urlopen(f"http://{cluster.address}/metrics", timeout=5)
        assert info.value.code == 401
        before = scrape(cluster.address)

        async def run():
            async with Client(cluster.address) as c:
                s = await c.open_session("qwen2", Sampling(temperature=0), wait=10)
                return [x.token async for x in c.generate(s, PROMPT, 8, ignore_eos=True)]

        assert len(run_async(run())) == 8
        time.sleep(1.5)  # node counters arrive with heartbeats
        after = scrape(cluster.address)
        assert value(after, "groove_tokens_generated_total") - value(before, "groove_tokens_generated_total") == 8
        assert value(after, "groove_sessions_opened_total") - value(before, "groove_sessions_opened_total") == 1
        assert value(after, "groove_tokens_per_second") > 0
        assert value(after, "groove_failovers_total") == 0
        assert value(after, "groove_drafted_tokens_total") == value(after, "groove_accepted_tokens_total") == 0
        nodes = {dict(k[1])["layers"]: k for k in after if k[0] == "groove_node_tokens_processed_total"}
        assert set(nodes) == {"0-1", "2-3"}
        for layers, key in nodes.items():
            labels = dict(key[1])
            assert after[key] - before.get(key, 0) == len(PROMPT) + 7  # the last token is never fed back
            assert value(after, "groove_node_step_seconds", **labels) > 0
            assert value(after, "groove_node_healthy", **labels) == 1


def test_status_page_is_served_without_data_and_polls_status(model_paths):
    with LocalCluster(model_paths["qwen2"], [(0, 3)]) as cluster:
        with urllib.request.urlopen(f"http://{cluster.address}/", timeout=5) as r:
            page = r.read().decode()
            assert r.headers["Content-Type"].startswith("text/html")
        assert "<title>Groove relay</title>" in page and 'fetch("/status"' in page
        from .test_pipeline import status

        (node,) = status(cluster.address)["nodes"]
        assert node["id"] not in page  # no data baked into the page: the script fetches it


def test_status_page_in_headless_chromium(model_paths, tmp_path):
    import shutil
    import subprocess

    from .test_pipeline import status

    browser = shutil.which("chromium") or shutil.which("chromium-browser")
    if browser is None:
        pytest.skip("headless Chromium is not installed (Debian package 'chromium')")
    with LocalCluster(model_paths["qwen2"], [(0, 1), (2, 3)]) as cluster:
        url = f"http://{cluster.address}/#token={auth.local_token('consumer')}"
        flags = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync",
                 f"--user-data-dir={tmp_path / 'profile'}", "--window-size=1000,700", "--virtual-time-budget=5000"]
        dom = subprocess.run([browser, *flags, "--dump-dom", url], capture_output=True, text=True, timeout=120).stdout
        shot = tmp_path / "status.png"
        subprocess.run([browser, *flags, f"--screenshot={shot}", url], capture_output=True, timeout=120)
        nodes = status(cluster.address)["nodes"]
    for n in nodes:
        assert n["id"] in dom and f"{n['layers'][0]}-{n['layers'][1]}" in dom
    assert "complete" in dom and "qwen2" in dom
    assert "<th>kernels</th>" in dom and "<td>torch</td>" in dom  # float32 nodes run torch's kernels only
    assert shot.is_file() and shot.stat().st_size > 5000
