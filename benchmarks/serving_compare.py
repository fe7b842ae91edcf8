"""W4 and Locust against our service and vLLM's OpenAI server on the same card: the side-by-side table and plots.

On the GPU host (benchmarks/README.md, "Serving side by side"), each side in turn, in one job:

    # vLLM's server up on :8100 (../shared/peer's run_peer.sh serve), then
    python -m gpt2serve.benchmarks.serving_compare peer --url http://127.0.0.1:8100 --out-dir $OUT
    # ours: `serve run configs/gpt2xl.yaml` as shipped, then the same config behind Serve's proxy, then in process
    python -m gpt2serve.benchmarks.serving_compare ours --config configs/gpt2xl.yaml --model /tmp/xl \\
        --load-format dummy --out-dir $OUT
    # here, on the two JSON files: the markdown table and the plots
    python -m gpt2serve.benchmarks.serving_compare report --out-dir benchmarks/results/DIR

Per server: W4's closed loop (``benchmarks/w4_serving.py``: 256-token prompts, 128 output tokens, EOS ignored) at
each of ``--levels`` concurrent streams for ``--level-s`` seconds, then Locust with 100 users
(``loadtests/locustfile.py``, the product's "used by" run). For ours, the 100-stream level is also profiled
(``benchmarks/profile_service.py``: CPU, stacks and event-loop lag of every process), and the same 100-stream load
runs behind Serve's proxy (the shipped config with ``proxy_location: EveryNode`` and no ``http_listener``) and on
the engine in process. Dollars per 1M output tokens are the GPU-hour price (``--price``) over the tokens served
in that hour, the same formula for both servers.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from gpt2serve.benchmarks import profile_service as prof
from gpt2serve.benchmarks.w4_serving import (Load, ServeProcess, _device_name, _git_commit, run_in_process,
                                              summarize)

LOCUSTFILE = Path(__file__).resolve().parent.parent / "loadtests" / "locustfile.py"


def w4_level(url: str, users: int, seconds: float, profile_dir: Path | None = None, tag: str = "") -> dict:
    """W4 at ``users`` streams against ``url``; with ``profile_dir``, the Serve processes are profiled meanwhile."""
    window = seconds / 2 if profile_dir is not None else None
    summary, measured = prof.profiled_w4(Load(concurrency=users, duration_s=seconds), [url], window, profile_dir, tag)
    row = {"users": users, "seconds": seconds, **summary}
    if measured is not None:
        row["profile"] = prof.process_rows(measured, window, row["out_tok_s"])
        row["event_loop_lag"] = measured["lag"]
        row["engine_steps"] = measured["engine_steps"]
    return row


def locust_run(url: str, users: int, seconds: int, out: Path) -> dict:
    summary = out / f"locust_{users}.json"
    cmd = [sys.executable, "-m", "locust", "-f", str(LOCUSTFILE), "--host", url, "--headless", "-u", str(users),
           "-r", str(users), "-t", f"{seconds}s", "--only-summary", "--processes", "4", "--summary-json",
           str(summary)]
    proc = subprocess.run(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    if not summary.exists():
        return {"users": users, "error": proc.stderr[-2000:]}
    return {**json.loads(summary.read_text()), "locust_exit_code": proc.returncode}


def sweep(url: str, levels: list[int], level_s: float, pause_s: float, profile_level: int | None = None) -> list[dict]:
    """W4 at each level; the level ``profile_level`` is profiled too (stacks into a scratch directory)."""
    rows = []
    for users in levels:
        stacks = Path(tempfile.mkdtemp()) if users == profile_level else None
        rows.append(w4_level(url, users, level_s, stacks, f"c{users}"))
        r = rows[-1]
        print(f"  {users:>4} streams: {r['out_tok_s']} out tok/s, TTFT p50/p99 {r['ttft_ms_p50']}/{r['ttft_ms_p99']}"
              f" ms, TPOT p50 {r['tpot_ms_p50']} ms, errors {r['errors']}/{r['requests']}", flush=True)
        time.sleep(pause_s)
    return rows


def run_ours(args, out: Path) -> dict:
    result: dict = {"server": "ours", "config": args.config, "commit": args.commit or _git_commit(),
                    "device": _device_name()}
    levels = [int(x) for x in args.levels.split(",")]
    for path, config in (("shipped", args.config), ("serve-proxy", prof.proxy_variant(args.config))):
        if path == "serve-proxy" and args.skip_proxy:
            continue
        env = prof.serve_env(args.model, args.load_format)
        prof.start_cluster(env)
        server = ServeProcess(config, env, log_path=str(out / f"serve_{path}.log"))
        try:
            url = server.wait_ready(lambda: ["http://127.0.0.1:8000"])[0]
            print(f"ours, {path}:", flush=True)
            result[path] = {"w4": sweep(url, levels if path == "shipped" else [args.profile_level], args.level_s,
                                        args.pause_s, args.profile_level)}
            if path == "shipped" and args.locust_s > 0:
                result[path]["locust"] = locust_run(url, args.locust_users, args.locust_s, out)
        finally:
            server.stop()
            prof.stop_cluster()
            (out / "ours.json").write_text(json.dumps(result, indent=2, default=str) + "\n")  # so far
    if not args.skip_in_process:
        timing: dict = {}
        samples, duration, _, _ = run_in_process(Load(concurrency=args.profile_level, duration_s=args.level_s),
                                                 args.config,
                                                 {"load_format": args.load_format, "model": args.model}
                                                 if args.model else {"load_format": args.load_format}, timing)
        result["in-process"] = {"w4": [{"users": args.profile_level, "seconds": duration,
                                        **summarize(samples, duration)}], "step_timing_ms": timing}
    return result


def run_peer(args, out: Path) -> dict:
    levels = [int(x) for x in args.levels.split(",")]
    print(f"peer at {args.url}:", flush=True)
    result = {"server": "vllm", "url": args.url, "device": _device_name(), "version": _peer_version(args.out_dir),
              "w4": sweep(args.url, levels, args.level_s, args.pause_s),
              "locust": locust_run(args.url, args.locust_users, args.locust_s, out)}
    return result


# ---------------------------------------------------------------------- report
def dollars_per_1m(tok_s: float | None, price_per_hour: float) -> float | None:
    return round(price_per_hour / 3600 / tok_s * 1e6, 4) if tok_s else None


def at(rows: list[dict], users: int) -> dict:
    return next((r for r in rows if r["users"] == users), {})


def report(out: Path, price: float) -> str:
    ours = json.loads((out / "ours.json").read_text())
    peer = json.loads((out / "vllm.json").read_text())
    shipped, proxy = ours["shipped"]["w4"], ours.get("serve-proxy", {}).get("w4", [])
    inproc = ours.get("in-process", {}).get("w4", [])
    v100, o100 = at(peer["w4"], 100), at(shipped, 100)
    lines = [f"# Serving side by side: ours ({ours['commit']}) and vLLM {peer.get('version', '')}, one job on "
             f"{ours['device']}", "",
             "W4: closed-loop streams, 256-token prompts, 128 output tokens (EOS ignored), GPT-2 XL fp16 dummy "
             "weights, both servers detokenizing with the same tokenizer directory.", "",
             "| W4, 100 streams | out tok/s | vs vLLM server | TTFT p50 / p99 ms | TPOT p50 / p99 ms | errors | "
             f"$ / 1M out tok (${price:.2f}/GPU-h) |", "|---|---|---|---|---|---|---|"]

    def row(name: str, r: dict) -> str:
        if not r:
            return f"| {name} | (not run) | | | | | |"
        ratio = r["out_tok_s"] / v100["out_tok_s"] if v100.get("out_tok_s") else None
        return (f"| {name} | {r['out_tok_s']:,.0f} | {ratio:.2f} | {r['ttft_ms_p50']} / {r['ttft_ms_p99']} | "
                f"{r['tpot_ms_p50']} / {r['tpot_ms_p99']} | {r['errors']}/{r['requests']} | "
                f"{dollars_per_1m(r['out_tok_s'], price)} |")

    lines += [row("vLLM OpenAI server", v100), row("ours, `serve run configs/gpt2xl.yaml` as shipped", o100),
              row("ours behind Serve's proxy (the shipped config before)", at(proxy, 100)),
              row("ours, engine in process (AsyncLLM)", at(inproc, 100))]
    if o100 and at(inproc, 100):
        lines += ["", f"Shipped service / engine in process: {o100['out_tok_s'] / at(inproc, 100)['out_tok_s']:.0%}"]
    lines += ["", "| streams | vLLM out tok/s | ours out tok/s | ours / vLLM | vLLM TTFT p50 | ours TTFT p50 | "
              "vLLM TPOT p50 | ours TPOT p50 |", "|---|---|---|---|---|---|---|---|"]
    for r in shipped:
        v = at(peer["w4"], r["users"])
        ratio = f"{r['out_tok_s'] / v['out_tok_s']:.2f}" if v.get("out_tok_s") else ""
        lines.append(f"| {r['users']} | {v.get('out_tok_s', '')} | {r['out_tok_s']} | {ratio} | "
                     f"{v.get('ttft_ms_p50', '')} | {r['ttft_ms_p50']} | {v.get('tpot_ms_p50', '')} | "
                     f"{r['tpot_ms_p50']} |")
    lines += ["", "Locust, 100 users (the card's \"used by\" run; $ / 1M: the formula above, and in brackets what "
              "the service's own cost metrics said over the run):", "",
              "| server | out tok/s | TTFT p50 / p99 ms | TPOT p50 / p99 ms | failures | $ / 1M out tok |",
              "|---|---|---|---|---|---|"]
    for name, loc in (("vLLM", peer.get("locust", {})), ("ours", ours["shipped"].get("locust", {}))):
        if "out_tok_s" not in loc:
            lines.append(f"| {name} | (failed: {str(loc.get('error', ''))[-200:]!r}) | | | | |")
            continue
        own = loc.get("dollars_per_1m_output_tokens")
        lines.append(f"| {name} | {loc['out_tok_s']:,.0f} | {loc.get('ttft_ms_p50')} / {loc.get('ttft_ms_p99')} | "
                     f"{loc.get('tpot_ms_p50')} / {loc.get('tpot_ms_p99')} | {loc.get('failures')}/{loc.get('requests')} "
                     f"| {dollars_per_1m(loc['out_tok_s'], price)}" + (f" [{own:.4f}]" if own else "") + " |")
    steps = [(name, at(rows, 100).get("engine_steps", {}).get("decode")) for name, rows in
             (("ours as shipped", shipped), ("ours behind Serve's proxy", proxy))]
    timing = ours.get("in-process", {}).get("step_timing_ms")
    if any(s for _, s in steps) or timing:
        lines += ["", "Engine steps at 100 streams: decode step wall time inside the service (workers' "
                  "`gpt2serve:step_time_seconds`), and the engine in process (`LLMEngine.step_timing()`, whole run):", ""]
        lines += [f"- {name}: {s['mean_step_ms']} ms per decode step, {s['steps_per_s']} decode steps/s"
                  for name, s in steps if s]
        if timing:
            lines.append("- in process: " + ", ".join(f"{k} {v:.3f}" for k, v in timing.items()
                                                      if k.endswith("_ms")) + f" over {timing.get('steps')} steps")
    for name, rows in (("shipped", shipped), ("behind Serve's proxy", proxy)):
        prof_rows = at(rows, 100).get("profile")
        if prof_rows:
            lines += ["", f"Where the CPU goes, ours {name}, 100 streams (`benchmarks/profile_service.py`):", "",
                      "| process | CPU % | CPU µs / output token | top packages by py-spy self time (s) |",
                      "|---|---|---|---|"]
            for p in prof_rows:
                pk = ", ".join(f"{k} {v}" for k, v in list(p["by_package_s"].items())[:4])
                lines.append(f"| {p['role']} | {p['cpu_pct']} | {p['cpu_us_per_token']} | {pk} |")
    text = "\n".join(lines) + "\n"
    (out / "side_by_side.md").write_text(text)
    plot(peer["w4"], shipped, out)
    return text


def plot(peer: list[dict], ours: list[dict], out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(15, 4.2))
    for rows, name, style in ((peer, "vLLM server", "s--"), (ours, "ours (as shipped)", "o-")):
        users = [r["users"] for r in rows]
        axes[0].plot(users, [r["out_tok_s"] for r in rows], style, label=name)
        axes[1].plot(users, [r["ttft_ms_p50"] for r in rows], style, label=f"{name} p50")
        axes[1].plot(users, [r["ttft_ms_p99"] for r in rows], style, alpha=0.4, label=f"{name} p99")
        axes[2].plot(users, [r["tpot_ms_p50"] for r in rows], style, label=f"{name} p50")
    for ax, title, unit in ((axes[0], "Output throughput", "tok/s"), (axes[1], "Time to first token", "ms"),
                            (axes[2], "Time per output token", "ms")):
        ax.set(xlabel="concurrent streams", ylabel=unit, title=title, xscale="log")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out / "w4_vs_concurrency.png", dpi=110)


def _peer_version(out_dir: str) -> str | None:
    """vLLM's version from its server's log (run_peer.sh writes it beside our results); vLLM itself is not
    importable beside our bundle."""
    import re

    log = Path(out_dir) / "vllm_serve.log"
    found = re.search(r"version (\d+\.\d+\.\d+)", log.read_text(errors="replace")) if log.exists() else None
    return found.group(1) if found else None


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("side", choices=["ours", "peer", "report"])
    p.add_argument("--out-dir", required=True)
    p.add_argument("--url", default="http://127.0.0.1:8100", help="peer: vLLM's OpenAI server")
    p.add_argument("--config", default="configs/gpt2xl.yaml")
    p.add_argument("--model", help="ours: GPT2SERVE_MODEL (the directory vLLM serves too)")
    p.add_argument("--load-format", default="dummy")
    p.add_argument("--levels", default="1,10,25,50,100,200")
    p.add_argument("--level-s", type=float, default=20.0)
    p.add_argument("--pause-s", type=float, default=2.0)
    p.add_argument("--locust-s", type=int, default=30, help="0: no Locust run")
    p.add_argument("--locust-users", type=int, default=100)
    p.add_argument("--profile-level", type=int, default=100, help="ours: the level profiled, and the one run "
                   "behind Serve's proxy and in process")
    p.add_argument("--price", type=float, default=3.00, help="report: $ per GPU-hour, for both servers")
    p.add_argument("--commit", help="ours: the commit measured (the GPU host's copy of .git may be stale)")
    p.add_argument("--skip-proxy", action="store_true")
    p.add_argument("--skip-in-process", action="store_true")
    args = p.parse_args(argv)
    out = Path(args.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    if args.side == "report":
        print(report(out, args.price))
        return
    result = run_ours(args, out) if args.side == "ours" else run_peer(args, out)
    name = "ours.json" if args.side == "ours" else "vllm.json"
    (out / name).write_text(json.dumps(result, indent=2, default=str) + "\n")


if __name__ == "__main__":
    main()
