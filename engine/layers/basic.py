"""Embedding and LayerNorm with the same ``load_weight`` hook as the linear layers."""

from __future__ import annotations

import torch
from torch import nn


def _copy_checked(param: torch.Tensor, name: str, tensor: torch.Tensor) -> None:
    if tuple(tensor.shape) != tuple(param.shape):
        raise ValueError(f"{name}: checkpoint shape {tuple(tensor.shape)} != layer shape {tuple(param.shape)}")
    param.data.copy_(tensor)


class Embedding(nn.Embedding):
    def __init__(self, num: int, dim: int):
        super().__init__(num, dim)
        self.weight.requires_grad_(False)

    def load_weight(self, name: str, tensor: torch.Tensor) -> None:
        _copy_checked(self.weight, name, tensor)


class LayerNorm(nn.LayerNorm):
    def __init__(self, dim: int, eps: float):
        super().__init__(dim, eps=eps)
        self.requires_grad_(False)

    def add_forward(self, x: torch.Tensor, residual: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(LayerNorm(x + residual), x + residual)``: on a GPU one Triton kernel instead of two passes (at
        batch 1 each GPT-2 XL step otherwise spends ~0.6 ms in 192 tiny add and LayerNorm launches)."""
        if x.is_cuda:
            from kernels.fused import add_layernorm

            return add_layernorm(x, residual, self.weight, self.bias, self.eps)
        residual = x + residual
        return self(residual), residual

    def load_weight(self, name: str, tensor: torch.Tensor) -> None:
        _copy_checked(getattr(self, name), name, tensor)
