"""Prefix-aware routing without Ray: the policy, each worker's PrefixIndex, and the numbered reports between a
worker's mirror (CacheReport) and the scheduler (Dispatcher.heartbeat), driven by a fake clock."""

import pytest
from prometheus_client.core import CollectorRegistry
from prometheus_client.exposition import generate_latest
from prometheus_client.parser import text_string_to_metric_families

from gpt2serve.actors.admission import Dispatcher
from gpt2serve.actors.metrics import SnapshotCollector
from gpt2serve.actors.prefix_index import CacheReport, PrefixIndex, prompt_hashes
from gpt2serve.actors.protocol import QueuedRequest
from gpt2serve.actors.routing import ROUTING_POLICIES, REASONS, LeastLoadedPolicy, PrefixAwarePolicy
from gpt2serve.actors.settings import ServiceConfig
from gpt2serve.policies.scheduling import SCHEDULING_POLICIES

BS = 16


class Clock:
    def __init__(self):
        self.t = 1000.0

    def __call__(self):
        return self.t


def dispatcher(clock, **policy_args) -> Dispatcher:
    policy = PrefixAwarePolicy(**{"max_imbalance_tokens": 1000, **policy_args})
    return Dispatcher(SCHEDULING_POLICIES.build("fcfs"), policy, max_queued_requests=64, clock=clock)


def info(blocks=1000, seqs=16, **cache):
    return {"block_size": BS, "num_total_blocks": blocks, "num_free_blocks": blocks, "max_num_seqs": seqs,
            "active_request_ids": [], **cache}


def prompt(prefix: int, n_blocks: int, tail: int = 5) -> list[int]:
    """``n_blocks`` full blocks shared by every prompt of the same ``prefix``, then a few unique tokens."""
    return [prefix * 1000 + i for i in range(n_blocks * BS)] + [7] * tail


def req(rid, tokens, new=10) -> QueuedRequest:
    return QueuedRequest(rid, len(tokens), new, prefix_hashes=prompt_hashes(tokens, BS))


def holds(d: Dispatcher, worker: str, hashes, seq=1) -> None:
    """The worker reports (as a snapshot) that its cache holds ``hashes``."""
    d.heartbeat(worker, info(cache_seq=seq, cache_snapshot=list(hashes)))


def route(d: Dispatcher, r: QueuedRequest) -> str:
    ((placed, worker),) = d.submit(r)
    assert placed is r
    return worker


# ---------------------------------------------------------------------- the policy
def test_longest_match_wins():
    d = dispatcher(Clock())
    p = prompt(1, 8)
    h = prompt_hashes(p, BS)
    holds(d, "a", h[:3])
    holds(d, "b", h[:6])
    holds(d, "c", [])
    assert route(d, req("r1", p)) == "b"
    assert d.routing.decisions == {"prefix_match": 1, "load_fallback": 0, "load": 0}
    # Only a's three blocks match a prompt that shares them with p, then diverges (chained hashes).
    other = p[:3 * BS] + [9] * (5 * BS)
    assert route(d, req("r2", other)) == "a"  # a and b both hold its first three blocks; a is less loaded
    assert d.workers["a"].inflight and d.routing.decisions["prefix_match"] == 2


def test_a_match_after_a_missing_block_does_not_count():
    index = PrefixIndex()
    h = prompt_hashes(prompt(1, 6), BS)
    index.report(1, snapshot=[h[0], h[1], h[3], h[4], h[5]])
    assert index.match(h, now=0.0) == 2


def test_load_fallback_past_the_margin():
    clock = Clock()
    d = dispatcher(clock, max_imbalance_tokens=300)
    p = prompt(2, 8)
    holds(d, "hot", prompt_hashes(p, BS))
    holds(d, "cold", [])
    # Each request is 133 prompt + 10 output tokens in flight. The holder takes them while it is at most 300 tokens
    # busier than the other: 0, 143, 286 -> "hot"; at 429 it is too busy, and load decides.
    assert [route(d, req(f"r{i}", p)) for i in range(4)] == ["hot", "hot", "hot", "cold"]
    assert d.routing.decisions == {"prefix_match": 3, "load_fallback": 1, "load": 0}


