"""The scheduler deployment's logic without Ray: global queue order, admission, routing, worker bookkeeping."""

import pytest

from gpt2serve.actors.admission import Dispatcher, QueueFullError, RequestTooLargeError
from gpt2serve.actors.protocol import QueuedRequest
from gpt2serve.actors.routing import ROUTING_POLICIES, LeastLoadedPolicy
from gpt2serve.policies.scheduling import SCHEDULING_POLICIES


class Clock:
    def __init__(self):
        self.t = 1000.0

    def __call__(self):
        return self.t


def make(policy="fcfs", max_queued=8, clock=None, routing=None, **kw) -> Dispatcher:
    return Dispatcher(SCHEDULING_POLICIES.build(policy), routing or LeastLoadedPolicy(), max_queued_requests=max_queued,
                      clock=clock or Clock(), **kw)


def info(blocks=100, free=None, seqs=4, active=(), block_size=16):
    return {"block_size": block_size, "num_total_blocks": blocks, "num_free_blocks": blocks if free is None else free,
            "max_num_seqs": seqs, "active_request_ids": list(active)}


def req(rid, prompt=16, new=16, n=1, priority=0, t=None):
    r = QueuedRequest(rid, prompt, new, n=n, priority=priority)
    if t is not None:
        r.arrival_time = t
    return r


def ids(placed):
    return [(r.request_id, w) for r, w in placed]


def test_requests_wait_until_a_worker_registers():
    d = make()
    assert d.submit(req("a")) == []
    assert [r.request_id for r in d.waiting] == ["a"]
    assert ids(d.heartbeat("w1", info())) == [("a", "w1")]
    assert d.assigned == {"a": "w1"} and not d.waiting


def test_least_loaded_by_tokens_in_flight_then_free_blocks():
    d = make()
    d.heartbeat("w1", info(free=90))
    d.heartbeat("w2", info(free=100))
    # Equal load (nothing in flight): more free blocks wins.
    assert ids(d.submit(req("big", prompt=200, new=100))) == [("big", "w2")]
    # w2 now holds 300 tokens: the next goes to w1 even though w2 reported more free blocks.
    assert ids(d.submit(req("small", prompt=10, new=10))) == [("small", "w1")]
    assert ids(d.submit(req("next", prompt=10, new=10))) == [("next", "w1")]  # 20 < 300
    assert d.workers["w1"].load_tokens == 40 and d.workers["w2"].load_tokens == 300


def test_sequence_slots_and_kv_reservations_gate_admission():
    d = make(max_queued=10)
    d.heartbeat("w1", info(blocks=10, seqs=2))
    # 16 + 16 - 1 tokens -> 2 blocks each (block_size 16).
    assert ids(d.submit(req("a"))) == [("a", "w1")]
    assert ids(d.submit(req("b"))) == [("b", "w1")]
    assert d.submit(req("c")) == []  # both sequence slots taken
    assert ids(d.release("a")) == [("c", "w1")]
    d.release("b")
    d.release("c")
    # n=2 takes two sequence slots (and 2 x 2 blocks): nothing else fits beside it.
    assert ids(d.submit(req("pair", n=2))) == [("pair", "w1")]
    assert d.submit(req("d")) == []
    assert d.workers["w1"].reserved_blocks == 4 and d.workers["w1"].inflight_seqs == 2


def test_kv_budget_counts_whole_output_budget():
    d = make()
    d.heartbeat("w1", info(blocks=10, seqs=8))
    assert ids(d.submit(req("a", prompt=64, new=64))) == [("a", "w1")]  # 127 tokens -> 8 blocks
    assert d.submit(req("b", prompt=16, new=32)) == []  # 3 more blocks would overdraw 10
    assert ids(d.release("a")) == [("b", "w1")]


def test_kv_overcommit_admits_beyond_the_pool():
    d = make(kv_overcommit=2.0)
    d.heartbeat("w1", info(blocks=10, seqs=8))
    assert ids(d.submit(req("a", prompt=64, new=64))) == [("a", "w1")]
    assert ids(d.submit(req("b", prompt=64, new=64))) == [("b", "w1")]  # 16 blocks of 20 allowed


