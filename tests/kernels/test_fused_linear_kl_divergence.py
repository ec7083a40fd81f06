"""fused_linear_kl's divergence options: reverse KL, generalized JSD, the teacher's top-k
buckets, and kl_reduction="sum" (LRC's scale), on both backends (Triton under the
interpreter on CPU).

The reference below is written from the formulas with probabilities (not log-space tricks),
in float64 with torch autograd, and does not call the library's naive_* function.
"""
import math

import pytest
import torch
import torch.nn.functional as F

import red_kernels
from red_kernels import fused_linear_kl, naive_fused_linear_kl
from helpers import assert_close, rel_err, randn

N, d, D, V = 37, 48, 96, 300
B = 3  # n_sequences for kl_reduction="sum" (any positive number: the rows need not divide)
DIVS = ("forward-kl", "reverse-kl", "jsd")
# top_k: 0 (full vocabulary), a small K, K >= V (must equal the full divergence)
TOPKS = (0, 7, V + 5)
# Scalars exactly representable in fp32: the kernel receives them as fp32 arguments, so the
# float64 runs compare at 1e-10 only when no rounding happens there.
T, KW, CW, BETA = 2.0, 0.75, 0.5, 0.25


def _kl(a, b):
    return (a * (a.log() - b.log())).sum(-1)


def ref_loss(h_s, w_s, h_t, w_t, labels, temperature, kl_weight, ce_weight, divergence, beta, top_k,
             reduction, n_sequences, ignore=-100, idx=None):
    """(loss, kl, ce) straight from the definitions; ``idx`` overrides the top-k selection."""
    ls, lt = h_s @ w_s.t(), h_t @ w_t.t()
    Vv = ls.shape[1]
    valid = labels != ignore if labels is not None else torch.ones(len(ls), dtype=torch.bool, device=ls.device)
    p = torch.softmax(lt / temperature, -1)
    q = torch.softmax(ls / temperature, -1)
    if 0 < top_k < Vv:
        if idx is None:
            idx = lt.topk(top_k, dim=-1).indices
        pk, qk = p.gather(1, idx), q.gather(1, idx)
        p = torch.cat([pk, 1 - pk.sum(-1, keepdim=True)], 1)  # K tokens + the tail bucket
        q = torch.cat([qk, 1 - qk.sum(-1, keepdim=True)], 1)
    if divergence == "forward-kl":
        rows = _kl(p, q)
    elif divergence == "reverse-kl":
        rows = _kl(q, p)
    else:
        m = beta * p + (1 - beta) * q
        rows = beta * _kl(p, m) + (1 - beta) * _kl(q, m)
    n = valid.sum().clamp(min=1)
    kl = rows[valid].sum() / (n if reduction == "mean" else n_sequences)
    if labels is None:
        return kl_weight * kl, kl, torch.zeros((), dtype=kl.dtype, device=kl.device)
    ce = -torch.log_softmax(ls[valid], -1).gather(1, labels[valid][:, None]).sum() / n
    return kl_weight * kl + ce_weight * ce, kl, ce