def test_no_match_anywhere_is_routed_by_load_and_counted_as_load():
    d = dispatcher(Clock())
    holds(d, "a", prompt_hashes(prompt(1, 4), BS))
    holds(d, "b", [])
    d.submit(QueuedRequest("short", 5, 5))  # no full block: no hashes at all
    d.submit(req("new", prompt(3, 4)))
    assert d.routing.decisions == {"prefix_match": 0, "load_fallback": 0, "load": 2}
    assert sum(d.routing.decisions.values()) == d.counters["admitted"]


def test_new_prefixes_spread_to_the_replica_caching_least():
    """Equal load: an unmatched prompt goes where fewer blocks are cached, so distinct prefixes spread out."""
    d = dispatcher(Clock())
    holds(d, "a", prompt_hashes(prompt(1, 4), BS))
    holds(d, "b", [])
    assert route(d, req("x", prompt(5, 4))) == "b"
    d.release("x")
    # b now holds (optimistically) the 4 blocks just routed there; a holds 4: tie on cache size, then the id.
    assert route(d, req("y", prompt(6, 4))) == "a"


def test_least_loaded_counts_every_decision_as_load():
    d = Dispatcher(SCHEDULING_POLICIES.build("fcfs"), LeastLoadedPolicy(), max_queued_requests=8, clock=Clock())
    p = prompt(1, 4)
    holds(d, "a", prompt_hashes(p, BS))
    holds(d, "b", [])
    route(d, req("r1", p))
    route(d, req("r2", p))
    assert d.routing.decisions == {"prefix_match": 0, "load_fallback": 0, "load": 2}
    assert not LeastLoadedPolicy.uses_prefix_hashes and PrefixAwarePolicy.uses_prefix_hashes


def test_registry_and_default():
    assert isinstance(ROUTING_POLICIES.build("prefix_aware", optimistic_ttl_s=5), PrefixAwarePolicy)
    assert ServiceConfig().routing_policy == "prefix_aware"
    assert set(ROUTING_POLICIES.names) >= {"prefix_aware", "least_loaded"}


# ---------------------------------------------------------------------- optimistic entries
def test_a_burst_follows_the_first_request_before_any_event_arrives():
    clock = Clock()
    d = dispatcher(clock)
    holds(d, "a", [])
    holds(d, "b", [])
    p = prompt(4, 8)
    first = route(d, req("first", p))
    # The holder is busier now, by less than the margin: the rest of the burst still follows the first.
    assert {route(d, req(f"burst{i}", p)) for i in range(3)} == {first}
    assert d.routing.decisions["prefix_match"] == 3


def test_optimistic_entries_expire_unless_events_confirm_them():
    clock = Clock()
    d = dispatcher(clock, optimistic_ttl_s=30)
    holds(d, "a", [])
    holds(d, "b", [])
    p, q = prompt(1, 4), prompt(2, 4)
    hp, hq = prompt_hashes(p, BS), prompt_hashes(q, BS)
    wp = route(d, req("p", p))
    wq = route(d, req("q", q))
    assert wp != wq
    d.release("p")
    d.release("q")
    # wp's engine confirms p's blocks; wq's engine never mentions q's (say q was cancelled before its prefill).
    d.heartbeat(wp, info(cache_seq=2, cache_events=[(h, True) for h in hp]))
    d.heartbeat(wq, info(cache_seq=2, cache_events=[]))
    assert d.workers[wp].prefix_index.match(hp, clock.t) == 4 and not d.workers[wp].prefix_index.optimistic
    assert d.workers[wq].prefix_index.match(hq, clock.t) == 4  # still the optimistic guess
    clock.t += 31
    d.heartbeat(wq, info(cache_seq=3, cache_events=[]))
    assert d.workers[wq].prefix_index.match(hq, clock.t) == 0 and not d.workers[wq].prefix_index.optimistic
    assert d.workers[wp].prefix_index.match(hp, clock.t) == 4  # confirmed: no expiry
    route(d, req("p2", p))
    route(d, req("q2", q))
    assert d.routing.decisions == {"prefix_match": 1, "load_fallback": 0, "load": 3}


def test_an_eviction_event_contradicts_an_optimistic_entry_and_a_renewal_outlives_the_first():
    index = PrefixIndex()
    index.report(1, snapshot=[])
    h = prompt_hashes(prompt(1, 3), BS)
    index.assume(h, until=10.0)
    index.assume(h, until=20.0)  # routed again: the later expiry holds
    index.expire(now=15.0)
    assert index.match(h, now=15.0) == 3
    index.report(2, events=[(h[1], False)])
    assert index.match(h, now=15.0) == 1
    index.expire(now=25.0)
    assert index.match(h, now=25.0) == 0 and len(index) == 0


