"""Bad input is refused per request while the engine keeps serving; aborts anywhere free every block."""

import asyncio

import pytest

from gpt2serve import AsyncLLM, InvalidRequestError, SamplingParams
from gpt2serve.engine.request import RequestStatus
from tests.conftest import run_to_completion


@pytest.mark.parametrize("kwargs, param", [
    ({"temperature": -0.5}, "temperature"),
    ({"top_p": 1.5}, "top_p"),
    ({"top_p": 0.0}, "top_p"),
    ({"max_tokens": 0}, "max_tokens"),
    ({"n": 0}, "n"),
    ({"top_k": -3}, "top_k"),
    ({"logprobs": 21}, "logprobs"),
    ({"stop": [""]}, "stop"),
])
def test_invalid_sampling_params_name_the_field(kwargs, param):
    with pytest.raises(InvalidRequestError) as e:
        SamplingParams(**kwargs)
    assert e.value.param == param and param in str(e.value)


def test_bad_requests_fail_alone_while_the_engine_keeps_serving(make_engine):
    engine = make_engine(max_model_len=128, num_gpu_blocks=12, block_size=8)
    good = SamplingParams(max_tokens=20, temperature=0, ignore_eos=True)
    for i in range(3):
        engine.add_request(f"good{i}", [1 + i] * 30, good)
    engine.step()
    engine.step()
    bad = [
        ([1] * 128, good, "max_model_len"),  # prompt as long as the context
        ([5, engine.vocab_size], good, "out of vocabulary"),
        ([5, -1], good, "out of vocabulary"),
        ([], good, "empty"),
        ("", good, "empty"),
        ([1] * 100, SamplingParams(max_tokens=100), "KV blocks"),  # 127 tokens can never fit the 96-token pool
        ([1] * 5, good, "already in flight"),
    ]
    for prompt, params, message in bad:
        rid = "good0" if message == "already in flight" else "bad"
        with pytest.raises(InvalidRequestError, match=message):
            engine.add_request(rid, prompt, params)
        engine.step()
    done = run_to_completion(engine)
    assert sorted(done) == ["good0", "good1", "good2"]
    assert all(len(o.outputs[0].token_ids) == 20 for o in done.values())


def _long_running_engine(make_engine, **overrides):
    engine = make_engine(max_num_batched_tokens=16, block_size=8, num_gpu_blocks=64, **overrides)
    params = SamplingParams(max_tokens=40, temperature=0, ignore_eos=True)
    engine.add_request("decoding", [3, 4, 5], params)
    engine.add_request("long-prompt", list(range(1, 101)), params)  # 100 tokens: chunks over 7+ steps
    return engine


def test_abort_mid_prefill_and_mid_decode(make_engine):
    engine = _long_running_engine(make_engine)
    engine.step()
    engine.step()
    prefilling = engine.scheduler.requests["long-prompt"]
    assert 0 < prefilling.num_computed_tokens < 100
    out = engine.abort("long-prompt")
    assert out.finished and out.outputs[0].finish_reason == "abort"
    decoding = engine.scheduler.requests["decoding"]
    assert decoding.output_token_ids
    engine.step()
    engine.abort("decoding")
    assert not engine.has_unfinished()
    engine.step()  # the runner drops the aborted requests' state
    assert engine.runner.requests == {}
    assert engine.abort("decoding") is None  # aborting twice is harmless


def test_abort_while_waiting_and_while_swapped(make_engine):
    engine = make_engine(max_num_batched_tokens=64, block_size=4, num_gpu_blocks=8, max_num_seqs=2,
                         preemption_policy="swap")
    params = SamplingParams(max_tokens=12, temperature=0, ignore_eos=True)
    for i in range(3):
        engine.add_request(f"r{i}", [i + 1] * 8, params)
    while not engine.scheduler.swapped:
        engine.step()
    swapped = engine.scheduler.swapped[0].request_id
    waiting = engine.scheduler.waiting[0].request_id
    assert engine.scheduler.requests[swapped].status is RequestStatus.SWAPPED
    engine.abort(swapped)
    engine.abort(waiting)
    assert engine.kv.cpu_pool.num_free == engine.kv.cpu_pool.num_blocks
    done = run_to_completion(engine)
    assert set(done) == {"r0", "r1", "r2"} - {swapped, waiting}


def test_n_samples_abort_together(make_engine):
    engine = make_engine(block_size=4)
    engine.add_request("n", list(range(1, 11)), SamplingParams(n=4, max_tokens=30, temperature=1.0))
    for _ in range(3):
        engine.step()
    assert len(engine.kv.tables) == 4
    engine.abort("n")
    assert not engine.has_unfinished()


def test_async_streaming_matches_offline_and_cancel_frees_blocks(make_engine):
    engine = make_engine(max_num_batched_tokens=32)
    prompt = list(range(10, 60))
    params = SamplingParams(max_tokens=16, temperature=0, ignore_eos=True)
    llm = AsyncLLM(engine)

    async def scenario():
        # Full stream: deltas add up to the offline result.
        tokens, text = [], ""
        async for out in llm.generate(prompt, params, request_id="a"):
            tokens += out.outputs[0].token_ids
            text += out.outputs[0].text
        # A consumer that goes away after 3 deltas, while a second stream runs on.
        other = asyncio.create_task(_collect(llm.generate(prompt, params, request_id="c")))
        seen = 0
        async for _ in llm.generate(list(range(5, 90)), SamplingParams(max_tokens=200, ignore_eos=True),
                                    request_id="b"):
            seen += 1
            if seen == 3:
                break
        # Abort from outside ends the stream with finish_reason "abort".
        aborted = asyncio.create_task(_collect(llm.generate(prompt, SamplingParams(max_tokens=200, ignore_eos=True),
                                                           request_id="d")))
        await asyncio.sleep(0.05)
        await llm.abort("d")
        with pytest.raises(InvalidRequestError):
            async for _ in llm.generate([], params):
                pass
        return tokens, text, await other, await aborted

    tokens, text, other, aborted = asyncio.run(scenario())
    offline = engine.tokenizer.decode(tokens)
    assert text == offline and len(tokens) == 16
    assert other == tokens
    assert engine.kv.all_free() and not engine.has_unfinished()
    assert engine.scheduler.requests == {}
    assert aborted and len(aborted) < 200


async def _collect(stream):
    tokens = []
    async for out in stream:
        tokens += out.outputs[0].token_ids
    return tokens
