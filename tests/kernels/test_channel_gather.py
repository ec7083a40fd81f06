import pytest
import torch

from red_kernels import gather_columns, gather_rows, select_linear
from red_kernels.channel_gather import _gather_cols_triton, _gather_rows_triton
from kernel_utils import assert_close, randn


def _index(n, d, gen):
    return torch.randperm(n, generator=gen, device=gen.device)[:d].sort().values


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("R,C,d", [(37, 96, 48), (1, 96, 1), (0, 96, 48), (45, 70, 0)])
def test_gathers_exact(backend, dtype, R, C, d, gen):
    w = randn(R, C, dtype=dtype, gen=gen)
    idx = _index(C, d, gen)
    out = gather_columns(w, idx)
    assert out.dtype == dtype and torch.equal(out, w[:, idx])
    w2 = randn(C, R, dtype=dtype, gen=gen)
    out = gather_rows(w2, idx)
    assert torch.equal(out, w2[idx, :])


def test_triton_gather_noncontiguous_rows_and_large_index(gen):
    """Row stride from a slice; every output element written (poisoned with NaN)."""
    big = randn(40, 130, gen=gen)
    w = big[:, 3:120]  # row stride 130
    idx = _index(117, 50, gen)
    assert torch.equal(_gather_cols_triton(w, idx), w[:, idx])
    assert torch.equal(_gather_rows_triton(big.t().contiguous(), idx), big.t()[idx])


def test_gather_backward_scatters(backend, gen):
    w = randn(8, 20, dtype=torch.float64, gen=gen, requires_grad=True)
    idx = _index(20, 7, gen)
    assert torch.autograd.gradcheck(lambda w: gather_columns(w, idx), (w,), fast_mode=True)
    w2 = randn(20, 8, dtype=torch.float64, gen=gen, requires_grad=True)
    assert torch.autograd.gradcheck(lambda w: gather_rows(w, idx), (w2,), fast_mode=True)


def test_bad_index_raises(device):
    w = torch.zeros(3, 4, device=device)
    with pytest.raises(ValueError):
        gather_columns(w, torch.tensor([0, 1], dtype=torch.int32, device=device))
    with pytest.raises(IndexError):
        gather_rows(w, torch.tensor([0, 3], device=device))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("lead", [(37,), (2, 5), (1,), (0,)])
@pytest.mark.parametrize("with_bias", [False, True])
def test_select_linear_matches_reference(backend, dtype, lead, with_bias, gen):
    IN, OUT, d = 96, 40, 48
    x = randn(*lead, IN, dtype=dtype, gen=gen, requires_grad=True)
    w = randn(OUT, IN, dtype=dtype, gen=gen, scale=0.1, requires_grad=True)
    b = randn(OUT, dtype=dtype, gen=gen, requires_grad=True) if with_bias else None
    idx = _index(IN, d, gen)
    y = select_linear(x, w, idx, b)
    xd, wd = x.detach().double().requires_grad_(), w.detach().double().requires_grad_()
    bd = b.detach().double().requires_grad_() if with_bias else None
    yr = xd[..., idx] @ wd[:, idx].t() + (bd if with_bias else 0)
    assert y.shape == yr.shape and y.dtype == dtype
    if y.numel() == 0:
        return
    assert_close(y, yr, dtype, "y")
    g = randn(*yr.shape, dtype=torch.float64, gen=gen)
    (y.double() * g).sum().mul(3.0).backward()
    (yr * g).sum().mul(3.0).backward()
    assert_close(x.grad, xd.grad, dtype, "dx")
    assert_close(w.grad, wd.grad, dtype, "dw")
    unselected = torch.ones(IN, dtype=torch.bool, device=x.device)
    unselected[idx] = False
    assert torch.all(x.grad[..., unselected] == 0) and torch.all(w.grad[:, unselected] == 0)
    if with_bias:
        assert_close(b.grad, bd.grad, dtype, "db")


def test_select_linear_gradcheck(backend, gen):
    x = randn(5, 12, dtype=torch.float64, gen=gen, requires_grad=True)
    w = randn(6, 12, dtype=torch.float64, gen=gen, requires_grad=True)
    b = randn(6, dtype=torch.float64, gen=gen, requires_grad=True)
    idx = _index(12, 5, gen)
    assert torch.autograd.gradcheck(lambda x, w, b: select_linear(x, w, idx, b), (x, w, b),
                                    fast_mode=True)


def test_select_linear_frozen_weight_gets_no_grad(backend, gen):
    x = randn(4, 12, gen=gen, requires_grad=True)
    w = randn(6, 12, gen=gen)
    select_linear(x, w, _index(12, 5, gen)).sum().backward()
    assert w.grad is None and x.grad is not None and torch.isfinite(x.grad).all()
