"""Model-worker replicas on a simulated two-node Ray cluster scale up under load and back down.

``two_node_scenario.py`` starts a ``ray.cluster_utils.Cluster`` (a head node and a second node on this
machine, each offering one ``model_slot``; a worker replica needs one), deploys the service with worker
autoscaling 1..2, drives it over HTTP and prints what it saw as JSON. It runs in a subprocess: the rest of the
suite keeps one Ray instance per pytest process (tests/serve/conftest.py), and a second cluster must not be
started inside it. This test asserts on the JSON.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = [pytest.mark.ray, pytest.mark.cluster, pytest.mark.timeout(300)]

SCRIPT = Path(__file__).with_name("two_node_scenario.py")
REPO = SCRIPT.parents[2]
RESULT_PREFIX = "SCENARIO_RESULT "


def complete(outcome: dict, max_tokens: int) -> bool:
    return (outcome["status"] == 200 and outcome["error"] is None and outcome["done"]
            and outcome["tokens"] == max_tokens and outcome["finish"] == "length")


@pytest.fixture(scope="module")
def scenario(tiny_model_dir) -> dict:
    env = {**os.environ, "RAY_AUTH_MODE": "disabled", "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0"}
    env.pop("RAY_ADDRESS", None)  # the scenario starts its own cluster, never joins another one
    env.pop("RAY_SERVE_ENABLE_DIRECT_INGRESS", None)  # it talks to Serve's proxy (tests/serve/conftest.py sets it)
    proc = subprocess.run([sys.executable, str(SCRIPT), str(tiny_model_dir)], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=280)
    lines = [line for line in proc.stdout.splitlines() if line.startswith(RESULT_PREFIX)]
    assert lines, f"no result from the scenario (rc {proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}"
    result = json.loads(lines[-1][len(RESULT_PREFIX):])
    assert result["error"] is None, (f"scenario failed (Ray logs under {result['ray_tmpdir']}):\n"
                                     f"{result['error']}\n{proc.stderr[-5000:]}")
    assert proc.returncode == 0, proc.stderr[-5000:]
    return result


def test_worker_replicas_spread_over_two_nodes_under_load(scenario):
    head, second = scenario["nodes"]["head"], scenario["nodes"]["second"]
    assert head != second
    assert set(scenario["ray_nodes"]) == {head, second}, "both nodes alive, each with one model slot"
    assert all(slots == 1.0 for slots in scenario["ray_nodes"].values()), scenario["ray_nodes"]

    first = scenario["first"]
    assert len(first["workers"]) == 1 and first["serve_replica_states"] == {"RUNNING": 1}
    assert set(first["nodes"].values()) <= {head, second}

    peak = scenario["peak"]
    assert len(peak["workers"]) == 2 and peak["serve_replica_states"] == {"RUNNING": 2}
    assert set(first["workers"]) < set(peak["workers"]), "the first worker stays; a second one is added"
    assert set(peak["nodes"].values()) == {head, second}, f"the two workers must be on two nodes: {peak}"
    # Both registered with the scheduler (heartbeats from the second node arrive) and both served requests.
    assert set(peak["snapshot_workers"]) == set(peak["workers"])
    assert all(n > 0 for n in peak["requests_started"].values()), peak["requests_started"]

    cfg = scenario["config"]
    load = scenario["load_results"]
    assert len(load) >= cfg["load_clients"]
    failed = [o for o in load if not complete(o, cfg["load_tokens"])]
    assert not failed, f"{len(failed)} of {len(load)} requests under load failed: {failed[:5]}"


def test_scale_down_drains_without_failed_requests_and_frees_kv(scenario):
    cfg = scenario["config"]
    peak, final = scenario["peak"], scenario["final"]
    assert len(final["workers"]) == 1 and final["serve_replica_states"] == {"RUNNING": 1}
    assert set(final["workers"]) < set(peak["workers"])
    (removed,) = final["removed"]
    assert final["removed_actors"][removed]["state"] == "DEAD"
    assert final["removed_actors"][removed]["node"] == peak["nodes"][removed]
    (remaining,) = final["workers"]
    assert final["nodes"][remaining] == peak["nodes"][remaining], "the remaining worker did not move"

    # A client kept sending requests while the replica was taken away: none failed.
    trickle = scenario["trickle_results"]
    assert scenario["trickle_during_scale_down"] >= 1
    failed = [o for o in trickle if not complete(o, cfg["trickle_tokens"])]
    assert not failed, f"{len(failed)} of {len(trickle)} requests during scale-down failed: {failed[:5]}"

    # Idle: the scheduler routes to the remaining worker only and holds nothing; its KV pool is all free.
    assert scenario["idle"], (scenario["idle_snapshot"], scenario["idle_stats"])
    snap = scenario["idle_snapshot"]
    assert snap["workers"] == [remaining] and snap["routable"] == [remaining]
    assert snap["num_waiting"] == 0 and snap["num_assigned"] == 0
    assert snap["counters"]["rejected_queue_full"] == 0 and snap["counters"]["leases_expired"] == 0
    stats = scenario["idle_stats"][remaining]
    assert stats["num_free_blocks"] == stats["num_total_blocks"] > 0
    assert stats["active_request_ids"] == []
    assert stats["requests_started"] == stats["requests_finished"] > 0
    assert stats["requests_cancelled"] == 0
    total = len(scenario["load_results"]) + len(trickle)
    # Every request reached the scheduler (more admits than requests would be transparent retries).
    assert snap["counters"]["admitted"] >= total

    after = scenario["after_results"]
    assert len(after) == 3 and all(complete(o, cfg["after_tokens"]) for o in after), after
