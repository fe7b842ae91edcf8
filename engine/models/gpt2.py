"""GPT-2 on the paged KV pool: the HF architecture, with attention delegated to a paged-attention backend.

The whole step is one flat batch of tokens ([T, hidden]) from many sequences; only attention needs to know
which tokens belong to which sequence, and it learns that from the ``AttentionMetadata``.
"""

from __future__ import annotations

from typing import Iterable

import torch
import torch.nn.functional as F
from torch import nn

from gpt2serve.engine.attention import AttentionBackend, AttentionMetadata
from gpt2serve.engine.distributed import PipelineParallel, TensorParallel, shard_range
from gpt2serve.engine.layers.basic import Embedding, LayerNorm
from gpt2serve.engine.layers.linear import Conv1DLinear, Linear
from gpt2serve.engine.layers.parallel import ColumnParallelConv1D, RowParallelConv1D
from gpt2serve.engine.layers.quantization import LinearMethod


class GPT2Attention(nn.Module):
    def __init__(self, hidden: int, num_heads: int, backend: AttentionBackend, method: LinearMethod | None = None,
                 tp: TensorParallel = TensorParallel()):
        """With ``tp.size > 1`` this rank holds its share of the heads (``distributed.split_sizes``): their q, k
        and v columns of ``c_attn``, their rows of ``c_proj``, and their part of the KV pool."""
        super().__init__()
        self.head_dim = hidden // num_heads
        self.scale = self.head_dim ** -0.5
        self.backend = backend
        if tp.size == 1:
            self.num_heads = num_heads
            self.c_attn = Conv1DLinear(hidden, 3 * hidden, method=method)
            self.c_proj = Conv1DLinear(hidden, hidden, method=method)
            return
        heads = shard_range(num_heads, tp.size, tp.rank)
        self.num_heads = len(heads)
        mine = torch.arange(heads.start * self.head_dim, heads.stop * self.head_dim)
        self.c_attn = ColumnParallelConv1D(hidden, torch.cat([part * hidden + mine for part in range(3)]), method)
        self.c_proj = RowParallelConv1D(mine, hidden, tp, method)

    def forward(self, residual: torch.Tensor, norm: LayerNorm, kv_cache: torch.Tensor,
                meta: AttentionMetadata) -> torch.Tensor:
        """``residual + attention(norm(residual))``."""
        tokens = residual.shape[0]
        lora = meta.lora_slots
        qkv = self.c_attn(residual, norm=norm, lora_slots=lora)
        q, k, v = qkv.view(tokens, 3, self.num_heads, self.head_dim).unbind(1)
        out = self.backend.forward(q, k, v, kv_cache, meta, self.scale)
        return self.c_proj(out.reshape(tokens, -1), residual=residual, lora_slots=lora)


class GPT2MLP(nn.Module):
    def __init__(self, hidden: int, inner: int, method: LinearMethod | None = None,
                 tp: TensorParallel = TensorParallel()):
        super().__init__()
        if tp.size == 1:
            self.c_fc = Conv1DLinear(hidden, inner, method=method)
            self.c_proj = Conv1DLinear(inner, hidden, method=method)
            return
        cols = shard_range(inner, tp.size, tp.rank)
        mine = torch.arange(cols.start, cols.stop)
        self.c_fc = ColumnParallelConv1D(hidden, mine, method)
        self.c_proj = RowParallelConv1D(mine, hidden, tp, method)

    def forward(self, residual: torch.Tensor, norm: LayerNorm, lora_slots: torch.Tensor | None = None) -> torch.Tensor:
        """``residual + mlp(norm(residual))``."""
        hidden = self.c_fc(residual, norm=norm, activation="gelu_tanh", lora_slots=lora_slots)
        return self.c_proj(hidden, residual=residual, lora_slots=lora_slots)


class GPT2Block(nn.Module):
    def __init__(self, hidden: int, num_heads: int, inner: int, eps: float, backend: AttentionBackend,
                 method: LinearMethod | None = None, tp: TensorParallel = TensorParallel()):
        super().__init__()
        self.ln_1 = LayerNorm(hidden, eps)
        self.attn = GPT2Attention(hidden, num_heads, backend, method, tp)
        self.ln_2 = LayerNorm(hidden, eps)
        self.mlp = GPT2MLP(hidden, inner, method, tp)

    def forward(self, residual, kv_cache, meta):
        # Each LayerNorm is handed to the linear layer it feeds, and each residual add to the linear layer that
        # produces it, so that a batch-1 step can run every sub-layer as one fused kernel.
        residual = self.attn(residual, self.ln_1, kv_cache, meta)
        return self.mlp(residual, self.ln_2, meta.lora_slots)