def _inputs(dtype, gen, n=N, scale=0.15, ignore_rows=True):
    h_s = randn(n, d, dtype=dtype, gen=gen)
    w_s = randn(V, d, dtype=dtype, gen=gen, scale=scale)
    h_t = randn(n, D, dtype=dtype, gen=gen)
    w_t = randn(V, D, dtype=dtype, gen=gen, scale=scale)
    labels = torch.randint(0, V, (n,), generator=gen, device=gen.device)
    if ignore_rows:
        labels[torch.randperm(n, generator=gen, device=gen.device)[: n // 4]] = -100
    return h_s, w_s, h_t, w_t, labels


def _opts(divergence, top_k, reduction, beta=BETA):
    return dict(divergence=divergence, jsd_beta=beta, top_k=top_k, kl_reduction=reduction,
                n_sequences=B if reduction == "sum" else None)


def _fused(f, h_s, w_s, h_t, w_t, labels, factor=1.5, **kw):
    """(loss, kl, ce, dh_s, dw_s) of f after backward of factor·loss."""
    h, w = h_s.detach().clone().requires_grad_(), w_s.detach().clone().requires_grad_()
    loss, kl, ce = f(h, w, h_t, w_t, labels, **kw)
    (loss * factor).backward()
    return loss.detach(), kl, ce, h.grad, w.grad


def _reference(h_s, w_s, h_t, w_t, labels, temperature, kl_weight, ce_weight, opts, factor=1.5, idx=None):
    hd, wd = h_s.detach().double().requires_grad_(), w_s.detach().double().requires_grad_()
    loss, kl, ce = ref_loss(hd, wd, h_t.double(), w_t.double(), labels, temperature, kl_weight, ce_weight,
                            opts["divergence"], opts["jsd_beta"], opts["top_k"], opts["kl_reduction"],
                            opts["n_sequences"], idx=idx)
    (loss * factor).backward()
    return loss.detach(), kl.detach(), ce.detach(), hd.grad, wd.grad


NAMES = ("loss", "kl", "ce", "dh_s", "dw_s")


@pytest.mark.parametrize("reduction", ["mean", "sum"])
@pytest.mark.parametrize("top_k", TOPKS)
@pytest.mark.parametrize("divergence", DIVS)
def test_float64_value_and_grad(backend, divergence, top_k, reduction, gen):
    """Every divergence x top_k x reduction, ignored rows, T=2, chunk 16 (N=37: ragged)."""
    h_s, w_s, h_t, w_t, labels = _inputs(torch.float64, gen)
    opts = _opts(divergence, top_k, reduction)
    out = _fused(fused_linear_kl, h_s, w_s, h_t, w_t, labels, temperature=T, kl_weight=KW, ce_weight=CW,
                 chunk_size=16, **opts)
    ref = _reference(h_s, w_s, h_t, w_t, labels, T, KW, CW, opts)
    assert out[1] > 0 and out[2] > 0
    for a, b, name in zip(out, ref, NAMES):
        assert a.dtype == torch.float64, name
        assert_close(a, b, torch.float64, name)


@pytest.mark.parametrize("reduction", ["mean", "sum"])
@pytest.mark.parametrize("top_k", TOPKS)
@pytest.mark.parametrize("divergence", DIVS)
def test_naive_matches_reference(divergence, top_k, reduction, gen):
    h_s, w_s, h_t, w_t, labels = _inputs(torch.float64, gen)
    opts = _opts(divergence, top_k, reduction)
    out = _fused(naive_fused_linear_kl, h_s, w_s, h_t, w_t, labels, temperature=1.3, kl_weight=0.7,
                 ce_weight=0.4, **opts)
    ref = _reference(h_s, w_s, h_t, w_t, labels, 1.3, 0.7, 0.4, opts)
    for a, b, name in zip(out, ref, NAMES):
        assert_close(a, b, torch.float64, name)


@pytest.mark.parametrize("top_k", [0, 7])
@pytest.mark.parametrize("divergence", DIVS)
def test_triton_equals_torch_fp32(divergence, top_k, gen, device):
    """fp32: the Triton kernel and the torch chunk path agree to 2e-5 relative (the fp32
    tolerance of these tests; measured ~1e-7), and both are within 2e-5 of float64."""
    h_s, w_s, h_t, w_t, labels = _inputs(torch.float32, gen)
    opts = _opts(divergence, top_k, "sum" if divergence == "reverse-kl" else "mean", beta=0.3)
    kw = dict(temperature=1.7, kl_weight=0.6, ce_weight=0.4, chunk_size=16, **opts)
    outs = {}
    for be in ("torch", "triton"):
        with red_kernels.use_backend(be):
            outs[be] = _fused(fused_linear_kl, h_s, w_s, h_t, w_t, labels, **kw)
    ref = _reference(h_s, w_s, h_t, w_t, labels, 1.7, 0.6, 0.4, opts)
    for i, name in enumerate(NAMES):
        assert outs["triton"][i].dtype == torch.float32
        assert_close(outs["triton"][i], outs["torch"][i], torch.float32, f"triton vs torch {name}")
        assert_close(outs["triton"][i], ref[i], torch.float32, f"triton vs float64 {name}")


@pytest.mark.parametrize("top_k", [0, 7])
@pytest.mark.parametrize("divergence", DIVS)
def test_bf16_inputs(backend, divergence, top_k, gen):
    """bf16 operands (on CPU: bf16 upcast after every load and round-to-nearest-even stores,
    the FIX_BF16/UPCAST path of the interpreter) match float64 at the bf16 tolerance. The
    reference uses the top-k indices of the op's own bf16 teacher logits (near-ties of
    bf16 logits may otherwise select different tokens)."""
    h_s, w_s, h_t, w_t, labels = _inputs(torch.bfloat16, gen)
    opts = _opts(divergence, top_k, "sum")
    out = _fused(fused_linear_kl, h_s, w_s, h_t, w_t, labels, temperature=1.5, kl_weight=0.8, ce_weight=0.5,
                 **opts)
    idx = (h_t @ w_t.t()).topk(top_k, dim=-1).indices if top_k else None
    ref = _reference(h_s, w_s, h_t, w_t, labels, 1.5, 0.8, 0.5, opts, idx=idx)
    assert out[3].dtype == torch.bfloat16 and out[4].dtype == torch.bfloat16
    for a, b, name in zip(out, ref, NAMES):
        assert_close(a, b, torch.bfloat16, name)


def _trl_generalized_jsd(student_logits, teacher_logits, labels, beta, ignore=-100):
    """TRL's generalized_jsd_loss as documented (GKD, arXiv 2306.13649, Eq. 1), re-derived:
    log m = logsumexp(log q + log(1 - beta), log p + log(beta)); value beta·KL(p‖m) +
    (1 - beta)·KL(q‖m) per token, with the endpoints beta=0 -> KL(p‖q) and beta=1 ->
    KL(q‖p); "batchmean" with labels: the sum over tokens whose label is not -100 divided by
    their count."""
    log_q = torch.log_softmax(student_logits, -1)
    log_p = torch.log_softmax(teacher_logits, -1)
    if beta == 0:
        per_tok = (log_p.exp() * (log_p - log_q)).sum(-1)
    elif beta == 1:
        per_tok = (log_q.exp() * (log_q - log_p)).sum(-1)
    else:
        log_m = torch.logsumexp(torch.stack([log_q + math.log(1 - beta), log_p + math.log(beta)]), 0)
        kl_teacher = (log_p.exp() * (log_p - log_m)).sum(-1)
        kl_student = (log_q.exp() * (log_q - log_m)).sum(-1)
        per_tok = beta * kl_teacher + (1 - beta) * kl_student
    keep = labels != ignore
    return per_tok[keep].sum() / keep.sum()


def test_jsd_matches_trl_formula(backend, gen):
    """Our beta is TRL's beta (the teacher's weight in the mixture and on KL(p‖m)); TRL's
    special endpoints are our forward-kl (beta=0) and reverse-kl (beta=1)."""
    h_s, w_s, h_t, w_t, labels = _inputs(torch.float64, gen)
    ls, lt = h_s @ w_s.t(), h_t @ w_t.t()
    for beta in (0.1, 0.25, 0.5, 0.9):
        trl = _trl_generalized_jsd(ls, lt, labels, beta)
        _, kl, _ = fused_linear_kl(h_s, w_s, h_t, w_t, labels, divergence="jsd", jsd_beta=beta, chunk_size=16)
        assert rel_err(kl, trl) < 1e-6, beta  # beta=0.1, 0.9 reach the kernel as fp32 arguments
    for beta, div in ((0, "forward-kl"), (1, "reverse-kl")):
        _, kl, _ = fused_linear_kl(h_s, w_s, h_t, w_t, labels, divergence=div, chunk_size=16)
        assert rel_err(kl, _trl_generalized_jsd(ls, lt, labels, beta)) < 1e-10, div


def test_jsd_small_and_large_beta(backend, gen):
    """As beta -> 0 the JSD goes to 0 like beta·KL(p‖q) (not to the forward KL, which TRL
    returns at exactly beta=0); as beta -> 1 like (1 - beta)·KL(q‖p)."""
    h_s, w_s, h_t, w_t, labels = _inputs(torch.float64, gen)
    kw = dict(chunk_size=16, ce_weight=0.0)
    fwd = fused_linear_kl(h_s, w_s, h_t, w_t, labels, **kw)[1]
    rev = fused_linear_kl(h_s, w_s, h_t, w_t, labels, divergence="reverse-kl", **kw)[1]
    eps = 2.0 ** -20  # exact in fp32; the next term of the expansion is O(eps²)
    small = fused_linear_kl(h_s, w_s, h_t, w_t, labels, divergence="jsd", jsd_beta=eps, **kw)[1]
    large = fused_linear_kl(h_s, w_s, h_t, w_t, labels, divergence="jsd", jsd_beta=1 - eps, **kw)[1]
    assert fwd > 0.01 and 0 < small < 1e-5 * fwd
    assert abs(small / eps - fwd) < 0.02 * fwd
    assert abs(large / eps - rev) < 0.02 * rev


def test_sum_reduction_is_lrc_batchmean(backend, gen):
    """kl_reduction="sum" with n_sequences=B equals F.kl_div(..., reduction="batchmean") on
    [B, T, V] logits (no T² factor), value and gradient, when every row is valid."""
    Bs, Ts = 3, 11
    h_s, w_s, h_t, w_t, _ = _inputs(torch.float64, gen, n=Bs * Ts)
    temp = 2.0
    h, w = h_s.clone().requires_grad_(), w_s.clone().requires_grad_()
    loss, kl, ce = fused_linear_kl(h, w, h_t, w_t, None, temperature=temp, kl_reduction="sum",
                                   n_sequences=Bs, chunk_size=8)
    loss.backward()
    hr, wr = h_s.clone().requires_grad_(), w_s.clone().requires_grad_()
    s = (hr @ wr.t()).reshape(Bs, Ts, V)
    t = (h_t @ w_t.t()).reshape(Bs, Ts, V)
    lrc = F.kl_div(torch.log_softmax(s / temp, -1), torch.log_softmax(t / temp, -1), log_target=True,
                   reduction="batchmean")
    lrc.backward()
    assert_close(kl, lrc, torch.float64, "kl")
    assert_close(loss, lrc, torch.float64, "loss")
    assert_close(h.grad, hr.grad, torch.float64, "dh_s")
    assert_close(w.grad, wr.grad, torch.float64, "dw_s")
    # about seq_len times the mean reduction
    mean = fused_linear_kl(h_s, w_s, h_t, w_t, None, temperature=temp, chunk_size=8)[1]
    assert_close(kl, mean * Ts, torch.float64, "sum = T x mean")


@pytest.mark.parametrize("top_k", [0, 7])
@pytest.mark.parametrize("divergence", DIVS)
def test_identical_models_zero_divergence(backend, divergence, top_k, gen):
    """Student == teacher: every divergence (and its bucketed form) is 0, and so is its
    gradient without CE."""
    h = randn(N, d, gen=gen, requires_grad=True)
    w = randn(V, d, gen=gen, scale=0.3, requires_grad=True)
    loss, kl, _ = fused_linear_kl(h, w, h.detach(), w.detach(), divergence=divergence, top_k=top_k)
    loss.backward()
    assert abs(kl.item()) < 1e-6
    assert h.grad.abs().max().item() < 1e-6 and w.grad.abs().max().item() < 1e-6


def test_defaults_are_bitwise_unchanged(backend, gen):
    """The default call and the call with every new option spelled out at its default give
    bit-identical outputs and gradients (the default path is today's path)."""
    h_s, w_s, h_t, w_t, labels = _inputs(torch.float32, gen)
    kw = dict(temperature=1.3, kl_weight=0.6, ce_weight=0.4, chunk_size=16)
    a = _fused(fused_linear_kl, h_s, w_s, h_t, w_t, labels, **kw)
    b = _fused(fused_linear_kl, h_s, w_s, h_t, w_t, labels, divergence="forward-kl", jsd_beta=0.5, top_k=0,
               kl_reduction="mean", n_sequences=None, **kw)
    c = _fused(fused_linear_kl, h_s, w_s, h_t, w_t, labels, **kw, top_k=V)  # k >= V: full vocabulary
    for x, y, z, name in zip(a, b, c, NAMES):
        assert torch.equal(x, y) and torch.equal(x, z), name
    na = _fused(naive_fused_linear_kl, h_s, w_s, h_t, w_t, labels, **kw)
    nb = _fused(naive_fused_linear_kl, h_s, w_s, h_t, w_t, labels, divergence="forward-kl", jsd_beta=0.5,
                top_k=0, kl_reduction="mean", n_sequences=None, **kw)
    for x, y, name in zip(na, nb, NAMES):
        assert torch.equal(x, y), name


def test_module_options(gen):
    h_s, w_s, h_t, w_t, labels = _inputs(torch.float32, gen)
    m = red_kernels.FusedLinearKL(temperature=2.0, divergence="jsd", jsd_beta=0.3, top_k=5, kl_reduction="sum")
    out = m(h_s, w_s, h_t, w_t, labels, n_sequences=4)
    ref = fused_linear_kl(h_s, w_s, h_t, w_t, labels, temperature=2.0, divergence="jsd", jsd_beta=0.3, top_k=5,
                          kl_reduction="sum", n_sequences=4)
    for x, y in zip(out, ref):
        assert torch.equal(x, y)
    with pytest.raises(ValueError, match="n_sequences"):
        m(h_s, w_s, h_t, w_t, labels)


@pytest.mark.parametrize("f", [fused_linear_kl, naive_fused_linear_kl], ids=["fused", "naive"])
def test_bad_arguments(f, gen):
    h_s, w_s, h_t, w_t, labels = _inputs(torch.float32, gen, n=4)
    cases = [
        (dict(divergence="kl"), "forward-kl, reverse-kl, jsd"),
        (dict(divergence="jsd", jsd_beta=0.0), "strictly between 0 and 1.*forward-kl"),
        (dict(divergence="jsd", jsd_beta=1.0), "strictly between 0 and 1.*reverse-kl"),
        (dict(divergence="jsd", jsd_beta=1.5), "strictly between 0 and 1"),
        (dict(divergence="jsd", jsd_beta=-0.1), "strictly between 0 and 1"),
        (dict(top_k=-1), "top_k must be an int >= 0"),
        (dict(top_k=2.5), "top_k must be an int >= 0"),
        (dict(kl_reduction="sum"), "needs n_sequences: pass the number of sequences"),
        (dict(kl_reduction="sum", n_sequences=0), "positive int"),
        (dict(kl_reduction="batchmean"), "use 'mean' or 'sum'"),
    ]
    for kw, msg in cases:
        with pytest.raises(ValueError, match=msg):
            f(h_s, w_s, h_t, w_t, labels, **kw)
    with pytest.raises(ValueError, match="strictly between"):
        red_kernels.FusedLinearKL(divergence="jsd", jsd_beta=1.0)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="device->host syncs are only visible on CUDA")
def test_no_host_sync_on_cuda(gen):
    """kl_reduction="sum", top-k and JSD add no device->host synchronisation."""
    h_s, w_s, h_t, w_t, labels = _inputs(torch.bfloat16, gen)
    h_s.requires_grad_()
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        loss, _, _ = fused_linear_kl(h_s, w_s, h_t, w_t, labels, divergence="jsd", top_k=7, kl_reduction="sum",
                                     n_sequences=B)
        loss.backward()
    finally:
        torch.cuda.set_sync_debug_mode("default")
