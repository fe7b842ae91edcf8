"""CI smoke: Locust headless, 10 users for 20 s, streaming against the tiny-model service on the CPU."""

from pathlib import Path

import pytest

pytestmark = [pytest.mark.ray, pytest.mark.timeout(300)]


def test_locust_smoke_has_no_failures_and_records_ttft(locust_smoke):
    run = locust_smoke
    assert run.returncode == 0, run.output[-3000:]  # Locust exits 1 when any request failed
    rows = {(r["Type"], r["Name"]): r for r in run.stats}
    assert int(rows[("", "Aggregated")]["Failure Count"]) == 0
    posts = [r for (kind, _), r in rows.items() if kind == "POST"]
    assert posts and all(int(r["Request Count"]) > 0 for r in posts)
    ttft = [r for (kind, _), r in rows.items() if kind == "TTFT"]
    tpot = [r for (kind, _), r in rows.items() if kind == "TPOT"]
    assert ttft and sum(int(r["Request Count"]) for r in ttft) > 0
    assert all(float(r["Median Response Time"]) > 0 for r in ttft)
    assert tpot and sum(int(r["Request Count"]) for r in tpot) > 0
    assert "TTFT" in run.html.read_text()

    s = run.summary
    assert s["failures"] == 0 and s["num_ttft"] > 0 and s["ttft_ms_p50"] > 0 and s["tpot_ms_p50"] > 0
    assert s["out_tok_s"] > 0
    # Cost over the run, read from the service's counters: at $3.60 per GPU-hour a GPU-second is $0.001.
    assert s["num_gpus"] == 2 and s["gpu_seconds"] > 20
    assert s["cost_dollars"] == pytest.approx(0.001 * s["gpu_seconds"], rel=1e-4)
    assert s["dollars_per_1m_output_tokens"] > 0


def test_sweep_plots_latency_and_throughput(locust_smoke, tmp_path):
    pytest.importorskip("matplotlib", reason="pip install matplotlib (loadtests/sweep.py plots)")
    import sys

    sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "loadtests"))
    import sweep

    steps = [{**locust_smoke.summary, "users": u} for u in (1, 10, 25, 50, 100)]
    for path in sweep.plot(steps, tmp_path):
        assert path.stat().st_size > 10_000 and path.read_bytes()[:4] == b"\x89PNG"
