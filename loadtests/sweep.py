"""Step the number of concurrent users (1, 10, 25, 50, 100 by default), one headless Locust run per step, and plot
latency and throughput against concurrency.

    python loadtests/sweep.py --host http://127.0.0.1:8000 --out loadtests/results/sweep-h100 --run-time 60s \\
        --processes 4
    python loadtests/sweep.py --plot-only loadtests/results/sweep-h100      # replot from the saved summaries

Per step it keeps Locust's CSV and HTML report and the locustfile's summary JSON (``c<users>.json``); then
``sweep.json`` (all summaries), ``latency_vs_concurrency.png`` (TTFT and TPOT p50/p99) and
``throughput_vs_concurrency.png`` (output tok/s and requests/s, with $ per 1M output tokens where the service
reported cost). Workload flags after ``--`` go to the locustfile (defaults: W4's 256-token prompts, 128 output
tokens, EOS ignored), e.g. ``-- --prompt-tokens 16-768 --output-tokens 16-256``.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent


def run_step(host: str, users: int, run_time: str, out: Path, processes: int, extra: list[str]) -> dict:
    cmd = [sys.executable, "-m", "locust", "-f", str(HERE / "locustfile.py"), "--host", host, "--headless",
           "-u", str(users), "-r", str(users), "-t", run_time, "--csv", str(out / f"c{users}"),
           "--html", str(out / f"c{users}.html"), "--summary-json", str(out / f"c{users}.json"), "--only-summary"]
    if processes > 1 and users >= processes:
        cmd += ["--processes", str(processes)]
    print("+ " + " ".join(cmd + extra), flush=True)
    proc = subprocess.run(cmd + extra)
    summary = json.loads((out / f"c{users}.json").read_text())
    summary["locust_exit_code"] = proc.returncode
    return summary


def plot(summaries: list[dict], out: Path) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    summaries = sorted(summaries, key=lambda s: s["users"])
    users = [s["users"] for s in summaries]
    title = out.name

    def series(key):
        return [s.get(key) if s.get(key) is not None else float("nan") for s in summaries]

    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    for ax, metric, name in ((axes[0], "ttft", "Time to first token"), (axes[1], "tpot", "Time per output token")):
        ax.plot(users, series(f"{metric}_ms_p50"), "o-", label="p50")
        ax.plot(users, series(f"{metric}_ms_p99"), "s--", label="p99")
        ax.set(xlabel="concurrent users", ylabel="ms", title=name)
        ax.set_xscale("log")
        ax.set_xticks(users, [str(u) for u in users])
        ax.grid(alpha=0.3)
        ax.legend()
    fig.suptitle(f"Latency vs concurrency ({title})")
    fig.tight_layout()
    latency = out / "latency_vs_concurrency.png"
    fig.savefig(latency, dpi=120)
    plt.close(fig)

    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    axes[0].plot(users, series("out_tok_s"), "o-", color="tab:green")
    axes[0].set(xlabel="concurrent users", ylabel="output tokens/s", title="Throughput")
    ax2 = axes[0].twinx()
    ax2.plot(users, series("req_s"), "s--", color="tab:gray")
    ax2.set_ylabel("requests/s", color="tab:gray")
    dollars = series("dollars_per_1m_output_tokens")
    axes[1].plot(users, dollars, "o-", color="tab:red")
    axes[1].set(xlabel="concurrent users", ylabel="$ per 1M output tokens", title="Cost per output token")
    for ax in axes:
        ax.set_xscale("log")
        ax.set_xticks(users, [str(u) for u in users])
        ax.grid(alpha=0.3)
    fig.suptitle(f"Throughput and cost vs concurrency ({title})")
    fig.tight_layout()
    throughput = out / "throughput_vs_concurrency.png"
    fig.savefig(throughput, dpi=120)
    plt.close(fig)
    return [latency, throughput]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--host", default="http://127.0.0.1:8000")
    ap.add_argument("--out", type=Path, default=Path("loadtests/results/sweep"))
    ap.add_argument("--levels", default="1,10,25,50,100", help="concurrent users per step")
    ap.add_argument("--run-time", default="60s")
    ap.add_argument("--processes", type=int, default=1, help="Locust processes (for the larger steps)")
    ap.add_argument("--pause-s", type=float, default=5.0, help="idle time between steps (the service drains)")
    ap.add_argument("--plot-only", type=Path, default=None, help="replot the summaries in this directory")
    args, extra = ap.parse_known_args()
    extra = [a for a in extra if a != "--"]

    if args.plot_only:
        summaries = json.loads((args.plot_only / "sweep.json").read_text())["steps"]
        for path in plot(summaries, args.plot_only):
            print(f"wrote {path}")
        return

    args.out.mkdir(parents=True, exist_ok=True)
    summaries = []
    for i, users in enumerate(int(u) for u in args.levels.split(",")):
        if i:
            time.sleep(args.pause_s)
        summaries.append(run_step(args.host, users, args.run_time, args.out, args.processes, extra))
    (args.out / "sweep.json").write_text(json.dumps({
        "host": args.host, "run_time": args.run_time, "processes": args.processes, "locust_args": extra,
        "steps": summaries}, indent=2) + "\n")
    for path in plot(summaries, args.out):
        print(f"wrote {path}")
    failed = [s["users"] for s in summaries if s.get("failures")]
    if failed:
        sys.exit(f"steps with failed requests: {failed}")


if __name__ == "__main__":
    main()
