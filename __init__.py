"""gpt2serve: a GPT-2 inference engine on a paged KV cache, and the Ray Serve service around it.

The repository root *is* this package: ``pyproject.toml`` maps the import name ``gpt2serve`` onto it, so each
top-level folder is a subpackage: ``gpt2serve.engine`` (the core, plain Python + PyTorch, no Ray: start reading at
``engine/llm_engine.py``, where a step is schedule → execute → update), ``gpt2serve.kernels`` (Triton kernels
beside their PyTorch references), ``gpt2serve.policies``, and ``gpt2serve.actors`` with ``gpt2serve.serve_app``
(the Ray Serve service).

Why one namespace: ``kernels``, ``engine``, ``policies``, ``actors`` and ``benchmarks`` are names of other
packages on the registry, and transformers itself imports Hugging Face's ``kernels``. So the folders carry no
``__init__.py`` of their own: seen from a directory on ``sys.path`` (the repository root, when Python starts
there) each is at most a namespace portion, which an installed package of the same name always wins over.

The engine's public names are importable from here, loaded on first use so that importing a service module does
not pay for torch::

    from gpt2serve import LLM, SamplingParams
"""

from __future__ import annotations

import importlib

_EXPORTS = {
    "AsyncLLM": "gpt2serve.engine.async_llm",
    "CompletionOutput": "gpt2serve.engine.outputs",
    "EngineConfig": "gpt2serve.engine.config",
    "InvalidRequestError": "gpt2serve.engine.errors",
    "LLM": "gpt2serve.engine.llm",
    "LLMEngine": "gpt2serve.engine.llm_engine",
    "RequestOutput": "gpt2serve.engine.outputs",
    "SamplingParams": "gpt2serve.engine.sampling_params",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'gpt2serve' has no attribute {name!r}")
    return getattr(importlib.import_module(module), name)


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_EXPORTS))
