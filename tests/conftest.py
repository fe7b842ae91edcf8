import os
import time

# Under pytest-xdist (the README's inner loop: -n 2) the workers share the cores: each gets its share of threads,
# or their OpenMP pools spin against each other and the run takes longer than with one process.
if os.environ.get("PYTEST_XDIST_WORKER_COUNT"):
    os.environ.setdefault("OMP_NUM_THREADS",
                          str(max(1, (os.cpu_count() or 1) // int(os.environ["PYTEST_XDIST_WORKER_COUNT"]))))

import torch  # noqa: E402

# Triton reads this at import: on machines without a GPU its kernels run in the interpreter.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

from gpt2serve import EngineConfig, LLMEngine  # noqa: E402
from gpt2serve.engine.distributed import free_port  # noqa: E402,F401  (the servers tests start listen on it)
from gpt2serve.engine.tiny_model import build_tiny_checkpoint  # noqa: E402


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory):
    return build_tiny_checkpoint(tmp_path_factory.mktemp("models") / "gpt2-tiny")


@pytest.fixture(scope="session")
def hf_model(tiny_model_dir):
    from transformers import GPT2LMHeadModel

    return GPT2LMHeadModel.from_pretrained(tiny_model_dir, torch_dtype=torch.float32).eval()


def engine_config(model_dir, **overrides) -> EngineConfig:
    settings = dict(model=str(model_dir), device="cpu", dtype="float32", num_gpu_blocks=512, block_size=16,
                    max_num_batched_tokens=64, max_num_seqs=8, swap_space_gib=0.05)
    settings.update(overrides)
    return EngineConfig(**settings)


@pytest.fixture
def make_engine(tiny_model_dir):
    """Engines built here are checked after the test: every KV block free, reference counts exact."""
    engines = []

    def make(**overrides) -> LLMEngine:
        engine = LLMEngine(engine_config(tiny_model_dir, **overrides))
        engines.append(engine)
        return engine

    yield make
    for engine in engines:
        engine.kv.check_invariants()
        assert engine.kv.all_free(), f"KV blocks leaked: {engine.stats()}"


def wait_for(predicate, timeout_s: float, what: str, period_s: float = 0.1):
    """Poll ``predicate`` until it returns something true (returned), or fail naming ``what``."""
    deadline = time.monotonic() + timeout_s
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"{what}: not within {timeout_s} s")
        time.sleep(period_s)


def make_peft_adapter(base_dir, out, rank: int, alpha: int, targets: list[str], seed: int):
    """A LoRA adapter made by PEFT itself (random, non-zero B) and saved in its own layout, so that the engine
    reads the real format."""
    from peft import LoraConfig, get_peft_model
    from transformers import GPT2LMHeadModel

    torch.manual_seed(seed)
    model = GPT2LMHeadModel.from_pretrained(base_dir, torch_dtype=torch.float32)
    config = LoraConfig(r=rank, lora_alpha=alpha, target_modules=targets, fan_in_fan_out=True,
                        init_lora_weights=False, lora_dropout=0.0)
    get_peft_model(model, config).save_pretrained(out)
    return out


def run_to_completion(engine: LLMEngine, max_steps: int = 100_000) -> dict:
    """Step until idle; return the final RequestOutput of every request, by id."""
    done = {}
    for _ in range(max_steps):
        if not engine.has_unfinished():
            return done
        for out in engine.step():
            if out.finished:
                done[out.request_id] = out
        engine.kv.check_invariants()
    raise AssertionError("engine did not finish")


def hf_greedy(hf_model, prompt: list[int], max_new_tokens: int) -> list[int]:
    ids = torch.tensor([prompt])
    with torch.no_grad():
        out = hf_model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new_tokens,
                                do_sample=False, eos_token_id=None, pad_token_id=0)
    return out[0, len(prompt):].tolist()


def run_staggered(engine: LLMEngine, prompts: list[list[int]], params, per_step: int = 3) -> list[list[int]]:
    """Requests arrive ``per_step`` at a time between steps, so that prefill chunks and decodes mix; returns
    each request's output token ids, in prompt order."""
    done = {}
    pending = list(enumerate(prompts))
    while pending or engine.has_unfinished():
        for _ in range(min(per_step, len(pending))):
            i, prompt = pending.pop(0)
            engine.add_request(f"r{i}", prompt, params)
        for out in engine.step():
            if out.finished:
                done[out.request_id] = out
        engine.kv.check_invariants()
    return [done[f"r{i}"].outputs[0].token_ids for i in range(len(prompts))]
