"""Tensor-parallel linear layers: each rank holds some output features (column-parallel) or some input features
(row-parallel) of a full layer, and takes them from the full checkpoint tensor itself (engine/distributed.py).

Both are ``Conv1DLinear`` layers of the rank's own shape, so the dense, int8 and int4 methods and the fused
kernels work unchanged; only loading (which slice) and, for row-parallel layers, the all-reduce differ.
"""

from __future__ import annotations

import torch

from gpt2serve.engine.distributed import TensorParallel
from gpt2serve.engine.layers.linear import Conv1DLinear
from gpt2serve.engine.layers.quantization import LinearMethod


def _check_dense(name: str) -> None:
    if name not in ("weight", "bias"):
        raise ValueError("tensor parallelism with pre-quantized (GPTQ / AWQ) checkpoints is not supported yet: "
                         f"cannot split {name!r}")


class ColumnParallelConv1D(Conv1DLinear):
    """Output features ``rows`` of a full ``[in_features -> len(full)]`` layer; no communication."""

    def __init__(self, in_features: int, rows: torch.Tensor, method: LinearMethod | None = None):
        super().__init__(in_features, len(rows), method=method)
        self.rows = rows.cpu()

    def load_weight(self, name: str, tensor: torch.Tensor) -> None:
        _check_dense(name)
        out_dim = 1 if name == "weight" and self.transposed_checkpoint else 0  # Conv1D weights are [in, out]
        super().load_weight(name, tensor.index_select(out_dim, self.rows.to(tensor.device)))


class RowParallelConv1D(Conv1DLinear):
    """Input features ``cols`` of a full layer; the ranks' partial outputs are summed by one all-reduce. The bias
    and the residual are added by rank 0 alone, inside its fused kernel, so the sum holds each once."""

    def __init__(self, cols: torch.Tensor, out_features: int, tp: TensorParallel, method: LinearMethod | None = None):
        super().__init__(len(cols), out_features, method=method)
        self.cols = cols.cpu()
        self.tp = tp

    def load_weight(self, name: str, tensor: torch.Tensor) -> None:
        _check_dense(name)
        if name == "bias":
            super().load_weight(name, tensor if self.tp.is_driver else torch.zeros_like(tensor))
        else:
            in_dim = 0 if self.transposed_checkpoint else 1
            super().load_weight(name, tensor.index_select(in_dim, self.cols.to(tensor.device)))

    def forward(self, x: torch.Tensor, *, residual: torch.Tensor | None = None, **kwargs) -> torch.Tensor:
        y = super().forward(x, residual=residual if self.tp.is_driver else None, **kwargs)
        return self.tp.all_reduce(y)
