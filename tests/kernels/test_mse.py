"""mse / mse_with_target_ms: same-space MSE with the teacher mean square read in the same pass.

Every result is compared with an independent float64 reference written here (not only with
``naive_mse``), on fresh random inputs of ragged shapes, with the loss scaled before backward.
"""
import pytest
import torch

from red_kernels import mse, mse_with_target_ms, naive_mse
from kernel_utils import assert_close, randn

T, W = 37, 96


def _ref(s, t):
    """float64 (mean((s − t)²), mean(t²)) of the given values (bf16 values upcast exactly)."""
    s, t = s.double(), t.double()
    return (s - t).square().mean(), t.square().mean()


def _check(s, t, dtype, factor=3.0):
    """Forward of both outputs and ds (loss scaled by ``factor``) against the fp64 reference."""
    s.requires_grad_(True)
    loss, ms = mse_with_target_ms(s, t)
    assert loss.dim() == 0 and ms.dim() == 0
    assert loss.dtype == torch.float32 and ms.dtype == torch.float32
    assert loss.requires_grad and not ms.requires_grad
    sd = s.detach().double().requires_grad_()
    lref, msref = _ref(sd, t)
    assert_close(loss, lref, dtype, "loss")
    assert_close(ms, msref, dtype, "ms")
    (loss * factor).backward()
    (lref * factor).backward()
    assert s.grad.dtype == s.dtype and s.grad.shape == s.shape
    assert_close(s.grad, sd.grad, dtype, "ds")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shape", [(T, W), (3, 7, W), (1, W), (T, 5)])
def test_mse_matches_reference(backend, dtype, shape, gen):
    s = randn(*shape, dtype=dtype, gen=gen)
    t = randn(*shape, dtype=dtype, gen=gen, scale=0.7)
    _check(s, t, dtype)


def test_mse_equals_first_output_and_naive(backend, gen):
    s, t = randn(T, W, gen=gen, requires_grad=True), randn(T, W, gen=gen)
    a = mse(s, t)
    b, _ = mse_with_target_ms(s, t)
    assert a.dtype == torch.float32 and a.requires_grad
    assert_close(a, b, torch.float32)
    assert_close(a, naive_mse(s, t), torch.float32)
    assert_close(a, _ref(s, t)[0], torch.float32)


def test_mean_square_is_fp64_mean_of_t_squared(backend, gen):
    """The second output is mean(t²) of the target alone, whatever s is, and carries no grad."""
    t = randn(2, 19, W, dtype=torch.bfloat16, gen=gen, scale=2.0)
    for s in (randn(2, 19, W, dtype=torch.bfloat16, gen=gen), t.clone()):
        s.requires_grad_(True)
        loss, ms = mse_with_target_ms(s, t)
        assert ms.dtype == torch.float32
        assert abs(ms.item() - t.double().square().mean().item()) <= 1e-6 * t.double().square().mean().item()
        assert not ms.requires_grad and ms.grad_fn is None
    assert loss.item() == 0.0  # s == t


def test_ms_is_not_differentiable(backend, gen):
    s, t = randn(T, W, gen=gen, requires_grad=True), randn(T, W, gen=gen)
    loss, ms = mse_with_target_ms(s, t)
    assert not ms.requires_grad
    with pytest.raises(RuntimeError):
        ms.backward()
    # using ms as a (constant) normalizer: the gradient is that of loss / ms with ms fixed
    (loss / ms * 2.0).backward()
    sd = s.detach().double().requires_grad_()
    lref, msref = _ref(sd, t)
    (lref / msref.detach() * 2.0).backward()
    assert_close(s.grad, sd.grad, torch.float32, "ds")


def test_target_gets_no_grad(backend, gen):
    """t is detached inside the op: a leaf t (or anything upstream of it) gets no gradient."""
    s = randn(T, W, gen=gen, requires_grad=True)
    u = randn(T, W, gen=gen, requires_grad=True)
    t = u * 1.5
    mse(s, t).mul(4.0).backward()
    assert u.grad is None
    sd = s.detach().double().requires_grad_()
    _ref(sd, t.detach())[0].mul(4.0).backward()
    assert_close(s.grad, sd.grad, torch.float32, "ds")
    # only t requires grad: nothing in the output requires grad
    assert not mse(s.detach(), t).requires_grad


def test_no_grad_forward(backend, gen):
    s, t = randn(T, W, gen=gen, requires_grad=True), randn(T, W, gen=gen)
    with torch.no_grad():
        loss, ms = mse_with_target_ms(s, t)
    assert not loss.requires_grad
    lref, msref = _ref(s, t)
    assert_close(loss, lref, torch.float32, "loss")
    assert_close(ms, msref, torch.float32, "ms")


