"""The Grafana dashboards, as code (grafana-foundation-sdk, Grafana Labs' own builder library).

    python -m gpt2serve.dashboards.build            # rewrites dashboards/json/*.json
    python -m gpt2serve.dashboards.build --check    # fails if the committed JSON differs from what the code builds

Four dashboards: latency (TTFT / TPOT / end-to-end / queue / step percentiles), throughput (tokens/s,
requests/s, aborts, rejections), capacity (KV usage, queue depth, running / waiting / swapped, preemptions,
swaps, GPU memory, prefix-cache hit rate and evictions, routing decisions) and cost ($ per 1M output tokens,
$ per request, GPU-hours, cost per replica, utilisation).

Every query is written once, with two dashboard variables: ``$datasource`` (a Prometheus data source) and
``$metric_prefix``, the name prefix of the source Prometheus scrapes: ``gpt2serve:`` for the service's
``/metrics`` (default) or ``ray_gpt2serve_`` for Ray's metrics endpoint (engine/metrics.py explains the two).
``$model_name`` filters by served model. The tests (tests/telemetry/test_prometheus.py) run every target's
query against a real Prometheus scraping the service, with both prefixes.
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import dataclass
from pathlib import Path

from grafana_foundation_sdk.builders import common
from grafana_foundation_sdk.builders import dashboard as db
from grafana_foundation_sdk.builders import prometheus, stat, timeseries
from grafana_foundation_sdk.cog.encoder import JSONEncoder
from grafana_foundation_sdk.models.common import (BigValueColorMode, BigValueGraphMode, LegendDisplayMode,
                                                  LegendPlacement, SortOrder, TooltipDisplayMode)
from grafana_foundation_sdk.models.dashboard import (DashboardCursorSync, DataSourceRef, VariableOption,
                                                     VariableRefresh)

OUT = Path(__file__).resolve().parent / "json"
DATASOURCE = DataSourceRef(type_val="prometheus", uid="${datasource}")
PREFIXES = {"service /metrics": "gpt2serve:", "Ray metrics endpoint": "ray_gpt2serve_"}
P = "${metric_prefix}"
F = '{model_name=~"$model_name"}'
RATE = "[$__rate_interval]"
RANGE = "[$__range]"


@dataclass
class Q:
    expr: str
    legend: str = ""


def quantiles(metric: str, by: str = "", qs=(0.5, 0.9, 0.99)) -> list[Q]:
    group = f"le{', ' + by if by else ''}"
    label = f"{{{{{by}}}}} " if by else ""
    return [Q(f"histogram_quantile({q}, sum by ({group}) (rate({P}{metric}_bucket{F}{RATE})))",
              f"{label}p{int(q * 100)}") for q in qs]


def mean(metric: str, by: str = "replica") -> Q:
    return Q(f"sum by ({by}) (rate({P}{metric}_sum{F}{RATE})) / sum by ({by}) (rate({P}{metric}_count{F}{RATE}))",
             f"{{{{{by}}}}} mean")


def ts(title: str, unit: str, targets: list[Q], description: str = "", w: int = 12, h: int = 8):
    panel = (timeseries.Panel().title(title).description(description).unit(unit).datasource(DATASOURCE)
             .span(w).height(h).fill_opacity(10).line_width(1)
             .legend(common.VizLegendOptions().display_mode(LegendDisplayMode.LIST)
                     .placement(LegendPlacement.BOTTOM).show_legend(True))
             .tooltip(common.VizTooltipOptions().mode(TooltipDisplayMode.MULTI).sort(SortOrder.DESCENDING)))
    for i, t in enumerate(targets):
        panel = panel.with_target(prometheus.Dataquery().expr(t.expr).legend_format(t.legend or "__auto")
                                  .ref_id(chr(ord("A") + i)))
    return panel


def single(title: str, unit: str, expr: str, description: str = "", w: int = 6, h: int = 5, decimals: int = 2):
    return (stat.Panel().title(title).description(description).unit(unit).decimals(decimals).datasource(DATASOURCE)
            .span(w).height(h).graph_mode(BigValueGraphMode.NONE).color_mode(BigValueColorMode.VALUE)
            .reduce_options(common.ReduceDataOptions().calcs(["lastNotNull"]).values(False))
            .with_target(prometheus.Dataquery().expr(expr).instant().ref_id("A")))


def base(uid: str, title: str, description: str) -> db.Dashboard:
    prefix = (db.CustomVariable("metric_prefix").label("Metrics source")
              .values(",".join(f"{k} : {v}" for k, v in PREFIXES.items()))
              .current(VariableOption(text="service /metrics", value="gpt2serve:", selected=True)))
    model = (db.QueryVariable("model_name").label("Model").datasource(DATASOURCE)
             .query(f"label_values({P}num_gpus, model_name)").refresh(VariableRefresh.ON_TIME_RANGE_CHANGED)
             .include_all(True).all_value(".*").multi(True)
             .current(VariableOption(text="All", value="$__all", selected=True)))
    return (db.Dashboard(title).uid(uid).description(description).tags(["gpt2serve"]).refresh("10s")
            .time("now-30m", "now").timezone("browser").tooltip(DashboardCursorSync.CROSSHAIR)
            .with_variable(db.DatasourceVariable("datasource").label("Data source").type("prometheus"))
            .with_variable(prefix).with_variable(model))


def latency() -> db.Dashboard:
    return (base("gpt2serve-latency", "gpt2serve / latency",
                 "Engine-side latency percentiles from the model workers' histograms (engine/metrics.py).")
            .with_row(db.Row("Per request"))
            .with_panel(ts("Time to first token", "s", quantiles("time_to_first_token_seconds"),
                           "Engine arrival to first token."))
            .with_panel(ts("Time per output token", "s", quantiles("time_per_output_token_seconds"),
                           "Per request: (last token - first token) / (tokens - 1)."))
            .with_panel(ts("End-to-end latency", "s", quantiles("e2e_request_latency_seconds")))
            .with_panel(ts("Queue time in the engine", "s", quantiles("request_queue_time_seconds", qs=(0.5, 0.99)),
                           "Engine arrival to first scheduled. The global queue before it is on the capacity "
                           "dashboard."))
            .with_row(db.Row("Per step and per replica"))
            .with_panel(ts("Step time by phase", "s", quantiles("step_time_seconds", by="phase", qs=(0.5, 0.99)),
                           "phase=prefill: the step computed prompt tokens (mixed steps included); decode: only "
                           "decode tokens."))
            .with_panel(ts("Mean TTFT and TPOT by replica", "s", [
                Q(mean("time_to_first_token_seconds").expr, "{{replica}} TTFT"),
                Q(mean("time_per_output_token_seconds").expr, "{{replica}} TPOT")])))


def throughput() -> db.Dashboard:
    return (base("gpt2serve-throughput", "gpt2serve / throughput", "Tokens and requests per second.")
            .with_panel(single("Output tokens/s", "short", f"sum(rate({P}generation_tokens_total{F}{RATE}))"))
            .with_panel(single("Prompt tokens/s", "short", f"sum(rate({P}prompt_tokens_total{F}{RATE}))"))
            .with_panel(single("Requests/s", "reqps", f"sum(rate({P}request_success_total{F}{RATE}))"))
            .with_panel(single("Aborted requests/s", "reqps", f"sum(rate({P}request_aborted_total{F}{RATE}))"))
            .with_panel(ts("Tokens/s", "short", [
                Q(f"sum(rate({P}generation_tokens_total{F}{RATE}))", "output"),
                Q(f"sum(rate({P}prompt_tokens_total{F}{RATE}))", "prompt"),
                Q(f"sum by (replica) (rate({P}generation_tokens_total{F}{RATE}))", "output {{replica}}")]))
            .with_panel(ts("Requests/s by finish reason", "reqps", [
                Q(f"sum by (finished_reason) (rate({P}request_success_total{F}{RATE}))", "{{finished_reason}}"),
                Q(f"sum(rate({P}request_aborted_total{F}{RATE}))", "aborted")]))
            .with_panel(ts("Rejected requests/s", "reqps", [
                Q(f"sum by (reason) (rate({P}request_rejected_total{F}{RATE}))", "{{reason}}")],
                "queue_full: HTTP 429 (global queue full); too_large: HTTP 400 (can never fit a worker).")))


def capacity() -> db.Dashboard:
    hits, queries = f"{P}prefix_cache_hits_total{F}", f"{P}prefix_cache_queries_total{F}"
    return (base("gpt2serve-capacity", "gpt2serve / capacity",
                 "KV pool, queues, preemptions and swaps, prefix cache and prefix-aware routing.")
            .with_panel(ts("KV cache usage", "percentunit", [
                Q(f"max by (replica) ({P}kv_cache_usage_perc{F})", "{{replica}}")], w=12))
            .with_panel(ts("Queue depth", "short", [
                Q(f"sum({P}scheduler_queue_length)", "global queue (scheduler)"),
                Q(f"sum by (replica) ({P}num_requests_waiting{F})", "engine waiting {{replica}}")]))
            .with_panel(ts("Running and swapped sequences", "short", [
                Q(f"sum by (replica) ({P}num_requests_running{F})", "running {{replica}}"),
                Q(f"sum by (replica) ({P}num_requests_swapped{F})", "swapped {{replica}}")]))
            .with_panel(ts("Preemptions and swaps per second", "short", [
                Q(f"sum by (replica) (rate({P}num_preemptions_total{F}{RATE}))", "preemptions {{replica}}"),
                Q(f"sum by (replica) (rate({P}num_swap_out_total{F}{RATE}))", "swap-outs {{replica}}"),
                Q(f"sum by (replica) (rate({P}num_swap_in_total{F}{RATE}))", "swap-ins {{replica}}")]))
            .with_panel(ts("GPU memory in use", "bytes", [
                Q(f"max by (replica) ({P}gpu_memory_used_bytes{F})", "{{replica}}")],
                "Device memory in use on each worker's GPU (0 on CPU workers)."))
            .with_row(db.Row("Prefix cache and routing"))
            .with_panel(ts("Prefix-cache hit rate", "percentunit", [
                Q(f"sum by (replica) (rate({hits}{RATE})) / sum by (replica) (rate({queries}{RATE}))", "{{replica}}"),
                Q(f"sum(rate({hits}{RATE})) / sum(rate({queries}{RATE}))", "all replicas")],
                "Prompt tokens found in the worker's prefix cache over prompt tokens looked up (vLLM's "
                "prefix_cache_hits / prefix_cache_queries). Prefix-aware routing raises it by sending a prompt to "
                "the replica that holds its prefix."))
            .with_panel(ts("Routing decisions by reason", "reqps", [
                Q(f"sum by (reason) (rate({P}router_decisions_total{F}{RATE}))", "{{reason}}")],
                "prefix_match: routed to the replica caching the longest prefix of the prompt; load_fallback: "
                "that replica was too busy (routing_policy_args.max_imbalance_tokens), so load decided; load: no "
                "replica cached any of it."))
            .with_panel(ts("Prefix-cache evictions per second", "short", [
                Q(f"sum by (replica) (rate({P}prefix_cache_evictions_total{F}{RATE}))", "{{replica}}")],
                "Cached KV blocks handed out again for new tokens (blocks/s): a high rate beside a low hit rate "
                "means the pool is too small for the prefixes it is asked to keep."))
            .with_row(db.Row("Speculative decoding"))
            .with_panel(ts("Draft acceptance rate", "percentunit", [
                Q(f"sum by (replica) (rate({P}spec_decode_num_accepted_tokens_total{F}{RATE})) / "
                  f"sum by (replica) (rate({P}spec_decode_num_draft_tokens_total{F}{RATE}))", "{{replica}}"),
                Q(f"sum by (position) (rate({P}spec_decode_num_accepted_tokens_per_pos_total{F}{RATE})) / "
                  f"sum by (position) (rate({P}spec_decode_num_draft_tokens_per_pos_total{F}{RATE}))",
                  "position {{position}}")],
                "Proposed tokens the target accepted over proposed tokens verified, per replica and by position in "
                "the draft (later positions are accepted only if every earlier one was)."))
            .with_panel(ts("Tokens per verify step", "short", [
                Q(f"1 + sum by (replica) (rate({P}spec_decode_num_accepted_tokens_total{F}{RATE})) / "
                  f"sum by (replica) (rate({P}spec_decode_num_drafts_total{F}{RATE}))", "{{replica}}")],
                "Tokens a request gains per step that verifies a draft: its accepted proposals plus the target's "
                "own next token.")))


def cost() -> db.Dashboard:
    dollars = f"{P}cost_dollars_total{F}"
    return (base("gpt2serve-cost", "gpt2serve / cost",
                 "From GPU-seconds held (wall time x GPUs, idle included) at the configured price per GPU-hour.")
            .with_panel(single("$ per 1M output tokens (range)", "currencyUSD",
                               f"1e6 * sum(increase({dollars}{RANGE})) / "
                               f"sum(increase({P}generation_tokens_total{F}{RANGE}))"))
            .with_panel(single("$ per request (range)", "currencyUSD",
                               f"sum(increase({dollars}{RANGE})) / sum(increase({P}request_success_total{F}{RANGE}))",
                               "Everything spent over the range (idle included) per finished request.", decimals=6))
            .with_panel(single("GPU-hours (range)", "short",
                               f"sum(increase({P}gpu_seconds_total{F}{RANGE})) / 3600", decimals=3))
            .with_panel(single("Spent (range)", "currencyUSD", f"sum(increase({dollars}{RANGE}))", decimals=4))
            .with_panel(ts("$ per 1M output tokens", "currencyUSD", [
                Q(f"1e6 * sum(rate({dollars}{RATE})) / sum(rate({P}generation_tokens_total{F}{RATE}))", "all"),
                Q(f"1e6 * sum by (replica) (rate({dollars}{RATE})) / "
                  f"sum by (replica) (rate({P}generation_tokens_total{F}{RATE}))", "{{replica}}")]))
            .with_panel(ts("$ per request", "currencyUSD", [
                Q(f"sum(rate({dollars}{RATE})) / sum(rate({P}request_success_total{F}{RATE}))",
                  "all-in (idle included)"),
                *[Q(q.expr, f"attributed {q.legend}") for q in quantiles("request_cost_dollars", qs=(0.5, 0.99))]],
                "All-in: spend over finished requests. Attributed: each request's token share of the steps it "
                "was in (engine/metrics.py)."))
            .with_panel(ts("Cost per replica ($/hour)", "currencyUSD", [
                Q(f"3600 * sum by (replica) (rate({dollars}{RATE}))", "{{replica}}")]))
            .with_panel(ts("GPU busy fraction", "percentunit", [
                Q(f"sum by (replica) (rate({P}gpu_busy_seconds_total{F}{RATE})) / "
                  f"sum by (replica) (rate({P}gpu_seconds_total{F}{RATE}))", "{{replica}}")],
                "Time in engine steps over time held: the part of the spend that did work."))
            .with_panel(ts("GPUs held and price per GPU-hour", "short", [
                Q(f"sum by (replica) ({P}num_gpus{F})", "GPUs {{replica}}"),
                Q(f"max by (node_type) ({P}gpu_price_dollars_per_hour{F})", "$/GPU-hour {{node_type}}")],
                "The configured price (service setting cost.gpu_hour_prices) by node type.")))


DASHBOARDS = {"latency": latency, "throughput": throughput, "capacity": capacity, "cost": cost}


def build_all() -> dict[str, dict]:
    """name -> dashboard JSON (as Grafana's HTTP API takes it)."""
    return {name: json.loads(json.dumps(make().build(), cls=JSONEncoder)) for name, make in DASHBOARDS.items()}


def render(model: dict) -> str:
    return json.dumps(model, indent=2, sort_keys=True) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--check", action="store_true", help="compare with the committed files instead of writing")
    ap.add_argument("--out", type=Path, default=OUT)
    args = ap.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    stale = []
    for name, model in build_all().items():
        path = args.out / f"{name}.json"
        text = render(model)
        if args.check:
            if not path.exists() or path.read_text() != text:
                stale.append(str(path))
        else:
            path.write_text(text)
            print(f"wrote {path}")
    if stale:
        sys.exit("out of date (run python -m gpt2serve.dashboards.build): " + ", ".join(stale))


if __name__ == "__main__":
    main()
