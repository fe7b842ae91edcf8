"""How a linear layer stores its weight: dense, or weight-only int8 / int4 (made at load, or GPTQ / AWQ checkpoints).

A decode step reads every weight once, so its time is the weight bytes over the memory bandwidth: int8 halves
them, int4 quarters them (docs/quantization.md). Each ``LinearMethod`` owns three things for one layer:
which tensors it keeps (``create_weights``), how checkpoint tensors become those (``load`` / ``finish``), and the
product (``apply``). ``Linear`` delegates to its method, so GPT-2's fused ``c_attn`` and MLP layers are quantized
by naming a method in YAML, with no branch in the model.

Every int4 source ends in one layout, the one ``kernels/quant_linear.py`` multiplies by: ``qweight`` int32
``[N, K // 8]`` (eight 4-bit values per word along K, low nibble first), ``scales`` and float ``zeros``
``[N, ceil(K / group_size)]``, and for GPTQ act-order checkpoints a ``perm`` of the input features.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from gpt2serve.policies.registry import Registry

QUANT_METHODS: Registry["LinearMethod"] = Registry("quantization")

# Rows from which a quantized layer multiplies by its weight dequantized to the activation dtype (cuBLAS) instead of
# the Triton kernel. Measured on the H100 (benchmarks/results/2026-11-24_quant-linear_H100.txt and _quant_H100.json):
# the Triton prefill tiles are slow (c_attn at 64 rows: 95-111 us against 14 us for fp16 cuBLAS), but switching at
# 17 rows made W1 slower still (int8 9,061 against 10,412 out tok/s at 1024, int4 3,866 against 8,024: decode
# steps of up to 256 rows then dequantize every weight every step), so only prefill-sized steps take this path.
DEQUANT_MATMUL_MIN_ROWS = 1024


def _param(*shape: int, dtype: torch.dtype) -> nn.Parameter:
    return nn.Parameter(torch.empty(*shape, dtype=dtype), requires_grad=False)


def _gelu_and_residual(y: torch.Tensor, activation: str | None, residual: torch.Tensor | None) -> torch.Tensor:
    if activation == "gelu_tanh":
        y = F.gelu(y, approximate="tanh")
    return y if residual is None else y + residual


class LinearMethod:
    """Dense weights in the activation dtype: ``weight`` ``[out, in]``, the ``F.linear`` layout."""

    checkpoint_names: tuple[str, ...] = ("weight",)  # what a checkpoint must hold per layer (besides ``bias``)

    def create_weights(self, layer: nn.Module) -> None:
        layer.weight = _param(layer.out_features, layer.in_features, dtype=torch.get_default_dtype())

    def load(self, layer: nn.Module, name: str, tensor: torch.Tensor, transposed: bool) -> None:
        """``transposed``: the checkpoint holds [in, out] (GPT-2's Conv1D)."""
        if name != "weight":
            raise ValueError(f"unexpected checkpoint tensor {name!r} for a {self.name} linear layer")
        _copy_checked(layer.weight, name, tensor.t() if transposed else tensor)

    def finish(self, layer: nn.Module) -> None:
        """Called once every checkpoint tensor of the layer is loaded."""

    def apply(self, layer: nn.Module, x: torch.Tensor, norm: nn.LayerNorm | None, activation: str | None,
              residual: torch.Tensor | None) -> torch.Tensor:
        """``activation(norm(x) @ W.T + b) + residual``.

        While a CUDA graph of a small step is captured this is one Triton kernel that reads the weight once
        (cuBLAS reaches 0.5-1.3 TB/s on GPT-2 XL's matrices at one row, and the separate LayerNorm, GELU and add
        are ~5 us launches each). Outside graphs, launching Triton from Python costs more host time than the
        fusion saves, so eager steps use the plain PyTorch ops.
        """
        if x.is_cuda and torch.cuda.is_current_stream_capturing():
            from gpt2serve.kernels.decode_linear import fused_linear, use_fused_linear

            if use_fused_linear(x.shape[0], x.device):
                return fused_linear(
                    x, layer.weight, layer.bias, ln_weight=norm.weight if norm is not None else None,
                    ln_bias=norm.bias if norm is not None else None, ln_eps=norm.eps if norm is not None else 1e-5,
                    activation=activation, residual=residual)
        if norm is not None:
            x = norm(x)
        return _gelu_and_residual(F.linear(x, layer.weight, layer.bias), activation, residual)

    def dense_weight(self, layer: nn.Module, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """The weight as ``[out, in]`` floats (references, LoRA merging, large-batch products)."""
        return layer.weight

    def quantized_bytes(self, layer: nn.Module) -> int:
        return 0


QUANT_METHODS.register("none")(LinearMethod)


def _copy_checked(param: torch.Tensor, name: str, tensor: torch.Tensor) -> None:
    if tuple(tensor.shape) != tuple(param.shape):
        raise ValueError(f"{name}: checkpoint shape {tuple(tensor.shape)} != layer shape {tuple(param.shape)}")
    param.data.copy_(tensor)


class _QuantizedMethod(LinearMethod):
    """Shared by the int8 and int4 layouts: the product goes through a Triton kernel on a GPU and through the
    dequantized weight on a CPU (the reference path; the tiny models of the tests run there)."""

    param_names: tuple[str, ...] = ()

    def apply(self, layer, x, norm, activation, residual):
        if norm is not None:
            x = norm(x)
        if not x.is_cuda or x.shape[0] >= DEQUANT_MATMUL_MIN_ROWS:
            return _gelu_and_residual(self.dense_product(layer, x), activation, residual)
        return self.kernel(layer, x, activation, residual)

    def dense_product(self, layer, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.dense_weight(layer, x.dtype), layer.bias)

    def quantized_bytes(self, layer) -> int:
        return sum(getattr(layer, n).numel() * getattr(layer, n).element_size() for n in self.param_names
                   if getattr(layer, n, None) is not None)


@QUANT_METHODS.register("int8")
class Int8Method(_QuantizedMethod):
    """Symmetric per output channel, rounded to nearest at load: ``W[n, k] = qweight[n, k] * scales[n]``."""

    param_names = ("qweight", "scales")

    def create_weights(self, layer):
        layer.qweight = _param(layer.out_features, layer.in_features, dtype=torch.int8)
        layer.scales = _param(layer.out_features, dtype=torch.get_default_dtype())

    def load(self, layer, name, tensor, transposed):
        from gpt2serve.kernels.quant_linear import quantize_int8

        if name != "weight":
            raise ValueError(f"unexpected checkpoint tensor {name!r} for an int8 linear layer")
        w = (tensor.t() if transposed else tensor).to(layer.qweight.device, torch.float32)
        _check_shape(layer, w)
        q, s = quantize_int8(w)
        layer.qweight.data.copy_(q)
        layer.scales.data.copy_(s)

    def dense_weight(self, layer, dtype=torch.float32):
        return layer.qweight.to(dtype) * layer.scales.to(dtype)[:, None]

    def dense_product(self, layer, x):
        # A per-output-channel scale commutes with the product: scale the [M, N] output, not the [N, K] weight.
        y = F.linear(x, layer.qweight.to(x.dtype)) * layer.scales.to(x.dtype)
        return y if layer.bias is None else y + layer.bias

    def kernel(self, layer, x, activation, residual):
        from gpt2serve.kernels.quant_linear import int8_linear

        return int8_linear(x, layer.qweight, layer.scales, bias=layer.bias, activation=activation,
                           residual=residual)


def _check_shape(layer: nn.Module, w: torch.Tensor) -> None:
    if tuple(w.shape) != (layer.out_features, layer.in_features):
        raise ValueError(f"weight: checkpoint shape {tuple(w.shape)} != layer shape "
                         f"{(layer.out_features, layer.in_features)}")


@QUANT_METHODS.register("int4")
class Int4Method(_QuantizedMethod):
    """Asymmetric per group of ``group_size`` input features, with zero points, rounded to nearest at load."""

    param_names = ("qweight", "scales", "zeros", "perm")

    def __init__(self, group_size: int = 128):
        self.group_size = group_size

    def create_weights(self, layer):
        n, k = layer.out_features, layer.in_features
        if k % 8:
            raise ValueError(f"int4 packs 8 input features per word; in_features={k} is not a multiple of 8")
        groups = -(-k // self.group_size)
        dtype = torch.get_default_dtype()
        layer.qweight = _param(n, k // 8, dtype=torch.int32)
        layer.scales = _param(n, groups, dtype=dtype)
        layer.zeros = _param(n, groups, dtype=dtype)
        layer.perm = None  # act-order GPTQ only

    def load(self, layer, name, tensor, transposed):
        from gpt2serve.kernels.quant_linear import quantize_int4

        if name != "weight":
            raise ValueError(f"unexpected checkpoint tensor {name!r} for an int4 linear layer")
        w = (tensor.t() if transposed else tensor).to(layer.qweight.device, torch.float32)
        _check_shape(layer, w)
        self._store(layer, *quantize_int4(w, self.group_size))

    def _store(self, layer, qweight, scales, zeros, perm=None):
        for name, value in (("qweight", qweight), ("scales", scales), ("zeros", zeros)):
            _copy_checked(getattr(layer, name), name, value)
        if perm is not None:
            layer.perm = nn.Parameter(perm.to(layer.qweight.device, torch.int32), requires_grad=False)

    def dense_weight(self, layer, dtype=torch.float32):
        from gpt2serve.kernels.quant_linear import dequantize_int4

        w = dequantize_int4(layer.qweight, layer.scales, layer.zeros, self.group_size).to(dtype)
        if layer.perm is not None:  # stored columns are the input features in ``perm`` order
            w = torch.empty_like(w).index_copy_(1, layer.perm.long(), w)
        return w

    def kernel(self, layer, x, activation, residual):
        from gpt2serve.kernels.quant_linear import int4_linear

        return int4_linear(x, layer.qweight, layer.scales, layer.zeros, self.group_size, bias=layer.bias,
                           activation=activation, residual=residual, perm=layer.perm)


class _CheckpointInt4Method(Int4Method):
    """Pre-quantized 4-bit checkpoints: the layer collects ``qweight``, ``qzeros``, ``scales`` (and ``g_idx``),
    then ``finish`` converts them once to the kernel's layout. Both formats describe ``x @ W`` with ``W``
    ``[in, out]`` whatever the original module was, so Conv1D's transposition does not apply."""

    checkpoint_names = ("qweight", "qzeros", "scales")
    optional_names: tuple[str, ...] = ()

    def load(self, layer, name, tensor, transposed):
        if name not in self.checkpoint_names + self.optional_names:
            raise ValueError(f"unexpected checkpoint tensor {name!r} for a {self.name} linear layer")
        layer._parts = getattr(layer, "_parts", {})
        layer._parts[name] = tensor.to(layer.qweight.device)

    def finish(self, layer):
        parts = layer.__dict__.pop("_parts", {})
        missing = [n for n in self.checkpoint_names if n not in parts]
        if missing:
            raise ValueError(f"{self.name} layer lacks {missing}")
        k, n = layer.in_features, layer.out_features
        q, zeros, scales = self.unpack(parts)  # q [in, out] ints, zeros and scales [groups, out]
        groups = -(-k // self.group_size)
        if tuple(q.shape) != (k, n) or tuple(scales.shape) != (groups, n) or tuple(zeros.shape) != (groups, n):
            raise ValueError(
                f"{self.name} tensors describe a {tuple(q.shape)} weight with {tuple(scales.shape)} scales; the "
                f"layer is [in={k}, out={n}] with group_size {self.group_size} ({groups} groups)")
        perm = self.input_order(parts.get("g_idx"), k)
        if perm is not None:
            q = q[perm]
        from gpt2serve.kernels.quant_linear import pack_int4

        self._store(layer, pack_int4(q.t().contiguous()), scales.t().to(layer.scales.dtype),
                    zeros.t().to(layer.zeros.dtype), perm)

    def input_order(self, g_idx: torch.Tensor | None, k: int) -> torch.Tensor | None:
        return None


def _unpack_rows(packed: torch.Tensor, order: tuple[int, ...] = tuple(range(8))) -> torch.Tensor:
    """int32 ``[r, c]`` → ``[r, 8c]`` values 0..15; nibble i of a word holds column ``order[i]`` of its eight."""
    shifts = torch.arange(0, 32, 4, device=packed.device, dtype=torch.int32)
    nibbles = (packed.unsqueeze(-1) >> shifts) & 0xF  # [r, c, 8], nibble i
    inverse = [order.index(j) for j in range(8)]
    return nibbles[..., inverse].reshape(packed.shape[0], -1)


@QUANT_METHODS.register("gptq")
class GptqMethod(_CheckpointInt4Method):
    """AutoGPTQ / GPTQModel layout: ``qweight`` ``[in / 8, out]`` packed along the input features, ``qzeros``
    ``[groups, out / 8]``, ``scales`` ``[groups, out]``, ``g_idx`` ``[in]`` (the group of each input feature; with
    act-order, ``desc_act``, groups are not contiguous). The ``gptq`` checkpoint format stores zero points minus
    one (``gptq_v2`` does not)."""

    optional_names = ("g_idx",)

    def __init__(self, group_size: int = 128, zero_offset: int = 1):
        super().__init__(group_size)
        self.zero_offset = zero_offset

    def unpack(self, parts):
        q = _unpack_rows(parts["qweight"].t().contiguous()).t()  # [in, out]
        zeros = _unpack_rows(parts["qzeros"]) + self.zero_offset
        return q, zeros, parts["scales"]

    def input_order(self, g_idx, k):
        """Sort the input features by group, so that each group is a contiguous run of ``group_size`` columns as
        the kernel assumes; the kernel then reads x through the same order."""
        if g_idx is None:
            return None
        g_idx = g_idx.long()
        plain = torch.arange(k, device=g_idx.device) // self.group_size
        if torch.equal(g_idx, plain):
            return None
        order = torch.argsort(g_idx, stable=True)
        if not torch.equal(g_idx[order], plain):
            raise ValueError("g_idx does not give every group exactly group_size input features")
        return order.to(torch.int32)


@QUANT_METHODS.register("awq")
class AwqMethod(_CheckpointInt4Method):
    """AutoAWQ GEMM layout: ``qweight`` ``[in, out / 8]`` packed along the output features in the interleaved
    order 0 2 4 6 1 3 5 7, ``qzeros`` ``[groups, out / 8]`` packed the same way, ``scales`` ``[groups, out]``."""

    ORDER = (0, 2, 4, 6, 1, 3, 5, 7)

    def unpack(self, parts):
        return _unpack_rows(parts["qweight"], self.ORDER), _unpack_rows(parts["qzeros"], self.ORDER), parts["scales"]


def build_linear_method(quantization: str, checkpoint_quant: dict[str, Any] | None, group_size: int) -> LinearMethod:
    """The method every linear layer of the model uses. ``checkpoint_quant`` is the checkpoint's own
    ``quantization_config``; GPTQ / AWQ settings (group size, zero offset) come from there."""
    if quantization in ("gptq", "awq"):
        cq = checkpoint_quant or {}
        if cq.get("quant_method", quantization) != quantization:
            raise ValueError(f"quantization: {quantization} but the checkpoint is {cq.get('quant_method')!r}")
        bits = cq.get("bits", cq.get("w_bit", 4))
        if bits != 4:
            raise ValueError(f"{quantization} checkpoints with {bits}-bit weights are not supported (4 only)")
        size = cq.get("group_size", cq.get("q_group_size", group_size))
        if size in (-1, None):
            raise ValueError(f"{quantization} without groups (group_size -1) is not supported")
        if quantization == "awq":
            if cq.get("zero_point", True) is False or cq.get("version", "gemm").lower() != "gemm":
                raise ValueError("only AWQ checkpoints in the GEMM layout with zero points are supported")
            return AwqMethod(group_size=size)
        return GptqMethod(group_size=size, zero_offset=0 if cq.get("checkpoint_format") == "gptq_v2" else 1)
    if quantization == "int4":
        return Int4Method(group_size=group_size)
    return QUANT_METHODS.build(quantization)


def checkpoint_quantization(directory: Path | None) -> dict[str, Any] | None:
    """The ``quantization_config`` of ``config.json`` (or AutoGPTQ's ``quantize_config.json``), if any."""
    if directory is None:
        return None
    config = directory / "config.json"
    if config.exists():
        found = json.loads(config.read_text()).get("quantization_config")
        if found:
            return found
    legacy = directory / "quantize_config.json"
    if legacy.exists():
        return {"quant_method": "gptq", **json.loads(legacy.read_text())}
    return None
