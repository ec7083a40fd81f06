"""clone_mse: the clone MSE as a tap on the student's activation (s passes through).

Every result is compared with an independent float64 reference written here (not only with
``naive_clone_mse``), on fresh random inputs of ragged shapes. The returned s is used
downstream, as the student uses it, so the tests check that the clone gradient and the
downstream gradient add up, with the loss scaled before backward.
"""
import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from red_kernels import clone_mse, naive_clone_mse
from helpers import assert_close, randn

T, W = 37, 96


def _ref(s, t):
    """float64 (mean((s − t)²), mean(t²)) of the given values (bf16 values upcast exactly)."""
    s, t = s.double(), t.double()
    return (s - t).square().mean(), t.square().mean()


def _downstream(x):
    """What the student does with the activation after the tap (some function of it)."""
    return (x.double().sin() * 0.7).sum()


def _check(s, t, dtype, factor=3.0):
    """Forward of both values and ds (clone loss scaled by ``factor`` plus a downstream use
    of the returned s) against the fp64 reference."""
    s.requires_grad_(True)
    out, loss, ms = clone_mse(s, t)
    assert out.shape == s.shape and out.dtype == s.dtype and torch.equal(out, s)
    assert loss.dim() == 0 and ms.dim() == 0
    assert loss.dtype == torch.float32 and ms.dtype == torch.float32
    assert loss.requires_grad and not ms.requires_grad
    sd = s.detach().double().requires_grad_()
    lref, msref = _ref(sd, t)
    assert_close(loss, lref, dtype, "loss")
    assert_close(ms, msref, dtype, "ms")
    (loss * factor + _downstream(out)).backward()
    (lref * factor + _downstream(sd)).backward()
    assert s.grad.dtype == s.dtype and s.grad.shape == s.shape
    assert_close(s.grad, sd.grad, dtype, "ds")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shape", [(T, W), (3, 7, W), (1, W), (T, 5)])
def test_clone_mse_matches_reference(backend, dtype, shape, gen):
    s = randn(*shape, dtype=dtype, gen=gen)
    t = randn(*shape, dtype=dtype, gen=gen, scale=0.7)
    _check(s, t, dtype)


def test_only_the_loss_used(backend, gen):
    """The returned s unused downstream: ds is the clone gradient alone; equals naive."""
    s, t = randn(T, W, gen=gen, requires_grad=True), randn(T, W, gen=gen)
    _, loss, ms = clone_mse(s, t)
    _, nl, nms = naive_clone_mse(s, t)
    assert_close(loss, nl, torch.float32, "loss")
    assert_close(ms, nms, torch.float32, "ms")
    (loss * 2.0).backward()
    sd = s.detach().double().requires_grad_()
    (_ref(sd, t)[0] * 2.0).backward()
    assert_close(s.grad, sd.grad, torch.float32, "ds")


def test_target_with_grad(backend, gen):
    """The FFN term's target is the teacher output times the student's P: dt = −go·g."""
    s = randn(T, W, gen=gen, requires_grad=True)
    y = randn(T, 50, gen=gen)
    P = randn(50, W, gen=gen, scale=0.2, requires_grad=True)
    out, loss, _ = clone_mse(s, y @ P)
    (loss * 1.5 + _downstream(out)).backward()
    sd, Pd = s.detach().double().requires_grad_(), P.detach().double().requires_grad_()
    (_ref(sd, y.double() @ Pd)[0] * 1.5 + _downstream(sd)).backward()
    assert_close(s.grad, sd.grad, torch.float32, "ds")
    assert_close(P.grad, Pd.grad, torch.float32, "dP")


def test_mean_square_is_the_targets_and_not_differentiable(backend, gen):
    t = randn(2, 19, W, dtype=torch.bfloat16, gen=gen, scale=2.0)
    for s in (randn(2, 19, W, dtype=torch.bfloat16, gen=gen), t.clone()):
        s.requires_grad_(True)
        _, loss, ms = clone_mse(s, t)
        assert ms.dtype == torch.float32
        assert abs(ms.item() - t.double().square().mean().item()) <= 1e-6 * t.double().square().mean().item()
        assert not ms.requires_grad and ms.grad_fn is None
    assert loss.item() == 0.0  # s == t
    # used as a constant normalizer: the gradient is that of loss / ms with ms fixed
    s, t = randn(T, W, gen=gen, requires_grad=True), randn(T, W, gen=gen)
    _, loss, ms = clone_mse(s, t)
    (loss / ms * 2.0).backward()
    sd = s.detach().double().requires_grad_()
    lref, msref = _ref(sd, t)
    (lref / msref.detach() * 2.0).backward()
    assert_close(s.grad, sd.grad, torch.float32, "ds")