class GPT2LMHeadModel(nn.Module):
    def __init__(self, hf_config, backend: AttentionBackend, linear_method: LinearMethod | None = None,
                 tp: TensorParallel = TensorParallel(), pp: PipelineParallel = PipelineParallel()):
        """``linear_method``: how every block's linear layers hold their weights (dense, int8, int4, GPTQ, AWQ);
        the LM head stays tied to the dense token embedding. ``tp``: this rank's share of a tensor-parallel model
        (embeddings, LayerNorms and the LM head are replicated; ``num_heads`` is this rank's). ``pp``: this rank's
        stage of a pipeline-parallel one (``h`` holds the stage's blocks, ``num_layers`` counts them; embeddings
        and the final LayerNorm are on every stage, GPT-2's being small next to its blocks)."""
        super().__init__()
        self.linear_method = linear_method or LinearMethod()
        c = hf_config
        hidden = c.n_embd
        inner = c.n_inner or 4 * hidden
        self.vocab_size = c.vocab_size
        self.wte = Embedding(c.vocab_size, hidden)
        self.wpe = Embedding(c.n_positions, hidden)
        self.pp = pp
        self.layers = pp.layers(c.n_layer)  # global indices of this stage's blocks
        if not self.layers:
            raise ValueError(f"pipeline_parallel_size {pp.size} exceeds the model's {c.n_layer} blocks")
        self.h = nn.ModuleList(
            GPT2Block(hidden, c.n_head, inner, c.layer_norm_epsilon, backend, self.linear_method, tp)
            for _ in self.layers
        )
        self.num_layers, self.num_heads, self.head_dim = len(self.layers), self.h[0].attn.num_heads, hidden // c.n_head
        self.ln_f = LayerNorm(hidden, c.layer_norm_epsilon)

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, kv_caches: list[torch.Tensor],
                meta: AttentionMetadata) -> torch.Tensor:
        """Hidden states after the final LayerNorm, one row per token of the flat batch."""
        if self.pp.size == 1:
            return self.ln_f(self._blocks(self.wte(input_ids) + self.wpe(positions), kv_caches, meta))
        # Pipeline stage: the step's sequences go through in micro-batches, each sent on as soon as this stage is
        # done with it, so that the next stage works on one while this one works on the next.
        hidden = self.wte.weight.shape[1]
        micro_batches = [(0, len(input_ids), meta)]
        if self.pp.micro_batches > 1:
            # The split needs the row offsets on the host: a small copy (pipeline steps run eagerly anyway).
            micro_batches = meta.split(self.pp.micro_batches, meta.query_start_loc.tolist())
        outputs, sending = [], []
        for t0, t1, part in micro_batches:
            if self.pp.is_first:
                x = self.wte(input_ids[t0:t1]) + self.wpe(positions[t0:t1])
            else:  # the previous stage's output
                x = self.pp.recv_activations(self.wte.weight.new_empty((t1 - t0, hidden)))
            x = self._blocks(x, kv_caches, part)
            if self.pp.is_last:
                outputs.append(x)
            else:
                x = x.contiguous()
                sending.append((self.pp.send_activations(x), x))
        for work, _ in sending:
            work.wait()
        if self.pp.is_last:
            return self.pp.share_output(self.ln_f(torch.cat(outputs) if len(outputs) > 1 else outputs[0]))
        return self.pp.share_output(self.wte.weight.new_empty((len(input_ids), hidden)))

    def _blocks(self, x: torch.Tensor, kv_caches: list[torch.Tensor], meta: AttentionMetadata) -> torch.Tensor:
        for layer, kv_cache in zip(self.h, kv_caches):
            x = layer(x, kv_cache, meta)
        return x

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return F.linear(hidden, self.wte.weight)  # the LM head is tied to the token embedding

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> None:
        """Take HF GPT-2 tensors by name; every tensor a layer expects must be found exactly once."""
        modules = dict(self.named_modules())
        linears = {name: m for name, m in modules.items() if isinstance(m, Linear)}
        expected = {f"{name}.{part}" for name, m in linears.items() for part in m.checkpoint_names()}
        expected |= {name for name, _ in self.named_parameters() if name.rpartition(".")[0] not in linears}
        loaded = set()
        for name, tensor in weights:
            name = name.removeprefix("transformer.")
            if name.endswith((".attn.bias", ".attn.masked_bias")) or name == "lm_head.weight":
                continue  # causal-mask buffers; the LM head is tied to wte
            if name.startswith("h."):  # block i of the checkpoint is block i - start of this pipeline stage
                index, _, rest = name[2:].partition(".")
                if int(index) not in self.layers:
                    continue
                name = f"h.{int(index) - self.layers.start}.{rest}"
            module_name, _, param = name.rpartition(".")
            if module_name not in modules or not hasattr(modules[module_name], "load_weight"):
                raise ValueError(f"checkpoint tensor {name!r} matches no layer of GPT2LMHeadModel")
            modules[module_name].load_weight(param, tensor)
            loaded.add(name)
        missing = expected - loaded
        if missing:
            raise ValueError(f"checkpoint lacks {len(missing)} tensors, e.g. {sorted(missing)[:3]}")
        for layer in linears.values():
            layer.finish_loading()
