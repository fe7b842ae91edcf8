"""Linear layers. Each knows how to take its weight from a checkpoint tensor.

GPT-2 checkpoints store Conv1D weights as [in_features, out_features]; we keep [out, in] so that the forward
is a plain ``F.linear`` (and so that quantized and LoRA variants share one layout). How the weight is stored and
multiplied by (dense, int8, int4, GPTQ, AWQ) is the layer's ``LinearMethod`` (``engine/layers/quantization.py``).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from gpt2serve.engine.layers.quantization import LinearMethod

# The sorted LoRA path groups a step's rows by slot; the grouping depends only on the step's slot ids, so every
# layer of the step shares one: (slot ids tensor, captured into a graph or not, its LoraSegments).
_step_segments: tuple | None = None


def _segments_of_step(slots: torch.Tensor, num_slots: int):
    from gpt2serve.kernels.lora import MASKED_MAX_ROWS, lora_segments

    global _step_segments
    if slots.shape[0] <= MASKED_MAX_ROWS:
        return None  # the masked path: no grouping
    # Keyed by the tensor object (the model hands every layer the same one) and by capture: a graph's warm-up run
    # and its capture see the same buffers, but the capture must record its own grouping launch.
    capturing = slots.is_cuda and torch.cuda.is_current_stream_capturing()
    cached = _step_segments
    if cached is None or cached[0] is not slots or cached[1] != capturing or cached[2].num_slots != num_slots:
        cached = _step_segments = (slots, capturing, lora_segments(slots, num_slots))
    return cached[2]


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
        # Whether some loaded adapter targets this layer (the model runner marks it). The others' slot stacks are
        # all zeros, so they skip the LoRA kernels; a decode graph captured without them is recaptured when this
        # changes.
        self.lora_targeted = False

    def forward(self, x: torch.Tensor, *, norm: nn.LayerNorm | None = None, activation: str | None = None,
                residual: torch.Tensor | None = None, lora_slots: torch.Tensor | None = None) -> torch.Tensor:
        """``activation(norm(x) @ W.T + b + lora(norm(x))) + residual``, each part optional (fused where the
        method can). ``lora_slots``: each row's adapter slot, -1 for none; None when no row has one."""
        if lora_slots is None or self.lora_a is None or not self.lora_targeted:
            return self.method.apply(self, x, norm, activation, residual)
        if self._fuses_lora(x):
            return self._fused_lora_forward(x, norm, activation, residual, lora_slots)
        # The delta must join before the activation, so the norm and the activation leave the fused kernel;
        # bias and residual are additions, so the delta can follow them.
        h = norm(x) if norm is not None else x
        y = self.method.apply(self, h, None, None, residual if activation is None else None)
        if h.is_cuda:
            from gpt2serve.kernels.lora import apply_lora

            apply_lora(h, y, self.lora_a, self.lora_b, lora_slots,
                       segments=_segments_of_step(lora_slots, self.lora_a.shape[0]))
        else:  # the CPU tests' tiny models: the reference is fast enough and exact
            from gpt2serve.kernels.lora import lora_delta_ref

            rows = lora_slots >= 0
            if bool(rows.any()):
                y = y + lora_delta_ref(h, self.lora_a, self.lora_b, lora_slots).to(y.dtype)
        if activation == "gelu_tanh":
            y = F.gelu(y, approximate="tanh")
            return y if residual is None else y + residual
        return y

    def _fuses_lora(self, x: torch.Tensor) -> bool:
        """Whether this LoRA step goes through ``fused_linear`` with the delta in its epilogue: dense weights,
        and the rows and graph capture for which ``LinearMethod.apply`` fuses the plain layer."""
        if type(self.method) is not LinearMethod or not x.is_cuda or not torch.cuda.is_current_stream_capturing():
            return False
        from gpt2serve.kernels.decode_linear import use_fused_linear

        return use_fused_linear(x.shape[0], x.device)

    def _fused_lora_forward(self, x, norm, activation, residual, lora_slots):
        """One launch, as without LoRA: the fused linear's own producer programs compute the shrink (the
        LayerNorm folded in) beside its weight stream, and its epilogue adds the delta before the activation, so
        LayerNorm, bias, GELU and residual stay in the one kernel."""
        from gpt2serve.kernels.decode_linear import LoraDelta, fused_linear

        return fused_linear(x, self.weight, self.bias, ln_weight=norm.weight if norm is not None else None,
                            ln_bias=norm.bias if norm is not None else None,
                            ln_eps=norm.eps if norm is not None else 1e-5, activation=activation,
                            residual=residual, lora=LoraDelta(self.lora_b, lora_slots, lora_a=self.lora_a))

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
