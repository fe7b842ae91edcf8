"""Start the service on the CPU with the tiny test model, in its own Ray instance, and keep it up until SIGTERM.

For the telemetry tests (tests/telemetry) and for trying dashboards and load tests on a laptop:

    python scripts/tiny_service.py --port 8000 --metrics-export-port 8080
    bash scripts/prometheus.sh --service 127.0.0.1:8000 --ray 127.0.0.1:8080      # in another shell
    locust -f loadtests/locustfile.py --host http://127.0.0.1:8000 --max-token-id 500 ...

Prints one line ``READY {json}`` (service URL, Ray metrics port, model name, the Ray cluster's GCS address for
drivers that want to join it, e.g. to kill a replica: loadtests/worker_kill.py) once every worker is routed.
Ray's own metrics are exported on ``--metrics-export-port`` (Ray's per-node metrics agent), reported every
``RAY_metrics_report_interval_ms`` (1 s here unless set; Ray's default is 10 s).
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import tempfile
import threading
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--port", type=int, default=8000)
    ap.add_argument("--metrics-export-port", type=int, default=8080)
    ap.add_argument("--model-dir", default=None, help="tiny checkpoint (built here if missing; default: a temp dir)")
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--model-name", default="tiny-gpt2")
    ap.add_argument("--max-queued-requests", type=int, default=64)
    ap.add_argument("--num-gpu-blocks", type=int, default=256, help="KV pool of each worker, in 16-token blocks")
    ap.add_argument("--max-num-seqs", type=int, default=8, help="sequences each worker's engine runs at once")
    ap.add_argument("--kv-overcommit", type=float, default=1.0,
                    help="above 1 the scheduler routes more than fits, so the engines preempt")
    ap.add_argument("--preemption-policy", default="recompute", choices=("recompute", "swap"))
    ap.add_argument("--price-per-hour", type=float, default=3.6,
                    help="$ per (pretend) GPU-hour of a worker: 3.6 makes one GPU-second cost $0.001")
    ap.add_argument("--num-cpus", type=int, default=4)
    ap.add_argument("--num-speculative-tokens", type=int, default=0,
                    help="above 0: speculative decoding with n-gram proposals of this many tokens")
    args = ap.parse_args()

    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
    os.environ.setdefault("RAY_metrics_report_interval_ms", "1000")
    os.environ.setdefault("TRITON_INTERPRET", "1")

    import ray
    from ray import serve

    from gpt2serve import serve_app
    from gpt2serve.engine.tiny_model import build_tiny_checkpoint

    model_dir = Path(args.model_dir or tempfile.mkdtemp(prefix="gpt2-tiny-"))
    if not (model_dir / "config.json").exists():
        build_tiny_checkpoint(model_dir)

    ray.init(address="local", num_cpus=args.num_cpus, include_dashboard=False, log_to_driver=False,
             _metrics_export_port=args.metrics_export_port)
    stop = threading.Event()  # handlers set after ray.init, which installs its own
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    signal.signal(signal.SIGINT, lambda *_: stop.set())
    try:
        serve.start(http_options={"host": "127.0.0.1", "port": args.port})
        quarter = {"ray_actor_options": {"num_cpus": 0.25}}
        app = serve_app.build_app({
            "engine": dict(model=str(model_dir), device="cpu", dtype="float32", num_gpu_blocks=args.num_gpu_blocks,
                           block_size=16, max_num_batched_tokens=256, max_num_seqs=args.max_num_seqs,
                           swap_space_gib=0.05,
                           preemption_policy=args.preemption_policy,
                           speculative={"method": "ngram", "num_speculative_tokens": args.num_speculative_tokens}
                           if args.num_speculative_tokens else None),
            "served_model_name": args.model_name, "max_queued_requests": args.max_queued_requests,
            "kv_overcommit": args.kv_overcommit,
            "heartbeat_interval_s": 0.2, "channel_idle_s": 2.0,
            # A CPU worker holds no GPU and would cost nothing: pretend it holds one, at a round price.
            "cost": {"node_type": "cpu-test", "num_gpus": 1, "gpu_hour_prices": {"cpu-test": args.price_per_hour}},
            # Short graceful shutdowns: SIGTERM should not wait out streams nobody reads any more.
            "ingress": {**quarter, "graceful_shutdown_timeout_s": 5}, "scheduler": quarter,
            "worker": {**quarter, "num_replicas": args.workers, "graceful_shutdown_timeout_s": 5},
        })
        serve.run(app, name="gpt2-telemetry", route_prefix="/")
        url = f"http://127.0.0.1:{args.port}"
        deadline = time.monotonic() + 120
        while True:
            try:
                health = json.load(urllib.request.urlopen(f"{url}/health", timeout=5))
                if health.get("workers") == args.workers:
                    break
            except OSError:
                pass
            if time.monotonic() > deadline:
                raise SystemExit("the service did not become healthy within 120 s")
            time.sleep(0.2)
        print("READY " + json.dumps({"url": url, "ray_metrics_port": args.metrics_export_port,
                                     "model": args.model_name, "model_dir": str(model_dir),
                                     "price_per_gpu_hour": args.price_per_hour, "workers": args.workers,
                                     "gcs_address": ray.get_runtime_context().gcs_address}),
              flush=True)
        while not stop.wait(1.0):
            pass
    finally:
        try:
            serve.shutdown()
        finally:
            ray.shutdown()


if __name__ == "__main__":
    main()
