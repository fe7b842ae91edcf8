"""Linear layers. Each knows how to take its weight from a checkpoint tensor.

GPT-2 checkpoints store Conv1D weights as [in_features, out_features]; we keep [out, in] so that the forward
is a plain ``F.linear`` (and so that quantized and LoRA variants later share one layout).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class Linear(nn.Module):
    def __init__(self, in_features: int, out_features: int, bias: bool = True):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.weight = nn.Parameter(torch.empty(out_features, in_features), requires_grad=False)
        self.bias = nn.Parameter(torch.empty(out_features), requires_grad=False) if bias else None

    def forward(self, x: torch.Tensor, *, norm: nn.LayerNorm | None = None, activation: str | None = None,
                residual: torch.Tensor | None = None) -> torch.Tensor:
        """``activation(norm(x) @ W.T + b) + residual``, with each part optional.

        While a CUDA graph of a batch-1 step is captured this is one Triton kernel that reads the weight once
        (cuBLAS reaches 0.5-1.3 TB/s on GPT-2 XL's matrices at one row, and the separate LayerNorm, GELU and add
        are ~5 us launches each). Outside graphs, launching Triton from Python costs more host time than the
        fusion saves, so eager steps use the plain PyTorch ops.
        """
        if x.is_cuda and torch.cuda.is_current_stream_capturing():
            from kernels.decode_linear import fused_linear, use_fused_linear

            if use_fused_linear(x.shape[0], x.device):
                return fused_linear(
                    x, self.weight, self.bias, ln_weight=norm.weight if norm is not None else None,
                    ln_bias=norm.bias if norm is not None else None, ln_eps=norm.eps if norm is not None else 1e-5,
                    activation=activation, residual=residual)
        if norm is not None:
            x = norm(x)
        y = F.linear(x, self.weight, self.bias)
        if activation == "gelu_tanh":
            y = F.gelu(y, approximate="tanh")
        return y if residual is None else y + residual

    def load_weight(self, name: str, tensor: torch.Tensor, transposed: bool = False) -> None:
        """``transposed``: the checkpoint holds [in, out] (GPT-2's Conv1D)."""
        param = self.weight if name == "weight" else self.bias
        if name == "weight" and transposed:
            tensor = tensor.t()
        if tuple(tensor.shape) != tuple(param.shape):
            raise ValueError(f"{name}: checkpoint shape {tuple(tensor.shape)} != layer shape {tuple(param.shape)}")
        param.data.copy_(tensor)


class Conv1DLinear(Linear):
    """A linear layer fed from a GPT-2 Conv1D checkpoint tensor."""

    def load_weight(self, name: str, tensor: torch.Tensor, transposed: bool = True) -> None:
        super().load_weight(name, tensor, transposed=transposed)