def test_fcfs_order_and_head_of_line_blocking():
    clock = Clock()
    d = make(clock=clock)
    d.heartbeat("w1", info(blocks=10, seqs=8))
    assert ids(d.submit(req("hog", prompt=64, new=64))) == [("hog", "w1")]
    d.submit(req("big", prompt=32, new=32, t=1.0))  # 4 blocks: does not fit next to hog (8 of 10)
    d.submit(req("tiny", prompt=4, new=4, t=2.0))  # would fit, but must not pass "big"
    assert [r.request_id for r in d.waiting] == ["big", "tiny"]
    assert ids(d.release("hog")) == [("big", "w1"), ("tiny", "w1")]


def test_priority_policy_orders_the_global_queue():
    d = make(policy="priority")
    d.submit(req("low", priority=5, t=1.0))
    d.submit(req("high", priority=-1, t=2.0))
    d.submit(req("mid", priority=0, t=3.0))
    assert ids(d.heartbeat("w1", info(seqs=1))) == [("high", "w1")]
    assert ids(d.release("high")) == [("mid", "w1")]
    assert ids(d.release("mid")) == [("low", "w1")]


def test_queue_full_rejects_with_retry_after():
    d = make(max_queued=2, min_retry_after_s=1.0)
    d.heartbeat("w1", info(seqs=1))
    d.submit(req("run"))
    d.submit(req("q1"))
    d.submit(req("q2"))
    with pytest.raises(QueueFullError) as e:
        d.submit(req("q3"))
    assert e.value.retry_after_s == 1.0  # nothing has finished yet: the floor
    assert [r.request_id for r in d.waiting] == ["q1", "q2"] and d.counters["rejected_queue_full"] == 1


def test_retry_after_is_the_time_to_drain_the_queue_at_the_recent_rate():
    clock = Clock()
    d = make(max_queued=100, clock=clock)
    d.heartbeat("w1", info(seqs=1))
    for i in range(5):  # one request finishes every 2 s: 0.5 requests/s
        d.submit(req(f"r{i}"))
        clock.t += 2
        d.release(f"r{i}")
    d.submit(req("running"))
    for i in range(6):
        d.submit(req(f"w{i}"))
    assert len(d.waiting) == 6
    assert d.retry_after_s() == 12  # 6 waiting / 0.5 per second
    clock.t += 60  # the rate is measured over the last 10 s only
    assert d.retry_after_s() == 1.0


def test_zero_queue_means_no_waiting_at_all():
    d = make(max_queued=0)
    d.heartbeat("w1", info(seqs=1))
    d.submit(req("a"))
    with pytest.raises(QueueFullError):
        d.submit(req("b"))


def test_request_no_worker_could_ever_hold_is_refused_not_queued():
    d = make()
    d.heartbeat("w1", info(blocks=4, seqs=2))
    with pytest.raises(RequestTooLargeError):
        d.submit(req("huge", prompt=100, new=100))
    with pytest.raises(RequestTooLargeError):
        d.submit(req("wide", n=3))
    assert not d.waiting


def test_cancel_waiting_and_cancel_routed():
    d = make()
    d.heartbeat("w1", info(seqs=1))
    d.submit(req("a"))
    d.submit(req("b"))
    assert d.cancel("b") == [] and not d.waiting
    d.submit(req("c"))
    assert ids(d.cancel("a")) == [("c", "w1")]  # releasing a's slot routes c


def test_release_is_idempotent_and_unknown_ids_are_ignored():
    d = make()
    d.heartbeat("w1", info())
    d.submit(req("a"))
    d.release("a")
    assert d.release("a") == [] and d.release("nope") == []
    assert d.workers["w1"].inflight == {}


def test_worker_failure_reported_by_ingress_drops_the_worker():
    d = make()
    d.heartbeat("w1", info())
    d.heartbeat("w2", info())
    d.submit(req("a"))
    dead = d.assigned["a"]
    d.submit(req("b"))
    d.release("a", worker_failed=True)
    assert dead not in d.workers and set(d.assigned.values()) <= set(d.workers)
    assert ids(d.submit(req("c")))[0][1] != dead


def test_silent_workers_expire_and_new_ones_take_over():
    clock = Clock()
    d = make(clock=clock, worker_timeout_s=5)
    d.heartbeat("w1", info(seqs=1))
    d.submit(req("a"))
    d.submit(req("b"))
    clock.t += 6
    assert d.expire() == ["w1"]
    assert "a" not in d.assigned and [r.request_id for r in d.waiting] == ["b"]
    assert ids(d.heartbeat("w2", info(seqs=1))) == [("b", "w2")]


