"""The service's LoRA bookkeeping without Ray: the scheduler's registry and a worker's ``WorkerAdapters`` driving a
real (tiny, CPU) engine through the races that hot-swapping creates. The HTTP side is tests/serve/test_lora_serving.py.
"""

import asyncio
import random

import pytest

from gpt2serve.actors.lora_registry import LoRARegistry, LoRASnapshot, WorkerAdapters
from gpt2serve.actors.protocol import LoRARef
from gpt2serve import SamplingParams
from gpt2serve.engine.async_llm import AsyncLLM
from gpt2serve.engine.config import LoRAModuleConfig
from gpt2serve.engine.lora import LoRAError, UnknownLoRAError
from tests.conftest import make_peft_adapter, run_to_completion

pytest.importorskip("peft")

NEW = 12
PARAMS = SamplingParams(max_tokens=NEW, temperature=0, ignore_eos=True)


# ---------------------------------------------------------------------- the registry (scheduler side)
def test_registry_versions_uids_and_refusals():
    reg = LoRARegistry([LoRAModuleConfig(name="boot", path="/a"), LoRAModuleConfig(name="folded", path="/m",
                                                                                   merge=True)], {"base"})
    assert reg.resolve("base") is None and reg.resolve("folded") is None  # the merged one is the base model now
    assert reg.resolve("boot") == LoRARef("boot", "boot#0", "/a")  # the uid every worker's engine gave it
    with pytest.raises(UnknownLoRAError, match="The model `nope` does not exist"):
        reg.resolve("nope")
    for taken in ("base", "folded", "boot"):
        with pytest.raises(LoRAError, match="already been loaded"):
            reg.propose(taken, "/x")

    proposal = reg.propose("poetry", "/p")
    assert proposal.version == 1 and proposal.adapters["poetry"].path == "/p"
    with pytest.raises(UnknownLoRAError):  # not requestable before every worker has it
        reg.resolve("poetry")
    first = reg.commit()
    assert reg.version == 1 and reg.resolve("poetry") == first

    proposal = reg.propose("verse", "/bad")
    back = reg.abandon()
    assert back.version > proposal.version and "verse" not in back.adapters  # newer than what workers tried

    gone = reg.remove("poetry")
    assert "poetry" not in gone.adapters and gone.version > back.version
    with pytest.raises(UnknownLoRAError, match="cannot be found"):
        reg.remove("poetry")
    with pytest.raises(LoRAError, match="merged"):
        reg.remove("folded")
    reg.propose("poetry", "/p")
    again = reg.commit()
    assert again.uid != first.uid  # a reload never shares prefix-cache keys with the old load


def test_a_registry_adopts_the_newest_worker_snapshot_until_it_changes_something_itself():
    old = LoRARegistry([LoRAModuleConfig(name="boot", path="/a")], {"base"})
    old.propose("poetry", "/p")
    poetry = old.commit()
    reported = (old.version, list(old.snapshot().adapters.values()))  # what a worker following it reports

    new = LoRARegistry([LoRAModuleConfig(name="boot", path="/a")], {"base"})  # the scheduler restarted
    assert new.epoch != old.epoch and poetry.uid.startswith(f"poetry#{old.epoch}.")
    new.adopt(0, [])  # a worker that never heard from any scheduler: nothing to learn
    new.adopt(*reported)
    assert new.resolve("poetry") == poetry and new.version == old.version
    new.adopt(old.version - 1, [])  # older news changes nothing
    assert new.resolve("poetry") == poetry

    new.propose("verse", "/v")
    new.commit()
    ahead = new.version + 5  # a worker that followed a snapshot this registry never saw
    new.adopt(ahead, [])  # after a change of its own: only its version moves past the worker's, so that the
    assert set(new.adapters) == {"boot", "poetry", "verse"} and new.version == ahead + 1  # worker catches up


