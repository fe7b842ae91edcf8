"""Worker replicas spread over a simulated two-node Ray cluster, scaled up under load and back down.

Run by ``test_two_node_autoscaling.py`` as a subprocess (``python tests/cluster/two_node_scenario.py
[MODEL_DIR]``), so that its Ray cluster is not the pytest process's own Ray instance (tests/serve/conftest.py).
Prints one line ``SCENARIO_RESULT {json}`` with what it observed; the test asserts on it. Runs standalone too.
Ray's temp tree goes under a private ``RAY_TMPDIR`` (kept on failure, for the logs), so that nothing else on the
machine connects to this cluster by accident.

The cluster: a head node and a second node on this machine, each offering ``{"model_slot": 1}``. A
``ModelWorker`` replica asks for one ``model_slot``, so at most one replica fits on a node and two replicas are
necessarily on two nodes. Other replicas (ingress, scheduler) take a quarter CPU wherever they fit. Serve's HTTP
proxy runs on the head node only (two nodes of one machine cannot both bind its port).

Phases:
1. deploy with worker autoscaling 1..2; one worker registers with the scheduler;
2. load: ``LOAD_CLIENTS`` clients loop long streaming requests, until the scheduler routes to two workers and
   both have started requests (the second worker is on the second node, reached over Ray);
3. the heavy clients stop; one client keeps sending short streaming requests while Serve takes a replica away
   (the drain under traffic), until one worker is left and the removed replica's actor is dead;
4. the trickle stops; the service goes idle (every KV block free); a few more requests are served.
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import sys
import tempfile
import time
import traceback
from pathlib import Path
from typing import Any

os.environ.setdefault("RAY_AUTH_MODE", "disabled")  # read by every Ray process started below
os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")  # bind to 127.0.0.1

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))

from tests.conftest import engine_config, free_port, wait_for  # noqa: E402  (also sets TRITON_INTERPRET on CPU machines)

APP = "gpt2-cluster"
MODEL = "tiny-cluster"
WORKER = "ModelWorker"
SLOT = "model_slot"
RESULT_PREFIX = "SCENARIO_RESULT "
# As tests/serve (conftest ENGINE_OVERRIDES) with 4 sequences per worker, as test_autoscaling.py.
ENGINE_OVERRIDES = dict(num_gpu_blocks=256, max_num_seqs=4, max_num_batched_tokens=256)
AUTOSCALING = {"min_replicas": 1, "max_replicas": 2, "target_ongoing_requests": 2, "upscale_delay_s": 0.5,
               "downscale_delay_s": 2, "metrics_interval_s": 0.5, "look_back_period_s": 2}
LOAD_CLIENTS = 10  # engine load 10 against a target of 2 per replica: asks for 5, capped at 2
LOAD_TOKENS = 300
TRICKLE_TOKENS = 32  # one client: load 1 against a target of 2: one replica is enough
AFTER_TOKENS = 8
PROMPT = "def main("


class Observer:
    """The driver's view of the app: the scheduler's snapshot, pinned worker stats, and the GCS actor table."""

    def __init__(self):
        from ray import serve

        self.scheduler = serve.get_deployment_handle("Scheduler", app_name=APP)
        self.worker = serve.get_deployment_handle(WORKER, app_name=APP)

    def snapshot(self) -> dict[str, Any]:
        return self.scheduler.snapshot.remote().result(timeout_s=30)

    def workers(self) -> set[str]:
        return set(self.snapshot()["workers"])

    def stats(self, worker_id: str) -> dict[str, Any]:
        return self.worker.stats.remote(replica=worker_id).result(timeout_s=30)

    @staticmethod
    def replica_actors() -> dict[str, dict[str, str]]:
        """Every worker replica actor Ray knows of, alive or dead, by replica unique id: its node and state.
        (The GCS actor table, read directly: ``ray.util.state`` would need the dashboard, which is off.)"""
        import ray

        prefix = f"SERVE_REPLICA::{APP}#{WORKER}#"
        out = {}
        for actor in ray._private.state.actors().values():
            if actor["Name"].startswith(prefix):
                out[actor["Name"][len(prefix):]] = {"node": actor["Address"]["NodeID"], "state": actor["State"],
                                                    "pid": actor["Pid"]}
        return out

    @staticmethod
    def serve_replica_states() -> dict[str, int]:
        from ray import serve

        status = serve.status().applications[APP].deployments[WORKER]
        return {str(getattr(k, "value", k)): v for k, v in status.replica_states.items()}


async def stream_completion(client, url: str, max_tokens: int) -> dict[str, Any]:
    """One streaming completion, reduced to what the test checks."""
    body = {"model": MODEL, "prompt": PROMPT, "max_tokens": max_tokens, "temperature": 0, "ignore_eos": True,
            "stream": True, "stream_options": {"include_usage": True}}
    started = time.monotonic()
    outcome: dict[str, Any] = {"status": None, "tokens": None, "finish": None, "done": False, "error": None}
    try:
        async with client.stream("POST", url, json=body) as r:
            outcome["status"] = r.status_code
            if r.status_code != 200:
                outcome["error"] = (await r.aread()).decode(errors="replace")[:300]
                return outcome
            async for line in r.aiter_lines():
                if not line.startswith("data: "):
                    continue
                payload = line[len("data: "):]
                if payload == "[DONE]":
                    outcome["done"] = True
                    continue
                event = json.loads(payload)
                if "error" in event:
                    outcome["error"] = str(event["error"])[:300]
                for choice in event.get("choices") or []:
                    if choice.get("finish_reason") is not None:
                        outcome["finish"] = choice["finish_reason"]
                if event.get("usage"):
                    outcome["tokens"] = event["usage"]["completion_tokens"]
    except Exception as e:  # noqa: BLE001 - a transport failure is a failed request, recorded as such
        outcome["error"] = f"{type(e).__name__}: {e}"[:300]
    outcome["wall_s"] = round(time.monotonic() - started, 2)
    return outcome


async def drive(obs: Observer, url: str, result: dict[str, Any], t0: float) -> None:
    import httpx

    load_results: list[dict] = result["load_results"]
    trickle_results: list[dict] = result["trickle_results"]
    stop_load, stop_trickle = asyncio.Event(), asyncio.Event()

    async def looping(client, stop: asyncio.Event, sink: list, max_tokens: int, tag: str) -> None:
        while not stop.is_set():
            outcome = await stream_completion(client, url, max_tokens)
            outcome["t_end_s"] = round(time.monotonic() - t0, 2)
            sink.append(outcome)
            if outcome["error"] is not None:
                print(f"[{tag}] failed request: {outcome}", file=sys.stderr, flush=True)

    async def until(predicate, timeout_s: float, what: str):
        deadline = time.monotonic() + timeout_s
        while True:
            value = await asyncio.to_thread(predicate)
            if value:
                return value
            if time.monotonic() > deadline:
                raise TimeoutError(f"timed out after {timeout_s} s waiting for {what}")
            await asyncio.sleep(0.25)

    limits = httpx.Limits(max_connections=LOAD_CLIENTS + 4)
    async with httpx.AsyncClient(timeout=120, limits=limits) as client:
        heavy = [asyncio.create_task(looping(client, stop_load, load_results, LOAD_TOKENS, "load"))
                 for _ in range(LOAD_CLIENTS)]
        trickle = None
        try:
            # Phase 2: two workers registered, both serving (so the one on the second node reaches the
            # scheduler with heartbeats and gets requests routed to it through its pinned handle).
            def both_serving():
                workers = obs.workers()
                if len(workers) < 2:
                    return None
                stats = {w: obs.stats(w) for w in workers}
                return stats if all(s["requests_started"] > 0 for s in stats.values()) else None

            def two_workers():
                workers = obs.workers()
                return workers if len(workers) >= 2 else None

            two = await until(two_workers, 120, "a second worker to register")
            result["t_two_workers_s"] = round(time.monotonic() - t0, 2)
            peak_stats = await until(both_serving, 60, "both workers to start requests")
            actors = await asyncio.to_thread(obs.replica_actors)
            result["peak"] = {
                "workers": sorted(two),
                "nodes": {w: actors.get(w, {}).get("node") for w in peak_stats},
                "requests_started": {w: s["requests_started"] for w, s in peak_stats.items()},
                "serve_replica_states": await asyncio.to_thread(obs.serve_replica_states),
                "snapshot_workers": sorted((await asyncio.to_thread(obs.snapshot))["workers"]),
            }
            # Phase 3: the heavy load ends; one client keeps going while a replica is taken away.
            trickle = asyncio.create_task(looping(client, stop_trickle, trickle_results, TRICKLE_TOKENS,
                                                  "trickle"))
            stop_load.set()
            await asyncio.gather(*heavy)
            result["t_load_stopped_s"] = round(time.monotonic() - t0, 2)
            peak = set(result["peak"]["workers"])

            def scaled_down():
                workers = obs.workers()
                if len(workers) != 1:
                    return None
                actors = obs.replica_actors()
                removed = peak - workers
                if any(actors.get(w, {}).get("state") != "DEAD" for w in removed):
                    return None  # still draining
                return workers, actors

            remaining, actors = await until(scaled_down, 120, "scale-down to one worker")
            result["t_scaled_down_s"] = round(time.monotonic() - t0, 2)
            result["trickle_during_scale_down"] = len(trickle_results)
            removed = sorted(peak - remaining)
            result["final"] = {
                "workers": sorted(remaining),
                "nodes": {w: actors.get(w, {}).get("node") for w in remaining},
                "removed": removed,
                "removed_actors": {w: actors.get(w) for w in removed},
                "serve_replica_states": await asyncio.to_thread(obs.serve_replica_states),
            }
        finally:
            stop_load.set()
            stop_trickle.set()
            await asyncio.gather(*heavy, *([trickle] if trickle else []), return_exceptions=True)

        # Phase 4: idle again. Releases are fire-and-forget: wait until they have all landed.
        def idle():
            snap = obs.snapshot()
            stats = {w: obs.stats(w) for w in snap["workers"]}
            quiet = (all(s["num_free_blocks"] == s["num_total_blocks"] and not s["active_request_ids"]
                         for s in stats.values()) and snap["num_assigned"] == 0 and snap["num_waiting"] == 0)
            return (snap, stats) if quiet else None

        try:
            snap, stats = await until(idle, 30, "the service to go idle")
            result["idle"] = True
        except TimeoutError:
            result["idle"] = False
            snap = await asyncio.to_thread(obs.snapshot)
            stats = {w: await asyncio.to_thread(obs.stats, w) for w in snap["workers"]}
        result["idle_snapshot"] = {k: snap[k] for k in ("num_waiting", "num_assigned", "routable", "counters")}
        result["idle_snapshot"]["workers"] = sorted(snap["workers"])
        result["idle_stats"] = {w: {k: s[k] for k in ("num_free_blocks", "num_total_blocks", "active_request_ids",
                                                      "requests_started", "requests_finished",
                                                      "requests_cancelled", "requests_misrouted", "num_channels")}
                                for w, s in stats.items()}
        result["after_results"] = [await stream_completion(client, url, AFTER_TOKENS) for _ in range(3)]


def scenario(model_dir: Path, result: dict[str, Any]) -> None:
    import ray
    from ray import serve
    from ray.cluster_utils import Cluster

    from gpt2serve import serve_app

    t0 = time.monotonic()
    cluster = Cluster(initialize_head=True, head_node_args={
        "num_cpus": 1, "resources": {SLOT: 1}, "include_dashboard": False, "node_ip_address": "127.0.0.1"})
    try:
        second = cluster.add_node(num_cpus=1, resources={SLOT: 1}, node_ip_address="127.0.0.1")
        cluster.wait_for_nodes()
        result["nodes"] = {"head": cluster.head_node.node_id, "second": second.node_id}
        ray.init(address=cluster.address, log_to_driver=False)
        result["ray_nodes"] = {n["NodeID"]: n["Resources"].get(SLOT) for n in ray.nodes() if n["Alive"]}
        port = free_port()
        serve.start(proxy_location="HeadOnly", http_options={"host": "127.0.0.1", "port": port})
        quarter = {"ray_actor_options": {"num_cpus": 0.25}}
        engine = engine_config(model_dir, **ENGINE_OVERRIDES).model_dump(mode="json")
        serve.run(serve_app.build_app({
            "engine": engine, "served_model_name": MODEL, "heartbeat_interval_s": 0.2, "channel_idle_s": 1.0,
            "ingress": quarter, "scheduler": quarter,
            "worker": {"ray_actor_options": {"num_cpus": 0.25, "resources": {SLOT: 1}},
                       "health_check_period_s": 1, "graceful_shutdown_timeout_s": 30,
                       "autoscaling_config": AUTOSCALING},
        }), name=APP, route_prefix="/")
        result["t_deployed_s"] = round(time.monotonic() - t0, 2)
        obs = Observer()
        first = wait_for(obs.workers, 60, "the first worker to register")
        actors = obs.replica_actors()
        result["first"] = {"workers": sorted(first), "nodes": {w: actors.get(w, {}).get("node") for w in first},
                           "serve_replica_states": obs.serve_replica_states()}
        asyncio.run(drive(obs, f"http://127.0.0.1:{port}/v1/completions", result, t0))
        result["t_total_s"] = round(time.monotonic() - t0, 2)
    finally:
        try:
            serve.shutdown()
        finally:
            ray.shutdown()
            cluster.shutdown()


def main() -> int:
    # Ray's whole temp tree (sessions, sockets, and the ``ray_current_cluster`` file that a plain ``ray.init()``
    # or ``serve run`` on this machine would follow into our cluster) goes to a private directory.
    ray_tmp = tempfile.mkdtemp(prefix="raycl-", dir="/tmp")  # short: Unix socket paths must stay < 108 bytes
    os.environ["RAY_TMPDIR"] = ray_tmp
    result: dict[str, Any] = {"ray_tmpdir": ray_tmp, "load_results": [], "trickle_results": [], "error": None,
                              "config": {"load_clients": LOAD_CLIENTS, "load_tokens": LOAD_TOKENS,
                                         "trickle_tokens": TRICKLE_TOKENS, "after_tokens": AFTER_TOKENS,
                                         "autoscaling": AUTOSCALING}}
    try:
        if len(sys.argv) > 1:
            scenario(Path(sys.argv[1]), result)
        else:
            from gpt2serve.engine.tiny_model import build_tiny_checkpoint

            with tempfile.TemporaryDirectory() as tmp:
                scenario(build_tiny_checkpoint(Path(tmp) / "gpt2-tiny"), result)
    except BaseException:  # noqa: BLE001 - whatever happened, the test gets the partial result and the reason
        result["error"] = traceback.format_exc()
    if result["error"] is None:
        shutil.rmtree(ray_tmp, ignore_errors=True)  # kept on failure: the Ray logs are under it
    print(RESULT_PREFIX + json.dumps(result), flush=True)
    return 0 if result["error"] is None else 1


if __name__ == "__main__":
    sys.exit(main())