def test_heartbeats_keep_workers_alive_and_expire_lost_leases():
    clock = Clock()
    d = make(clock=clock, worker_timeout_s=5, lease_grace_s=10)
    d.heartbeat("w1", info())
    d.submit(req("held"))
    d.submit(req("lost"))  # its ingress died before calling the worker or releasing
    for _ in range(4):
        clock.t += 4
        d.heartbeat("w1", info(active=["held"]))
    assert d.expire() == []
    assert set(d.assigned) == {"held"}
    assert d.counters["leases_expired"] == 1


def test_requests_waiting_past_the_queue_timeout_leave_the_queue():
    clock = Clock()
    d = make(clock=clock, queue_timeout_s=10)
    d.heartbeat("w1", info(seqs=1))
    for rid in ("running", "old"):  # one slot: "old" waits from now
        d.submit(req(rid))
    clock.t += 6
    d.submit(req("young"))
    assert d.expire_waiting() == []
    clock.t += 5  # "old" has waited 11 s, "young" 5 s
    assert [r.request_id for r in d.expire_waiting()] == ["old"]
    assert [r.request_id for r in d.waiting] == ["young"] and d.counters["rejected_queue_timeout"] == 1
    assert ids(d.release("running")) == [("young", "w1")]
    assert make(clock=clock).expire_waiting() == []  # no timeout configured: nothing expires


def test_a_restarted_scheduler_adopts_what_workers_hold_and_does_not_over_admit():
    """A new dispatcher (the scheduler replica was replaced) meets workers that are busy: their first heartbeats
    name the requests they hold, with sizes, and those are reserved before anything new is routed."""
    d = make(max_queued=8)
    busy = info(blocks=10, seqs=4, active=["old1", "old2"])
    # Two requests of 16 prompt + 16 new tokens: 2 blocks each, one of them n=2 (two slots, 4 blocks).
    busy["held_requests"] = {"old1": [16, 16, 1], "old2": [16, 16, 2]}
    assert d.submit(req("new1")) == []  # no worker known yet: it waits
    assert ids(d.heartbeat("w1", busy)) == [("new1", "w1")]  # 3 + 1 slots of 4, 6 + 2 blocks of 10
    assert d.counters["adopted"] == 2 and d.assigned == {"old1": "w1", "old2": "w1", "new1": "w1"}
    assert d.workers["w1"].inflight_seqs == 4 and d.workers["w1"].reserved_blocks == 8
    assert d.submit(req("new2")) == []  # every slot is taken, as on the worker itself
    assert "held_requests" not in d.workers["w1"].stats
    # Later heartbeats adopt nothing more (a release may have overtaken a report); their ingress's release
    # reaches the new scheduler, or the worker stops listing them.
    assert ids(d.release("old1")) == [("new2", "w1")]
    assert d.heartbeat("w1", {**busy, "active_request_ids": ["new1", "new2"]}) == []
    assert set(d.assigned) == {"new1", "new2"} and d.counters["adopted"] == 2


def test_a_worker_reporting_itself_unhealthy_gets_no_new_request():
    d = make()
    d.heartbeat("sick", info())
    d.heartbeat("well", info(free=1))  # fewer free blocks: only chosen when "sick" cannot be
    d.heartbeat("sick", {**info(), "unhealthy": "3 engine steps failed in a row"})
    assert [w for _, w in ids(d.submit(req("a"))) + ids(d.submit(req("b")))] == ["well", "well"]
    d.heartbeat("sick", info())  # the dispatcher goes by each heartbeat's word (a worker's verdict latches)
    assert ids(d.submit(req("c"))) == [("c", "sick")]


def test_affinity_hook_outranks_load_within_the_imbalance_limit():
    class PrefixAffinity(LeastLoadedPolicy):
        def affinity(self, req, worker, now):
            return int(worker.worker_id == "cached")

    d = make(routing=PrefixAffinity(max_imbalance_tokens=100))
    d.heartbeat("cached", info())
    d.heartbeat("other", info())
    assert ids(d.submit(req("a", prompt=40, new=10))) == [("a", "cached")]
    assert ids(d.submit(req("b", prompt=40, new=10))) == [("b", "cached")]  # 50 tokens more: still within 100
    assert ids(d.submit(req("c", prompt=40, new=10))) == [("c", "cached")]  # 100: still within
    assert ids(d.submit(req("d", prompt=40, new=10))) == [("d", "other")]  # 150 > 100: load wins


