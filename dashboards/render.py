"""Render a dashboard's panels from a Prometheus to a PNG with matplotlib: a stand-in for a Grafana screenshot
where no Grafana server can run (see docs/telemetry.md). Same queries as the JSON, same variables filled in.

    python -m gpt2serve.dashboards.render --prometheus http://127.0.0.1:9090 --dashboard latency --minutes 10 \\
        --out latency.png [--prefix ray_gpt2serve_] [--rate-interval 1m]
"""

from __future__ import annotations

import argparse
import json
import math
import re
import time
import urllib.parse
import urllib.request
from pathlib import Path

from gpt2serve.dashboards.provision import load_dashboards


def fill(expr: str, prefix: str, rate_interval: str, range_s: int) -> str:
    return (expr.replace("${metric_prefix}", prefix).replace("$__rate_interval", rate_interval)
            .replace("$__range", f"{range_s}s").replace('"$model_name"', '".*"'))


def prom(url: str, path: str, **params) -> list:
    reply = json.load(urllib.request.urlopen(f"{url}/api/v1/{path}?" + urllib.parse.urlencode(params), timeout=30))
    if reply["status"] != "success":
        raise RuntimeError(reply)
    return reply["data"]["result"]


def legend(fmt: str, labels: dict) -> str:
    if not fmt or fmt == "__auto":
        return ",".join(f"{k}={v}" for k, v in labels.items()) or "value"
    return re.sub(r"\{\{\s*(\w+)\s*\}\}", lambda m: labels.get(m.group(1), ""), fmt)


def render(prometheus: str, dashboard: dict, out: Path, minutes: float, prefix: str, rate_interval: str) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    end = time.time()
    start = end - 60 * minutes
    step = max(int(60 * minutes / 240), 1)
    panels = [p for p in dashboard["panels"] if p.get("type") in ("timeseries", "stat")]
    stats = [p for p in panels if p["type"] == "stat"]
    series = [p for p in panels if p["type"] == "timeseries"]
    rows = math.ceil(len(series) / 2) + (1 if stats else 0)
    fig = plt.figure(figsize=(13, 3.3 * rows))
    grid = fig.add_gridspec(rows, 2)
    row0 = 0
    if stats:
        ax = fig.add_subplot(grid[0, :])
        ax.axis("off")
        for i, p in enumerate(stats):
            result = prom(prometheus, "query", query=fill(p["targets"][0]["expr"], prefix, rate_interval,
                                                             int(end - start)), time=end)
            value = float(result[0]["value"][1]) if result else math.nan
            unit = p.get("fieldConfig", {}).get("defaults", {}).get("unit", "")
            text = f"${value:,.6g}" if unit == "currencyUSD" else f"{value:,.6g}"
            x = (i + 0.5) / len(stats)
            ax.text(x, 0.62, text, ha="center", va="center", fontsize=18, weight="bold", transform=ax.transAxes)
            ax.text(x, 0.2, p["title"], ha="center", va="center", fontsize=9, transform=ax.transAxes)
        row0 = 1
    for i, p in enumerate(series):
        ax = fig.add_subplot(grid[row0 + i // 2, i % 2])
        for t in p["targets"]:
            expr = fill(t["expr"], prefix, rate_interval, int(end - start))
            for s in prom(prometheus, "query_range", query=expr, start=start, end=end, step=step):
                xs = [float(v[0]) - end for v in s["values"]]
                ys = [float(v[1]) for v in s["values"]]
                ax.plot([x / 60 for x in xs], ys, label=legend(t.get("legendFormat", ""), s["metric"]), lw=1.2)
        ax.set_title(p["title"], fontsize=10)
        ax.set_xlabel("minutes ago", fontsize=8)
        unit = p.get("fieldConfig", {}).get("defaults", {}).get("unit", "")
        ax.set_ylabel(unit, fontsize=8)
        ax.grid(alpha=0.3)
        ax.tick_params(labelsize=8)
        if ax.lines:
            ax.legend(fontsize=7, loc="upper left")
    fig.suptitle(f"{dashboard['title']}  (rendered from Prometheus, source {prefix}*)", fontsize=12)
    fig.tight_layout()
    fig.savefig(out, dpi=100)
    plt.close(fig)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--prometheus", required=True)
    ap.add_argument("--dashboard", required=True, help="latency, throughput, capacity or cost")
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--minutes", type=float, default=10)
    ap.add_argument("--prefix", default="gpt2serve:")
    ap.add_argument("--rate-interval", default="1m")
    args = ap.parse_args()
    print(render(args.prometheus, load_dashboards()[args.dashboard], args.out, args.minutes, args.prefix,
                 args.rate_interval))


if __name__ == "__main__":
    main()
