"""Weight-only int8 / int4 linear kernels vs their PyTorch reference; packing and quantization round trips.

On a CPU machine the kernels run in the Triton interpreter at small, tile-unaligned shapes with small tiles (so
that a shape spans several N tiles, M tiles and K chunks); the ``gpu`` tests run GPT-2 XL's four linear shapes.
"""

import itertools

import pytest
import torch

from tests.kernels.kernel_testing import DEVICE, interpreter_only, needs_gpu, randn as _randn, rel_err as _rel_err  # noqa: F401
from gpt2serve.kernels import decode_linear as dl  # noqa: E402
from gpt2serve.kernels import quant_linear as ql  # noqa: E402


def _check(y, ref, tol):
    assert y.shape == ref.shape, (y.shape, ref.shape)
    assert torch.isfinite(y).all(), "non-finite output (an element the kernel never wrote?)"
    err = _rel_err(y, ref)
    assert err <= tol, f"max relative error {err:.3g} > {tol}"


class Problem:
    """Random, never-zero inputs for one layer: x with a non-zero mean, weights ~ K^-0.5, quantized both ways."""

    def __init__(self, m, k, n, *, bias=False, gelu=False, res=False, perm=False, group_size=64,
                 dtype=torch.float32, seed=0, device=DEVICE):
        self.x = _randn(m, k, dtype=dtype, seed=seed, device=device, scale=2.0, offset=0.5)
        w = _randn(n, k, dtype=dtype, seed=seed + 1, device=device, scale=k ** -0.5)
        self.q8, self.s8 = ql.quantize_int8(w)
        self.group_size = group_size
        self.q4, self.s4, self.z4 = ql.quantize_int4(w, group_size)
        gen = torch.Generator().manual_seed(seed + 2)
        self.epi = dict(
            bias=_randn(n, dtype=dtype, seed=seed + 3, device=device) if bias else None,
            activation="gelu_tanh" if gelu else None,
            residual=_randn(m, n, dtype=dtype, seed=seed + 4, device=device) if res else None,
        )
        self.perm = torch.randperm(k, generator=gen).to(device=device, dtype=torch.int32) if perm else None

    def int8(self, x=None, **kw):
        return ql.int8_linear(self.x if x is None else x, self.q8, self.s8, **self.epi, **kw)

    def int8_ref(self, x=None):
        return ql.int8_linear_ref(self.x if x is None else x, self.q8, self.s8, **self.epi)

    def int4(self, x=None, **kw):
        return ql.int4_linear(self.x if x is None else x, self.q4, self.s4, self.z4, self.group_size, **self.epi,
                              perm=self.perm, **kw)

    def int4_ref(self, x=None):
        return ql.int4_linear_ref(self.x if x is None else x, self.q4, self.s4, self.z4, self.group_size,
                                  **self.epi, perm=self.perm)

    def run(self, bits, config=None):
        """The kernel with out= pre-filled with NaN, so that any element it fails to write shows up."""
        x = self.x
        out = torch.full((x.shape[0], self.q8.shape[0]), float("nan"), dtype=x.dtype, device=x.device)
        y = (self.int8 if bits == 8 else self.int4)(out=out, config=config)
        assert y is out
        return y

    def ref(self, bits):
        return self.int8_ref() if bits == 8 else self.int4_ref()


# ---------------------------------------------------------------------------------------------------------------
# Packing and quantization