def test_routing_registry():
    assert isinstance(ROUTING_POLICIES.build("least_loaded"), LeastLoadedPolicy)
    with pytest.raises(ValueError, match="least_loaded"):
        ROUTING_POLICIES.build("round_robin")


def test_snapshot_reports_queue_and_workers():
    d = make()
    d.heartbeat("w1", info(seqs=1, active=["x"]))
    d.submit(req("a"))
    d.submit(req("b"))
    snap = d.snapshot()
    assert snap["num_waiting"] == 1 and snap["num_assigned"] == 1
    w = snap["workers"]["w1"]
    assert w["inflight"] == 1 and w["load_tokens"] == 32 and "active_request_ids" not in w["stats"]


def test_reservations_follow_how_long_requests_really_run():
    """Requests that stop early (EOS, stop strings, clients leaving) teach admission to reserve less than
    max_tokens: more of them run at once. Until enough have ended, max_tokens is reserved."""
    d = make(reserve_output="p90", max_queued=64)
    d.heartbeat("w1", info(blocks=40, seqs=64))  # 640 tokens of KV
    # prompt 16 + max_tokens 304: 20 blocks each, so two at a time while nothing is known
    placed = [w for i in range(3) for _, w in d.submit(req(f"cold{i}", prompt=16, new=304))]
    assert placed == ["w1", "w1"] and len(d.waiting) == 1
    for i in range(2):
        d.release(f"cold{i}", output_tokens_per_seq=40)
    d.release("cold2", output_tokens_per_seq=40)  # admitted by the releases above, and ended too
    for i in range(29):  # 32 requests ended in all: the estimate exists
        d.submit(req(f"warm{i}", prompt=16, new=304))
        d.release(f"warm{i}", output_tokens_per_seq=8 + i)
    assert d.output_lengths.estimate() == 36  # the 29th of 32 sorted lengths
    # Now each reserves 16 + 36 tokens (4 blocks): ten run at once on the same pool.
    placed = [w for i in range(12) for _, w in d.submit(req(f"hot{i}", prompt=16, new=304))]
    assert len(placed) == 10 and len(d.waiting) == 2
    assert all(r.reserve_new_tokens == 36 for r in d.waiting)
    # A request asking for less than the estimate reserves only what it asks for.
    short = req("short", prompt=16, new=8)
    d.submit(short)
    assert short.reserve_new_tokens == 8
    # "Never fits" is still judged on max_tokens: the pool could not hold this one to its end.
    with pytest.raises(RequestTooLargeError):
        d.submit(req("huge", prompt=16, new=700))


def test_worker_failures_and_requests_with_no_token_teach_nothing():
    d = make(reserve_output="mean")
    d.heartbeat("w1", info(blocks=100, seqs=8))
    for i in range(40):
        d.submit(req(f"r{i}"))
        d.release(f"r{i}", worker_failed=(i % 2 == 0), output_tokens_per_seq=5)
        if i % 2 == 0:
            d.heartbeat("w1", info(blocks=100, seqs=8))  # the failed worker comes back
    d.submit(req("none"))
    d.release("none", output_tokens_per_seq=0)
    assert len(d.output_lengths.recent) == 20 and d.output_lengths.estimate() is None  # fewer than 32 samples


def test_the_mean_is_reserved_by_default_and_statistics_are_checked():
    from gpt2serve.actors.admission import OutputLengths
    from gpt2serve.actors.settings import ServiceConfig

    assert ServiceConfig().kv_reserve_output == "mean"
    lengths = OutputLengths("mean", min_samples=4)
    for n in (10, 20, 30, 41):
        lengths.observe(n)
    assert lengths.estimate() == 26 and lengths.reserve_for(512) == 26 and lengths.reserve_for(5) == 5
    with pytest.raises(ValueError):
        OutputLengths("p200")
    with pytest.raises(ValueError):
        ServiceConfig(kv_reserve_output="median")
