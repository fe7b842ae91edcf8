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

    def load_weight(self, name: str, tensor: torch.Tensor) -> None:
        _copy_checked(getattr(self, name), name, tensor)
