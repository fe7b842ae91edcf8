"""Where the service's time goes under W4: CPU, Python stacks and event-loop lag of every process on the path.

    python -m gpt2serve.benchmarks.profile_service --config configs/gpt2xl.yaml --load-format dummy \\
        --out-dir /tmp/prof          # the config as shipped; also --ingress proxy, direct, haproxy

Starts a Ray head with a known metrics port (so Serve's own event-loop monitors can be read), then
``serve run CONFIG`` on it, then the W4 load of ``benchmarks/w4_serving.py`` against the chosen ingress. In the
middle of the load, for ``--window`` seconds, every Serve process (proxy, HAProxy's request router, each replica
of each deployment) is measured three ways:

- CPU seconds used in the window (``psutil``), also per output token the clients received in it;
- Python stacks sampled by ``py-spy`` (without pausing the process): the functions that hold the CPU, by self
  time and by the package they belong to;
- event-loop lag: Serve's ``serve_event_loop_scheduling_latency_ms`` histograms, per loop (main, user code,
  router) of each actor, from Ray's metrics endpoint, with the monitoring interval set to 0.1 s.

Writes ``profile_<ingress>.json`` (all of it) and ``profile_<ingress>.md`` (the tables) under ``--out-dir``.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from collections import Counter, defaultdict
from pathlib import Path

import yaml

from gpt2serve.benchmarks.w4_serving import Load, ServeProcess, discover_direct_ingress, run_http, summarize

RAY_PORT, METRICS_PORT = 6390, 8090
LAG_METRIC = "serve_event_loop_scheduling_latency_ms"
# A stack frame's file, bucketed by what it belongs to (first match wins).
PACKAGES = [
    ("gpt2serve (ours)", r"gpt2serve/|/actors/|/engine/|/kernels/|/policies/"),
    ("serve proxy", r"ray/serve/_private/proxy"),
    ("serve replica", r"ray/serve/_private/replica"),
    ("serve router", r"ray/serve/_private/(router|request_router|replica_scheduler)"),
    ("serve other", r"ray/serve/"),
    ("ray core", r"ray/|_raylet"),
    ("uvicorn / starlette / fastapi", r"uvicorn/|starlette/|fastapi/|h11/|httptools"),
    ("pydantic", r"pydantic"),
    ("json", r"json/"),
    ("asyncio", r"asyncio/"),
    ("threads (native calls, GIL waits)", r"threading\.py|concurrent/futures/"),
    ("torch", r"torch/"),
    ("tokenizers / transformers", r"tokenizers|transformers/"),
    ("prometheus", r"prometheus_client"),
]


def serve_processes() -> dict[int, str]:
    """pid -> role, for the Serve processes on this node (by their Ray process titles)."""
    import psutil

    found = {}
    for p in psutil.process_iter(["pid", "cmdline", "name"]):
        title = " ".join(p.info["cmdline"] or []) or (p.info["name"] or "")
        if "haproxy" in (p.info["name"] or ""):
            found[p.info["pid"]] = "haproxy (native)"
            continue
        m = re.search(r"ray::(ServeReplica:[\w-]+:[\w-]+|ProxyActor|ServeController)", title)
        if m:
            found[p.info["pid"]] = m.group(1)
    return found


def actor_names() -> dict[str, tuple[str, int]]:
    """Ray actor id -> (class or replica name, pid), from Ray's state API."""
    try:
        out = subprocess.run(["ray", "list", "actors", "--format", "json", "--limit", "1000", "--address",
                              f"127.0.0.1:{RAY_PORT}"], capture_output=True, text=True, timeout=60).stdout
        return {a["actor_id"]: (a.get("name") or a.get("class_name"), a.get("pid")) for a in json.loads(out)}
    except (OSError, ValueError, subprocess.TimeoutExpired):
        return {}


def lag_histograms() -> dict[tuple, dict]:
    """(actor_id, component, loop_type) -> {"count", "sum", buckets {le: cumulative count}}."""
    text = urllib.request.urlopen(f"http://127.0.0.1:{METRICS_PORT}/metrics", timeout=10).read().decode()
    hist: dict[tuple, dict] = defaultdict(lambda: {"count": 0.0, "sum": 0.0, "buckets": {}})
    for line in text.splitlines():
        if LAG_METRIC not in line or line.startswith("#"):
            continue
        m = re.match(r"(\w+)\{(.*)\}\s+(\S+)", line)
        if not m:
            continue
        name, labels, value = m.group(1), dict(re.findall(r'(\w+)="([^"]*)"', m.group(2))), float(m.group(3))
        key = (labels.get("actor_id", "?"), labels.get("component", "?"), labels.get("loop_type", "?"))
        if name.endswith("_count"):
            hist[key]["count"] += value
        elif name.endswith("_sum"):
            hist[key]["sum"] += value
        elif name.endswith("_bucket"):
            hist[key]["buckets"][float(labels["le"])] = hist[key]["buckets"].get(float(labels["le"]), 0) + value
    return dict(hist)


