"""LoRA through the engine against HF transformers + PEFT on the same tiny model and adapters.

Adapters are made here with PEFT itself (``get_peft_model`` with random, non-zero B matrices, saved with
``save_pretrained``), so that the engine reads the real PEFT layout; the reference is ``PeftModel``.
"""

import json
import random

import pytest
import torch

from gpt2serve import LLMEngine, SamplingParams
from gpt2serve.engine.lora import LoRAError, UnknownLoRAError
from tests.conftest import engine_config, hf_greedy, make_peft_adapter, run_to_completion

peft = pytest.importorskip("peft")

NEW = 10
ADAPTERS = {  # name: (rank, alpha, target modules, seed)
    "business": (8, 16, ["c_attn", "c_proj", "c_fc"], 1),
    "poetry": (4, 8, ["c_attn"], 2),  # rank below the others: zero-padded in its slot
    "legal": (16, 8, ["c_fc", "c_proj"], 3),
}


@pytest.fixture(scope="module")
def adapters(tiny_model_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("adapters")
    return {name: make_peft_adapter(tiny_model_dir, root / name, *spec) for name, spec in ADAPTERS.items()}


@pytest.fixture(scope="module")
def references(tiny_model_dir, adapters, hf_model):
    """Greedy continuations of the same prompts under each adapter and under the base model (HF + PEFT)."""
    from peft import PeftModel
    from transformers import GPT2LMHeadModel

    rng = random.Random(3)
    prompts = [[rng.randrange(hf_model.config.vocab_size) for _ in range(n)] for n in (5, 40, 18)]
    refs = {None: [hf_greedy(hf_model, p, NEW) for p in prompts]}
    models = {None: hf_model}
    for name, path in adapters.items():
        base = GPT2LMHeadModel.from_pretrained(tiny_model_dir, torch_dtype=torch.float32).eval()
        models[name] = PeftModel.from_pretrained(base, path).eval()
        refs[name] = [hf_greedy(models[name], p, NEW) for p in prompts]
    assert all(refs[name] != refs[None] for name in adapters), "an adapter that changes nothing tests nothing"
    return prompts, refs, models


def _lora_engine(make_engine, adapters, **overrides):
    modules = [{"name": n, "path": str(p)} for n, p in adapters.items()]
    return make_engine(enable_lora=True, max_loras=2, max_lora_rank=16, lora_modules=modules, **overrides)


GPU = pytest.param("cuda", marks=[pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(),
                                                                      reason="needs a CUDA GPU")])


@pytest.mark.parametrize("device", ["cpu", GPU])
def test_a_batch_mixing_adapters_gives_each_request_its_own_output(make_engine, adapters, references, device):
    """3 adapters and the base model in one batch, with 2 GPU slots: the scheduler holds back the third adapter's
    requests and the slots swap adapters by LRU. The same prompts under every adapter also check that prefix
    caching never shares K/V across adapters."""
    prompts, refs, _ = references
    engine = _lora_engine(make_engine, adapters, device=device)  # on the GPU: Triton kernels and CUDA graphs
    params = SamplingParams(max_tokens=NEW, temperature=0, ignore_eos=True)
    for name in [None, *adapters]:
        for i, p in enumerate(prompts):
            engine.add_request(f"{name}-{i}", p, params, lora_name=name)
    done = run_to_completion(engine)
    for name in [None, *adapters]:
        assert [done[f"{name}-{i}"].outputs[0].token_ids for i in range(len(prompts))] == refs[name], name
    assert len(engine.runner.lora.slots.slot_of) <= 2


def test_logprobs_with_an_adapter_match_peft(make_engine, adapters, references):
    prompts, _, models = references
    engine = _lora_engine(make_engine, adapters)
    params = SamplingParams(max_tokens=4, temperature=0, ignore_eos=True, prompt_logprobs=0)
    engine.add_request("r", prompts[1], params, lora_name="business")
    out = run_to_completion(engine)["r"]
    full = torch.tensor([prompts[1] + out.outputs[0].token_ids])
    with torch.no_grad():
        ref = torch.log_softmax(models["business"](full).logits[0].float(), dim=-1)
    got = [lp.logprob for lp in out.prompt_logprobs[1:]]
    want = [ref[j - 1, t].item() for j, t in enumerate(prompts[1]) if j > 0]
    assert max(abs(a - b) for a, b in zip(got, want)) < 1e-4


def test_unload_waits_for_running_requests_and_refuses_new_ones(make_engine, adapters, references):
    prompts, refs, _ = references
    engine = _lora_engine(make_engine, adapters)
    params = SamplingParams(max_tokens=NEW, temperature=0, ignore_eos=True)
    engine.add_request("running", prompts[0], params, lora_name="poetry")
    engine.step()
    engine.remove_lora("poetry")
    with pytest.raises(UnknownLoRAError, match="poetry"):
        engine.add_request("late", prompts[0], params, lora_name="poetry")
    assert any(a.name == "poetry" for a in engine.runner.lora.adapters.values())  # still held for "running"
    done = run_to_completion(engine)
    assert done["running"].outputs[0].token_ids == refs["poetry"][0]  # finished with the adapter it named
    assert not any(a.name == "poetry" for a in engine.runner.lora.adapters.values())  # and then dropped
    engine.add_lora("poetry", str(adapters["poetry"]))  # reloads under the same name, a new cache key
    engine.add_request("again", prompts[0], params, lora_name="poetry")
    assert run_to_completion(engine)["again"].outputs[0].token_ids == refs["poetry"][0]


def test_bad_adapters_are_refused_with_the_reason(make_engine, adapters, tmp_path):
    engine = _lora_engine(make_engine, {})
    with pytest.raises(LoRAError, match="rank 16 exceeds max_lora_rank 8"):
        LLMEngine(engine.config.model_copy(update={"max_lora_rank": 8, "lora_modules": []})).add_lora(
            "legal", str(adapters["legal"]))
    with pytest.raises(LoRAError, match="does not exist"):
        engine.add_lora("x", str(tmp_path / "nowhere"))
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "adapter_config.json").write_text("{not json")
    with pytest.raises(LoRAError, match="not valid JSON"):
        engine.add_lora("x", str(broken))
    (broken / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "r": 4, "lora_alpha": 8}))
    with pytest.raises(LoRAError, match="no adapter_model.safetensors"):
        engine.add_lora("x", str(broken))
    engine.add_lora("business", str(adapters["business"]))
    with pytest.raises(LoRAError, match="already loaded"):
        engine.add_lora("business", str(adapters["business"]))
    with pytest.raises(UnknownLoRAError):
        engine.remove_lora("nobody")
    with pytest.raises(UnknownLoRAError):
        engine.add_request("r", [1, 2], SamplingParams(max_tokens=2), lora_name="nobody")


def test_merge_folds_the_adapter_into_the_base_weights(make_engine, adapters, references):
    prompts, refs, _ = references
    engine = make_engine(lora_modules=[{"name": "business", "path": str(adapters["business"]), "merge": True}])
    params = SamplingParams(max_tokens=NEW, temperature=0, ignore_eos=True)
    for i, p in enumerate(prompts):
        engine.add_request(f"r{i}", p, params)  # no adapter named: the merged base model is the adapted one
    done = run_to_completion(engine)
    assert [done[f"r{i}"].outputs[0].token_ids for i in range(len(prompts))] == refs["business"]
    assert engine.list_loras() == ["business"]
