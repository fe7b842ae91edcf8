"""Locust against the CPU service with one of its two workers killed halfway: every request must be answered (a
success or a retryable error), none lost, none a 500 (issue 22).

    python loadtests/worker_kill.py --out loadtests/results/cpu-2026-12-08-worker-kill

Starts ``scripts/tiny_service.py`` (its own Ray instance, the tiny test model, 2 worker replicas), runs headless
Locust (``loadtests/locustfile.py``, closed-loop users, streaming and non-streaming completions) for
``--run-time`` seconds, and at half time kills one worker replica with ``ray.kill`` (its process dies as in a crash:
no drain, no goodbye). Then it waits until Serve has replaced the worker and every worker's KV pool is free again,
stops the service, and writes into ``--out``: Locust's CSVs (``locust_*.csv``), its summary with the answers by
outcome (``locust.json``), and ``run.json`` (settings, the kill, the replacement, the pools at the end, the
verdict). Exit status 0 when every request was answered with a success or a retryable error.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
APP = "gpt2-telemetry"  # the application scripts/tiny_service.py deploys


def get_json(url: str, timeout: float = 10) -> dict:
    return json.load(urllib.request.urlopen(url, timeout=timeout))


def start_service(args) -> tuple[subprocess.Popen, dict]:
    cmd = [sys.executable, str(ROOT / "scripts/tiny_service.py"), "--port", str(args.port), "--workers", "2",
           "--metrics-export-port", str(args.port + 1), "--max-queued-requests", str(args.max_queued_requests),
           "--max-num-seqs", str(args.max_num_seqs), "--num-gpu-blocks", str(args.num_gpu_blocks)]
    print("+ " + " ".join(cmd), flush=True)
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True)
    for line in proc.stdout:
        if line.startswith("READY "):
            info = json.loads(line[len("READY "):])
            # Keep draining its output, so that the service never blocks on a full pipe.
            threading.Thread(target=lambda: [None for _ in proc.stdout], daemon=True).start()
            return proc, info
    raise SystemExit(f"the service exited before it was ready (status {proc.wait()})")


def kill_one_worker() -> str:
    import ray

    names = sorted(a["name"] for a in ray.util.list_named_actors(all_namespaces=True)
                   if a["name"].startswith(f"SERVE_REPLICA::{APP}#ModelWorker#"))
    victim = names[0]
    ray.kill(ray.get_actor(victim, namespace="serve"), no_restart=True)
    return victim.rsplit("#", 1)[1]


def recovered(url: str, killed: str) -> dict | None:
    """The live view, if two workers are routed, the killed one not among them, and every pool is free with
    nothing running or waiting; else None."""
    try:
        stats = get_json(f"{url}/playground/stats")
    except OSError:
        return None
    workers = stats["workers"]
    done = (len(workers) == 2 and killed not in [w["id"] for w in workers] and stats["running"] == 0
            and stats["waiting"]["queue"] == 0
            and all(w["free_blocks"] == w["total_blocks"] and w["waiting"] == 0 for w in workers))
    return stats if done else None


def wait_recovered(url: str, killed: str, timeout_s: float = 120) -> dict:
    deadline = time.monotonic() + timeout_s
    while (stats := recovered(url, killed)) is None:
        if time.monotonic() > deadline:
            raise SystemExit(f"the service did not recover within {timeout_s} s")
        time.sleep(0.5)
    return stats


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--users", type=int, default=100)
    ap.add_argument("--spawn-rate", type=float, default=20)
    ap.add_argument("--run-time", type=int, default=90, help="seconds; one worker is killed at half time")
    ap.add_argument("--port", type=int, default=8300)
    ap.add_argument("--max-queued-requests", type=int, default=256, help="above --users: no 429 by design")
    ap.add_argument("--max-num-seqs", type=int, default=16)
    ap.add_argument("--num-gpu-blocks", type=int, default=512)
    ap.add_argument("--locust-args", default="--prompt-tokens 16-128 --output-tokens 16-64 --max-token-id 500 "
                    "--request-mix stream=3,completion=1", help="workload flags for the locustfile")
    args = ap.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")

    service, info = start_service(args)
    url = info["url"]
    import ray

    ray.init(address=info["gcs_address"], log_to_driver=False)  # joined now: the kill itself takes no time
    run: dict = {"command": " ".join([Path(sys.executable).name, *sys.argv]), "users": args.users,
                 "run_time_s": args.run_time, "max_num_seqs": args.max_num_seqs,
                 "max_queued_requests": args.max_queued_requests, "locust_args": args.locust_args,
                 # The machine may be shared: what else ran shows in its load average (1, 5, 15 min).
                 "loadavg_at_start": [round(x, 2) for x in os.getloadavg()], "cpu_count": os.cpu_count()}
    try:
        locust = [sys.executable, "-m", "locust", "-f", str(ROOT / "loadtests/locustfile.py"), "--host", url,
                  "--headless", "-u", str(args.users), "-r", str(args.spawn_rate), "-t", f"{args.run_time}s",
                  "--csv", str(args.out / "locust"), "--summary-json", str(args.out / "locust.json"),
                  "--only-summary", "--stop-timeout", "60", *args.locust_args.split()]
        print("+ " + " ".join(locust), flush=True)
        t0 = time.monotonic()
        load = subprocess.Popen(locust)
        time.sleep(args.run_time / 2)
        before = get_json(f"{url}/playground/stats")
        run["killed_worker"] = kill_one_worker()
        run["killed_at_s"] = round(time.monotonic() - t0, 1)
        run["in_flight_at_kill"] = {"running": before["running"], "queued": before["waiting"]["queue"]}
        print(f"killed worker {run['killed_worker']} at {run['killed_at_s']} s", flush=True)
        run["locust_exit_code"] = load.wait()
        run["loadavg_at_end"] = [round(x, 2) for x in os.getloadavg()]
        run["locust_wall_s"] = round(time.monotonic() - t0, 1)
        end = wait_recovered(url, run["killed_worker"])
        run["recovered_after_s"] = round(time.monotonic() - t0, 1)
        run["workers_at_end"] = [{k: w[k] for k in ("id", "free_blocks", "total_blocks", "running")}
                                 for w in end["workers"]]
    finally:
        service.terminate()
        service.wait(60)
    summary = json.loads((args.out / "locust.json").read_text())
    outcomes = summary["outcomes"]
    answered = outcomes.get("ok", 0) + outcomes.get("retryable", 0)
    run["verdict"] = {"requests": summary["requests"], "ok": outcomes.get("ok", 0),
                      "retryable": outcomes.get("retryable", 0), "lost": outcomes.get("lost", 0),
                      "http_500": outcomes.get("http_500", 0),
                      "other": summary["requests"] - answered - outcomes.get("lost", 0) - outcomes.get("http_500", 0),
                      "every_request_answered": answered == summary["requests"]}
    (args.out / "run.json").write_text(json.dumps(run, indent=2) + "\n")
    print(json.dumps(run["verdict"]))
    sys.exit(0 if run["verdict"]["every_request_answered"] else 1)


if __name__ == "__main__":
    main()