# ---------------------------------------------------------------------- a worker's adapters, on a real engine
@pytest.fixture(scope="module")
def dirs(tiny_model_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("hot-swap")
    out = {name: make_peft_adapter(tiny_model_dir, root / name, 8, 16, ["c_attn", "c_fc"], seed)
           for name, seed in (("poetry", 11), ("poetry-v2", 12), ("verse", 13))}
    out["too-big"] = make_peft_adapter(tiny_model_dir, root / "too-big", 32, 32, ["c_attn"], 14)
    return out


@pytest.fixture(scope="module")
def prompt():
    return [random.Random(5).randrange(500) for _ in range(20)]


@pytest.fixture(scope="module")
def expected(tiny_model_dir, dirs, prompt):
    """Each adapter's greedy output on the prompt, from an engine that has only that adapter."""
    from gpt2serve import LLMEngine
    from tests.conftest import engine_config

    out = {}
    for name in ("poetry", "poetry-v2", "verse", None):
        modules = [{"name": "a", "path": str(dirs[name])}] if name else []
        engine = LLMEngine(engine_config(tiny_model_dir, enable_lora=True, max_lora_rank=16, lora_modules=modules))
        engine.add_request("r", prompt, PARAMS, lora_name="a" if name else None)
        out[name] = run_to_completion(engine)["r"].outputs[0].token_ids
    assert len({tuple(v) for v in out.values()}) == 4, "adapters that change nothing test nothing"
    return out


async def _generate(llm: AsyncLLM, adapters: WorkerAdapters, ref: LoRARef | None, prompt, request_id: str,
                    started: asyncio.Event | None = None) -> list[int]:
    """What the worker's ``_run`` does: hold the load, generate with it, release it."""
    name = await adapters.acquire(ref) if ref else None
    tokens = []
    try:
        async for out in llm.generate(prompt, PARAMS, request_id=request_id, lora_name=name):
            tokens += out.outputs[0].token_ids
            if started is not None:
                started.set()
    finally:
        if ref:
            adapters.release(ref)
    return tokens


async def _engine_uids(llm: AsyncLLM) -> set[str]:
    """The loads the engine still holds, after one more step (a step drops what ``remove_lora`` released)."""
    async for _ in llm.generate([1, 2, 3], SamplingParams(max_tokens=1)):
        pass
    return set(llm.engine.runner.lora.adapters)


def test_worker_follows_snapshots_and_reports_bad_adapters(make_engine, dirs):
    llm = AsyncLLM(make_engine(enable_lora=True, max_loras=2, max_lora_rank=16))
    adapters = WorkerAdapters(llm)
    poetry, verse = LoRARef("poetry", "poetry#1", str(dirs["poetry"])), LoRARef("verse", "verse#2", str(dirs["verse"]))

    async def scenario():
        assert await adapters.sync(LoRASnapshot(1, {"poetry": poetry})) == {}
        assert await _engine_uids(llm) == {"poetry#1"}
        errors = await adapters.sync(LoRASnapshot(2, {"poetry": poetry, "big": LoRARef("big", "big#3", str(dirs["too-big"])),
                                                      "gone": LoRARef("gone", "gone#4", "/no/such/dir")}))
        assert errors["big"] == "adapter rank 32 exceeds max_lora_rank 16"
        assert "does not exist" in errors["gone"]
        await adapters.sync(LoRASnapshot(1, {"verse": verse}))  # older than what it has: ignored
        assert await _engine_uids(llm) == {"poetry#1"} and adapters.version == 2
        await adapters.sync(LoRASnapshot(4, {"verse": verse}))
        assert await _engine_uids(llm) == {"verse#2"} and adapters.info() == {"lora_version": 4, "lora_held": ["verse#2"]}

    asyncio.run(scenario())


def test_unload_waits_for_the_requests_using_the_adapter(make_engine, dirs, prompt, expected):
    """Unloaded mid-request: the request finishes with the adapter it named; then the engine lets it go."""
    llm = AsyncLLM(make_engine(enable_lora=True, max_loras=2, max_lora_rank=16))
    adapters = WorkerAdapters(llm)
    poetry = LoRARef("poetry", "poetry#1", str(dirs["poetry"]))

    async def scenario():
        await adapters.sync(LoRASnapshot(1, {"poetry": poetry}))
        started = asyncio.Event()
        running = asyncio.create_task(_generate(llm, adapters, poetry, prompt, "running", started))
        await started.wait()
        await adapters.sync(LoRASnapshot(2, {}))  # unloaded while "running" holds it: kept for now
        assert "poetry#1" in adapters.held
        assert await running == expected["poetry"]
        await adapters.sweep()
        assert adapters.held == {}
        assert await _engine_uids(llm) == set()

    asyncio.run(scenario())


def test_late_and_reloaded_requests_get_the_load_they_were_admitted_with(make_engine, dirs, prompt, expected):
    """A request admitted before an unload but arriving after it, and two loads of one name side by side (the
    old still serving while the new one starts): every request gets the weights its admission named."""
    llm = AsyncLLM(make_engine(enable_lora=True, max_loras=2, max_lora_rank=16))
    adapters = WorkerAdapters(llm)
    old = LoRARef("poetry", "poetry#1", str(dirs["poetry"]))
    new = LoRARef("poetry", "poetry#2", str(dirs["poetry-v2"]))

    async def scenario():
        await adapters.sync(LoRASnapshot(1, {"poetry": old}))
        await adapters.sync(LoRASnapshot(2, {}))  # unloaded ...
        late = await _generate(llm, adapters, old, prompt, "late")  # ... but this one was admitted before
        assert late == expected["poetry"]
        await adapters.sync(LoRASnapshot(3, {"poetry": new}))  # reloaded from another directory
        both = await asyncio.gather(_generate(llm, adapters, old, prompt, "old"),
                                    _generate(llm, adapters, new, prompt, "new"),
                                    _generate(llm, adapters, None, prompt, "base"))
        assert both == [expected["poetry"], expected["poetry-v2"], expected[None]]
        await adapters.sweep()
        assert set(adapters.held) == {"poetry#2"}

    asyncio.run(scenario())


def test_after_a_scheduler_restart_a_reload_never_gets_the_uid_of_a_load_still_resident(make_engine, dirs, prompt,
                                                                                          expected):
    """The old registry loaded ``poetry``; a request still runs with it when the scheduler restarts. The new registry
    rebuilds itself from the worker's report, unloads ``poetry`` and loads another directory under that name: the
    new load's uid is new (another epoch), so the worker loads the new weights instead of serving the old ones
    under an old uid, and each request gets the weights its admission named."""
    llm = AsyncLLM(make_engine(enable_lora=True, max_loras=2, max_lora_rank=16))
    adapters = WorkerAdapters(llm)
    before = LoRARegistry([], {"base"})
    before.propose("poetry", str(dirs["poetry"]))
    old = before.commit()

    async def scenario():
        await adapters.sync(before.snapshot())
        started = asyncio.Event()
        running = asyncio.create_task(_generate(llm, adapters, old, prompt, "running", started))
        await started.wait()

        after = LoRARegistry([], {"base"})  # the restarted scheduler
        report = adapters.report()
        after.adopt(report["lora_version"], report["lora_adapters"])
        assert after.resolve("poetry") == old
        await adapters.sync(after.remove("poetry"))
        after.propose("poetry", str(dirs["poetry-v2"]))
        new = after.commit()
        assert new.uid != old.uid
        await adapters.sync(after.snapshot())
        assert await _generate(llm, adapters, after.resolve("poetry"), prompt, "new") == expected["poetry-v2"]
        assert await running == expected["poetry"]
        await adapters.sweep()
        assert set(adapters.held) == {new.uid}

    asyncio.run(scenario())


def test_an_error_between_steps_reaches_the_caller(make_engine):
    """A change run between two steps that raises (unloading a name that is not loaded) raises in the awaiting
    caller, instead of leaving it waiting for a result that never comes."""
    llm = AsyncLLM(make_engine(enable_lora=True, max_loras=2, max_lora_rank=16))

    async def scenario():
        with pytest.raises(UnknownLoRAError, match="no adapter named 'nope'"):
            await asyncio.wait_for(llm.remove_lora("nope"), timeout=20)

    asyncio.run(scenario())
