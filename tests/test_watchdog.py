"""The step watchdog (engine/watchdog.py) on a fake clock, then on a real tiny engine whose steps are made to raise
or hang by the test-only wrapper (actors/faults.py): the requests in flight fail with ``EngineStepError``, their
blocks are freed, and ``check_health`` fails once steps keep failing or one never returns.
"""

import asyncio

import pytest

from gpt2serve import SamplingParams
from gpt2serve.actors.faults import FaultyEngine
from gpt2serve.engine.async_llm import AsyncLLM
from gpt2serve.engine.errors import EngineStepError, EngineUnhealthyError
from gpt2serve.engine.watchdog import StepWatchdog

pytestmark = pytest.mark.timeout(60)
LONG = SamplingParams(max_tokens=400, ignore_eos=True)


class Clock:
    def __init__(self):
        self.t = 100.0

    def __call__(self):
        return self.t


def test_an_idle_engine_is_never_stalled_and_steps_are_progress():
    clock = Clock()
    dog = StepWatchdog(stall_timeout_s=5, max_failed_steps=3, clock=clock)
    clock.t += 1000  # idle for a long time: not a stall
    assert dog.unhealthy() is None
    dog.working()  # work arrives: progress is due from now
    clock.t += 4
    dog.stepped()
    clock.t += 4.9
    assert dog.unhealthy() is None
    dog.idle()
    clock.t += 60
    dog.working()
    clock.t += 5.1  # a step that has not returned for 5.1 s
    assert "no engine step completed for 5.1 s" in dog.unhealthy()


def test_failed_steps_in_a_row_and_the_verdict_latches():
    clock = Clock()
    dog = StepWatchdog(stall_timeout_s=None, max_failed_steps=3, clock=clock)
    dog.working()
    for _ in range(2):
        dog.failed(RuntimeError("boom"))
    dog.stepped()  # a success in between resets the count
    for _ in range(2):
        dog.failed(RuntimeError("boom"))
    assert dog.unhealthy() is None
    clock.t += 10_000  # no stall limit set: waiting is not judged
    assert dog.unhealthy() is None
    dog.failed(RuntimeError("boom 3"))
    verdict = dog.unhealthy()
    assert verdict.startswith("3 engine steps failed in a row") and "boom 3" in verdict
    dog.stepped()  # a replica that was declared unhealthy stays so until Serve replaces it
    assert dog.unhealthy() == verdict


def test_no_limits_judge_nothing():
    clock = Clock()
    dog = StepWatchdog(clock=clock)
    dog.working()
    for _ in range(100):
        dog.failed(RuntimeError())
    clock.t += 1e6
    assert dog.unhealthy() is None


async def _collect(llm: AsyncLLM, rid: str, prompt: list[int]) -> tuple[int, BaseException | None]:
    deltas = 0
    try:
        async for _ in llm.generate(prompt, LONG, request_id=rid):
            deltas += 1
    except BaseException as e:  # noqa: BLE001 - the test looks at it
        return deltas, e
    return deltas, None


def test_raising_steps_fail_their_requests_free_their_blocks_and_then_the_health_check(make_engine):
    engine = FaultyEngine(make_engine())
    llm = AsyncLLM(engine, StepWatchdog(max_failed_steps=2))

    async def scenario():
        first = [asyncio.create_task(_collect(llm, f"a{i}", list(range(5, 40)))) for i in range(3)]
        while engine.stats()["num_running"] < 3:
            await asyncio.sleep(0.01)
        engine.inject("raise")
        results = await asyncio.gather(*first)
        assert all(isinstance(e, EngineStepError) and "injected fault" in str(e) for _, e in results), results
        await llm.check_health()  # one failed step: still healthy
        _, error = await _collect(llm, "b", [7, 8, 9])
        assert isinstance(error, EngineStepError)
        with pytest.raises(EngineUnhealthyError, match="2 engine steps failed in a row"):
            await llm.check_health()
        engine.inject(None)  # steps work again, but the verdict stands: the replica is replaced anyway
        assert await _collect(llm, "c", [7, 8, 9]) == (400, None)
        with pytest.raises(EngineUnhealthyError):
            await llm.check_health()

    asyncio.run(scenario())
    assert engine.kv.all_free()  # make_engine checks it again, with the reference counts


def test_a_step_that_never_returns_fails_the_health_check(make_engine):
    engine = FaultyEngine(make_engine())
    llm = AsyncLLM(engine, StepWatchdog(stall_timeout_s=0.3))

    async def scenario():
        run = asyncio.create_task(_collect(llm, "a", list(range(5, 40))))
        while engine.stats()["num_running"] < 1:
            await asyncio.sleep(0.01)
        await llm.check_health()
        engine.inject("hang")
        await asyncio.sleep(0.6)
        with pytest.raises(EngineUnhealthyError, match="no engine step completed"):
            await llm.check_health()
        assert not run.done()  # the engine gives it nothing more: failing it is the worker's business
        engine.inject(None)  # let the step thread go, so that the test can end
        run.cancel()
        await asyncio.gather(run, return_exceptions=True)
        while engine.has_unfinished():
            await asyncio.sleep(0.01)

    asyncio.run(scenario())


def test_fault_modes_are_checked():
    engine = FaultyEngine(object())
    with pytest.raises(ValueError, match="unknown fault 'melt'"):
        engine.inject("melt")