def test_pack_int4_layout_and_round_trip():
    # Nibble j of word w is column 8w + j, low nibble first; nibble 7 >= 8 makes the word negative as int32.
    q = torch.tensor([[1, 2, 3, 4, 5, 6, 7, 8, 15, 0, 0, 0, 0, 0, 0, 15]], dtype=torch.int32)
    packed = ql.pack_int4(q)
    assert packed.dtype == torch.int32 and packed.shape == (1, 2)
    assert packed[0, 0].item() == 0x87654321 - (1 << 32)
    assert packed[0, 1].item() == 0xF000000F - (1 << 32)
    assert torch.equal(ql.unpack_int4(packed).int(), q)

    gen = torch.Generator().manual_seed(0)
    q = torch.randint(0, 16, (7, 96), generator=gen, dtype=torch.int32)
    q[:, 7::8] = torch.randint(8, 16, (7, 12), generator=gen, dtype=torch.int32)  # every top nibble >= 8
    packed = ql.pack_int4(q)
    assert (packed < 0).all()
    assert torch.equal(ql.unpack_int4(packed).int(), q)
    words = torch.randint(-(1 << 31), (1 << 31) - 1, (5, 9), generator=gen, dtype=torch.int64).to(torch.int32)
    assert torch.equal(ql.pack_int4(ql.unpack_int4(words)), words)
    with pytest.raises(AssertionError):
        ql.pack_int4(torch.zeros(2, 12, dtype=torch.int32))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_quantize_int8_error_bound(dtype):
    w = _randn(10, 70, dtype=dtype, seed=1, device="cpu", scale=0.05, offset=0.01)
    w[3] = 0  # all-zero row: finite scale, q == 0
    w[5, 9] = 0.9  # one outlier per row sets the scale
    q, s = ql.quantize_int8(w)
    assert q.dtype == torch.int8 and q.shape == w.shape and s.dtype == dtype and s.shape == (10,)
    assert torch.isfinite(s).all() and (s > 0).all() and (q[3] == 0).all()
    assert q.abs().max() <= 127
    err = (w.float() - ql.dequantize_int8(q, s)).abs()
    assert (err <= s.float()[:, None] / 2 * (1 + 1e-5)).all()


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("k,group_size", [(200, 64), (1600, 128), (64, 64), (200, 40)])
def test_quantize_int4_error_bound(dtype, k, group_size):
    """|w - dequant(w)| <= scale / 2 inside every group, the partial last group included (K=200 with groups of
    64: 3 full groups and one of 8; K=1600 with 128: 12.5 groups, as GPT-2 XL)."""
    n = 9
    w = _randn(n, k, dtype=dtype, seed=k + group_size, device="cpu", scale=0.05, offset=0.01)
    w[1] = 0  # all-zero row
    w[2] = w[2].abs() + 0.1  # a row of positive values: its range is widened down to 0
    w[4, -1] = -0.7  # an outlier in the last (possibly partial) group
    q, s, z = ql.quantize_int4(w, group_size)
    g = -(-k // group_size)
    assert q.dtype == torch.int32 and q.shape == (n, k // 8)
    assert s.shape == z.shape == (n, g) and s.dtype == z.dtype == dtype
    assert torch.isfinite(s).all() and (s > 0).all()
    assert torch.equal(z.float(), z.float().round()) and z.min() >= 0 and z.max() <= 15
    deq = ql.dequantize_int4(q, s, z, group_size)
    assert (deq[1] == 0).all()
    col_scale = s.float()[:, torch.arange(k) // group_size]
    err = (w.float() - deq).abs()
    assert (err <= col_scale / 2 * (1 + 1e-5)).all(), f"worst {(err / col_scale).max():.4f} scales"
    # The partial last group has its own scale, fitted to its own values.
    last = w.float()[4, (g - 1) * group_size:]
    assert s[4, -1].float() >= (last.max().clamp_min(0) - last.min()) / 15


# ---------------------------------------------------------------------------------------------------------------
# Kernels vs the reference (interpreter)

# Small tiles: several N tiles, K chunks and (for M > 16) M tiles at the CPU shapes.
SMALL = {"block_m": 16, "block_n": 16, "block_k": 32}
CONFIGS = {
    "split1": {**SMALL, "split": 1},
    "split3-serial": {**SMALL, "split": 3, "split_mode": "serial"},
    "split2-two_pass": {**SMALL, "split": 2, "split_mode": "two_pass"},
}
EPILOGUES = list(itertools.product([False, True], repeat=3))  # (bias, gelu, res)
SHAPES = [(64, 48, 32), (200, 72, 64)]  # (K, N, int4 group size); K=200: groups 64, 64, 64, 8
MS = [1, 3, 16, 17, 40]


@interpreter_only
@pytest.mark.parametrize("bits", [8, 4])
@pytest.mark.parametrize("k,n,group_size", SHAPES, ids=lambda v: str(v))
@pytest.mark.parametrize("m", MS)
def test_kernel_matches_reference(bits, m, k, n, group_size):
    """Decode (M <= 16) and prefill (M > 16) tiles, each with and without split-K in both reduction modes; the
    epilogue flags (and perm, for int4) rotate over the cases so that every combination runs somewhere."""
    case = MS.index(m) * len(SHAPES) + SHAPES.index((k, n, group_size))
    bias, gelu, res = EPILOGUES[(case + bits) % len(EPILOGUES)]
    p = Problem(m, k, n, bias=bias, gelu=gelu, res=res, perm=bits == 4 and case % 2 == 0, group_size=group_size,
                seed=case * 10 + bits)
    ref = p.ref(bits)
    for name in ("split1", "split3-serial" if case % 2 else "split2-two_pass"):
        _check(p.run(bits, CONFIGS[name]), ref, 1e-4)


@interpreter_only
@pytest.mark.parametrize("bias,gelu,res", EPILOGUES, ids=lambda v: "1" if v else "0")
def test_every_epilogue(bias, gelu, res):
    """All eight epilogue combinations, int8 at M=2 (decode) and int4 with perm at M=20 (prefill)."""
    p = Problem(2, 64, 40, bias=bias, gelu=gelu, res=res, seed=3)
    _check(p.run(8, {**SMALL, "split": 2}), p.ref(8), 1e-4)
    p = Problem(20, 64, 40, bias=bias, gelu=gelu, res=res, perm=True, group_size=32, seed=4)
    _check(p.run(4, SMALL), p.ref(4), 1e-4)


@interpreter_only
@pytest.mark.parametrize("m", [3, 20])
@pytest.mark.parametrize("group_size,config,uniform,fold", [
    (64, SMALL, True, True),  # one group per chunk: scale / zero folded out of the dot (decode)
    (64, {**SMALL, "fold": False}, True, False),  # one group per chunk, dequantized per element
    (40, SMALL, False, False),  # groups straddle chunks: scales and zeros gathered per column
    (48, {"block_m": 16, "block_n": 16}, True, True),  # block_k shrinks to 16, which divides 48
    (24, {"block_m": 16, "block_n": 16, "block_k": 32}, False, False),
], ids=["fold", "per-element", "gather", "shrunk-block-k", "gather-24"])
def test_int4_group_paths(m, group_size, config, uniform, fold):
    p = Problem(m, 200, 40, bias=True, res=True, perm=m == 3, group_size=group_size, seed=group_size + m)
    cfg = ql.resolve_config(4, m, 40, 200, DEVICE, group_size, config)
    assert cfg["group_uniform"] == uniform and cfg["fold"] == (fold and m <= ql.DECODE_MAX_M)
    _check(p.run(4, config), p.ref(4), 1e-4)
    _check(p.run(4, {**config, "split": 3}), p.ref(4), 1e-4)


@pytest.mark.parametrize("bits", [8, 4])
@pytest.mark.parametrize("m", [5, 33])
def test_split_modes_bitwise_equal_and_counters_rearmed(bits, m):
    """Serial and two-pass reductions add the partials in the same order: identical bits, and repeated calls
    are deterministic. The serial mode's arrival counters are back at 0 after every launch (graph replays rely
    on it)."""
    p = Problem(m, 200, 72, bias=True, gelu=True, res=True, perm=bits == 4, seed=50 + m)
    serial = p.run(bits, {**SMALL, "split": 4, "split_mode": "serial"})
    again = p.run(bits, {**SMALL, "split": 4, "split_mode": "serial"})
    two_pass = p.run(bits, {**SMALL, "split": 4, "split_mode": "two_pass"})
    assert torch.equal(serial, again) and torch.equal(serial, two_pass)
    _check(serial, p.ref(bits), 1e-4)
    assert int(dl._COUNTERS[(p.x.device.type, p.x.device.index)].abs().sum()) == 0


def test_default_configs(monkeypatch):
    """Regimes by M, block_k fitted to the group size, and split-K where N gives too few tiles (as on an H100's
    132 SMs at GPT-2 XL shapes)."""
    monkeypatch.setattr(dl, "_sm_count", lambda device: 132)
    for m in (1, 8, 16):
        cfg = ql.resolve_config(4, m, 1600, 6400, "cuda", 128)
        assert cfg["regime"] == "decode" and cfg["block_m"] == 16 and cfg["fold"] and cfg["block_k"] == 128
        assert 4 <= cfg["split"] <= ql.SPLIT_MAX  # mlp.c_proj: 25 tiles of 64 rows
        assert ql.resolve_config(8, m, 1600, 6400, "cuda")["split"] > 1
    assert ql.resolve_config(4, 1, 1600, 1600, "cuda", 64)["block_k"] == 64
    assert not ql.resolve_config(4, 1, 1600, 1600, "cuda", 40)["group_uniform"]
    for m, block_m in ((17, 32), (64, 64), (512, 128), (2048, 128)):
        cfg = ql.resolve_config(4, m, 4800, 1600, "cuda", 128)
        assert cfg["regime"] == "prefill" and cfg["block_m"] == block_m and not cfg["fold"]
        assert cfg["group_uniform"]
    assert ql.resolve_config(8, 2048, 6400, 1600, "cuda")["split"] == 1  # plenty of tiles
    assert ql.resolve_config(8, 64, 1600, 6400, "cuda")["split"] > 1
    assert ql.resolve_config(8, 3, 48, 40, "cuda", config={**SMALL, "split": 16})["split"] == 2  # cdiv(40, 32)


def test_in_place_residual_batch_dims_perm_dtype_and_strided_rows():
    """out may alias the residual (hidden += proj(...)); x may carry leading dims or be a column slice of a wider
    buffer (rows contiguous within themselves); perm may be int64."""
    p = Problem(6, 64, 48, bias=True, res=True, seed=31)
    ref = p.int8_ref()
    hidden = p.epi["residual"].clone()
    y = ql.int8_linear(p.x, p.q8, p.s8, p.epi["bias"], residual=hidden, out=hidden, config={**SMALL, "split": 2})
    assert y is hidden
    _check(hidden, ref, 1e-4)
    y3 = ql.int4_linear(p.x.view(2, 3, 64), p.q4, p.s4, p.z4, p.group_size, config=SMALL)
    assert y3.shape == (2, 3, 48)
    _check(y3.view(6, 48), ql.int4_linear_ref(p.x, p.q4, p.s4, p.z4, p.group_size), 1e-4)
    perm = torch.randperm(64, generator=torch.Generator().manual_seed(33)).to(DEVICE)  # int64 is accepted too
    for rows in (3, 20):  # gathered in the kernel (decode) / by index_select (prefill)
        x = _randn(rows, 64, seed=34 + rows, offset=0.3)
        _check(ql.int4_linear(x, p.q4, p.s4, p.z4, p.group_size, perm=perm, config=SMALL),
               ql.int4_linear_ref(x, p.q4, p.s4, p.z4, p.group_size, perm=perm), 1e-4)
    base = _randn(4, 100, seed=32, offset=0.3)
    x = base[:, 20:84]
    assert x.stride() == (100, 1)
    _check(ql.int4_linear(x, p.q4, p.s4, p.z4, p.group_size, config=SMALL),
           ql.int4_linear_ref(x, p.q4, p.s4, p.z4, p.group_size), 1e-4)


def test_fp16_interpreted():
    p = Problem(4, 64, 48, bias=True, gelu=True, res=True, perm=True, group_size=32, dtype=torch.float16, seed=41)
    for bits in (8, 4):
        _check(p.run(bits, SMALL), p.ref(bits), 2e-3)
    p = Problem(20, 64, 48, bias=True, res=True, group_size=32, dtype=torch.float16, seed=42)
    for bits in (8, 4):
        _check(p.run(bits, SMALL), p.ref(bits), 2e-3)


def test_empty_batch_and_errors():
    p = Problem(2, 64, 24, seed=61)
    empty = torch.empty(0, 64, device=DEVICE)
    assert ql.int8_linear(empty, p.q8, p.s8).shape == (0, 24)
    assert ql.int4_linear(empty, p.q4, p.s4, p.z4, p.group_size).shape == (0, 24)
    with pytest.raises(ValueError):
        ql.int8_linear(p.x, p.q8, p.s8, activation="relu")
    with pytest.raises(AssertionError):  # K mismatch
        ql.int8_linear(_randn(2, 60, seed=62), p.q8, p.s8)
    with pytest.raises(AssertionError):  # int4 weights in the int8 entry point
        ql.int8_linear(p.x, p.q4, p.s8)
    with pytest.raises(AssertionError):  # scales of the wrong group count
        ql.int4_linear(p.x, p.q4, p.s4, p.z4, 16)
    with pytest.raises(AssertionError):
        ql.quantize_int4(_randn(3, 20, seed=63))


# ---------------------------------------------------------------------------------------------------------------
# GPU: GPT-2 XL's four linear shapes with the epilogue the model fuses into each.

XL_LAYERS = {  # name: (K, N, epilogue)
    "c_attn": (1600, 4800, dict(bias=True)),
    "attn.c_proj": (1600, 1600, dict(bias=True, res=True)),
    "c_fc": (1600, 6400, dict(bias=True, gelu=True)),
    "mlp.c_proj": (6400, 1600, dict(bias=True, res=True)),
}


def _fp32_ref(p, bits):
    """The reference on fp32 inputs: not rounded to fp16, so the kernel's own rounding counts in the error."""
    x = p.x.float()
    epi = {key: v.float() if torch.is_tensor(v) else v for key, v in p.epi.items()}
    if bits == 8:
        return ql.int8_linear_ref(x, p.q8, p.s8, **epi)
    return ql.int4_linear_ref(x, p.q4, p.s4, p.z4, p.group_size, **epi, perm=p.perm)


@needs_gpu
@pytest.mark.parametrize("bits", [8, 4])
@pytest.mark.parametrize("layer", list(XL_LAYERS))
@pytest.mark.parametrize("m", [1, 5, 8, 16, 64, 512])
def test_gpu_xl_shapes(bits, layer, m):
    k, n, epi = XL_LAYERS[layer]
    p = Problem(m, k, n, **epi, group_size=128, dtype=torch.float16, seed=m + len(layer))
    y = p.run(bits)
    err = _rel_err(y, _fp32_ref(p, bits))
    assert err <= 1e-3, f"int{bits} {layer} M={m}: relative error {err:.3g}"


@needs_gpu
@pytest.mark.parametrize("m", [1, 8, 64])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_gpu_perm_bf16_and_split_modes(m, dtype):
    """int4 with act-order perm, both activation dtypes, both split-K reductions (identical bits)."""
    k, n, epi = XL_LAYERS["mlp.c_proj"]
    p = Problem(m, k, n, **epi, perm=True, group_size=128, dtype=dtype, seed=7 + m)
    tol = 1e-3 if dtype == torch.float16 else 1e-2
    for bits in (8, 4):
        serial = p.run(bits, {"split": 5, "split_mode": "serial"}).clone()
        assert _rel_err(serial, _fp32_ref(p, bits)) <= tol
        assert torch.equal(serial, p.run(bits, {"split": 5, "split_mode": "two_pass"}))
        assert _rel_err(p.run(bits), _fp32_ref(p, bits)) <= tol


@needs_gpu
@pytest.mark.parametrize("bits", [8, 4])
def test_gpu_cuda_graph_replay(bits):
    """The decode path (split-K with arrival counters) captured after one eager warm-up call: new x written in
    place, replayed, equals an eager call on the same x."""
    k, n, epi = XL_LAYERS["mlp.c_proj"]
    m = 4
    p = Problem(m, k, n, **epi, perm=bits == 4, group_size=128, dtype=torch.float16, seed=19)
    cfg = ql.resolve_config(bits, m, n, k, p.x.device, 128)
    assert cfg["split"] > 1 and cfg["split_mode"] == "serial"
    x = p.x.clone()
    out = torch.empty(m, n, dtype=x.dtype, device=x.device)
    call = p.int8 if bits == 8 else p.int4
    call(x, out=out)  # warm-up: compiles, allocates the split-K scratch
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, stream=stream):
            call(x, out=out)
    torch.cuda.current_stream().wait_stream(stream)
    for seed in range(5):
        x.copy_(_randn(m, k, dtype=x.dtype, seed=100 + seed, scale=2.0, offset=0.5))
        out.fill_(float("nan"))
        graph.replay()
        torch.cuda.synchronize()
        expect = call(x)
        assert torch.equal(out, expect)
        ref = (p.int8_ref if bits == 8 else p.int4_ref)(x.float())
        assert _rel_err(out, ref) <= 1e-3
