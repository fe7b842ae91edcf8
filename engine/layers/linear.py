"""Linear layers. Each knows how to take its weight from a checkpoint tensor.

GPT-2 checkpoints store Conv1D weights as [in_features, out_features]; we keep [out, in] so that the forward
is a plain ``F.linear`` (and so that quantized and LoRA variants share one layout). How the weight is stored and
multiplied by (dense, int8, int4, GPTQ, AWQ) is the layer's ``LinearMethod`` (``engine/layers/quantization.py``).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from engine.layers.quantization import LinearMethod


class Linear(nn.Module):
    transposed_checkpoint = False  # True where the checkpoint holds [in, out]

    def __init__(self, in_features: int, out_features: int, bias: bool = True, method: LinearMethod | None = None):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.method = method or LinearMethod()
        self.method.create_weights(self)
        self.bias = nn.Parameter(torch.empty(out_features), requires_grad=False) if bias else None
        # LoRA slots (engine/lora.py fills them when LoRA is enabled): [S, R, in] and [S, out, R].
        self.lora_a: torch.Tensor | None = None
        self.lora_b: torch.Tensor | None = None

    def forward(self, x: torch.Tensor, *, norm: nn.LayerNorm | None = None, activation: str | None = None,
                residual: torch.Tensor | None = None, lora_slots: torch.Tensor | None = None) -> torch.Tensor:
        """``activation(norm(x) @ W.T + b + lora(norm(x))) + residual``, each part optional (fused where the
        method can). ``lora_slots``: each row's adapter slot, -1 for none; None when no row has one."""
        if lora_slots is None or self.lora_a is None:
            return self.method.apply(self, x, norm, activation, residual)
        # The delta must join before the activation, so the norm and the activation leave the fused kernel;
        # bias and residual are additions, so the delta can follow them.
        h = norm(x) if norm is not None else x
        y = self.method.apply(self, h, None, None, residual if activation is None else None)
        if h.is_cuda:
            from kernels.lora import apply_lora

            apply_lora(h, y, self.lora_a, self.lora_b, lora_slots)
        else:  # the CPU tests' tiny models: the reference is fast enough and exact
            from kernels.lora import lora_delta_ref

            rows = lora_slots >= 0
            if bool(rows.any()):
                y = y + lora_delta_ref(h, self.lora_a, self.lora_b, lora_slots).to(y.dtype)
        if activation == "gelu_tanh":
            y = F.gelu(y, approximate="tanh")
            return y if residual is None else y + residual
        return y

    def load_weight(self, name: str, tensor: torch.Tensor) -> None:
        if name == "bias" and self.bias is not None:
            if tuple(tensor.shape) != tuple(self.bias.shape):
                raise ValueError(f"bias: checkpoint shape {tuple(tensor.shape)} != layer shape "
                                 f"{tuple(self.bias.shape)}")
            self.bias.data.copy_(tensor)
        else:
            self.method.load(self, name, tensor, self.transposed_checkpoint)

    def checkpoint_names(self) -> list[str]:
        return list(self.method.checkpoint_names) + (["bias"] if self.bias is not None else [])

    def finish_loading(self) -> None:
        self.method.finish(self)


class Conv1DLinear(Linear):
    """A linear layer fed from a GPT-2 Conv1D checkpoint tensor."""

    transposed_checkpoint = True
