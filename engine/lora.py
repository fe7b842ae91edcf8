"""LoRA adapters: PEFT checkpoints, GPU slots with LRU eviction, and the per-token slot map of a step.

A LoRA adapter adds ``scaling * B @ A`` (rank r) to some linear layers. Serving many adapters from one base model
means keeping up to ``max_loras`` of them in GPU slots, stacked per layer (``lora_a [S, R, K]``, ``lora_b [S, N,
R]``, rank zero-padded to ``max_lora_rank``), and telling each layer which slot every token row uses; the kernels in
``kernels/lora.py`` apply all of a step's adapters in one shrink and one expand per layer (docs/lora.md).

Names and ids: a request names an adapter; the engine keys it by a ``uid`` that is new on every load, so that an
adapter unloaded and loaded again under the same name never shares prefix-cache blocks with its old self. Adapters
of the start-up config get ``<name>#0`` (``startup_uid``), so that every replica of a service agrees on them.
"""

from __future__ import annotations

import itertools
import json
import logging
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

log = logging.getLogger(__name__)

PEFT_PREFIX = "base_model.model."


def lora_layers(model: nn.Module) -> dict[str, nn.Module]:
    """The linear layers an adapter may target, by module name (``h.0.attn.c_attn``, ...)."""
    from gpt2serve.engine.layers.linear import Linear

    return {name: m for name, m in model.named_modules() if isinstance(m, Linear)}


class LoRAError(ValueError):
    """An adapter that cannot be loaded as given (the HTTP API answers 400 with this message)."""


class UnknownLoRAError(KeyError):
    """A request or an unload names an adapter that is not loaded (the HTTP API answers 404)."""

    def __str__(self) -> str:
        return str(self.args[0])


@dataclass
class LoRAAdapter:
    name: str
    uid: str
    path: str
    rank: int
    scaling: float
    weights: dict[str, tuple[torch.Tensor, torch.Tensor]]  # layer name -> (A [r, in], B [out, r] * scaling), CPU

    @property
    def bytes(self) -> int:
        return sum(a.numel() * a.element_size() + b.numel() * b.element_size() for a, b in self.weights.values())


_uids = itertools.count(1)


def startup_uid(name: str) -> str:
    return f"{name}#0"


def read_peft_adapter(name: str, path: str | Path, layers: dict[str, nn.Module], max_rank: int,
                      uid: str | None = None) -> LoRAAdapter:
    """Read and check a PEFT LoRA directory against the model's linear layers (``layers``: name -> Linear).
    ``uid``: the load's key (a service gives every replica the same one, so their prefix caches agree); None
    draws a new one.

    GPT-2's ``c_attn`` / ``c_proj`` / ``c_fc`` are Conv1D modules (weights ``[in, out]``), but PEFT's ``lora_A`` and
    ``lora_B`` are ordinary linear layers (``[r, in]`` and ``[out, r]``) whatever the base module, so the delta in
    our ``[out, in]`` layout is ``B @ A`` with no transposition; ``fan_in_fan_out`` only matters when merging into
    Conv1D weights, which we keep as ``[out, in]`` too.
    """
    path = Path(path)
    config_file, weights_file = path / "adapter_config.json", path / "adapter_model.safetensors"
    if not path.is_dir():
        raise LoRAError(f"adapter directory {str(path)!r} does not exist")
    if not config_file.exists():
        raise LoRAError(f"{str(path)!r} has no adapter_config.json")
    try:
        config = json.loads(config_file.read_text())
    except json.JSONDecodeError as e:
        raise LoRAError(f"adapter_config.json is not valid JSON: {e}") from None
    if config.get("peft_type", "LORA") != "LORA":
        raise LoRAError(f"adapter type {config.get('peft_type')!r} is not LORA")
    rank = config.get("r")
    if not isinstance(rank, int) or rank < 1:
        raise LoRAError(f"adapter_config.json: r must be a positive integer, got {rank!r}")
    if rank > max_rank:
        raise LoRAError(f"adapter rank {rank} exceeds max_lora_rank {max_rank}")
    for key, what in (("rank_pattern", "per-module ranks"), ("alpha_pattern", "per-module alphas"),
                      ("modules_to_save", "modules_to_save"), ("use_dora", "DoRA")):
        if config.get(key):
            raise LoRAError(f"adapters with {what} are not supported")
    if config.get("bias", "none") != "none":
        raise LoRAError("adapters that train biases (bias != 'none') are not supported")
    alpha = config.get("lora_alpha", rank)
    scaling = alpha / (rank ** 0.5 if config.get("use_rslora") else rank)
    if not weights_file.exists():
        raise LoRAError(f"{str(path)!r} has no adapter_model.safetensors")
    from safetensors.torch import load_file

    try:
        tensors = load_file(weights_file)
    except Exception as e:  # noqa: BLE001 - safetensors raises several kinds for a damaged file
        raise LoRAError(f"adapter_model.safetensors cannot be read: {e}") from None
    parts: dict[str, dict[str, torch.Tensor]] = {}
    for key, tensor in tensors.items():
        module, _, kind = key.removeprefix(PEFT_PREFIX).removeprefix("transformer.").rpartition(".lora_")
        kind = kind.removesuffix(".weight")
        if kind not in ("A", "B") or module not in layers:
            raise LoRAError(f"adapter tensor {key!r} matches no LoRA-capable layer (c_attn, c_proj, c_fc)")
        parts.setdefault(module, {})[kind] = tensor
    if not parts:
        raise LoRAError("adapter_model.safetensors holds no lora_A / lora_B tensors")
    weights = {}
    for module, ab in parts.items():
        if set(ab) != {"A", "B"}:
            raise LoRAError(f"{module}: lora_A and lora_B must both be present")
        layer, a, b = layers[module], ab["A"].float(), ab["B"].float()
        if tuple(a.shape) != (rank, layer.in_features) or tuple(b.shape) != (layer.out_features, rank):
            raise LoRAError(f"{module}: lora_A {tuple(a.shape)} / lora_B {tuple(b.shape)} do not fit a rank-{rank} "
                            f"adapter of a [{layer.in_features} -> {layer.out_features}] layer")
        weights[module] = (a.contiguous(), (b * scaling).contiguous())
    return LoRAAdapter(name=name, uid=uid or f"{name}#{next(_uids)}", path=str(path), rank=rank, scaling=scaling,
                       weights=weights)


