"""Loading: local safetensors / .bin checkpoints, dummy weights with no checkpoint, the tokenizer fallback."""

import logging
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from gpt2serve import LLM, EngineConfig, LLMEngine, SamplingParams
from gpt2serve.engine.loader import GPT2_FAMILY, load_hf_config
from gpt2serve.engine.tiny_model import build_dummy_model_dir
from gpt2serve.engine.tokenizer import ByteTokenizer, _gpt2_byte_order
from tests.conftest import engine_config


def test_bin_checkpoint_gives_the_same_output_as_safetensors(tiny_model_dir, tmp_path):
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for name in ("config.json", "tokenizer.json", "tokenizer_config.json"):
        (bin_dir / name).write_bytes((tiny_model_dir / name).read_bytes())
    torch.save(load_file(tiny_model_dir / "model.safetensors"), bin_dir / "pytorch_model.bin")
    params = SamplingParams(max_tokens=10, temperature=0)
    outs = [LLM(engine_config(d, load_format=fmt)).generate(prompt_token_ids=[[4, 8, 15, 16]], sampling_params=params)
            for d, fmt in [(tiny_model_dir, "safetensors"), (bin_dir, "pt")]]
    assert outs[0][0].outputs[0].token_ids == outs[1][0].outputs[0].token_ids


def test_checkpoint_with_missing_tensors_is_refused(tiny_model_dir, tmp_path):
    from safetensors.torch import save_file

    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "config.json").write_bytes((tiny_model_dir / "config.json").read_bytes())
    tensors = load_file(tiny_model_dir / "model.safetensors")
    tensors.pop(next(k for k in tensors if k.endswith("mlp.c_fc.weight")))
    save_file(tensors, broken / "model.safetensors")
    with pytest.raises(ValueError, match="lacks 1 tensors"):
        LLMEngine(engine_config(broken))


def test_dummy_weights_need_no_checkpoint_and_warn_about_the_tokenizer(caplog, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with caplog.at_level(logging.WARNING):
        engine = LLMEngine(EngineConfig(model="gpt2", load_format="dummy", device="cpu", num_gpu_blocks=16))
    model = engine.runner.model
    assert (model.num_layers, model.wte.weight.shape) == (12, (50257, 768))
    assert any("NO TOKENIZER" in r.message for r in caplog.records)
    assert isinstance(engine.tokenizer, ByteTokenizer)
    engine.add_request("x", "Hello", SamplingParams(max_tokens=3, ignore_eos=True))
    while engine.has_unfinished():
        engine.step()
    assert engine.kv.all_free()


@pytest.mark.slow  # trains a tokenizer of 50,257 entries (seconds) and builds GPT-2 small twice
def test_default_service_config_answers_text_with_text(tmp_path, monkeypatch):
    """configs/tiny.yaml's engine on the directory scripts/bootstrap.sh makes (GPT-2 small's config, a BPE tokenizer
    trained here, dummy weights): a text prompt gets visible text back, where the byte-level fallback (no tokenizer)
    decodes the same kind of random ids to almost nothing."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    tiny_yaml = Path(__file__).resolve().parents[1] / "configs" / "tiny.yaml"
    assert EngineConfig.from_yaml(tiny_yaml).model == "models/gpt2-offline"
    model = build_dummy_model_dir(tmp_path / "gpt2-offline", like="gpt2")
    hf = load_hf_config(EngineConfig(model=str(model), load_format="dummy"))
    assert (hf.n_layer, hf.n_embd, hf.n_head, hf.vocab_size) == (12, 768, 12, 50257)
    params = SamplingParams(max_tokens=16, seed=0, ignore_eos=True)
    visible = {}
    for name, path in (("bpe", str(model)), ("bytes", "gpt2")):
        llm = LLM(EngineConfig.from_yaml(tiny_yaml, model=path))
        assert llm.engine.config.load_format == "dummy"
        text = llm.generate("Hello", params)[0].outputs[0].text
        assert llm.engine.kv.all_free()
        visible[name] = sum(not c.isspace() for c in text)
    assert visible["bpe"] >= 16 > visible["bytes"]


@pytest.mark.parametrize("name", sorted(GPT2_FAMILY))
def test_family_geometry_for_dummy_weights(name, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    config = load_hf_config(EngineConfig(model=f"openai-community/{name}", load_format="dummy"))
    assert (config.n_layer, config.n_embd, config.n_head) == tuple(GPT2_FAMILY[name].values())
    assert config.vocab_size == 50257 and config.n_positions == 1024


def test_unreachable_model_says_what_to_do(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(FileNotFoundError, match="load_format: dummy"):
        LLMEngine(EngineConfig(model="gpt2-xl", device="cpu"))


def test_byte_tokenizer_uses_gpt2_byte_ids_and_round_trips():
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    assert _gpt2_byte_order() == list(bytes_to_unicode().keys())  # GPT-2's first 256 vocabulary entries
    tok = ByteTokenizer()
    text = "héllo, 世界! \n\t"
    ids = tok.encode(text)
    assert len(ids) == len(text.encode()) and max(ids) < 256
    assert tok.decode(ids) == text
    assert tok.decode(tok.encode("a") + [1000]) == "a"  # merged-piece ids are unknown without a vocabulary


def test_bfloat16_on_the_cpu(make_engine):
    engine = make_engine(dtype="bfloat16")
    assert engine.runner.kv_cache.dtype == torch.bfloat16
    engine.add_request("x", [1, 2, 3], SamplingParams(max_tokens=4, ignore_eos=True))
    while engine.has_unfinished():
        engine.step()


def test_config_from_serve_yaml_and_plain_yaml(tmp_path):
    serve = tmp_path / "serve.yaml"
    serve.write_text("applications:\n- name: x\n  args:\n    engine:\n      model: gpt2\n      block_size: 8\n")
    plain = tmp_path / "plain.yaml"
    plain.write_text("engine:\n  model: gpt2-xl\n  max_num_seqs: 3\n")
    assert EngineConfig.from_yaml(serve).block_size == 8
    assert EngineConfig.from_yaml(plain, load_format="dummy").load_format == "dummy"
    with pytest.raises(ValueError):
        EngineConfig(model="gpt2", max_num_seqs=0)
    with pytest.raises(ValueError):
        EngineConfig(model="gpt2", no_such_setting=1)


@pytest.mark.slow  # a fresh interpreter that imports torch and transformers
def test_cli_streams_a_completion(tiny_model_dir):
    result = subprocess.run(
        [sys.executable, "-m", "gpt2serve.engine", "generate", "--model", str(tiny_model_dir), "--prompt", "def main(",
         "--max-tokens", "8"], capture_output=True, text=True, timeout=120,
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("def main(") and len(result.stdout) > len("def main(")
    assert "8 tokens" in result.stderr and "TTFT" in result.stderr
