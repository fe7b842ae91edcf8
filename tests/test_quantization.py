"""Weight-only quantization through the engine: int8 / int4 made at load, GPTQ and AWQ checkpoints.

The GPTQ and AWQ checkpoints are written here by packers of the test's own (plain Python bit arithmetic per
value, nothing shared with ``engine/layers/quantization.py``); the reference is HF transformers with each
layer's weight replaced by its dequantized values. The kernels themselves are checked in
``tests/kernels/test_quant_linear.py``.
"""

import json
import random
import shutil

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from gpt2serve import LLMEngine, SamplingParams
from gpt2serve.engine.layers.linear import Linear
from tests.conftest import engine_config, hf_greedy, run_to_completion

GROUP = 32
LINEARS = ("attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj")
AWQ_ORDER = [0, 2, 4, 6, 1, 3, 5, 7]


def _quantize_groups(w_in_out: np.ndarray, g_idx: np.ndarray):
    """Asymmetric 4-bit RTN of a Conv1D weight [in, out], one scale and zero per (group, out column)."""
    groups = int(g_idx.max()) + 1
    q = np.zeros(w_in_out.shape, dtype=np.int64)
    scales = np.zeros((groups, w_in_out.shape[1]), dtype=np.float32)
    zeros = np.zeros((groups, w_in_out.shape[1]), dtype=np.int64)
    for g in range(groups):
        rows = np.nonzero(g_idx == g)[0]
        lo, hi = w_in_out[rows].min(axis=0), w_in_out[rows].max(axis=0)
        scale = np.maximum((hi - lo) / 15.0, 1e-8).astype(np.float32)
        zero = np.clip(np.round(-lo / scale), 0, 15).astype(np.int64)
        q[rows] = np.clip(np.round(w_in_out[rows] / scale) + zero, 0, 15)
        scales[g], zeros[g] = scale, zero
    deq = (q - zeros[g_idx]) * scales[g_idx]
    return q, scales, zeros, deq.astype(np.float32)


def _pack_words(values: list[int], order: list[int]) -> int:
    word = 0
    for i, column in enumerate(order):
        word |= (int(values[column]) & 0xF) << (4 * i)
    return word - (1 << 32) if word >= 1 << 31 else word  # as a signed int32


