"""What the kernel tests share: the device, the GPU marker, seeded random inputs, the relative error.

Importing this first sets ``TRITON_INTERPRET=1`` on machines without a GPU, before any kernel module is imported.
"""

import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"

# The small-shape sweeps are for the interpreter: on a GPU each flag combination is a separate compile.
interpreter_only = pytest.mark.skipif(torch.cuda.is_available(), reason="interpreter sweep; see the gpu tests")


def needs_gpu(test):
    return pytest.mark.gpu(pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")(test))


def randn(*shape, dtype=torch.float32, seed=0, device=DEVICE, scale=1.0, offset=0.0):
    gen = torch.Generator().manual_seed(seed)
    return (torch.randn(*shape, generator=gen) * scale + offset).to(device=device, dtype=dtype)


def rel_err(y, ref):
    """max |y - ref| / max |ref|, in fp32."""
    return ((y.float() - ref.float()).abs().max() / ref.float().abs().max().clamp_min(1e-6)).item()
