import pytest
import torch

import red_kernels
from red_kernels import naive_rmsnorm_with_stats, rmsnorm_with_stats
from red_kernels.norm_stats import _rmsnorm_with_stats_triton
from helpers import assert_close, randn


def _ref(x, w, eps):
    """float64 reference (HF formula without the intermediate rounding)."""
    xd = x.double()
    y = w.double() * (xd * torch.rsqrt(xd.pow(2).mean(-1, keepdim=True) + eps))
    x2, y2 = xd.reshape(-1, x.shape[-1]), y.reshape(-1, x.shape[-1])
    return y, torch.stack([x2.abs().sum(0), x2.pow(2).sum(0), y2.abs().sum(0), y2.pow(2).sum(0)])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shape", [(37, 96), (3, 5, 96), (1, 96)])
def test_matches_reference(backend, dtype, shape, gen):
    x = randn(*shape, dtype=dtype, gen=gen, scale=2.0)
    w = randn(shape[-1], dtype=dtype, gen=gen)
    y, stats = rmsnorm_with_stats(x, w, 1e-5)
    assert y.shape == x.shape and y.dtype == dtype
    assert stats.shape == (4, shape[-1]) and stats.dtype == torch.float32
    yr, sr = _ref(x, w, 1e-5)
    assert_close(y, yr, dtype, "y")
    assert_close(stats, sr, dtype, "stats")
    # the stats describe y exactly as returned
    _, s_naive = naive_rmsnorm_with_stats(x, w, 1e-5)
    assert_close(stats, s_naive, torch.float32, "stats vs naive", factor=5)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_triton_bitwise_equals_hf_formula_low_precision(dtype, gen):
    """With the hand rounding, the kernel reproduces HF's bf16/fp16 output bit for bit."""
    x = randn(37, 96, dtype=dtype, gen=gen)
    w = randn(96, dtype=dtype, gen=gen)
    y, _ = _rmsnorm_with_stats_triton(x, w, 1e-6)
    xf = x.float()
    y_hf = w * (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + 1e-6)).to(dtype)
    # rsqrt may differ from 1/sqrt by an fp32 ulp, which can flip a rare rounding
    mismatch = (y != y_hf).float().mean().item()
    assert mismatch < 2e-3, mismatch


@pytest.mark.parametrize("block_t,programs", [(4, 4), (8, 2), (16, 1)])
def test_triton_persistent_loops(block_t, programs, gen):
    """2-10 loop iterations per program, ragged last block, fixed-order reduction."""
    x = randn(37, 80, gen=gen)
    w = randn(80, gen=gen)
    y, s = _rmsnorm_with_stats_triton(x, w, 1e-6, block_t=block_t, programs=programs)
    yr, sr = _ref(x, w, 1e-6)
    assert_close(y, yr, torch.float32, "y")
    assert_close(s, sr, torch.float32, "stats")
    y2, s2 = _rmsnorm_with_stats_triton(x, w, 1e-6, block_t=block_t, programs=programs)
    assert torch.equal(s, s2)  # deterministic


def test_empty_input(backend, device):
    x = torch.randn(0, 96, device=device)
    y, s = rmsnorm_with_stats(x, torch.ones(96, device=device), 1e-6)
    assert y.shape == (0, 96)
    assert torch.equal(s, torch.zeros(4, 96, device=device))


def test_module_accumulates(backend, gen):
    w = randn(96, gen=gen)
    m = red_kernels.RMSNormWithStats(w, eps=1e-6)
    xs = [randn(5, 96, gen=gen), randn(7, 96, gen=gen)]
    for x in xs:
        m(x)
    _, sr = _ref(torch.cat(xs), w, 1e-6)
    assert int(m.rows) == 12
    assert_close(m.stats, sr, torch.float32, "stats")


def test_shape_mismatch_raises(device):
    with pytest.raises(ValueError):
        rmsnorm_with_stats(torch.randn(3, 8, device=device), torch.ones(7, device=device), 1e-6)