@dataclass
class LoRASlots:
    """Which adapter sits in which GPU slot; least recently used first in ``order``."""

    num_slots: int
    slot_of: dict[str, int] = field(default_factory=dict)  # uid -> slot
    order: OrderedDict = field(default_factory=OrderedDict)  # uid -> None, LRU first

    def place(self, uids: set[str]) -> tuple[dict[str, int], list[tuple[str, int]]]:
        """Slots for ``uids`` (at most ``num_slots``): the resident ones stay; the others take free slots or evict
        the least recently used adapter not in ``uids``. Returns every uid's slot and the (uid, slot) loads."""
        assert len(uids) <= self.num_slots, "the scheduler admits at most max_loras adapters per step"
        loads = []
        free = sorted(set(range(self.num_slots)) - set(self.slot_of.values()))
        for uid in sorted(uids - set(self.slot_of)):
            if free:
                slot = free.pop(0)
            else:
                victim = next(u for u in self.order if u not in uids)
                slot = self.slot_of.pop(victim)
                del self.order[victim]
            self.slot_of[uid] = slot
            loads.append((uid, slot))
        for uid in uids:
            self.order[uid] = None
            self.order.move_to_end(uid)
        return {uid: self.slot_of[uid] for uid in uids}, loads

    def drop(self, uid: str) -> None:
        if uid in self.slot_of:
            del self.slot_of[uid]
            del self.order[uid]


class LoRAManager:
    """The runner's adapters: CPU copies of every loaded adapter, ``max_loras`` GPU slots per linear layer."""

    def __init__(self, model: nn.Module, max_loras: int, max_rank: int, max_cpu_loras: int | None = None):
        self.layers = lora_layers(model)
        self.max_rank, self.max_cpu_loras = max_rank, max_cpu_loras
        self.slots = LoRASlots(max_loras)
        self.adapters: dict[str, LoRAAdapter] = {}  # uid -> adapter
        for layer in self.layers.values():
            dtype = layer.bias.dtype if layer.bias is not None else torch.get_default_dtype()
            device = next(layer.parameters()).device
            layer.lora_a = torch.zeros(max_loras, max_rank, layer.in_features, dtype=dtype, device=device)
            layer.lora_b = torch.zeros(max_loras, layer.out_features, max_rank, dtype=dtype, device=device)

    def add(self, adapter: LoRAAdapter) -> None:
        if self.max_cpu_loras is not None and len(self.adapters) >= self.max_cpu_loras:
            raise LoRAError(f"{len(self.adapters)} adapters are loaded already (max_cpu_loras); unload one first")
        self.adapters[adapter.uid] = adapter

    def remove(self, uid: str) -> None:
        self.adapters.pop(uid, None)
        self.slots.drop(uid)

    def slot_map(self, uids: set[str]) -> dict[str, int]:
        """Make ``uids`` resident (copying evicted-then-needed adapters back in) and return their slots."""
        slot_of, loads = self.slots.place(uids)
        for uid, slot in loads:
            adapter = self.adapters[uid]
            for name, layer in self.layers.items():
                a_stack, b_stack = layer.lora_a[slot], layer.lora_b[slot]
                a_stack.zero_()
                b_stack.zero_()
                if name in adapter.weights:
                    a, b = adapter.weights[name]
                    a_stack[:adapter.rank].copy_(a)
                    b_stack[:, :adapter.rank].copy_(b)
        return slot_of


def merge_adapter(model: nn.Module, adapter: LoRAAdapter) -> None:
    """Fold ``adapter`` into the dense base weights once (``merge: true``): the model then is the adapted one,
    at no cost per step, for every request."""
    from gpt2serve.engine.layers.quantization import LinearMethod

    layers = lora_layers(model)
    for name, (a, b) in adapter.weights.items():
        layer = layers[name]
        if type(layer.method) is not LinearMethod:
            raise LoRAError("merge: true needs dense base weights (quantization: none)")
        delta = (b.to(layer.weight.device) @ a.to(layer.weight.device)).to(layer.weight.dtype)
        layer.weight.data.add_(delta)
