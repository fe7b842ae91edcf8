"""A real Prometheus (Debian package) scraping the service's /metrics and Ray's metrics endpoint: the TTFT p50
query returns a number, and every query of every dashboard panel returns data, from both sources.

No Grafana server can be installed here (not in Debian, PyPI or npm), so this is how the dashboards are checked
beyond their JSON: a panel whose metric name or label is wrong would show "No data", and fails here.
"""

import json
import math
import time
import urllib.parse

import pytest

pytest.importorskip("grafana_foundation_sdk", reason="pip install grafana-foundation-sdk (the dashboards' builder)")

from gpt2serve.dashboards.build import PREFIXES  # noqa: E402
from gpt2serve.dashboards.provision import load_dashboards  # noqa: E402
from tests.telemetry.conftest import get, wait_for  # noqa: E402

pytestmark = [pytest.mark.ray, pytest.mark.timeout(300)]

# What Grafana would put in for its built-in variables over the last few minutes of this session.
GRAFANA_VARS = {"$__rate_interval": "1m", "$__range": "5m", "$__interval": "15s", '"$model_name"': '".*"'}


def query(prometheus: str, expr: str) -> list:
    reply = json.loads(get(f"{prometheus}/api/v1/query?" + urllib.parse.urlencode({"query": expr})))
    assert reply["status"] == "success", reply
    return reply["data"]["result"]


def instantiate(expr: str, prefix: str) -> str:
    expr = expr.replace("${metric_prefix}", prefix)
    for var, value in GRAFANA_VARS.items():
        expr = expr.replace(var, value)
    assert "$" not in expr, expr
    return expr


def test_prometheus_scrapes_the_service_and_ray(prometheus, stack):
    def both_up():
        up = {r["metric"]["job"]: r["value"][1] for r in query(prometheus, "up")}
        return up if up == {"gpt2serve": "1", "ray": "1"} else None

    wait_for(both_up, 30, "both scrape targets up")


def test_ttft_p50_from_promql(prometheus, locust_smoke):
    for prefix in PREFIXES.values():
        expr = f"histogram_quantile(0.5, sum by (le) (rate({prefix}time_to_first_token_seconds_bucket[5m])))"

        def p50():
            result = query(prometheus, expr)
            value = float(result[0]["value"][1]) if result else math.nan
            return value if math.isfinite(value) and value > 0 else None

        value = wait_for(p50, 30, f"a TTFT p50 from {expr}")
        assert 0 < value < 10, value


def test_every_dashboard_query_returns_data(prometheus, locust_smoke, error_paths, prefix_reuse, speculation):
    # The last events (the error burst) reach Prometheus from several processes and, on Ray's side, a report
    # interval later; a rate needs two samples of a series, and on Ray's endpoint a counter appears only once it
    # is above 0. So look again for a while before calling a panel empty.
    targets = [(name, panel["title"], source, instantiate(t["expr"], prefix))
               for name, dashboard in load_dashboards().items() for panel in dashboard["panels"]
               for t in panel.get("targets", []) for source, prefix in PREFIXES.items()]
    assert len(targets) > 50
    deadline = time.monotonic() + 45
    while True:
        empty = [f"{name} / {title} / {source}: {expr}" for name, title, source, expr in targets
                 if not query(prometheus, expr)]
        if not empty or time.monotonic() > deadline:
            break
        time.sleep(2)
    assert not empty, "panels with no data:\n" + "\n".join(empty)


def test_dashboard_variables_resolve(prometheus, locust_smoke):
    """The model_name variable's query (label_values of num_gpus) finds the served model, from both sources."""
    for prefix in PREFIXES.values():
        values = json.loads(get(f"{prometheus}/api/v1/label/model_name/values?"
                                + urllib.parse.urlencode({"match[]": f"{prefix}num_gpus"})))["data"]
        assert values == ["tiny-gpt2"], (prefix, values)