def step_time_sums(url: str) -> dict[tuple[str, str], float]:
    """(phase, "sum" | "count") -> the workers' ``gpt2serve:step_time_seconds`` histogram, from the service's
    ``/metrics``: how long the engines' steps take inside the service (compare with the same engine in process)."""
    text = urllib.request.urlopen(f"{url}/metrics", timeout=10).read().decode()
    out: dict[tuple[str, str], float] = {}
    for m in re.finditer(r'^gpt2serve:step_time_seconds_(sum|count)\{[^}]*phase="(\w+)"[^}]*\}\s+(\S+)$', text, re.M):
        key = (m.group(2), m.group(1))
        out[key] = out.get(key, 0.0) + float(m.group(3))
    return out


def steps_in_window(before: dict, after: dict, window_s: float) -> dict[str, dict]:
    out = {}
    for phase in sorted({p for p, _ in after}):
        n = after.get((phase, "count"), 0.0) - before.get((phase, "count"), 0.0)
        if n > 0:
            total = after.get((phase, "sum"), 0.0) - before.get((phase, "sum"), 0.0)
            out[phase] = {"steps_per_s": round(n / window_s, 1), "mean_step_ms": round(1000 * total / n, 3)}
    return out


def lag_in_window(before: dict, after: dict) -> dict[tuple, dict]:
    out = {}
    for key, a in after.items():
        b = before.get(key, {"count": 0.0, "sum": 0.0, "buckets": {}})
        n = a["count"] - b["count"]
        if n <= 0:
            continue
        buckets = sorted((le, a["buckets"][le] - b["buckets"].get(le, 0)) for le in a["buckets"])
        p99 = next((le for le, c in buckets if c >= 0.99 * n), float("inf"))
        out[key] = {"samples": int(n), "mean_ms": round((a["sum"] - b["sum"]) / n, 2), "p99_ms_le": p99}
    return out


