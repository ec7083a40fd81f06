import pytest
import torch

from red_kernels import projected_linear, projected_linear_group
from red_kernels.projected_linear import ProjectedLinear, _ProjectedLinearGroup
from kernel_utils import assert_close, randn

D, d, OUT, IN = 96, 48, 40, 72


def _ref(x, w, P, side, b=None):
    ws = w @ P if side == "in" else P.t() @ w
    y = x @ ws.t()
    return y if b is None else y + b


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("side", ["in", "out"])
@pytest.mark.parametrize("lead", [(37,), (2, 5), (1,), (0,)])
def test_projected_linear(backend, dtype, side, lead, gen):
    if side == "in":
        x = randn(*lead, d, dtype=dtype, gen=gen, requires_grad=True)
        w = randn(OUT, D, dtype=dtype, gen=gen, scale=0.1)
        b = randn(OUT, dtype=dtype, gen=gen)
    else:
        x = randn(*lead, IN, dtype=dtype, gen=gen, requires_grad=True)
        w = randn(D, IN, dtype=dtype, gen=gen, scale=0.1)
        b = randn(d, dtype=dtype, gen=gen)
    P = randn(D, d, dtype=dtype, gen=gen, scale=0.2, requires_grad=True)
    y = projected_linear(x, w, P, side, b)
    xd, Pd = x.detach().double().requires_grad_(), P.detach().double().requires_grad_()
    yr = _ref(xd, w.double(), Pd, side, b.double())
    assert y.shape == yr.shape and y.dtype == dtype
    g = randn(*yr.shape, dtype=torch.float64, gen=gen)
    (y.double() * g).sum().mul(2.5).backward()
    (yr * g).sum().mul(2.5).backward()
    if y.numel() == 0:
        assert x.grad.shape == x.shape and torch.all(P.grad == 0)
        return
    assert_close(y, yr, dtype, "y")
    assert_close(x.grad, xd.grad, dtype, "dx")
    assert_close(P.grad, Pd.grad, dtype, "dP")
    assert P.grad.dtype == P.dtype


def test_group_accumulates_dx_once(backend, gen):
    x = randn(37, d, gen=gen, requires_grad=True)
    ws = [randn(o, D, gen=gen, scale=0.1) for o in (40, 16, 16)]
    Ps = [randn(D, d, gen=gen, scale=0.2, requires_grad=True) for _ in ws]
    bs = [randn(o, gen=gen) for o in (40, 16, 16)]
    ys = projected_linear_group(x, ws, Ps, "in", bs)
    assert len(ys) == 3 and ys[0].grad_fn is ys[2].grad_fn  # one autograd node
    xd = x.detach().double().requires_grad_()
    Pds = [P.detach().double().requires_grad_() for P in Ps]
    yrs = [_ref(xd, w.double(), P, "in", b.double()) for w, P, b in zip(ws, Pds, bs)]
    gs = [randn(*y.shape, dtype=torch.float64, gen=gen) for y in yrs]
    sum((y.double() * g).sum() for y, g in zip(ys, gs)).backward()
    sum((y * g).sum() for y, g in zip(yrs, gs)).backward()
    for y, yr in zip(ys, yrs):
        assert_close(y, yr, torch.float32, "y")
    assert_close(x.grad, xd.grad, torch.float32, "dx")
    for P, Pd in zip(Ps, Pds):
        assert_close(P.grad, Pd.grad, torch.float32, "dP")


def test_group_with_unused_output(backend, gen):
    """An output that does not reach the loss gets dy=None; its P still gets a zero/None."""
    x = randn(9, d, gen=gen, requires_grad=True)
    ws = [randn(16, D, gen=gen) for _ in range(2)]
    Ps = [randn(D, d, gen=gen, requires_grad=True) for _ in range(2)]
    y0, _ = projected_linear_group(x, ws, Ps)
    y0.sum().backward()
    assert Ps[0].grad is not None and torch.isfinite(x.grad).all()
    assert Ps[1].grad is None or torch.all(Ps[1].grad == 0)


@pytest.mark.parametrize("recompute", [True, False])
def test_saved_tensors_follow_the_switch(recompute, gen):
    """recompute_weights=True saves only x (flattened), the teacher weight and P; False also
    keeps W_s, in x's (compute) dtype, and nothing else."""
    x = randn(5, d, gen=gen, requires_grad=True)
    w = randn(OUT, D, gen=gen)
    P = randn(D, d, gen=gen, requires_grad=True)
    y = projected_linear(x, w, P, "in", recompute_weights=recompute)
    saved = y.grad_fn.saved_tensors
    shapes = sorted(tuple(t.shape) for t in saved)
    expect = [(5, d), (OUT, D), (D, d)] + ([] if recompute else [(OUT, d)])
    assert shapes == sorted(expect)


@pytest.mark.parametrize("side", ["in", "out"])
def test_kept_and_recomputed_weights_give_identical_grads(side, gen):
    x = randn(6, d if side == "in" else OUT, gen=gen)
    w = randn(OUT, D, gen=gen) if side == "in" else randn(D, OUT, gen=gen)
    P = randn(D, d, gen=gen)
    grads = []
    for recompute in (True, False):
        xi, Pi = x.clone().requires_grad_(), P.clone().requires_grad_()
        projected_linear(xi, w, Pi, side, recompute_weights=recompute).square().sum().backward()
        grads.append((xi.grad, Pi.grad))
    assert torch.equal(grads[0][0], grads[1][0]) and torch.equal(grads[0][1], grads[1][1])