# ---------------------------------------------------------------------- reports
def test_eviction_events_remove_hashes():
    d = dispatcher(Clock())
    h = prompt_hashes(prompt(1, 6), BS)
    holds(d, "a", h)
    d.heartbeat("a", info(cache_seq=2, cache_events=[(h[4], False), (h[5], False), (h[4], True)]))
    index = d.workers["a"].prefix_index
    assert index.confirmed == set(h) - {h[5]}
    assert index.match(h, 0.0) == 5
    d.heartbeat("a", info(cache_seq=3, cache_events=[(h[0], False)]))
    assert index.match(h, 0.0) == 0


def test_a_sequence_gap_asks_for_a_snapshot_once_and_resyncs():
    d = dispatcher(Clock())
    h = prompt_hashes(prompt(1, 6), BS)
    # First contact with events (the scheduler restarted while the worker kept counting): a gap.
    d.heartbeat("a", info(cache_seq=41, cache_events=[(h[0], True)]))
    assert d.needs_cache_snapshot("a") and not d.workers["a"].prefix_index.confirmed
    d.heartbeat("a", info(cache_seq=42, cache_events=[(h[1], True)]))  # still untrusted until the snapshot
    assert d.needs_cache_snapshot("a") and not d.workers["a"].prefix_index.confirmed
    d.heartbeat("a", info(cache_seq=43, cache_snapshot=h[:3]))
    assert not d.needs_cache_snapshot("a") and d.workers["a"].prefix_index.confirmed == set(h[:3])
    d.heartbeat("a", info(cache_seq=44, cache_events=[(h[3], True)]))
    # A lost heartbeat (45) leaves a gap; a late duplicate (44) is ignored, not a gap.
    d.heartbeat("a", info(cache_seq=46, cache_events=[(h[5], True)]))
    assert d.needs_cache_snapshot("a")
    d.heartbeat("a", info(cache_seq=44, cache_events=[(h[0], False)]))
    d.heartbeat("a", info(cache_seq=47, cache_snapshot=h[:6]))
    index = d.workers["a"].prefix_index
    assert index.confirmed == set(h) and index.snapshots == 2 and not d.needs_cache_snapshot("a")
    assert "cache_snapshot" not in d.workers["a"].stats and "cache_events" not in d.workers["a"].stats
    assert not d.needs_cache_snapshot("nobody")


class FakeKV:
    """The engine's side of the contract: events since the last drain, in order."""

    def __init__(self):
        self.events: list[tuple[int, bool]] = []
        self.cached: set[int] = set()

    def cache(self, h):
        self.cached.add(h)
        self.events.append((h, True))

    def evict(self, h):
        self.cached.discard(h)
        self.events.append((h, False))

    def drain_cache_events(self):
        out, self.events = self.events, []
        return out


def test_worker_mirror_and_scheduler_index_agree_through_lost_heartbeats_and_a_scheduler_restart():
    clock = Clock()
    kv, report = FakeKV(), CacheReport()
    d = dispatcher(clock)
    sizes = []

    def beat(delivered=True, to=None):
        fields = report.next(kv.drain_cache_events())
        sizes.append(len(fields.get("cache_events", fields.get("cache_snapshot"))))
        if not delivered:
            return
        target = to or d
        target.heartbeat("w", info(**fields))
        if target.needs_cache_snapshot("w"):  # what Scheduler.heartbeat's reply carries
            report.snapshot_due = True

    h = prompt_hashes(prompt(1, 8), BS)
    beat()  # first contact: a snapshot (empty)
    for x in h[:4]:
        kv.cache(x)
    beat()
    assert d.workers["w"].prefix_index.confirmed == kv.cached
    kv.evict(h[3])
    kv.cache(h[4])
    beat(delivered=False)  # lost on the way
    kv.cache(h[5])
    beat()  # a gap: the reply asks for the snapshot
    assert d.workers["w"].prefix_index.confirmed != kv.cached
    beat()
    assert d.workers["w"].prefix_index.confirmed == kv.cached == report.cached
    restarted = dispatcher(clock)  # a new scheduler replica knows nothing
    kv.cache(h[6])
    beat(to=restarted)
    beat(to=restarted)
    assert restarted.workers["w"].prefix_index.confirmed == kv.cached
    # Events only between snapshots: each report is at most the size of the set.
    assert max(sizes) <= len(kv.cached)


