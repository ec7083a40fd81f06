"""LM-head distillation loss (KL teacher‖student + student CE) without [N, V] logits.

At V = 128k the eager composition holds the student and teacher logits, their fp32 copies,
softmaxes and the logits' gradient: several [N, V] tensors (4 GB each at N=16k in bf16).
Here rows are processed in chunks: cuBLAS makes the chunk's two logit blocks, one Triton
kernel does all the softmax math in fp32 (online log-sum-exp for student at temperature
T, teacher at T and student at 1 for the CE, then a second pass that writes the logit
gradient in place of the student logits), and cuBLAS turns that gradient into dh_s for
the chunk and adds dw_s into an fp32 buffer (deterministic Triton kernel, no atomics).
Gradients are made in the forward (Liger-Kernel's approach) and scaled by grad_output in
the backward; no logit tensor outlives its chunk.

kl = mean over valid rows of Σ_v p_t (log p_t − log p_s), p = softmax(logits / T), with no
T² factor; ce = mean over valid rows of the student's CE at temperature 1. Valid rows are
``labels != ignore_index`` (all rows when labels is None; ce is then 0).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from ._backend import HAS_TRITON, get_backend
from ._common import acc_tn_, alloc, cdiv, check_dot_dtypes, compute_dtype, fix_bf16, launch, next_pow2

if HAS_TRITON:
    import triton
    import triton.language as tl

    from ._common import rne_bf16

    @triton.jit
    def _kl_ce_kernel(
        ls_ptr, lt_ptr, lab_ptr, kl_ptr, ce_ptr,
        N, V, stride_s, stride_t, inv_temp, kl_w, ce_w, ignore_index,
        BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, HAS_LABELS: tl.constexpr,
        HAS_CE: tl.constexpr, SAME_T: tl.constexpr, WRITE_GRAD: tl.constexpr,
        FIX_BF16: tl.constexpr,
    ):
        """Per row: KL and CE values, and (WRITE_GRAD) d(loss·n_valid)/d logits_s into ls."""
        pid = tl.program_id(0).to(tl.int64)
        CDT = kl_ptr.dtype.element_ty
        rows = pid * BLOCK_N + tl.arange(0, BLOCK_N)
        rmask = rows < N
        rows_c = tl.minimum(rows, N - 1)  # padded rows read a real row; never stored
        if HAS_LABELS:
            lab = tl.load(lab_ptr + rows_c).to(tl.int64)
            valid = (lab != ignore_index) & rmask
        else:
            lab = tl.zeros((BLOCK_N,), dtype=tl.int64)
            valid = rmask
        s_row = ls_ptr + rows_c[:, None] * stride_s
        t_row = lt_ptr + rows_c[:, None] * stride_t
        m_s = tl.full((BLOCK_N,), float("-inf"), dtype=CDT)
        z_s = tl.zeros((BLOCK_N,), dtype=CDT)
        m_t = tl.full((BLOCK_N,), float("-inf"), dtype=CDT)
        z_t = tl.zeros((BLOCK_N,), dtype=CDT)
        a_t = tl.zeros((BLOCK_N,), dtype=CDT)  # Σ exp(t' − m_t)·(t' − s')
        m_c = tl.full((BLOCK_N,), float("-inf"), dtype=CDT)
        z_c = tl.zeros((BLOCK_N,), dtype=CDT)
        # pass 1: online log-sum-exps
        for v0 in range(0, V, BLOCK_V):
            cols = v0 + tl.arange(0, BLOCK_V)
            cm = (cols < V)[None, :]
            s = tl.load(s_row + cols[None, :], mask=cm, other=0.0).to(CDT)
            t = tl.load(t_row + cols[None, :], mask=cm, other=0.0).to(CDT)
            diff = (t - s) * inv_temp  # finite everywhere (masked columns: 0)
            sp = tl.where(cm, s * inv_temp, float("-inf"))
            tp = tl.where(cm, t * inv_temp, float("-inf"))
            new_s = tl.maximum(m_s, tl.max(sp, axis=1))
            z_s = z_s * tl.exp(m_s - new_s) + tl.sum(tl.exp(sp - new_s[:, None]), axis=1)
            m_s = new_s
            new_t = tl.maximum(m_t, tl.max(tp, axis=1))
            alpha = tl.exp(m_t - new_t)
            et = tl.exp(tp - new_t[:, None])
            z_t = z_t * alpha + tl.sum(et, axis=1)
            a_t = a_t * alpha + tl.sum(et * diff, axis=1)
            m_t = new_t
            if HAS_CE:
                if not SAME_T:
                    sc = tl.where(cm, s, float("-inf"))
                    new_c = tl.maximum(m_c, tl.max(sc, axis=1))
                    z_c = z_c * tl.exp(m_c - new_c) + tl.sum(tl.exp(sc - new_c[:, None]), axis=1)
                    m_c = new_c
        lse_s = m_s + tl.log(z_s)
        lse_t = m_t + tl.log(z_t)
        kl = a_t / z_t - lse_t + lse_s
        tl.store(kl_ptr + rows, tl.where(valid, kl, 0.0), mask=rmask)
        if HAS_CE:
            if SAME_T:
                lse_c = lse_s
            else:
                lse_c = m_c + tl.log(z_c)
            lab_ok = valid & (lab >= 0) & (lab < V)
            s_lab = tl.load(ls_ptr + rows_c * stride_s + lab, mask=lab_ok, other=0.0).to(CDT)
            tl.store(ce_ptr + rows, tl.where(lab_ok, lse_c - s_lab, 0.0), mask=rmask)
        # pass 2: gradient of Σ_rows (kl_w·kl + ce_w·ce) w.r.t. the student logits
        if WRITE_GRAD:
            for v0 in range(0, V, BLOCK_V):
                cols = v0 + tl.arange(0, BLOCK_V)
                cm = (cols < V)[None, :]
                s = tl.load(s_row + cols[None, :], mask=cm, other=0.0).to(CDT)
                t = tl.load(t_row + cols[None, :], mask=cm, other=0.0).to(CDT)
                p_s = tl.exp(s * inv_temp - lse_s[:, None])
                p_t = tl.exp(t * inv_temp - lse_t[:, None])
                g = (kl_w * inv_temp) * (p_s - p_t)
                if HAS_CE:
                    if SAME_T:
                        p_c = p_s
                    else:
                        p_c = tl.exp(s - lse_c[:, None])
                    onehot = (cols[None, :] == lab[:, None]).to(CDT)
                    g += ce_w * (p_c - onehot)
                g = tl.where(valid[:, None], g, 0.0)
                g = rne_bf16(g, FIX_BF16)
                tl.store(ls_ptr + rows[:, None] * stride_s + cols[None, :],
                         g.to(ls_ptr.dtype.element_ty), mask=rmask[:, None] & cm)


def _kl_ce_torch(ls, lt, lab, valid, inv_temp, kl_w, ce_w, has_ce, write_grad, cdt):
    """Same math as the kernel, in torch ops on one chunk (fp32)."""
    s, t = ls.to(cdt), lt.to(cdt)
    lps = torch.log_softmax(s * inv_temp, -1)
    lpt = torch.log_softmax(t * inv_temp, -1)
    kl = F.kl_div(lps, lpt, log_target=True, reduction="none").sum(-1) * valid
    ce = None
    if has_ce:
        lpc = lps if inv_temp == 1.0 else torch.log_softmax(s, -1)
        ce = -lpc.gather(1, lab.clamp(0, s.shape[1] - 1)[:, None])[:, 0] * valid
    if write_grad:
        g = (kl_w * inv_temp) * (lps.exp() - lpt.exp())
        if has_ce:
            g += ce_w * lpc.exp()
            g.scatter_add_(1, lab.clamp(0, s.shape[1] - 1)[:, None], -ce_w * valid[:, None])
        g *= valid[:, None]
        ls.copy_(g)
    return kl, ce


def default_chunk_rows(N: int, V: int, d: int, on_gpu: bool = True) -> int:
    """Rows per chunk: logits about the size of h_s (Liger's rule), but at least 1024 rows
    on a GPU and 256 elsewhere.

    On a GPU every chunk re-reads and re-writes the fp32 head gradient [V, d] (786 MB at
    V=128k, d=1536), which at 256 rows costs about as much as the chunk's logit GEMMs; at
    1024 rows it is a quarter, while a [1024, 128k] bf16 logit block is 256 MB. The CPU
    path materializes several fp32 [rows, V] temporaries instead (softmaxes in torch ops),
    and measured faster and 3.5x smaller at 256 rows (benchmarks/test_bench_kernels.py).
    """
    floor = 1024 if on_gpu else 256
    return max(1, min(N, max(floor, next_pow2(cdiv(N, cdiv(V, max(d, 1)))))))


def kl_ce_meta(on_gpu: bool, V: int) -> dict:
    """Rows per program, vocabulary block and warps of ``_kl_ce_kernel``."""
    if on_gpu:
        return dict(BLOCK_N=2, BLOCK_V=min(2048, next_pow2(V)), num_warps=8)
    return dict(BLOCK_N=8, BLOCK_V=min(128, next_pow2(V)), num_warps=4)


class _FusedLinearKL(torch.autograd.Function):
    @staticmethod
    def forward(ctx, h_s, w_s, h_t, w_t, labels, temperature, kl_weight, ce_weight,
                ignore_index, chunk_size, backend):
        N, d = h_s.shape
        V = w_s.shape[0]
        cdt = compute_dtype(h_s, w_s, h_t, w_t)
        dev = h_s.device
        has_labels = labels is not None
        has_ce = has_labels and ce_weight != 0.0
        ce_w = float(ce_weight) if has_ce else 0.0
        kl_w = float(kl_weight)
        inv_temp = 1.0 / float(temperature)
        need_h, need_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        write_grad = need_h or need_w
        if has_labels:
            valid = labels != ignore_index
        else:
            valid = torch.ones(N, dtype=torch.bool, device=dev)
        denom = valid.sum().clamp(min=1).to(cdt)
        kl_rows = alloc((N,), cdt, dev)
        ce_rows = alloc((N,), cdt, dev) if has_ce else None
        grad_h = alloc((N, d), h_s.dtype, dev) if need_h else None
        grad_w = torch.zeros(V, d, dtype=cdt, device=dev) if need_w else None
        C = chunk_size or default_chunk_rows(N, V, d, on_gpu=h_s.is_cuda)
        wt = w_t.to(h_t.dtype) if w_t.dtype != h_t.dtype else w_t
        for n0 in range(0, N, C):
            n1 = min(N, n0 + C)
            hs_c = h_s[n0:n1]
            ls = hs_c @ w_s.t()  # [c, V] student logits; becomes the logit gradient
            lt = h_t[n0:n1] @ wt.t()
            lab = labels[n0:n1] if has_labels else None
            if backend == "triton":
                meta = kl_ce_meta(ls.is_cuda, V)
                launch(_kl_ce_kernel, (cdiv(n1 - n0, meta["BLOCK_N"]),),
                       ls, lt, lab if has_labels else kl_rows, kl_rows[n0:n1],
                       ce_rows[n0:n1] if has_ce else kl_rows, n1 - n0, V, ls.stride(0),
                       lt.stride(0), inv_temp, kl_w, ce_w, int(ignore_index),
                       HAS_LABELS=has_labels, HAS_CE=has_ce, SAME_T=inv_temp == 1.0,
                       WRITE_GRAD=write_grad, FIX_BF16=fix_bf16(ls), **meta)
            else:
                v = valid[n0:n1].to(cdt)
                k, c = _kl_ce_torch(ls, lt, lab, v, inv_temp, kl_w, ce_w, has_ce, write_grad, cdt)
                kl_rows[n0:n1] = k
                if has_ce:
                    ce_rows[n0:n1] = c
            del lt
            if need_h:
                torch.matmul(ls, w_s, out=grad_h[n0:n1])
            if need_w:
                acc_tn_(grad_w, ls, hs_c, backend=backend)
            del ls
        kl = kl_rows.sum() / denom
        ce = ce_rows.sum() / denom if has_ce else torch.zeros((), dtype=cdt, device=dev)
        loss = kl_w * kl + ce_w * ce
        ctx.save_for_backward(grad_h, grad_w, denom)
        ctx.w_dtype = w_s.dtype
        ctx.mark_non_differentiable(kl, ce)
        return loss, kl, ce

    @staticmethod
    def backward(ctx, go, _gkl, _gce):
        grad_h, grad_w, denom = ctx.saved_tensors
        scale = go / denom
        gh = grad_h * scale.to(grad_h.dtype) if grad_h is not None else None
        gw = (grad_w * scale).to(ctx.w_dtype) if grad_w is not None else None
        return gh, gw, None, None, None, None, None, None, None, None, None


def fused_linear_kl(h_s, w_s, h_t, w_t, labels=None, temperature=1.0, kl_weight=1.0,
                    ce_weight=1.0, ignore_index=-100, chunk_size=None):
    """(loss, kl, ce): loss = kl_weight·kl + ce_weight·ce, differentiable w.r.t. h_s, w_s.

    h_s [N, d], w_s [V, d], h_t [N, D], w_t [V, D] (frozen), labels [N] already aligned
    with rows. kl and ce come back detached, fp32, for logging.
    """
    if h_s.dim() != 2 or h_t.dim() != 2 or h_s.shape[0] != h_t.shape[0]:
        raise ValueError("h_s [N, d] and h_t [N, D] must be 2-D with the same N")
    if w_s.shape[1] != h_s.shape[1] or w_t.shape[1] != h_t.shape[1] or w_s.shape[0] != w_t.shape[0]:
        raise ValueError(f"head shapes do not match: w_s {tuple(w_s.shape)}, w_t {tuple(w_t.shape)}")
    if labels is not None and labels.shape != (h_s.shape[0],):
        raise ValueError("labels must be [N], aligned with the rows")
    if temperature <= 0:
        raise ValueError("temperature must be positive")
    check_dot_dtypes("fused_linear_kl (student logits)", h_s=h_s, w_s=w_s)
    if labels is not None:
        labels = labels.contiguous()  # the kernel reads labels[row] at unit stride
    backend = get_backend(h_s, w_s, h_t, w_t)
    return _FusedLinearKL.apply(h_s, w_s, h_t.detach(), w_t.detach(), labels, float(temperature),
                                float(kl_weight), float(ce_weight), int(ignore_index),
                                chunk_size, backend)


def naive_fused_linear_kl(h_s, w_s, h_t, w_t, labels=None, temperature=1.0, kl_weight=1.0,
                          ce_weight=1.0, ignore_index=-100, chunk_size=None):
    """Eager composition with full [N, V] logits (fp32 softmax math, like HF + a KL)."""
    cdt = compute_dtype(h_s, w_s, h_t, w_t)
    ls = (h_s @ w_s.t()).to(cdt)
    lt = (h_t @ w_t.t()).to(cdt)
    N = h_s.shape[0]
    valid = (labels != ignore_index) if labels is not None else torch.ones(
        N, dtype=torch.bool, device=h_s.device)
    n = valid.sum().clamp(min=1).to(cdt)
    rows = F.kl_div(torch.log_softmax(ls / temperature, -1), torch.log_softmax(lt / temperature, -1),
                    log_target=True, reduction="none").sum(-1)
    kl = (rows * valid).sum() / n
    if labels is not None and ce_weight != 0.0:
        ce = F.cross_entropy(ls, labels, ignore_index=ignore_index, reduction="sum") / n
    else:
        ce = torch.zeros((), dtype=cdt, device=h_s.device)
        ce_weight = 0.0
    loss = kl_weight * kl + ce_weight * ce
    return loss, kl.detach(), ce.detach()


class FusedLinearKL(torch.nn.Module):
    """Module form holding the loss settings; call with (h_s, w_s, h_t, w_t, labels)."""

    def __init__(self, temperature=1.0, kl_weight=1.0, ce_weight=1.0, ignore_index=-100,
                 chunk_size=None):
        super().__init__()
        self.kw = dict(temperature=temperature, kl_weight=kl_weight, ce_weight=ce_weight,
                       ignore_index=ignore_index, chunk_size=chunk_size)

    def forward(self, h_s, w_s, h_t, w_t, labels=None):
        return fused_linear_kl(h_s, w_s, h_t, w_t, labels, **self.kw)