def py_spy(pid: int, seconds: float, path: Path) -> subprocess.Popen | None:
    exe = shutil.which("py-spy")
    if exe is None:
        return None
    return subprocess.Popen([exe, "record", "--pid", str(pid), "--duration", str(int(seconds)), "--rate", "200",
                             "--format", "raw", "--nonblocking", "--output", str(path)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def package_of(frame: str) -> str:
    for name, pattern in PACKAGES:
        if re.search(pattern, frame):
            return name
    return "other"


def summarize_stacks(path: Path, rate: int = 200, top: int = 12) -> dict:
    """Collapsed stacks -> active seconds, top functions by self time, and self time by package."""
    if not path.exists():
        return {}
    self_time: Counter[str] = Counter()
    by_package: Counter[str] = Counter()
    total = 0
    for line in path.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        if not stack:
            continue
        n = int(count)
        frames = [f for f in stack.split(";") if not f.startswith("process ") and not f.startswith("thread ")]
        if not frames:
            continue
        leaf = frames[-1]
        total += n
        self_time[re.sub(r":\d+\)$", ")", leaf)] += n
        by_package[package_of(leaf)] += n
    return {
        "active_s": round(total / rate, 2),
        "top_self": [(f, round(n / rate, 3)) for f, n in self_time.most_common(top)],
        "by_package_s": {k: round(v / rate, 3) for k, v in by_package.most_common()},
    }


def measure(window_s: float, out_dir: Path, tag: str, url: str | None = None) -> dict:
    """``url``: the service, whose /metrics gives the engines' step times in the window too."""
    import psutil

    procs = serve_processes()
    lag_before = lag_histograms()
    steps_before = step_time_sums(url) if url else {}
    cpu_before = {}
    for pid in procs:
        try:
            t = psutil.Process(pid).cpu_times()
            cpu_before[pid] = t.user + t.system
        except psutil.Error:
            pass
    spies = {pid: py_spy(pid, window_s, out_dir / f"stacks_{tag}_{pid}.txt") for pid in procs if "haproxy" not in
             procs[pid]}
    time.sleep(window_s)
    cpu = {}
    for pid in procs:
        try:
            t = psutil.Process(pid).cpu_times()
            cpu[pid] = round(t.user + t.system - cpu_before.get(pid, 0.0), 2)
        except psutil.Error:
            cpu[pid] = None
    lag = [{"actor_id": k[0], "component": k[1], "loop": k[2], **v}
           for k, v in sorted(lag_in_window(lag_before, lag_histograms()).items())]
    steps = steps_in_window(steps_before, step_time_sums(url), window_s) if url else {}
    for spy in spies.values():
        if spy is not None:
            try:
                spy.wait(window_s + 30)
            except subprocess.TimeoutExpired:
                spy.kill()
    return {"procs": procs, "cpu_s": cpu, "lag": lag, "engine_steps": steps,
            "stacks": {pid: summarize_stacks(out_dir / f"stacks_{tag}_{pid}.txt") for pid in procs}}


def serve_env(model: str | None, load_format: str | None, engine_overrides: dict[str, str] | None = None,
              ingress: str = "shipped") -> dict[str, str]:
    """The environment of ``serve run`` on the cluster ``start_cluster`` starts: Serve's event-loop monitors every
    0.1 s, the engine's overrides as GPT2SERVE_* variables, and the Serve flags of ``ingress``."""
    env = {"RAY_ADDRESS": f"127.0.0.1:{RAY_PORT}", "RAY_SERVE_EVENT_LOOP_MONITORING_INTERVAL_S": "0.1",
           "TOKENIZERS_PARALLELISM": "false"}
    if ingress in ("direct", "haproxy"):
        env["RAY_SERVE_ENABLE_DIRECT_INGRESS"] = "1"
    if ingress == "haproxy":
        env["RAY_SERVE_ENABLE_HA_PROXY"] = "1"
    overrides = {"load_format": load_format, "model": model, **(engine_overrides or {})}
    env.update({f"GPT2SERVE_{k.upper()}": str(v) for k, v in overrides.items() if v})
    return env


def profiled_w4(load: Load, urls: list[str], window_s: float | None = None, profile_dir: Path | None = None,
                tag: str = "") -> tuple[dict, dict | None]:
    """W4's closed loop against ``urls`` (its summary), and with ``window_s`` every Serve process measured for
    that long in the middle of it (``measure``, stacks into ``profile_dir``)."""
    box: dict = {}
    client = threading.Thread(target=lambda: box.update(zip(("samples", "dur", "model"), run_http(
        load, urls, min(4, load.concurrency)))))
    client.start()
    measured = None
    if window_s is not None:
        time.sleep(1.0 + (load.duration_s - window_s) / 2)
        measured = measure(window_s, profile_dir, tag, urls[0])
    client.join()
    return summarize(box["samples"], box["dur"]), measured


def proxy_variant(config: str) -> str:
    """The same config served through Serve's HTTP proxy on port 8000 instead of the ingress replicas' own
    listener (``http_listener``): the path every Serve feature flag below (direct ingress, HAProxy) starts from."""
    data = yaml.safe_load(Path(config).read_text())
    data["proxy_location"] = "EveryNode"
    data["http_options"] = {"host": "0.0.0.0", "port": 8000}
    for app in data["applications"]:
        app["args"].pop("http_listener", None)
    out = Path(tempfile.mkdtemp()) / Path(config).name
    out.write_text(yaml.safe_dump(data, sort_keys=False))
    return str(out)


def start_cluster(env: dict[str, str]) -> None:
    """A Ray head on this machine with Serve's settings from ``env`` and its metrics on METRICS_PORT."""
    ray_env = {**os.environ, **env}
    ray_env.pop("RAY_ADDRESS", None)
    ray_env.setdefault("RAY_AUTH_MODE", "disabled")
    subprocess.run(["ray", "start", "--head", "--port", str(RAY_PORT), "--metrics-export-port", str(METRICS_PORT),
                    "--disable-usage-stats"], env=ray_env, check=True, stdout=subprocess.DEVNULL)


def stop_cluster() -> None:
    subprocess.run(["ray", "stop", "--force"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def process_rows(measured: dict, window_s: float, out_tok_s: float) -> list[dict]:
    """One row per process: CPU share, CPU per output token received in the window, and its stacks' summary."""
    tokens = out_tok_s * window_s
    rows = []
    for pid, role in sorted(measured["procs"].items(), key=lambda kv: kv[1]):
        cpu = measured["cpu_s"].get(pid)
        st = measured["stacks"].get(pid, {})
        rows.append({"pid": pid, "role": role, "cpu_s": cpu,
                     "cpu_pct": round(100 * cpu / window_s, 1) if cpu is not None else None,
                     "cpu_us_per_token": round(1e6 * cpu / tokens, 1) if cpu and tokens else None,
                     "active_s": st.get("active_s"), "by_package_s": st.get("by_package_s", {}),
                     "top_self": st.get("top_self", [])})
    return rows


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--config", default="configs/gpt2xl.yaml")
    p.add_argument("--load-format")
    p.add_argument("--model", help="GPT2SERVE_MODEL: a checkpoint or config+tokenizer directory")
    p.add_argument("--ingress", choices=["shipped", "proxy", "direct", "haproxy"], default="shipped",
                   help="shipped: the config as it is; the others: through Serve's proxy, its direct ingress, HAProxy")
    p.add_argument("--concurrency", type=int, default=100)
    p.add_argument("--duration", type=float, default=45.0)
    p.add_argument("--max-token-id", type=int, default=50000, help="prompt ids are drawn from 0..this")
    p.add_argument("--window", type=float, default=20.0, help="seconds measured, in the middle of the load")
    p.add_argument("--set", action="append", default=[], metavar="FIELD=VALUE", help="engine or service override")
    p.add_argument("--out-dir", default="/tmp/profile_service")
    args = p.parse_args(argv)
    out_dir = Path(args.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)

    env = serve_env(args.model, args.load_format, dict(item.split("=", 1) for item in args.set), args.ingress)
    start_cluster(env)
    config = args.config if args.ingress == "shipped" else proxy_variant(args.config)
    server = ServeProcess(config, env, log_path=str(out_dir / f"serve_{args.ingress}.log"))
    result: dict = {"ingress": args.ingress, "config": args.config, "concurrency": args.concurrency,
                    "duration_s": args.duration, "window_s": args.window}
    try:
        urls = server.wait_ready(discover_direct_ingress if args.ingress == "direct" else
                                 (lambda: ["http://127.0.0.1:8000"]))
        load = Load(concurrency=args.concurrency, duration_s=args.duration, max_token_id=args.max_token_id)
        result["w4"], result["measured"] = profiled_w4(load, urls, args.window, out_dir, args.ingress)
        names = actor_names()
    finally:
        server.stop()
        stop_cluster()
    result["actor_names"] = names
    m = result["measured"]
    rows = process_rows(m, args.window, result["w4"]["out_tok_s"])
    result["processes"] = rows
    pid_of_actor = {aid: pid for aid, (_, pid) in names.items()}
    result["event_loop_lag"] = [{**lag, "role": m["procs"].get(pid_of_actor.get(lag["actor_id"]), "?")}
                                for lag in m["lag"]]
    (out_dir / f"profile_{args.ingress}.json").write_text(json.dumps(result, indent=2, default=str) + "\n")
    (out_dir / f"profile_{args.ingress}.md").write_text(markdown(result))
    print(markdown(result))


def markdown(r: dict) -> str:
    w = r["w4"]
    lines = [f"## W4 through `{r['ingress']}` ({r['concurrency']} streams, {r['duration_s']:.0f} s; "
             f"profiled {r['window_s']:.0f} s in the middle)", "",
             f"out tok/s {w['out_tok_s']}, TTFT p50/p99 {w['ttft_ms_p50']}/{w['ttft_ms_p99']} ms, "
             f"TPOT p50/p99 {w['tpot_ms_p50']}/{w['tpot_ms_p99']} ms, errors {w['errors']}/{w['requests']}", "",
             "| process | CPU % | CPU µs / output token | where the CPU goes (py-spy self time, s) |", "|---|---|---|---|"]
    for row in r["processes"]:
        pk = ", ".join(f"{k} {v}" for k, v in list(row["by_package_s"].items())[:5])
        lines.append(f"| {row['role']} ({row['pid']}) | {row['cpu_pct']} | {row['cpu_us_per_token']} | {pk} |")
    lines += ["", "| loop | samples | mean lag ms | p99 lag ms (bucket) |", "|---|---|---|---|"]
    for lag in r["event_loop_lag"]:
        lines.append(f"| {lag['role']} {lag['component']}/{lag['loop']} ({lag['actor_id'][:8]}) | {lag['samples']} | "
                     f"{lag['mean_ms']} | {lag['p99_ms_le']} |")
    lines += ["", "Top functions by self time (s), per process:", ""]
    for row in r["processes"]:
        if row["top_self"]:
            lines.append(f"- {row['role']} ({row['pid']}): " + "; ".join(f"{f} {s}" for f, s in row["top_self"][:8]))
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.exit(main())