def test_a_report_with_more_events_than_hashes_held_becomes_a_snapshot():
    report = CacheReport()
    assert "cache_snapshot" in report.next([])
    churn = [(h, c) for h in range(100) for c in (True, False)] + [(7, True)]
    fields = report.next(churn)
    assert fields["cache_snapshot"] == [7] and fields["cache_seq"] == 2
    fields = report.next([(8, True)])
    assert fields == {"cache_seq": 3, "cache_events": [(8, True)]}


# ---------------------------------------------------------------------- hashes and reporting
def test_prompt_hashes_cover_full_blocks_and_depend_on_the_adapter():
    tokens = list(range(50))
    base = prompt_hashes(tokens, BS)
    assert len(base) == 3 and base == prompt_hashes(tokens + [1, 2], BS)
    assert prompt_hashes(tokens, BS, lora_id="adapter-1") != base
    assert prompt_hashes(tokens, BS, lora_id=None) == base
    assert prompt_hashes(tokens[:15], BS) == ()


def test_snapshot_and_metrics_carry_the_decisions():
    d = dispatcher(Clock())
    h = prompt_hashes(prompt(1, 4), BS)
    holds(d, "a", h)
    route(d, req("r", prompt(1, 4)))
    snap = d.snapshot()
    assert snap["routing"] == {"policy": "prefix_aware", "decisions": {"prefix_match": 1, "load_fallback": 0,
                                                                       "load": 0}}
    assert snap["workers"]["a"]["cached_blocks"] == 4 and snap["workers"]["a"]["cache_snapshots"] == 1
    registry = CollectorRegistry()
    registry.register(SnapshotCollector(snap, model_name="m"))
    samples = [s for fam in text_string_to_metric_families(generate_latest(registry).decode()) for s in fam.samples]
    decisions = {s.labels["reason"]: s.value for s in samples if s.name == "gpt2serve:router_decisions_total"}
    assert decisions == {reason: float(reason == "prefix_match") for reason in REASONS}
    assert all(s.labels["replica"] == "scheduler" and s.labels["model_name"] == "m" for s in samples
               if s.name == "gpt2serve:router_decisions_total")
    assert [(s.labels, s.value) for s in samples if s.name == "gpt2serve:router_cached_blocks"] == [
        ({"worker": "a"}, 4.0)]


@pytest.mark.parametrize("stale", [0, 1])
def test_stale_snapshots_are_ignored(stale):
    index = PrefixIndex()
    index.report(5, snapshot=[1, 2])
    index.report(5 - stale, snapshot=[9])
    assert index.confirmed == {1, 2}


def test_the_ingress_sends_block_hashes_only_when_routing_reads_them():
    import asyncio

    from gpt2serve.actors.protocol import LoRARef
    from gpt2serve.actors.streams import Streams
    from tests.serve.test_streams import FakeScheduler, FakeWorker, params, settle

    async def admitted(hash_block_size, lora=None):
        scheduler, worker = FakeScheduler(["w1"]), FakeWorker()
        seen = []
        admit = scheduler.admit.fn
        scheduler.admit.fn = lambda r: (seen.append(r), admit(r))[1]
        streams = Streams(scheduler, worker, max_model_len=512, hash_block_size=hash_block_size)
        tokens = prompt(1, 3)
        start = asyncio.create_task(streams.start_all("r", [tokens], params(), 0, lora))
        await settle()
        ((rid, _),) = worker.submitted
        worker.emit(rid, "x", finished=True)
        await start
        return seen[0].prefix_hashes, tokens

    hashes, tokens = asyncio.run(admitted(BS))
    assert hashes == prompt_hashes(tokens, BS) and len(hashes) == 3
    # An adapter's prompts hash under its load's uid, as the engine keys its cache.
    assert asyncio.run(admitted(BS, LoRARef("a", "a#1", "/a")))[0] == prompt_hashes(tokens, BS, "a#1") != hashes
    assert asyncio.run(admitted(None))[0] == ()