def _pack_gptq_qweight(q: np.ndarray) -> np.ndarray:  # [in, out] -> [in / 8, out], along the input features
    k, n = q.shape
    out = np.zeros((k // 8, n), dtype=np.int64)
    for r in range(k // 8):
        for c in range(n):
            out[r, c] = _pack_words(list(q[8 * r:8 * r + 8, c]), list(range(8)))
    return out.astype(np.int32)


def _pack_columns(v: np.ndarray, order: list[int]) -> np.ndarray:  # [r, n] -> [r, n / 8], along the columns
    r, n = v.shape
    out = np.zeros((r, n // 8), dtype=np.int64)
    for i in range(r):
        for c in range(n // 8):
            out[i, c] = _pack_words(list(v[i, 8 * c:8 * c + 8]), order)
    return out.astype(np.int32)


def _write_quantized(src, dst, fmt: str, act_order: bool = False) -> dict[str, np.ndarray]:
    """Copy the tiny checkpoint with its linear layers in ``fmt``; return the dequantized weights by name."""
    dst.mkdir()
    for f in src.iterdir():
        if f.name != "model.safetensors":
            shutil.copy(f, dst / f.name)
    tensors = load_file(src / "model.safetensors")
    out, dequantized = {}, {}
    rng = np.random.default_rng(5)
    for name, t in tensors.items():
        prefix = name.rsplit(".", 1)[0]
        if not (name.endswith(".weight") and prefix.endswith(LINEARS)):
            out[name] = t
            continue
        w = t.float().numpy()  # Conv1D: [in, out]
        k = w.shape[0]
        g_idx = np.arange(k) // GROUP
        if act_order:  # GPTQ's desc_act: input features quantized in a permuted order, groups not contiguous
            g_idx = np.empty(k, dtype=np.int64)
            g_idx[rng.permutation(k)] = np.arange(k) // GROUP
        q, scales, zeros, deq = _quantize_groups(w, g_idx)
        if fmt == "gptq":
            out[f"{prefix}.qweight"] = torch.from_numpy(_pack_gptq_qweight(q))
            out[f"{prefix}.qzeros"] = torch.from_numpy(_pack_columns(zeros - 1, list(range(8))))  # stored minus one
            out[f"{prefix}.g_idx"] = torch.from_numpy(g_idx.astype(np.int32))
        else:
            out[f"{prefix}.qweight"] = torch.from_numpy(_pack_columns(q, AWQ_ORDER))
            out[f"{prefix}.qzeros"] = torch.from_numpy(_pack_columns(zeros, AWQ_ORDER))
        out[f"{prefix}.scales"] = torch.from_numpy(scales).half()
        # The checkpoint stores fp16 scales: the reference dequantizes with those.
        dequantized[name] = ((q - zeros[g_idx]) * scales.astype(np.float16).astype(np.float32)[g_idx])
    save_file(out, dst / "model.safetensors")
    config = json.loads((dst / "config.json").read_text())
    config["quantization_config"] = (
        {"quant_method": "gptq", "bits": 4, "group_size": GROUP, "desc_act": act_order, "sym": False,
         "checkpoint_format": "gptq"} if fmt == "gptq" else
        {"quant_method": "awq", "bits": 4, "group_size": GROUP, "zero_point": True, "version": "gemm"})
    (dst / "config.json").write_text(json.dumps(config))
    return dequantized


def _hf_with_weights(src, weights: dict[str, np.ndarray]):
    from transformers import GPT2LMHeadModel

    model = GPT2LMHeadModel.from_pretrained(src, torch_dtype=torch.float32).eval()
    state = model.state_dict()
    for name, w in weights.items():
        state[name if name.startswith("transformer.") else f"transformer.{name}"].copy_(torch.as_tensor(w))
    return model


def _prompts(vocab: int) -> list[list[int]]:
    rng = random.Random(7)
    return [[rng.randrange(vocab) for _ in range(n)] for n in (1, 9, 40, 77)]


def _check_against(engine: LLMEngine, hf, prompts) -> None:
    """Greedy tokens equal HF generate; every prompt and output logprob within 1e-4 of HF's log-softmax."""
    params = SamplingParams(max_tokens=12, temperature=0, ignore_eos=True, logprobs=1, prompt_logprobs=1)
    for i, p in enumerate(prompts):
        engine.add_request(f"r{i}", p, params)
    done = run_to_completion(engine)
    for i, p in enumerate(prompts):
        seq = done[f"r{i}"].outputs[0]
        assert seq.token_ids == hf_greedy(hf, p, 12)
        with torch.no_grad():
            ref = torch.log_softmax(hf(torch.tensor([p + seq.token_ids])).logits[0].float(), dim=-1)
        got = [lp.logprob for lp in done[f"r{i}"].prompt_logprobs[1:]] + [lp.logprob for lp in seq.logprobs]
        want = [ref[j - 1, t].item() for j, t in enumerate(p + seq.token_ids) if j > 0][:len(got)]
        # On a GPU, fp32 tl.dot products may round through TF32.
        atol = 1e-4 if engine.runner.device.type == "cpu" else 3e-3
        assert np.allclose(got, want, atol=atol), max(abs(a - b) for a, b in zip(got, want))
    assert engine.kv.all_free()


@pytest.mark.parametrize("fmt,act_order", [("gptq", False), ("gptq", True), ("awq", False)])
def test_gptq_and_awq_checkpoints_give_the_logits_of_their_dequantized_weights(tiny_model_dir, tmp_path, fmt,
                                                                             act_order):
    dequantized = _write_quantized(tiny_model_dir, tmp_path / fmt, fmt, act_order)
    hf = _hf_with_weights(tiny_model_dir, dequantized)
    engine = LLMEngine(engine_config(tmp_path / fmt))  # quantization found in config.json, none configured
    layer = engine.runner.model.h[0].attn.c_attn
    assert layer.method.name == fmt and layer.qweight.dtype == torch.int32
    assert (layer.perm is not None) == act_order
    _check_against(engine, hf, _prompts(hf.config.vocab_size))


GPU = pytest.param("cuda", marks=[pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(),
                                                                      reason="needs a CUDA GPU")])


@pytest.mark.parametrize("device", ["cpu", GPU])
@pytest.mark.parametrize("quantization,group_size", [("int8", 128), ("int4", 32), ("int4", 48)])
def test_quantized_at_load_gives_the_logits_of_its_dequantized_weights(tiny_model_dir, quantization, group_size,
                                                                       device):
    """48 does not divide the 64 input features of c_attn: its last group is partial. On the GPU the products run
    in the Triton kernels (eager and in CUDA graphs)."""
    engine = LLMEngine(engine_config(tiny_model_dir, quantization=quantization, quantization_group_size=group_size,
                                     device=device))
    model = engine.runner.model
    original = load_file(tiny_model_dir / "model.safetensors")
    dequantized = {}
    for name, m in model.named_modules():
        if isinstance(m, Linear):
            w = m.method.dense_weight(m).t().cpu()  # [in, out], the Conv1D layout
            ref = original[f"transformer.{name}.weight"].float()
            step = (ref.abs().max() / 127) if quantization == "int8" else (ref.max() - ref.min()) / 15
            assert 0 < (w - ref).abs().max() <= step  # really quantized, and no further off than one step
            dequantized[f"{name}.weight"] = w.numpy()
    hf = _hf_with_weights(tiny_model_dir, dequantized)
    _check_against(engine, hf, _prompts(hf.config.vocab_size))


def test_quantized_weights_take_less_memory(tiny_model_dir):
    from gpt2serve.engine.loader import weight_bytes

    sizes = {}
    for q in ("none", "int8", "int4"):
        model = LLMEngine(engine_config(tiny_model_dir, quantization=q, quantization_group_size=32)).runner.model
        sizes[q] = weight_bytes(model, torch.float32)
    linear = sum(m.in_features * m.out_features * 4 for m in model.modules() if isinstance(m, Linear))
    assert sizes["none"][0] == sizes["none"][1] == sizes["int8"][1] == sizes["int4"][1]
    # fp32 -> int8 saves 3 bytes per weight (less one fp32 scale per output row); int4 saves 3.5 less an fp32
    # scale and zero per group of 32 weights (0.25 bytes per weight).
    assert sizes["none"][0] - sizes["int8"][0] == pytest.approx(linear * 3 / 4, rel=0.02)
    assert sizes["none"][0] - sizes["int4"][0] == pytest.approx(linear * 3.25 / 4, rel=0.01)


def test_quantization_settings_that_contradict_the_checkpoint_are_refused(tiny_model_dir, tmp_path):
    with pytest.raises(ValueError, match="needs a checkpoint with a gptq"):
        LLMEngine(engine_config(tiny_model_dir, quantization="gptq"))
    _write_quantized(tiny_model_dir, tmp_path / "awq", "awq")
    with pytest.raises(ValueError, match="already awq-quantized"):
        LLMEngine(engine_config(tmp_path / "awq", quantization="int8"))
    tensors = load_file(tmp_path / "awq" / "model.safetensors")
    tensors.pop("transformer.h.1.mlp.c_fc.qzeros")
    save_file(tensors, tmp_path / "awq" / "model.safetensors")
    with pytest.raises(ValueError, match="lacks 1 tensors, e.g. \\['h.1.mlp.c_fc.qzeros'\\]"):
        LLMEngine(engine_config(tmp_path / "awq"))


def test_dummy_weights_quantize_too(tiny_model_dir):
    """Benchmarks use random weights: a quantized layer gets them through its own quantizing load."""
    engine = LLMEngine(engine_config(tiny_model_dir, load_format="dummy", quantization="int4",
                                     quantization_group_size=32))
    layer = engine.runner.model.h[1].mlp.c_proj
    assert layer.qweight.dtype == torch.int32 and layer.qweight.abs().sum() > 0
    engine.add_request("a", [1, 2, 3], SamplingParams(max_tokens=4, temperature=0, ignore_eos=True))
    assert len(run_to_completion(engine)["a"].outputs[0].token_ids) == 4