@pytest.mark.parametrize("recompute", [True, False])
@pytest.mark.parametrize("side", ["in", "out"])
def test_gradcheck(side, recompute, gen):
    x = randn(4, 3 if side == "in" else 5, dtype=torch.float64, gen=gen, requires_grad=True)
    w = randn(6, 7, dtype=torch.float64, gen=gen) if side == "in" else randn(7, 5, dtype=torch.float64, gen=gen)
    P = randn(7, 3, dtype=torch.float64, gen=gen, requires_grad=True)
    assert torch.autograd.gradcheck(lambda x, P: projected_linear(x, w, P, side, recompute_weights=recompute),
                                    (x, P), fast_mode=True)
    P2 = randn(7, 3, dtype=torch.float64, gen=gen, requires_grad=True)
    if side == "in":
        assert torch.autograd.gradcheck(
            lambda x, a, b: sum(y.sum() * (i + 1) for i, y in enumerate(
                projected_linear_group(x, [w, w[:2]], [a, b], recompute_weights=recompute))),
            (x, P, P2), fast_mode=True)


def test_module_and_errors(gen, device):
    lin = torch.nn.Linear(D, OUT, device=device)
    P = torch.nn.Parameter(randn(D, d, gen=gen))
    m = ProjectedLinear(lin, P, "in")
    x = randn(3, d, gen=gen)
    assert_close(m(x), _ref(x.double(), lin.weight.double(), P.double(), "in", lin.bias.double()),
                 torch.float32)
    with pytest.raises(ValueError):
        projected_linear(x, lin.weight, P, "sideways")
    with pytest.raises(ValueError):
        projected_linear(randn(3, d + 1, gen=gen), lin.weight, P, "in")
    assert issubclass(_ProjectedLinearGroup, torch.autograd.Function)


class _GemmDtypes(torch.utils._python_dispatch.TorchDispatchMode):
    """Records (op, dtypes of the tensor operands) of every aten GEMM dispatched inside."""

    GEMMS = {"mm", "addmm", "bmm", "baddbmm", "matmul", "addbmm", "mv", "dot", "linear", "_addmm_activation"}

    def __init__(self):
        super().__init__()
        self.calls = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = func.overloadpacket.__name__.rstrip("_")
        if name in self.GEMMS:
            dts = [a.dtype for a in list(args) + list(kwargs.values()) if isinstance(a, torch.Tensor)]
            self.calls.append((name, dts))
        return func(*args, **kwargs)


@pytest.mark.parametrize("recompute", [False, True])
@pytest.mark.parametrize("side", ["in", "out"])
def test_bf16_regime_with_fp32_master(backend, side, recompute, gen):
    """The trainer's GPU regime on CPU: bf16 x and teacher weight, fp32 master P. Output and dx
    bf16, dP fp32, values within bf16 tolerance of fp64; every GEMM of forward and backward
    runs on bf16 operands (no fp32 GEMM: autocast would not reach this custom op)."""
    bf16 = torch.bfloat16
    if side == "in":
        x = randn(37, d, dtype=bf16, gen=gen, requires_grad=True)
        w = randn(OUT, D, dtype=bf16, gen=gen, scale=0.1)
        b = randn(OUT, dtype=bf16, gen=gen)
    else:
        x = randn(2, 9, IN, dtype=bf16, gen=gen, requires_grad=True)
        w = randn(D, IN, dtype=bf16, gen=gen, scale=0.1)
        b = randn(d, dtype=bf16, gen=gen)
    P = randn(D, d, dtype=torch.float32, gen=gen, scale=0.2, requires_grad=True)
    with _GemmDtypes() as fwd:
        y = projected_linear(x, w, P, side, b, recompute_weights=recompute)
    g = randn(*y.shape, dtype=bf16, gen=gen)
    with _GemmDtypes() as bwd:
        (y * g).sum().mul(2.5).backward()
    assert y.dtype == bf16 and x.grad.dtype == bf16 and P.grad.dtype == torch.float32
    assert x.grad.shape == x.shape and P.grad.shape == P.shape

    xd, Pd = x.detach().double().requires_grad_(), P.detach().double().requires_grad_()
    yr = _ref(xd, w.double(), Pd, side, b.double())
    (yr * g.double()).sum().mul(2.5).backward()
    assert_close(y, yr, bf16, "y")
    assert_close(x.grad, xd.grad, bf16, "dx")
    assert_close(P.grad, Pd.grad, bf16, "dP")

    assert len(fwd.calls) >= 2, fwd.calls  # W_s = W_t·P (or Pᵀ·W_t), then x·W_sᵀ
    assert len(bwd.calls) >= (4 if recompute else 3), bwd.calls  # (W_s again,) dx, dW_s, dP
    for name, dts in fwd.calls + bwd.calls:
        assert dts and all(dt == bf16 for dt in dts), (name, dts)
