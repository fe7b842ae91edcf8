"""`python -m gpt2serve.engine tour`: each demo at small sizes, checked for the property it is there to show.

Each demo asserts after every run that its KV pool is entirely free (``engine.tour.run``), and the fixture below
checks every engine a demo built once more at the end; the tests check the counts that do not depend on the
machine.
"""

import json
import logging

import pytest
from transformers.utils import logging as hf_logging

from gpt2serve.engine import tour


@pytest.fixture(autouse=True)
def one_thread():
    with tour.torch_threads(1):
        yield


@pytest.fixture(autouse=True)
def pools_end_free(monkeypatch):
    """Every engine a demo builds must end with its whole KV pool free and exact reference counts."""
    engines = []
    build = tour._engine

    def spy(*args, **kwargs):
        engine, trace = build(*args, **kwargs)
        engines.append(engine)
        return engine, trace

    monkeypatch.setattr(tour, "_engine", spy)
    yield
    for engine in engines:
        engine.kv.check_invariants()
        assert engine.kv.all_free(), engine.stats()


def by(rows, key):
    return {row[key]: row for row in rows}


def test_kv_cache_computes_linear_positions_and_recompute_triangular(tiny_model_dir):
    prompt_len, new = 8, 12
    rows = by(tour.kv_cache(tiny_model_dir, prompt_len=prompt_len, new_tokens=new).rows, "mode")
    cached = rows["paged KV cache (the engine)"]
    recompute = rows["no cache: recompute the sequence each step"]
    assert cached["token positions computed"] == prompt_len + new - 1  # the last token is never fed back
    assert recompute["token positions computed"] == sum(prompt_len + i for i in range(new))
    assert cached["steps"] == recompute["steps"] == new
    assert recompute["same tokens"]  # the cache changes the cost, never the answer
    assert cached["wall ms"] > 0 and recompute["wall ms"] > 0


def test_batched_prefill_takes_one_step_for_what_serial_does_in_k(tiny_model_dir):
    k, prompt_len = 4, 16
    rows = by(tour.batched_prefill(tiny_model_dir, k=k, prompt_len=prompt_len).rows, "mode")
    batched, serial = rows["batched: all k in one step"], rows["serial: one prompt per step"]
    assert batched["steps"] == 1 < serial["steps"] == k
    assert batched["token positions computed"] == serial["token positions computed"] == k * prompt_len


def test_continuous_batching_lets_short_requests_finish_first_and_new_ones_join(tiny_model_dir):
    long_tokens, short_tokens = 12, 3
    demo = tour.continuous_batching(tiny_model_dir, long_tokens=long_tokens, short_tokens=short_tokens,
                                    batch_size=3)
    cont = by([r for r in demo.rows if r["batching"] == "continuous"], "request")
    static = by([r for r in demo.rows if r["batching"] == "static"], "request")
    shorts, longs = ["short-1", "short-2", "short-3"], ["long-1", "long-2"]

    assert max(cont[r]["finished at step"] for r in shorts) < min(cont[r]["finished at step"] for r in longs)
    # short-2 takes short-1's slot the step after short-1 ends, and short-3 short-2's, while the long ones run.
    assert cont["short-2"]["joined at step"] == cont["short-1"]["finished at step"] + 1
    assert cont["short-3"]["joined at step"] == cont["short-2"]["finished at step"] + 1
    assert cont["long-1"]["finished at step"] == long_tokens
    # A static batch of 3 holds short-1 until the long ones end; the other two wait for the next batch.
    assert static["short-1"]["finished at step"] == long_tokens
    assert static["short-2"]["joined at step"] == long_tokens + 1
    assert demo.summary["continuous"]["steps"] == long_tokens
    assert demo.summary["static"]["steps"] == long_tokens + short_tokens
    assert demo.summary["continuous"]["steps"] < demo.summary["static"]["steps"]


def test_greedy_repeats_and_seeds_differ(tiny_model_dir):
    rows = by(tour.sampling(tiny_model_dir, new_tokens=12).rows, "run")
    assert rows["greedy #2"]["same as greedy #1"] and rows["greedy #2"]["text"] == rows["greedy #1"]["text"]
    assert rows["sampled, seed 1"]["text"] != rows["sampled, seed 2"]["text"]
    assert not rows["sampled, seed 2"]["same as seed 1"]
    assert rows["sampled, seed 1 again"]["same as seed 1"]


def test_tour_command_writes_its_rows(tiny_model_dir, tmp_path, monkeypatch, capsys):
    from gpt2serve.engine import __main__

    sizes = {"kv_cache": dict(prompt_len=4, new_tokens=4), "batched_prefill": dict(k=2, prompt_len=4),
             "continuous_batching": dict(long_tokens=4, short_tokens=1), "sampling": dict(new_tokens=4)}
    for name, kwargs in sizes.items():
        demo = getattr(tour, name)
        monkeypatch.setattr(tour, name, lambda model_dir, demo=demo, kwargs=kwargs: demo(model_dir, **kwargs))
    out = tmp_path / "tour.json"
    # The command quiets the engine's logger and transformers' progress bars for its own process; put them back
    # for the tests that run after this one.
    engine_log = logging.getLogger("gpt2serve.engine")
    level, bars = engine_log.level, hf_logging.is_progress_bar_enabled()
    try:
        __main__.main(["tour", "--model", str(tiny_model_dir), "--json", str(out)])
    finally:
        engine_log.setLevel(level)
        if bars:
            hf_logging.enable_progress_bar()
    saved = json.loads(out.read_text())
    assert [d["name"] for d in saved["demos"]] == list(sizes)
    assert all(d["rows"] for d in saved["demos"])
    printed = capsys.readouterr().out
    assert "(a) KV cache on and off" in printed and "(d) Greedy and sampled" in printed
