"""Find a GPT-2 checkpoint (local directory, hub, or nothing at all for dummy weights) and build the model."""

from __future__ import annotations

import glob
import logging
import os
from pathlib import Path
from typing import Iterator

import torch
from transformers import GPT2Config

from gpt2serve.engine.attention import AttentionBackend
from gpt2serve.engine.config import EngineConfig
from gpt2serve.engine.distributed import PipelineParallel, TensorParallel
from gpt2serve.engine.layers.linear import Linear
from gpt2serve.engine.layers.quantization import LinearMethod, build_linear_method, checkpoint_quantization
from gpt2serve.engine.models.gpt2 import GPT2LMHeadModel

log = logging.getLogger(__name__)

# Geometry of the published checkpoints, so that dummy weights need no network at all.
GPT2_FAMILY = {
    "gpt2": dict(n_layer=12, n_embd=768, n_head=12),
    "gpt2-medium": dict(n_layer=24, n_embd=1024, n_head=16),
    "gpt2-large": dict(n_layer=36, n_embd=1280, n_head=20),
    "gpt2-xl": dict(n_layer=48, n_embd=1600, n_head=25),
}


def _family_name(model: str) -> str | None:
    name = model.removeprefix("openai-community/")
    return name if name in GPT2_FAMILY else None


def _hub_snapshot(model: str, local_only: bool) -> Path:
    from huggingface_hub import snapshot_download

    patterns = ["*.json", "*.safetensors", "*.txt", "merges.txt", "vocab.json"]
    try:
        return Path(snapshot_download(model, allow_patterns=patterns, local_files_only=local_only))
    except Exception as e:  # noqa: BLE001 - the hub raises many kinds; the message says what to do
        raise FileNotFoundError(
            f"model {model!r} is neither a local directory nor reachable on the Hugging Face hub ({e}). "
            "Pass a local checkpoint directory, or load_format: dummy for random weights of its shape."
        ) from e


def model_dir(config: EngineConfig) -> Path | None:
    """The directory holding the checkpoint; None when dummy weights need none (and none is cached)."""
    if os.path.isdir(config.model):
        return Path(config.model)
    if config.load_format == "dummy":
        try:
            return _hub_snapshot(config.model, local_only=True)
        except FileNotFoundError:
            return None
    return _hub_snapshot(config.model, local_only=os.environ.get("HF_HUB_OFFLINE") == "1")


def load_hf_config(config: EngineConfig) -> GPT2Config:
    directory = model_dir(config)
    if directory is not None and (directory / "config.json").exists():
        hf = GPT2Config.from_pretrained(directory)
    elif (family := _family_name(config.model)) is not None:
        hf = GPT2Config(**GPT2_FAMILY[family])
    else:
        raise FileNotFoundError(
            f"model {config.model!r}: no config.json there. It is not a directory (relative paths start at "
            f"{os.getcwd()}), nor a published GPT-2 ({', '.join(GPT2_FAMILY)}) or a hub id cached here. "
            "`gpt2serve make-dummy-model DIR` writes a config and a tokenizer for load_format: dummy.")
    if hf.model_type != "gpt2":
        raise ValueError(f"only GPT-2 checkpoints are supported, {config.model!r} is {hf.model_type!r}")
    return hf


def resolve_dtype(config: EngineConfig, device: torch.device) -> torch.dtype:
    if config.dtype == "auto":
        return torch.float16 if device.type == "cuda" else torch.float32
    return getattr(torch, config.dtype)


def resolve_device(config: EngineConfig) -> torch.device:
    if config.device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(config.device)


def _checkpoint_tensors(directory: Path, load_format: str) -> Iterator[tuple[str, torch.Tensor]]:
    safetensors = sorted(glob.glob(str(directory / "*.safetensors")))
    if load_format in ("auto", "safetensors") and safetensors:
        from safetensors import safe_open

        for path in safetensors:
            with safe_open(path, framework="pt") as f:
                for name in f.keys():
                    yield name, f.get_tensor(name)
        return
    bins = sorted(glob.glob(str(directory / "pytorch_model*.bin")))
    if load_format in ("auto", "pt") and bins:
        for path in bins:
            yield from torch.load(path, map_location="cpu", weights_only=True).items()
        return
    raise FileNotFoundError(f"no {load_format} weights in {directory}")


