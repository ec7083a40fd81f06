import pytest
import torch

import red_kernels
from red_kernels import fused_linear_kl
from helpers import assert_close, randn

N, d, D, V = 37, 48, 96, 300


def _ref(h_s, w_s, h_t, w_t, labels, T, kw, cw, ignore=-100):
    """float64 reference written independently of the library's naive_*."""
    ls, lt = h_s @ w_s.t(), h_t @ w_t.t()
    valid = labels != ignore if labels is not None else torch.ones(len(h_s), dtype=torch.bool,
                                                                   device=h_s.device)
    n = max(int(valid.sum()), 1)
    p_t = torch.softmax(lt[valid] / T, -1)
    kl = (p_t * (torch.log_softmax(lt[valid] / T, -1) - torch.log_softmax(ls[valid] / T, -1))).sum() / n
    if labels is None:
        return kw * kl, kl, torch.zeros((), device=h_s.device)
    ce = -torch.log_softmax(ls[valid], -1).gather(1, labels[valid][:, None]).sum() / n
    return kw * kl + cw * ce, kl, ce


def _inputs(dtype, gen, n=N, scale=0.15):
    h_s = randn(n, d, dtype=dtype, gen=gen, requires_grad=True)
    w_s = randn(V, d, dtype=dtype, gen=gen, scale=scale, requires_grad=True)
    h_t = randn(n, D, dtype=dtype, gen=gen)
    w_t = randn(V, D, dtype=dtype, gen=gen, scale=scale)
    labels = torch.randint(0, V, (n,), generator=gen, device=gen.device)
    if n > 3:
        labels[torch.randperm(n, generator=gen, device=gen.device)[: n // 4]] = -100
    return h_s, w_s, h_t, w_t, labels


def _run(dtype, gen, n=N, T=1.0, kw=1.0, cw=1.0, use_labels=True, chunk=None, scale=0.15):
    h_s, w_s, h_t, w_t, labels = _inputs(dtype, gen, n, scale)
    labels = labels if use_labels else None
    loss, kl, ce = fused_linear_kl(h_s, w_s, h_t, w_t, labels, temperature=T, kl_weight=kw,
                                   ce_weight=cw, chunk_size=chunk)
    assert loss.dtype == kl.dtype == ce.dtype == torch.float32
    assert not kl.requires_grad and not ce.requires_grad and loss.requires_grad
    hd, wd = h_s.detach().double().requires_grad_(), w_s.detach().double().requires_grad_()
    lr, klr, cer = _ref(hd, wd, h_t.double(), w_t.double(), labels, T, kw, cw)
    assert_close(loss, lr, dtype, "loss")
    assert_close(kl, klr, dtype, "kl")
    assert_close(ce, cer, dtype, "ce")
    (loss * 2.0).backward()
    (lr * 2.0).backward()
    assert h_s.grad.dtype == dtype and w_s.grad.dtype == dtype
    assert_close(h_s.grad, hd.grad, dtype, "dh_s")
    assert_close(w_s.grad, wd.grad, dtype, "dw_s")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("T", [1.0, 2.0])
def test_matches_reference(backend, dtype, T, gen):
    _run(dtype, gen, T=T, kw=0.7, cw=0.3)


@pytest.mark.parametrize("chunk", [5, 16, 64])
def test_chunking(backend, chunk, gen):
    _run(torch.float32, gen, T=1.5, chunk=chunk)


def test_no_labels(backend, gen):
    _run(torch.float32, gen, use_labels=False, cw=5.0)  # ce_weight ignored, ce = 0


def test_one_token(backend, gen):
    _run(torch.float32, gen, n=1, chunk=4)


def test_matches_naive(backend, gen):
    h_s, w_s, h_t, w_t, labels = _inputs(torch.float32, gen)
    out = fused_linear_kl(h_s, w_s, h_t, w_t, labels, temperature=1.3, ce_weight=0.5)
    ref = red_kernels.naive_fused_linear_kl(h_s, w_s, h_t, w_t, labels, temperature=1.3, ce_weight=0.5)
    for a, b in zip(out, ref):
        assert_close(a, b, torch.float32)


def test_empty_and_all_ignored(backend, gen, device):
    h_s, w_s, h_t, w_t, labels = _inputs(torch.float32, gen, n=6)
    loss, kl, ce = fused_linear_kl(h_s, w_s, h_t, w_t, torch.full((6,), -100, device=device))
    assert loss.item() == 0 and kl.item() == 0 and ce.item() == 0
    loss.backward()
    assert torch.all(h_s.grad == 0) and torch.all(w_s.grad == 0)
    e = torch.zeros(0, d, device=device, requires_grad=True)
    loss, kl, ce = fused_linear_kl(e, w_s, torch.zeros(0, D, device=device), w_t,
                                   torch.zeros(0, dtype=torch.long, device=device))
    loss.backward()
    assert loss.item() == 0 and torch.isfinite(loss) and e.grad.shape == (0, d)


def test_identical_models_zero_kl(backend, gen):
    """Student == teacher: KL is 0 and, without CE, the gradient is 0."""
    h = randn(N, d, gen=gen, requires_grad=True)
    w = randn(V, d, gen=gen, scale=0.3, requires_grad=True)
    loss, kl, _ = fused_linear_kl(h, w, h.detach(), w.detach())
    loss.backward()
    assert abs(kl.item()) < 1e-6
    assert h.grad.abs().max().item() < 1e-6 and w.grad.abs().max().item() < 1e-6


def test_no_grad_and_frozen_head(backend, gen):
    h_s, w_s, h_t, w_t, labels = _inputs(torch.float32, gen)
    with torch.no_grad():
        loss, kl, ce = fused_linear_kl(h_s, w_s, h_t, w_t, labels)
    lr, _, _ = _ref(h_s.double(), w_s.double(), h_t.double(), w_t.double(), labels, 1.0, 1.0, 1.0)
    assert_close(loss, lr, torch.float32)
    w_frozen = w_s.detach()
    loss, _, _ = fused_linear_kl(h_s, w_frozen, h_t, w_t, labels)
    loss.backward()
    assert h_s.grad is not None and w_frozen.grad is None


def test_deterministic_weight_grad(backend, gen):
    h_s, w_s, h_t, w_t, labels = _inputs(torch.float32, gen)
    grads = []
    for _ in range(2):
        w = w_s.detach().clone().requires_grad_()
        fused_linear_kl(h_s, w, h_t, w_t, labels, chunk_size=8)[0].backward()
        grads.append(w.grad)
    assert torch.equal(grads[0], grads[1])


def test_gradcheck_fp64(backend, gen):
    n, dd, DD, VV = 6, 5, 7, 40
    h_s = randn(n, dd, dtype=torch.float64, gen=gen, requires_grad=True)
    w_s = randn(VV, dd, dtype=torch.float64, gen=gen, requires_grad=True)
    h_t = randn(n, DD, dtype=torch.float64, gen=gen)
    w_t = randn(VV, DD, dtype=torch.float64, gen=gen)
    labels = torch.randint(0, VV, (n,), generator=gen, device=gen.device)
    labels[1] = -100
    f = lambda h, w: fused_linear_kl(h, w, h_t, w_t, labels, temperature=1.7, kl_weight=0.6,  # noqa: E731
                                     ce_weight=0.4, chunk_size=4)[0]
    assert torch.autograd.gradcheck(f, (h_s, w_s), fast_mode=True)


def test_module_and_errors(gen):
    h_s, w_s, h_t, w_t, labels = _inputs(torch.float32, gen)
    m = red_kernels.FusedLinearKL(temperature=2.0, ce_weight=0.0)
    loss, kl, ce = m(h_s, w_s, h_t, w_t, labels)
    assert ce.item() == 0 and torch.allclose(loss, kl)
    with pytest.raises(ValueError):
        fused_linear_kl(h_s, w_s[:, :5], h_t, w_t)
    with pytest.raises(ValueError):
        fused_linear_kl(h_s, w_s, h_t, w_t, temperature=0.0)
    # the module form computes what the function does, with its settings
    ref = fused_linear_kl(h_s, w_s, h_t, w_t, labels, temperature=2.0, ce_weight=0.0)
    assert torch.equal(loss, ref[0]) and torch.equal(kl, ref[1])


def _loss_and_grads(h_s, w_s, h_t, w_t, labels, **kw):
    h, w = h_s.detach().clone().requires_grad_(), w_s.detach().clone().requires_grad_()
    loss, kl, ce = fused_linear_kl(h, w, h_t, w_t, labels, **kw)
    (loss * 1.5).backward()
    return loss.detach(), kl, ce, h.grad, w.grad


def _check_against_ref(out, h_s, w_s, h_t, w_t, labels, T, kw, cw, dtype=torch.float32):
    hd, wd = h_s.detach().double().requires_grad_(), w_s.detach().double().requires_grad_()
    lr, klr, cer = _ref(hd, wd, h_t.double(), w_t.double(), labels, T, kw, cw)
    (lr * 1.5).backward()
    for a, b, name in zip(out, (lr, klr, cer, hd.grad, wd.grad), ("loss", "kl", "ce", "dh_s", "dw_s")):
        assert_close(a, b, dtype, name)


def _same(a, b, name):
    assert a.shape == b.shape and a.dtype == b.dtype, name
    assert torch.allclose(a, b, rtol=1e-6, atol=0), f"{name}: {(a - b).abs().max().item():.3e}"


@pytest.mark.parametrize("view", ["column", "step"])
def test_strided_labels(backend, view, gen):
    """labels as a non-contiguous view give the same loss/kl/ce and grads as contiguous ones."""
    h_s, w_s, h_t, w_t, labels = _inputs(torch.float32, gen)
    if view == "column":  # labels_full[:, 0] of an [N, 2] tensor: stride 2
        full = torch.stack([labels, torch.randint(0, V, (N,), generator=gen, device=gen.device)], 1)
        strided = full[:, 0]
    else:  # ids[::2]: every other entry of a 2N tensor
        ids = torch.randint(0, V, (2 * N,), generator=gen, device=gen.device)
        ids[::2] = labels
        strided = ids[::2]
    assert not strided.is_contiguous() and torch.equal(strided, labels)
    kw = dict(temperature=1.3, kl_weight=0.6, ce_weight=0.4, chunk_size=16)
    out_s = _loss_and_grads(h_s, w_s, h_t, w_t, strided, **kw)
    out_c = _loss_and_grads(h_s, w_s, h_t, w_t, labels.contiguous(), **kw)
    for a, b, name in zip(out_s, out_c, ("loss", "kl", "ce", "dh_s", "dw_s")):
        _same(a, b, name)
    _check_against_ref(out_s, h_s, w_s, h_t, w_t, labels, 1.3, 0.6, 0.4)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_small_chunks_match_one_chunk(backend, dtype, gen):
    """N=37 > chunk_size=16 (three chunks, the last ragged) equals chunk_size=None."""
    h_s, w_s, h_t, w_t, labels = _inputs(dtype, gen)
    kw = dict(temperature=2.0, kl_weight=0.8, ce_weight=0.5)
    small = _loss_and_grads(h_s, w_s, h_t, w_t, labels, chunk_size=16, **kw)
    whole = _loss_and_grads(h_s, w_s, h_t, w_t, labels, chunk_size=None, **kw)
    for a, b, name in zip(small, whole, ("loss", "kl", "ce", "dh_s", "dw_s")):
        assert a.dtype == b.dtype, name
        assert_close(a, b, dtype, name)
    assert small[3].dtype == dtype and small[4].dtype == dtype
    _check_against_ref(small, h_s, w_s, h_t, w_t, labels, 2.0, 0.8, 0.5, dtype)
    _check_against_ref(whole, h_s, w_s, h_t, w_t, labels, 2.0, 0.8, 0.5, dtype)


def test_transposed_h_s(backend, gen):
    """h_s as a transposed view ([N, d] with strides (1, N)) gives the contiguous results."""
    h_s, w_s, h_t, w_t, labels = _inputs(torch.float32, gen)
    h_view = h_s.detach().t().contiguous().t()
    assert h_view.stride(1) != 1 and torch.equal(h_view, h_s)
    out_c = _loss_and_grads(h_s, w_s, h_t, w_t, labels, chunk_size=16)
    out_v = _loss_and_grads(h_view, w_s, h_t, w_t, labels, chunk_size=16)
    for a, b, name in zip(out_v, out_c, ("loss", "kl", "ce", "dh_s", "dw_s")):
        assert a.dtype == b.dtype, name
        assert_close(a, b, torch.float32, name)  # another GEMM layout: summation order may differ
    _check_against_ref(out_v, h_s, w_s, h_t, w_t, labels, 1.0, 1.0, 1.0)
