"""Fused residual-add + LayerNorm and bias + tanh-GELU kernels vs their PyTorch references."""

import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

from gpt2serve.kernels.fused import add_layernorm, add_layernorm_ref, bias_gelu, bias_gelu_ref  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def needs_gpu(test):
    return pytest.mark.gpu(pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")(test))


def _randn(*shape, dtype=torch.float32, seed=0, device=DEVICE):
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=gen).to(device=device, dtype=dtype)


@pytest.mark.parametrize("width", [40, 100, 256, 1600])
@pytest.mark.parametrize("with_residual", [True, False])
def test_add_layernorm(width, with_residual):
    x = _randn(3, 5, width, seed=width) * 3 + 1  # non-zero mean: the centring matters
    residual = _randn(3, 5, width, seed=width + 1) if with_residual else None
    weight = _randn(width, seed=width + 2)
    bias = _randn(width, seed=width + 3)
    normed, new_res = add_layernorm(x, residual, weight, bias, 1e-5)
    ref_normed, ref_res = add_layernorm_ref(x, residual, weight, bias, 1e-5)
    assert normed.shape == x.shape and new_res.shape == x.shape
    torch.testing.assert_close(normed, ref_normed, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(new_res, ref_res, atol=0, rtol=0)
    if not with_residual:
        assert new_res is x


def test_add_layernorm_fp16():
    x, residual = _randn(4, 100, dtype=torch.float16, seed=1), _randn(4, 100, dtype=torch.float16, seed=2)
    weight, bias = _randn(100, dtype=torch.float16, seed=3), _randn(100, dtype=torch.float16, seed=4)
    normed, new_res = add_layernorm(x, residual, weight, bias, 1e-5)
    ref_normed, ref_res = add_layernorm_ref(x, residual, weight, bias, 1e-5)
    torch.testing.assert_close(new_res, ref_res, atol=0, rtol=0)
    torch.testing.assert_close(normed.float(), ref_normed.float(), atol=4e-3, rtol=4e-3)


@pytest.mark.parametrize("width", [40, 100, 1600, 6400])
def test_bias_gelu(width):
    x = _randn(3, width, seed=width) * 4  # reach both tails of the GELU
    bias = _randn(width, seed=width + 1)
    out = bias_gelu(x, bias)
    torch.testing.assert_close(out, bias_gelu_ref(x, bias), atol=1e-5, rtol=1e-5)


def test_bias_gelu_extremes_and_batch_dims():
    x = torch.tensor([[-1e4, -30.0, -3.0, -1e-3, 0.0, 1e-3, 3.0, 30.0, 1e4, 0.5]], device=DEVICE)
    x = x.expand(2, 3, -1).contiguous()
    bias = torch.zeros(10, device=DEVICE)
    out = bias_gelu(x, bias)
    assert out.shape == x.shape and torch.isfinite(out).all()
    torch.testing.assert_close(out, bias_gelu_ref(x, bias), atol=1e-5, rtol=1e-5)


@needs_gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_gpu_fused_real_shapes(dtype):
    tol = dict(atol=2e-2, rtol=2e-2) if dtype == torch.bfloat16 else dict(atol=4e-3, rtol=4e-3)
    x, residual = _randn(512, 1600, dtype=dtype, seed=1), _randn(512, 1600, dtype=dtype, seed=2)
    weight, bias = _randn(1600, dtype=dtype, seed=3), _randn(1600, dtype=dtype, seed=4)
    normed, new_res = add_layernorm(x, residual, weight, bias, 1e-5)
    ref_normed, ref_res = add_layernorm_ref(x, residual, weight, bias, 1e-5)
    torch.testing.assert_close(new_res, ref_res, atol=0, rtol=0)
    torch.testing.assert_close(normed.float(), ref_normed.float(), **tol)
    h, fc_bias = _randn(512, 6400, dtype=dtype, seed=5), _randn(6400, dtype=dtype, seed=6)
    torch.testing.assert_close(bias_gelu(h, fc_bias).float(), bias_gelu_ref(h, fc_bias).float(), **tol)
