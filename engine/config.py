"""Engine settings: one pydantic model, loadable from a dict, a YAML file or a Ray Serve config file."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, model_validator


class SpeculativeConfig(BaseModel):
    """Speculative decoding (docs/speculative-decoding.md): a proposer guesses k tokens, the target verifies them."""

    model_config = ConfigDict(extra="forbid", protected_namespaces=())

    method: Literal["ngram", "draft_model"] = Field(..., description="ngram: prompt lookup; draft_model: a small GPT-2.")
    num_speculative_tokens: int = Field(4, ge=1, le=16, description="k: tokens proposed per request per step.")
    prompt_lookup_min: int = Field(1, ge=1, description="ngram: shortest suffix to look up.")
    prompt_lookup_max: int = Field(4, ge=1, description="ngram: longest suffix to look up (tried first).")
    draft_model: str | None = Field(None, description="draft_model: a local directory or hub id (gpt2 for gpt2-xl).")
    draft_load_format: Literal["auto", "safetensors", "pt", "dummy"] = Field("auto")
    draft_kv_cache_gib: float = Field(2.0, gt=0, description="draft_model: memory for the draft's own KV pool.")
    min_acceptance_rate: float = Field(
        0.2, ge=0, le=1, description="A request whose recent proposals are accepted less often than this pauses "
        "speculation (4, 8, ... 64 steps, then one probe): a verify step costs more than a decode step.")


class LoRAModuleConfig(BaseModel):
    """An adapter to load at start-up."""

    model_config = ConfigDict(extra="forbid")

    name: str = Field(..., description="What requests put in their model field to use it.")
    path: str = Field(..., description="A PEFT LoRA directory (adapter_config.json + adapter_model.safetensors).")
    merge: bool = Field(False, description="Fold it into the base weights at load: every request then gets it, "
                        "at no per-step cost (one merged adapter at most; dense weights only).")


class EngineConfig(BaseModel):
    model_config = ConfigDict(extra="forbid", protected_namespaces=())

    # --- model ---
    model: str = Field("gpt2", description="A local Hugging Face directory, or a hub id such as gpt2 / gpt2-xl.")
    tokenizer: str | None = Field(None, description="Tokenizer directory or hub id; defaults to the model's.")
    load_format: Literal["auto", "safetensors", "pt", "dummy"] = Field(
        "auto", description="'dummy' builds random weights of the checkpoint's shape (benchmarks, offline runs)."
    )
    dtype: Literal["auto", "float32", "float16", "bfloat16"] = Field(
        "auto", description="'auto': float32 on the CPU, float16 on a GPU."
    )
    device: str = Field("auto", description="'auto' (cuda when present, else cpu), 'cpu', 'cuda', 'cuda:1'...")
    seed: int = Field(0, description="Seed for dummy weights and for unseeded sampling.")
    max_model_len: int | None = Field(None, description="Longest prompt + output; defaults to the model's context.")
    quantization: Literal["none", "int8", "int4", "gptq", "awq"] = Field(
        "none", description="Weight-only quantization of the blocks' linear layers (docs/quantization.md). int8 / "
        "int4 are made at load from fp16/fp32 weights; gptq / awq read pre-quantized checkpoints (chosen "
        "automatically when the checkpoint's config.json says so).")
    quantization_group_size: int = Field(128, ge=8, description="int4: input features per scale and zero point.")

    # --- paged KV pool ---
    block_size: int = Field(16, ge=1, description="Tokens per KV block.")
    num_gpu_blocks: int | None = Field(None, ge=1, description="Fix the pool size in blocks (skips profiling).")
    gpu_memory_utilization: float = Field(
        0.90, gt=0, le=1, description="Fraction of GPU memory for weights + activations + KV pool."
    )
    cpu_kv_cache_gib: float = Field(1.0, gt=0, description="KV pool size when the model runs on the CPU.")
    swap_space_gib: float = Field(4.0, ge=0, description="CPU memory for swapped-out KV blocks.")
    enable_prefix_caching: bool = Field(
        True, description="Reuse the KV blocks of prompt prefixes already computed (chained block hashes)."
    )

    # --- batching ---
    max_num_seqs: int = Field(256, ge=1, description="Most sequences in one step.")
    max_num_batched_tokens: int = Field(8192, ge=1, description="Token budget of one step (chunked prefill).")
    long_prefill_token_threshold: int | None = Field(
        None, ge=1, description="Cap on one request's prefill chunk per step, so decodes keep flowing."
    )

    # --- policies (by name; see policies/) ---
    scheduling_policy: str = Field("fcfs", description="Waiting-queue order: fcfs, priority, sjf, lpm.")
    scheduling_policy_args: dict[str, Any] = Field(default_factory=dict)
    preemption_policy: str = Field("recompute", description="What preemption does to a victim: recompute, swap.")
    swap_policy: str = Field("watermark", description="When swapped requests come back: watermark, eager.")
    swap_policy_args: dict[str, Any] = Field(default_factory=dict)

    # --- speculative decoding ---
    speculative: SpeculativeConfig | None = Field(None, description="Off when absent.")

    # --- LoRA (docs/lora.md) ---
    enable_lora: bool = Field(False, description="Serve LoRA adapters, several per batch.")
    max_loras: int = Field(4, ge=1, description="Adapters resident in GPU slots at once (most per step).")
    max_lora_rank: int = Field(64, ge=1, description="Largest adapter rank accepted; slots are this wide.")
    max_cpu_loras: int | None = Field(None, ge=1, description="Most adapters loaded (CPU copies); None: no limit.")
    lora_modules: list[LoRAModuleConfig] = Field(default_factory=list, description="Adapters loaded at start-up.")

    # --- execution ---
    attention_backend: Literal["auto", "torch", "triton"] = Field("auto")
    enforce_eager: bool = Field(False, description="Disable CUDA graphs.")
    tensor_parallel_size: int = Field(
        1, ge=1, description="Processes (GPUs) one model is split over: heads and MLP columns, unevenly where they "
        "do not divide; this process is rank 0 and starts the others (docs/parallelism.md).")
    pipeline_parallel_size: int = Field(
        1, ge=1, description="Processes (GPUs) one model's blocks are split over, as consecutive stages "
        "(not together with tensor_parallel_size > 1 yet).")
    pipeline_micro_batches: int = Field(
        2, ge=1, description="Groups of sequences a pipeline-parallel step is cut into and passed down the stages "
        "one after another, so that the stages work at once (1: the whole step at a time).")

    @model_validator(mode="after")
    def _check_lora(self) -> "EngineConfig":
        if self.lora_modules and not self.enable_lora and not all(m.merge for m in self.lora_modules):
            raise ValueError("lora_modules need enable_lora: true (unless every one is merged)")
        if sum(m.merge for m in self.lora_modules) > 1:
            raise ValueError("at most one adapter can be merged into the base weights")
        if self.enable_lora and self.speculative is not None:
            raise ValueError("LoRA with speculative decoding is not supported yet")
        if self.tensor_parallel_size > 1 and self.pipeline_parallel_size > 1:
            raise ValueError("tensor and pipeline parallelism together are not supported yet")
        if self.tensor_parallel_size > 1 or self.pipeline_parallel_size > 1:
            for what, on in (("LoRA", self.enable_lora), ("speculative decoding", self.speculative is not None),
                             ("GPTQ / AWQ checkpoints", self.quantization in ("gptq", "awq"))):
                if on:
                    raise ValueError(f"tensor or pipeline parallelism with {what} is not supported yet")
        return self

    @property
    def num_ranks(self) -> int:
        """Processes (GPUs) one model runs on (engine/distributed.py)."""
        return self.tensor_parallel_size * self.pipeline_parallel_size

    @classmethod
    def from_yaml(cls, path: str | Path, **overrides: Any) -> "EngineConfig":
        """Read a plain engine YAML or a Ray Serve config whose first application's args hold ``engine:``."""
        data = yaml.safe_load(Path(path).read_text()) or {}
        if "applications" in data:
            data = data["applications"][0].get("args", {})
        if "engine" in data:
            data = data["engine"]
        return cls(**{**data, **overrides})