def test_non_contiguous_inputs(backend, gen):
    s = randn(W, T, gen=gen).t().requires_grad_()  # [T, W] view with strides (1, T)
    t = randn(T, 2 * W, gen=gen)[:, ::2]
    assert not s.is_contiguous() and not t.is_contiguous()
    _check(s, t, torch.float32)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_twice_in_one_graph(backend, dtype, gen):
    """Two mse terms (one on a function of s) with different weights: grads add correctly."""
    s = randn(T, W, dtype=dtype, gen=gen, requires_grad=True)
    t1 = randn(T, W, dtype=dtype, gen=gen)
    t2 = randn(T, W, dtype=dtype, gen=gen)
    a = s * 0.5
    l1, ms1 = mse_with_target_ms(s, t1)
    l2 = mse(a, t2)
    loss = 0.3 * l1 + 1.7 * l2 + ms1
    loss.backward()
    sd = s.detach().double().requires_grad_()
    r1, rms1 = _ref(sd, t1)
    r2, _ = _ref(sd * 0.5, t2)
    lref = 0.3 * r1 + 1.7 * r2 + rms1
    lref.backward()
    assert_close(loss, lref, dtype, "loss")
    assert s.grad.dtype == dtype
    assert_close(s.grad, sd.grad, dtype, "ds")


@pytest.mark.parametrize("shape", [(0, W), (2, 0, W)])
def test_empty_gives_zero_loss_and_grads(backend, shape, device):
    s = torch.randn(*shape, device=device, requires_grad=True)
    t = torch.randn(*shape, device=device)
    loss, ms = mse_with_target_ms(s, t)
    assert loss.item() == 0.0 and ms.item() == 0.0
    assert loss.dtype == torch.float32
    (loss * 2.0).backward()
    assert s.grad.shape == s.shape and s.grad.dtype == s.dtype
    assert torch.all(s.grad == 0)


def test_gradcheck_fp64(backend, gen):
    s = randn(5, 7, dtype=torch.float64, gen=gen, requires_grad=True)
    t = randn(5, 7, dtype=torch.float64, gen=gen)
    t3 = randn(2, 3, 7, dtype=torch.float64, gen=gen)
    s3 = randn(2, 3, 7, dtype=torch.float64, gen=gen, requires_grad=True)
    gc = lambda f, ins: torch.autograd.gradcheck(f, ins, fast_mode=True)  # noqa: E731
    assert gc(lambda a: mse(a, t), (s,))
    assert gc(lambda a: mse_with_target_ms(a, t)[0] * 2.5, (s,))
    assert gc(lambda a: mse(a, t3), (s3,))
    loss = mse(s, t)
    assert loss.dtype == torch.float64


def test_shape_mismatch_raises(device):
    r = lambda *shape: torch.randn(*shape, device=device)  # noqa: E731
    with pytest.raises(ValueError):
        mse(r(3, 4), r(3, 5))
    with pytest.raises(ValueError):
        mse_with_target_ms(r(3, 4), r(4, 3))
    with pytest.raises(ValueError):
        mse(r(2, 3, 4), r(6, 4))  # same numel, different shape


class _Saved:
    """Collects (shape, dtype) of every tensor autograd saves inside the block."""

    def __init__(self):
        self.items = []
        self._hooks = torch.autograd.graph.saved_tensors_hooks(self._pack, lambda x: x)

    def _pack(self, x):
        self.items.append((tuple(x.shape), x.dtype, x.numel() * x.element_size()))
        return x

    def __enter__(self):
        self._hooks.__enter__()
        return self

    def __exit__(self, *exc):
        return self._hooks.__exit__(*exc)

    @property
    def nbytes(self):
        return sum(b for _, _, b in self.items)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_saves_only_ds_in_input_dtype(backend, dtype, gen):
    """mse keeps one tensor (ds) of s's shape and dtype until backward; naive_mse on bf16
    inputs keeps fp32 copies of the operands (the waste the op removes)."""
    s = randn(T, W, dtype=dtype, gen=gen, requires_grad=True)
    t = randn(T, W, dtype=dtype, gen=gen)
    with _Saved() as saved:
        y = mse(s, t)
    assert [(sh, dt) for sh, dt, _ in saved.items] == [(tuple(s.shape), dtype)]
    node_saved = y.grad_fn.saved_tensors
    assert len(node_saved) == 1
    assert node_saved[0].shape == s.shape and node_saved[0].dtype == dtype
    # 3-D input: one tensor, s's dtype and element count (rows flattened)
    s3 = randn(3, 7, W, dtype=dtype, gen=gen, requires_grad=True)
    (g3,) = mse(s3, randn(3, 7, W, dtype=dtype, gen=gen)).grad_fn.saved_tensors
    assert g3.dtype == dtype and g3.numel() == s3.numel()

    if dtype == torch.bfloat16:
        with _Saved() as naive:
            naive_mse(s, t)
        big = [(sh, dt) for sh, dt, _ in naive.items if sh == tuple(s.shape)]
        assert big and all(dt == torch.float32 for _, dt in big), naive.items
        assert naive.nbytes >= 2 * saved.nbytes, (naive.items, saved.items)


def test_no_saved_tensor_without_grad(backend, gen):
    s, t = randn(T, W, gen=gen), randn(T, W, gen=gen)
    with _Saved() as saved:
        loss = mse(s, t)
    assert saved.items == [] and loss.grad_fn is None


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_torch_path_several_row_chunks(dtype, gen):
    """The torch path sums fp32 temporaries over row chunks (a few MB each): a wide, ragged
    input spanning more than one chunk gives the one-pass result."""
    import red_kernels
    s = randn(300, 4099, dtype=dtype, gen=gen)
    t = randn(300, 4099, dtype=dtype, gen=gen)
    with red_kernels.use_backend("torch"):
        _check(s, t, dtype, factor=0.5)
