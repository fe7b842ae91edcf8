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

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight, self.bias)

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
