import pytest
import torch

from red_kernels import (projected_mse, projected_mse_student_space, selected_mse,
                         selected_mse_student_space)
from red_kernels.projected_mse import _projected_mse
from kernel_utils import assert_close, randn


def _index(n, d, gen):
    return torch.randperm(n, generator=gen, device=gen.device)[:d].sort().values


def _sel_matrix(index, D, dtype=torch.float64):
    P = torch.zeros(D, index.numel(), dtype=dtype, device=index.device)
    P[index, torch.arange(index.numel(), device=index.device)] = 1
    return P


def _ref_teacher(h_s, P, h_t):
    return (h_s @ P.t() - h_t).pow(2).mean()


def _ref_student(y_s, y_t, P):
    return (y_s - y_t @ P).pow(2).mean()


def _check(op, ref, inputs, grad_mask, dtype, gen):
    """Forward and gradients (loss scaled by 3) against autograd through a float64 ref."""
    ins = [t.requires_grad_(g) for t, g in zip(inputs, grad_mask)]
    loss = op(*ins)
    assert loss.dim() == 0 and loss.dtype == torch.float32
    refs = [t.detach().double().requires_grad_(g) for t, g in zip(inputs, grad_mask)]
    lref = ref(*refs)
    assert_close(loss, lref, dtype, "loss")
    (loss * 3.0).backward()
    (lref * 3.0).backward()
    for t, r, g in zip(ins, refs, grad_mask):
        if g:
            assert t.grad.dtype == t.dtype and t.grad.shape == t.shape
            assert_close(t.grad, r.grad, dtype, "grad")
        else:
            assert t.grad is None


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("lead", [(37,), (3, 7), (1,)])
def test_projected_mse(backend, dtype, lead, gen):
    D, d = 96, 48
    h_s = randn(*lead, d, dtype=dtype, gen=gen)
    P = randn(D, d, dtype=dtype, gen=gen, scale=0.2)
    h_t = randn(*lead, D, dtype=dtype, gen=gen)
    _check(projected_mse, _ref_teacher, [h_s, P, h_t], [True, True, False], dtype, gen)


@pytest.mark.parametrize("chunk_rows", [8, 16])
def test_projected_mse_chunks(backend, chunk_rows, gen):
    """Several token chunks: dP is summed over chunks, dh_s written chunk by chunk."""
    h_s, P, h_t = randn(37, 48, gen=gen), randn(96, 48, gen=gen, scale=0.2), randn(37, 96, gen=gen)
    _check(lambda a, b, c: _projected_mse(a, b, c, chunk_rows=chunk_rows), _ref_teacher,
           [h_s, P, h_t], [True, True, False], torch.float32, gen)


def test_projected_mse_only_p_trainable(backend, gen):
    h_s, P, h_t = randn(20, 48, gen=gen), randn(96, 48, gen=gen, scale=0.2), randn(20, 96, gen=gen)
    _check(projected_mse, _ref_teacher, [h_s, P, h_t], [False, True, False], torch.float32, gen)


def test_projected_mse_no_grad_forward_only(backend, gen):
    h_s, P, h_t = randn(37, 48, gen=gen), randn(96, 48, gen=gen), randn(37, 96, gen=gen)
    with torch.no_grad():
        loss = projected_mse(h_s, P, h_t)
    assert_close(loss, _ref_teacher(h_s.double(), P.double(), h_t.double()), torch.float32)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("lead", [(37,), (2, 9), (1,)])
def test_projected_mse_student_space(backend, dtype, lead, gen):
    D, d = 96, 48
    y_s = randn(*lead, d, dtype=dtype, gen=gen)
    y_t = randn(*lead, D, dtype=dtype, gen=gen)
    P = randn(D, d, dtype=dtype, gen=gen, scale=0.2)
    _check(projected_mse_student_space, _ref_student, [y_s, y_t, P], [True, False, True], dtype, gen)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("T", [37, 1])
def test_selected_mse_equals_projected(backend, dtype, T, gen):
    D, d = 96, 48
    idx = _index(D, d, gen)
    h_s, h_t = randn(T, d, dtype=dtype, gen=gen), randn(T, D, dtype=dtype, gen=gen)
    ref = lambda a, b: _ref_teacher(a, _sel_matrix(idx, D), b)  # noqa: E731
    _check(lambda a, b: selected_mse(a, idx, b), ref, [h_s, h_t], [True, False], dtype, gen)
    # and the same number as projected_mse with the explicit selection matrix
    with torch.no_grad():
        a = selected_mse(h_s, idx, h_t)
        b = projected_mse(h_s, _sel_matrix(idx, D, dtype), h_t)
    assert_close(a, b, dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("lead", [(37,), (3, 4), (1,)])
def test_selected_mse_student_space(backend, dtype, lead, gen):
    D, d = 96, 48
    idx = _index(D, d, gen)
    y_s, y_t = randn(*lead, d, dtype=dtype, gen=gen), randn(*lead, D, dtype=dtype, gen=gen)
    ref = lambda a, b: _ref_student(a, b, _sel_matrix(idx, D))  # noqa: E731
    _check(lambda a, b: selected_mse_student_space(a, b, idx), ref, [y_s, y_t], [True, False],
           dtype, gen)


def test_empty_batch_gives_zero_loss_and_grads(backend, gen, device):
    D, d = 96, 48
    idx = _index(D, d, gen)
    P = randn(D, d, gen=gen, requires_grad=True)
    empty = torch.randn(0, D, device=device)
    for fn, args in [
        (projected_mse, lambda s: (s, P, empty)),
        (projected_mse_student_space, lambda s: (s, empty, P)),
        (selected_mse, lambda s: (s, idx, empty)),
        (selected_mse_student_space, lambda s: (s, empty, idx)),
    ]:
        s = torch.randn(0, d, device=device, requires_grad=True)
        loss = fn(*args(s))
        assert loss.item() == 0.0
        loss.backward()
        assert s.grad.shape == (0, d)
    assert torch.all(P.grad == 0)


def test_gradcheck_fp64(backend, gen):
    D, d, T = 12, 6, 5
    idx = _index(D, d, gen)
    h_s = randn(T, d, dtype=torch.float64, gen=gen, requires_grad=True)
    P = randn(D, d, dtype=torch.float64, gen=gen, requires_grad=True)
    h_t = randn(T, D, dtype=torch.float64, gen=gen)
    y_t = randn(T, D, dtype=torch.float64, gen=gen)
    gc = lambda f, ins: torch.autograd.gradcheck(f, ins, fast_mode=True)  # noqa: E731
    assert gc(lambda a, p: _projected_mse(a, p, h_t, chunk_rows=2), (h_s, P))
    assert gc(lambda a, p: projected_mse_student_space(a, y_t, p), (h_s, P))
    assert gc(lambda a: selected_mse(a, idx, h_t), (h_s,))
    assert gc(lambda a: selected_mse_student_space(a, y_t, idx), (h_s,))


def test_shape_errors(device):
    r = lambda *shape: torch.randn(*shape, device=device)  # noqa: E731
    with pytest.raises(ValueError):
        projected_mse(r(3, 4), r(8, 5), r(3, 8))
    with pytest.raises(ValueError):
        selected_mse(r(3, 4), torch.arange(3, device=device), r(3, 8))