def _dummy_weights(model: GPT2LMHeadModel, seed: int) -> None:
    """Random weights of the right shape, initialised like HF's GPT-2 (same compute and memory traffic).
    A quantized layer draws the dense weight a dense layer would (same generator, order and dtype) and quantizes
    it through its own loading, so that the same seed gives the same model before quantization."""
    modules = dict(model.named_modules())
    gen = None
    for name, param in model.named_parameters():
        gen = gen or torch.Generator(device=param.device).manual_seed(seed)
        module_name, _, param_name = name.rpartition(".")
        layer = modules[module_name]
        if isinstance(layer, Linear) and type(layer.method) is not LinearMethod and param_name != "bias":
            if param_name == "qweight":
                dense = torch.empty(layer.out_features, layer.in_features, device=param.device,
                                    dtype=layer.scales.dtype).normal_(0.0, 0.02, generator=gen)
                layer.method.load(layer, "weight", dense, transposed=False)
        elif "ln_" in name:
            param.data.fill_(1.0 if name.endswith("weight") else 0.0)
        elif name.endswith("bias"):
            param.data.zero_()
        else:
            param.data.normal_(0.0, 0.02, generator=gen)


def linear_method(config: EngineConfig) -> LinearMethod:
    """The quantization of the blocks' linear layers: the configured one, or a GPTQ / AWQ checkpoint's own."""
    directory = model_dir(config) if config.load_format != "dummy" else None
    found = checkpoint_quantization(directory)
    quantization = config.quantization
    if found is not None:
        kind = found.get("quant_method")
        if quantization == "none" and kind in ("gptq", "awq"):
            log.info("checkpoint %s is %s-quantized: loading it as such", config.model, kind)
            quantization = kind
        elif quantization in ("int8", "int4") or kind != quantization:
            raise ValueError(f"quantization: {config.quantization} but the checkpoint is already "
                             f"{kind}-quantized; use quantization: {kind} (or none)")
    elif quantization in ("gptq", "awq") and config.load_format != "dummy":
        raise ValueError(f"quantization: {quantization} needs a checkpoint with a {quantization} "
                         "quantization_config in config.json")
    if quantization in ("gptq", "awq") and config.load_format == "dummy":
        quantization = "int4"  # same layout and kernels; random weights need no checkpoint format
    return build_linear_method(quantization, found, config.quantization_group_size)


def load_model(config: EngineConfig, backend: AttentionBackend, device: torch.device, dtype: torch.dtype,
               tp: TensorParallel = TensorParallel(), pp: PipelineParallel = PipelineParallel(),
               ) -> tuple[GPT2LMHeadModel, GPT2Config]:
    """The model on ``device``; with ``tp`` / ``pp``, this rank's share of it (each layer takes its slice of the
    full checkpoint tensors, each stage its blocks; dummy weights are drawn in the rank's own shapes)."""
    hf_config = load_hf_config(config)
    method = linear_method(config)
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)  # build the parameters in place: no float32 copy of GPT-2 XL on the host
    try:
        with torch.device(device):
            model = GPT2LMHeadModel(hf_config, backend, method, tp, pp)
    finally:
        torch.set_default_dtype(previous)
    if config.load_format == "dummy":
        _dummy_weights(model, config.seed)
    else:
        model.load_weights(_checkpoint_tensors(model_dir(config), config.load_format))
    return model.eval(), hf_config


def weight_bytes(model: GPT2LMHeadModel, dtype: torch.dtype) -> tuple[int, int]:
    """(bytes the model's parameters take, bytes they would take with dense linear layers in ``dtype``)."""
    actual = sum(p.numel() * p.element_size() for p in model.parameters())
    dense = actual
    for m in model.modules():
        if isinstance(m, Linear) and type(m.method) is not LinearMethod:
            dense += m.in_features * m.out_features * dtype.itemsize - m.method.quantized_bytes(m)
    return actual, dense