def test_no_grad_forward(backend, gen):
    s, t = randn(T, W, gen=gen, requires_grad=True), randn(T, W, gen=gen)
    with torch.no_grad():
        _, loss, ms = clone_mse(s, t)
    assert not loss.requires_grad
    lref, msref = _ref(s, t)
    assert_close(loss, lref, torch.float32, "loss")
    assert_close(ms, msref, torch.float32, "ms")


def test_non_contiguous_inputs(backend, gen):
    s = randn(W, T, gen=gen).t().requires_grad_()  # [T, W] view with strides (1, T)
    t = randn(T, 2 * W, gen=gen)[:, ::2]
    assert not s.is_contiguous() and not t.is_contiguous()
    _check(s, t, torch.float32)


@pytest.mark.parametrize("shape", [(0, W), (2, 0, W)])
def test_empty_gives_zero_loss_and_grads(backend, shape, device):
    s = torch.randn(*shape, device=device, requires_grad=True)
    t = torch.randn(*shape, device=device)
    _, loss, ms = clone_mse(s, t)
    assert loss.item() == 0.0 and ms.item() == 0.0
    (loss * 2.0).backward()
    assert s.grad.shape == s.shape and torch.all(s.grad == 0)


def test_gradcheck_fp64(backend, gen):
    s = randn(5, 7, dtype=torch.float64, gen=gen, requires_grad=True)
    t = randn(5, 7, dtype=torch.float64, gen=gen, requires_grad=True)
    gc = lambda f, ins: torch.autograd.gradcheck(f, ins, fast_mode=True)  # noqa: E731
    assert gc(lambda a, b: clone_mse(a, b)[1] * 2.5, (s, t))
    assert gc(lambda a, b: (clone_mse(a, b)[0].sin().sum() + clone_mse(a, b)[1]), (s, t))
    assert clone_mse(s, t)[1].dtype == torch.float64


def test_shape_mismatch_raises(device):
    r = lambda *shape: torch.randn(*shape, device=device)  # noqa: E731
    with pytest.raises(ValueError):
        clone_mse(r(3, 4), r(3, 5))
    with pytest.raises(ValueError):
        clone_mse(r(3, 4), r(4, 3))


class _Ops(TorchDispatchMode):
    """The aten ops run inside the block."""

    def __init__(self):
        super().__init__()
        self.ops = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        self.ops.append((func.overloadpacket.__name__, out.numel() if isinstance(out, torch.Tensor) else 0))
        return out


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_keeps_only_g_and_adds_it_in_one_op(backend, dtype, gen):
    """The tap keeps one tensor (g) of s's shape and dtype until backward, and its backward
    adds the clone gradient into the downstream one with a single addcmul: no separate
    g·go tensor for autograd to sum."""
    s = randn(T, W, dtype=dtype, gen=gen, requires_grad=True)
    t = randn(T, W, dtype=dtype, gen=gen)
    out, loss, _ = clone_mse(s, t)
    node = loss.grad_fn
    (g,) = node.saved_tensors
    assert g.dtype == dtype and g.numel() == s.numel()
    total = (out * 2.0).sum() + loss
    with _Ops() as ops:
        torch.autograd.grad(total, s)
    # backward of sum (expand) and of *2 (mul), then the tap: one addcmul over [T, W], and at
    # most a scalar op on the incoming gradient
    big = [o for o, n in ops.ops if n >= T * W and o not in ("_to_copy", "expand", "view", "ones_like", "detach",
                                                             "alias")]
    assert big == ["mul", "addcmul"], ops.ops


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_torch_path_several_row_chunks(dtype, gen):
    """The torch path sums fp32 temporaries over row chunks (a few MB each): a wide, ragged
    input spanning more than one chunk gives the one-pass result."""
    import red_kernels
    s = randn(300, 4099, dtype=dtype, gen=gen)
    t = randn(300, 4099, dtype=dtype, gen=gen)
    with red_kernels.use_backend("torch"):
        _check(s, t, dtype, factor=0.5)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_sums_and_the_kernels_own_final_reduction(backend, dtype, gen):
    """mean=False returns Σ(s − t)² and Σt² (the student divides all terms at once). 300 rows
    make 19 row blocks in the Triton kernel, more than one block of its final sum, and two
    launches in a row check that the count of finished programs is reset between them."""
    for rows in (300, 37):
        s = randn(rows, 40, dtype=dtype, gen=gen, requires_grad=True)
        t = randn(rows, 40, dtype=dtype, gen=gen)
        out, err, tsq = clone_mse(s, t, mean=False)
        sd = s.detach().double().requires_grad_()
        ref_err, ref_tsq = (sd - t.double()).square().sum(), t.double().square().sum()
        assert_close(err, ref_err, dtype, "sum of squared errors")
        assert_close(tsq, ref_tsq, dtype, "sum of squares")
        (err * 0.01 + _downstream(out)).backward()
        (ref_err * 0.01 + _downstream(sd)).backward()
        assert_close(s.grad, sd.grad, dtype, "ds")
