"""LM-head distillation loss (teacher/student divergence + student CE) without [N, V] logits.

At V = 128k the eager composition holds the student and teacher logits, their fp32 copies,
softmaxes and the logits' gradient: several [N, V] tensors (4 GB each at N=16k in bf16).
Here rows are processed in chunks: cuBLAS makes the chunk's two logit blocks, one Triton
kernel does all the softmax math in fp32 (online log-sum-exp for student at temperature
T, teacher at T and student at 1 for the CE, then a second pass that writes the logit
gradient in place of the student logits), and cuBLAS turns that gradient into dh_s for
the chunk and adds dw_s into an fp32 buffer (deterministic Triton kernel, no atomics).
Gradients are made in the forward (Liger-Kernel's approach) and scaled by grad_output in
the backward; no logit tensor outlives its chunk.

Per row, with p = softmax(teacher_logits / T) (the teacher) and q = softmax(student_logits
/ T) (the student), never with a T² factor:

* ``divergence="forward-kl"`` (default): KL(p‖q) = Σ_v p (log p − log q). Its gradient in
  the scaled student logits is q − p.
* ``"reverse-kl"``: KL(q‖p) = Σ_v q (log q − log p); gradient q (log q − log p − KL(q‖p)).
  The row value is accumulated online in the same pass as the log-sum-exps.
* ``"jsd"``: the generalized Jensen-Shannon divergence with mixture m = β p + (1 − β) q
  (β = ``jsd_beta`` weights the *teacher*), β·KL(p‖m) + (1 − β)·KL(q‖m), 0 < β < 1.
  Only the second term depends on q through its own log (the rest cancels), so the
  gradient is (1 − β) q (log q − log m − KL(q‖m)). log m needs both normalisers, so the
  kernel spends one extra read of the chunk's logits on the row values. As β → 0 the value
  goes to 0 like β·KL(p‖q) (it is *not* the forward KL there); as β → 1 like (1 − β)·KL(q‖p).
  TRL's ``generalized_jsd_loss`` uses the same β (its mixture is β·teacher + (1 − β)·
  student, and the same weights on the two KLs) but returns the plain forward / reverse
  KL at exactly β = 0 / 1; here those endpoints are refused (use the named divergences).

``top_k = K > 0`` scores the divergence over K + 1 buckets instead of V tokens: the
teacher's K most likely tokens (``torch.topk`` of the chunk's teacher logits) and one tail
bucket with the rest of the mass, p_tail = 1 − Σ_topK p and q_tail = 1 − Σ_topK q, where p
and q are still normalised over the full vocabulary and q is read at the teacher's top-K
indices. The tail masses are clamped at 0 and floored at ``TAIL_FLOOR`` (1e-6) inside
logs and ratios: as 1 − Σ they are resolved only to ~1e-7 in fp32, and the floor keeps a
vanishing tail from producing huge ratios. With bucket masses q̃_b and ∂D/∂q̃_b = G_b the
gradient in the scaled student logit of token j in bucket b is q_j (G_b − Σ_b' q̃_b' G_b'),
i.e. one per-row constant for every tail token and one value per top-K token: the kernel
writes the tail value over the whole row, then (after a barrier) overwrites the K top
positions. K ≥ V is the full divergence (the tail is empty; computed without selection).

The CE is always the student's cross-entropy at temperature 1 over the full vocabulary,
averaged over valid rows (``labels != ignore_index``; all rows when labels is None, and ce
is then 0). ``kl_reduction="mean"`` (default) divides the summed row divergences by the
number of valid rows; ``"sum"`` divides them by ``n_sequences`` instead, i.e. divergences
summed over the positions of each sequence and averaged over sequences (LRC's
``F.kl_div(..., reduction="batchmean")`` on [B, T, V] logits). The valid-row count is a
device tensor and is never read on the host: with "sum" the kernel reads the CE's weight
ce_weight·n_sequences/n_valid from a device scalar, and the backward scales the whole
gradient by grad_output/n_sequences, so KL and CE get different denominators with no
synchronisation.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from ._backend import HAS_TRITON, get_backend
from ._common import acc_tn_, alloc, cdiv, check_dot_dtypes, compute_dtype, fix_bf16, launch, next_pow2

if HAS_TRITON:
    import triton
    import triton.language as tl

    from ._common import rne_bf16

    @triton.jit
    def _logaddexp_tl(a, b):
        mx = tl.maximum(a, b)
        return mx + tl.log(tl.exp(a - mx) + tl.exp(b - mx))

    @triton.jit
    def _kl_ce_kernel(
        ls_ptr, lt_ptr, lab_ptr, kl_ptr, ce_ptr, idx_ptr, sk_ptr, tk_ptr, cew_ptr,
        N, V, K, stride_s, stride_t, inv_temp, kl_w, ce_w, beta, ignore_index,
        BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, HAS_LABELS: tl.constexpr,
        HAS_CE: tl.constexpr, SAME_T: tl.constexpr, WRITE_GRAD: tl.constexpr,
        FIX_BF16: tl.constexpr, DIV: tl.constexpr, TOPK: tl.constexpr, CE_W_PTR: tl.constexpr,
        BLOCK_K: tl.constexpr,
    ):
        """Per row: divergence and CE values, and (WRITE_GRAD) d(loss·n_valid)/d logits_s into ls.

        DIV: 0 forward KL, 1 reverse KL, 2 generalized JSD (mixture weight ``beta``).
        TOPK: the divergence over the K teacher top tokens (indices idx [rows, K], student /
        teacher logits there sk, tk [rows, K]) plus one tail bucket. CE_W_PTR: the CE weight
        is ce_w times the device scalar at cew_ptr (kl_reduction="sum", no host read).
        """
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
        a_s = tl.zeros((BLOCK_N,), dtype=CDT)  # Σ exp(s' − m_s)·(s' − t') (reverse KL)
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
            if DIV == 1 and not TOPK:
                alpha_s = tl.exp(m_s - new_s)
                es = tl.exp(sp - new_s[:, None])
                z_s = z_s * alpha_s + tl.sum(es, axis=1)
                a_s = a_s * alpha_s - tl.sum(es * diff, axis=1)
            else:
                z_s = z_s * tl.exp(m_s - new_s) + tl.sum(tl.exp(sp - new_s[:, None]), axis=1)
            m_s = new_s
            new_t = tl.maximum(m_t, tl.max(tp, axis=1))
            alpha = tl.exp(m_t - new_t)
            et = tl.exp(tp - new_t[:, None])
            z_t = z_t * alpha + tl.sum(et, axis=1)
            if DIV == 0 and not TOPK:
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
        if DIV == 2:
            b_r = tl.zeros((BLOCK_N,), dtype=CDT) + beta  # mixture weights in the compute dtype
            lb_r = tl.log(b_r)
            l1mb_r = tl.log(1.0 - b_r)
            log_b = lb_r[:, None]
            log_1mb = l1mb_r[:, None]
        kq = tl.zeros((BLOCK_N,), dtype=CDT)  # JSD: KL(q‖m) (full or bucketed)
        if TOPK:
            # the K + 1 bucket distributions: top-K entries, then the tail from 1 − Σ
            k_row = rows_c[:, None] * K
            sum_p = tl.zeros((BLOCK_N,), dtype=CDT)
            sum_q = tl.zeros((BLOCK_N,), dtype=CDT)
            acc = tl.zeros((BLOCK_N,), dtype=CDT)
            for k0 in range(0, K, BLOCK_K):
                kc = k0 + tl.arange(0, BLOCK_K)
                km = (kc < K)[None, :]
                tk = tl.load(tk_ptr + k_row + kc[None, :], mask=km, other=0.0).to(CDT)
                sk = tl.load(sk_ptr + k_row + kc[None, :], mask=km, other=0.0).to(CDT)
                lp = tk * inv_temp - lse_t[:, None]
                lq = sk * inv_temp - lse_s[:, None]
                pk = tl.where(km, tl.exp(lp), 0.0)
                qk = tl.where(km, tl.exp(lq), 0.0)
                sum_p += tl.sum(pk, axis=1)
                sum_q += tl.sum(qk, axis=1)
                if DIV == 0:
                    acc += tl.sum(pk * (lp - lq), axis=1)
                elif DIV == 1:
                    acc += tl.sum(qk * (lq - lp), axis=1)
                else:
                    lm = _logaddexp_tl(lp + log_b, lq + log_1mb)
                    acc += tl.sum(pk * (lp - lm), axis=1)
                    kq += tl.sum(qk * (lq - lm), axis=1)
            p_tail = tl.maximum(1.0 - sum_p, 0.0)
            q_tail = tl.maximum(1.0 - sum_q, 0.0)
            lp_tail = tl.log(tl.maximum(p_tail, 1e-6))
            lq_tail = tl.log(tl.maximum(q_tail, 1e-6))
            if DIV == 0:
                kl = acc + p_tail * (lp_tail - lq_tail)
                c_tail = 1.0 - p_tail / tl.maximum(q_tail, 1e-6)
            elif DIV == 1:
                kl = acc + q_tail * (lq_tail - lp_tail)
                c_tail = lq_tail - lp_tail - kl
            else:
                lm_tail = _logaddexp_tl(lp_tail + lb_r, lq_tail + l1mb_r)
                kp = acc + p_tail * (lp_tail - lm_tail)
                kq += q_tail * (lq_tail - lm_tail)
                kl = b_r * kp + (1.0 - b_r) * kq
                c_tail = (1.0 - b_r) * (lq_tail - lm_tail - kq)
        elif DIV == 0:
            kl = a_t / z_t - lse_t + lse_s
        elif DIV == 1:
            kl = a_s / z_s - lse_s + lse_t
        else:
            # JSD: one more read of the chunk for KL(p‖m) and KL(q‖m)
            kp = tl.zeros((BLOCK_N,), dtype=CDT)
            for v0 in range(0, V, BLOCK_V):
                cols = v0 + tl.arange(0, BLOCK_V)
                cm = (cols < V)[None, :]
                s = tl.load(s_row + cols[None, :], mask=cm, other=0.0).to(CDT)
                t = tl.load(t_row + cols[None, :], mask=cm, other=0.0).to(CDT)
                lq = s * inv_temp - lse_s[:, None]
                lp = t * inv_temp - lse_t[:, None]
                lm = _logaddexp_tl(lp + log_b, lq + log_1mb)
                kp += tl.sum(tl.where(cm, tl.exp(lp) * (lp - lm), 0.0), axis=1)
                kq += tl.sum(tl.where(cm, tl.exp(lq) * (lq - lm), 0.0), axis=1)
            kl = b_r * kp + (1.0 - b_r) * kq
        tl.store(kl_ptr + rows, tl.where(valid, kl, 0.0), mask=rmask)
        if HAS_CE:
            if SAME_T:
                lse_c = lse_s
            else:
                lse_c = m_c + tl.log(z_c)
            lab_ok = valid & (lab >= 0) & (lab < V)
            s_lab = tl.load(ls_ptr + rows_c * stride_s + lab, mask=lab_ok, other=0.0).to(CDT)
            tl.store(ce_ptr + rows, tl.where(lab_ok, lse_c - s_lab, 0.0), mask=rmask)
            if CE_W_PTR:
                cw = ce_w * tl.load(cew_ptr).to(CDT)
        # pass 2: gradient of Σ_rows (kl_w·kl + ce_w·ce) w.r.t. the student logits
        if WRITE_GRAD:
            for v0 in range(0, V, BLOCK_V):
                cols = v0 + tl.arange(0, BLOCK_V)
                cm = (cols < V)[None, :]
                s = tl.load(s_row + cols[None, :], mask=cm, other=0.0).to(CDT)
                p_s = tl.exp(s * inv_temp - lse_s[:, None])
                if TOPK:  # the tail bucket's value everywhere; the top K are overwritten below
                    g = (kl_w * inv_temp) * p_s * c_tail[:, None]
                elif DIV == 0:
                    t = tl.load(t_row + cols[None, :], mask=cm, other=0.0).to(CDT)
                    p_t = tl.exp(t * inv_temp - lse_t[:, None])
                    g = (kl_w * inv_temp) * (p_s - p_t)
                elif DIV == 1:
                    t = tl.load(t_row + cols[None, :], mask=cm, other=0.0).to(CDT)
                    g = (kl_w * inv_temp) * p_s * ((s - t) * inv_temp - lse_s[:, None] + lse_t[:, None]
                                                   - kl[:, None])
                else:
                    t = tl.load(t_row + cols[None, :], mask=cm, other=0.0).to(CDT)
                    lq = s * inv_temp - lse_s[:, None]
                    lm = _logaddexp_tl(t * inv_temp - lse_t[:, None] + log_b, lq + log_1mb)
                    g = (kl_w * inv_temp) * (1.0 - b_r[:, None]) * p_s * (lq - lm - kq[:, None])
                if HAS_CE:
                    if SAME_T:
                        p_c = p_s
                    else:
                        p_c = tl.exp(s - lse_c[:, None])
                    onehot = (cols[None, :] == lab[:, None]).to(CDT)
                    if CE_W_PTR:
                        g += cw * (p_c - onehot)
                    else:
                        g += ce_w * (p_c - onehot)
                g = tl.where(valid[:, None], g, 0.0)
                g = rne_bf16(g, FIX_BF16)
                tl.store(ls_ptr + rows[:, None] * stride_s + cols[None, :],
                         g.to(ls_ptr.dtype.element_ty), mask=rmask[:, None] & cm)
            if TOPK:
                # every thread's tail stores must land before the top-K overwrites
                tl.debug_barrier()
                for k0 in range(0, K, BLOCK_K):
                    kc = k0 + tl.arange(0, BLOCK_K)
                    km = (kc < K)[None, :]
                    idx = tl.load(idx_ptr + k_row + kc[None, :], mask=km, other=0).to(tl.int64)
                    tk = tl.load(tk_ptr + k_row + kc[None, :], mask=km, other=0.0).to(CDT)
                    sk = tl.load(sk_ptr + k_row + kc[None, :], mask=km, other=0.0).to(CDT)
                    lp = tk * inv_temp - lse_t[:, None]
                    lq = sk * inv_temp - lse_s[:, None]
                    qk = tl.exp(lq)
                    if DIV == 0:
                        g = (kl_w * inv_temp) * (qk - tl.exp(lp))
                    elif DIV == 1:
                        g = (kl_w * inv_temp) * qk * (lq - lp - kl[:, None])
                    else:
                        lm = _logaddexp_tl(lp + log_b, lq + log_1mb)
                        g = (kl_w * inv_temp) * (1.0 - b_r[:, None]) * qk * (lq - lm - kq[:, None])
                    if HAS_CE:
                        if SAME_T:
                            p_c = qk
                        else:
                            p_c = tl.exp(sk - lse_c[:, None])
                        onehot = (idx == lab[:, None]).to(CDT)
                        if CE_W_PTR:
                            g += cw * (p_c - onehot)
                        else:
                            g += ce_w * (p_c - onehot)
                    g = tl.where(valid[:, None], g, 0.0)
                    g = rne_bf16(g, FIX_BF16)
                    tl.store(ls_ptr + rows[:, None] * stride_s + idx,
                             g.to(ls_ptr.dtype.element_ty), mask=rmask[:, None] & km)


def _kl_ce_torch(ls, lt, lab, valid, inv_temp, kl_w, ce_w, has_ce, write_grad, cdt):
    """Same math as the kernel, in torch ops on one chunk (fp32), with as few passes over
    the [rows, V] block as torch allows: the student's softmax is made once and reused by
    the KL gradient and (at T = 1) the CE, and the gradient is built in place of it."""
    s, t = ls.to(cdt), lt.to(cdt)
    if inv_temp != 1.0:
        s_t, t_t = s * inv_temp, t * inv_temp
    else:
        s_t, t_t = s, t
    lps = torch.log_softmax(s_t, -1)
    lpt = torch.log_softmax(t_t, -1)
    del s_t, t_t
    pt = lpt.exp()
    kl = torch.sub(lpt, lps, out=lpt).mul_(pt).sum(-1) * valid  # Σ p (log p − log q)
    ce = None
    lab_c = lab.clamp(0, s.shape[1] - 1)[:, None] if has_ce else None
    if has_ce:
        lpc = lps if inv_temp == 1.0 else torch.log_softmax(s, -1)
        ce = -lpc.gather(1, lab_c)[:, 0] * valid
    if write_grad:
        a = kl_w * inv_temp
        g = lps.exp_()  # q; lps is not needed any more (ce already read)
        if has_ce and inv_temp == 1.0:
            g.mul_(a + ce_w).sub_(pt, alpha=a)  # a (q − p) + ce_w q
        else:
            g.sub_(pt).mul_(a)
            if has_ce:
                g.add_(lpc.exp_(), alpha=ce_w)
        if has_ce:
            g.scatter_add_(1, lab_c, -ce_w * valid[:, None])
        g.mul_(valid[:, None])
        ls.copy_(g)
    return kl, ce


#: Floor of the top-k tail masses inside logs and ratios (see the module docstring).
TAIL_FLOOR = 1e-6

DIVERGENCES = ("forward-kl", "reverse-kl", "jsd")
KL_REDUCTIONS = ("mean", "sum")


def _div_ce_torch(ls, lt, lab, valid, inv_temp, kl_w, ce_w, has_ce, write_grad, cdt, div, beta, top_k,
                  ce_scale):
    """The kernel's reverse-KL / JSD / top-k math in torch ops on one chunk (fp32), with the
    same analytic gradient; ``ce_scale`` (a device scalar or 1.0) multiplies the CE weight."""
    s, t = ls.to(cdt), lt.to(cdt)
    lq = torch.log_softmax(s * inv_temp, -1)
    lp = torch.log_softmax(t * inv_temp, -1)
    q = lq.exp()
    if beta is not None:
        log_b, log_1mb = math.log(beta), math.log1p(-beta)
    if top_k:
        idx = torch.topk(lt, top_k, dim=1).indices
        lpk, lqk = lp.gather(1, idx), lq.gather(1, idx)
        pk, qk = lpk.exp(), lqk.exp()
        p_tail = (1.0 - pk.sum(1)).clamp(min=0.0)
        q_tail = (1.0 - qk.sum(1)).clamp(min=0.0)
        lp_tail, lq_tail = p_tail.clamp(min=TAIL_FLOOR).log(), q_tail.clamp(min=TAIL_FLOOR).log()
        if div == 0:
            kl = (pk * (lpk - lqk)).sum(1) + p_tail * (lp_tail - lq_tail)
            c_tail = 1.0 - p_tail / q_tail.clamp(min=TAIL_FLOOR)
            gk = qk - pk
        elif div == 1:
            kl = (qk * (lqk - lpk)).sum(1) + q_tail * (lq_tail - lp_tail)
            c_tail = lq_tail - lp_tail - kl
            gk = qk * (lqk - lpk - kl[:, None])
        else:
            lmk = torch.logaddexp(lpk + log_b, lqk + log_1mb)
            lm_tail = torch.logaddexp(lp_tail + log_b, lq_tail + log_1mb)
            kp = (pk * (lpk - lmk)).sum(1) + p_tail * (lp_tail - lm_tail)
            kq = (qk * (lqk - lmk)).sum(1) + q_tail * (lq_tail - lm_tail)
            kl = beta * kp + (1.0 - beta) * kq
            c_tail = (1.0 - beta) * (lq_tail - lm_tail - kq)
            gk = (1.0 - beta) * qk * (lqk - lmk - kq[:, None])
        g = (q * c_tail[:, None]).scatter_(1, idx, gk) if write_grad else None
    elif div == 0:
        kl = (lp.exp() * (lp - lq)).sum(1)
        g = q - lp.exp() if write_grad else None
    elif div == 1:
        kl = (q * (lq - lp)).sum(1)
        g = q * (lq - lp - kl[:, None]) if write_grad else None
    else:
        lm = torch.logaddexp(lp + log_b, lq + log_1mb)
        kq = (q * (lq - lm)).sum(1)
        kl = beta * (lp.exp() * (lp - lm)).sum(1) + (1.0 - beta) * kq
        g = (1.0 - beta) * q * (lq - lm - kq[:, None]) if write_grad else None
    kl = kl * valid
    ce = None
    if has_ce:
        lpc = lq if inv_temp == 1.0 else torch.log_softmax(s, -1)
        ce = -lpc.gather(1, lab.clamp(0, s.shape[1] - 1)[:, None])[:, 0] * valid
    if write_grad:
        g *= kl_w * inv_temp
        if has_ce:
            cw = ce_w * ce_scale
            g += cw * lpc.exp()
            g.scatter_add_(1, lab.clamp(0, s.shape[1] - 1)[:, None], -(cw * valid)[:, None])
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


def topk_block(on_gpu: bool, K: int) -> int:
    """``BLOCK_K`` of ``_kl_ce_kernel``: the top-K columns read per step (16 when unused)."""
    return min(256 if on_gpu else 32, max(16, next_pow2(K)))


class _FusedLinearKL(torch.autograd.Function):
    @staticmethod
    def forward(ctx, h_s, w_s, h_t, w_t, labels, temperature, kl_weight, ce_weight,
                ignore_index, chunk_size, backend, div=0, beta=0.5, top_k=0, n_sequences=None, denominator=None):
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
        count = valid.sum() if denominator is None else torch.as_tensor(denominator, device=dev)
        denom = count.clamp(min=1).to(cdt)
        # kl_reduction="sum": the CE keeps the valid-row mean, so its weight inside the
        # gradient (which the backward divides by n_sequences) is ce_w·n_sequences/n_valid,
        # a device scalar the kernel reads (no host synchronisation)
        summed = n_sequences is not None
        ce_scale = (float(n_sequences) / denom).reshape(1) if summed and has_ce else None
        default = div == 0 and top_k == 0 and ce_scale is None
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
                if top_k:  # the teacher's top-K per row, and both logits there ([c, K] each)
                    tk, idx = torch.topk(lt, top_k, dim=1)
                    sk = ls.gather(1, idx)
                else:
                    tk = idx = sk = kl_rows
                launch(_kl_ce_kernel, (cdiv(n1 - n0, meta["BLOCK_N"]),),
                       ls, lt, lab if has_labels else kl_rows, kl_rows[n0:n1],
                       ce_rows[n0:n1] if has_ce else kl_rows, idx, sk, tk,
                       ce_scale if ce_scale is not None else kl_rows, n1 - n0, V, top_k, ls.stride(0),
                       lt.stride(0), inv_temp, kl_w, ce_w, float(beta), int(ignore_index),
                       HAS_LABELS=has_labels, HAS_CE=has_ce, SAME_T=inv_temp == 1.0,
                       WRITE_GRAD=write_grad, FIX_BF16=fix_bf16(ls), DIV=div, TOPK=top_k > 0,
                       CE_W_PTR=ce_scale is not None, BLOCK_K=topk_block(ls.is_cuda, top_k), **meta)
                del tk, idx, sk
            else:
                v = valid[n0:n1].to(cdt)
                if default:
                    k, c = _kl_ce_torch(ls, lt, lab, v, inv_temp, kl_w, ce_w, has_ce, write_grad, cdt)
                else:
                    k, c = _div_ce_torch(ls, lt, lab, v, inv_temp, kl_w, ce_w, has_ce, write_grad, cdt,
                                         div, beta, top_k, ce_scale if ce_scale is not None else 1.0)
                kl_rows[n0:n1] = k
                if has_ce:
                    ce_rows[n0:n1] = c
            del lt
            if need_h:
                torch.matmul(ls, w_s, out=grad_h[n0:n1])
            if need_w:
                acc_tn_(grad_w, ls, hs_c, backend=backend)
            del ls
        kl = kl_rows.sum() / (float(n_sequences) if summed else denom)
        ce = ce_rows.sum() / denom if has_ce else torch.zeros((), dtype=cdt, device=dev)
        loss = torch.add(kl if kl_w == 1.0 else kl * kl_w, ce, alpha=ce_w)  # one op in the common case
        ctx.save_for_backward(grad_h, grad_w, denom)
        ctx.n_sequences = float(n_sequences) if summed else None
        ctx.w_dtype = w_s.dtype
        ctx.mark_non_differentiable(kl, ce)
        return loss, kl, ce

    @staticmethod
    def backward(ctx, go, _gkl, _gce):
        grad_h, grad_w, denom = ctx.saved_tensors
        scale = go / denom if ctx.n_sequences is None else go / ctx.n_sequences
        gh = grad_h * scale.to(grad_h.dtype) if grad_h is not None else None
        gw = (grad_w * scale).to(ctx.w_dtype) if grad_w is not None else None
        return gh, gw, None, None, None, None, None, None, None, None, None, None, None, None, None, None


def _check_loss_options(divergence, jsd_beta, top_k, kl_reduction, n_sequences) -> tuple[int, float, int]:
    """Validate the divergence options; (divergence code, beta, top_k) for the kernel."""
    if divergence not in DIVERGENCES:
        raise ValueError(f"unknown divergence {divergence!r}; use one of {', '.join(DIVERGENCES)}")
    beta = float(jsd_beta)
    if divergence == "jsd" and not 0.0 < beta < 1.0:
        raise ValueError(f"jsd_beta must be strictly between 0 and 1, got {jsd_beta!r}; for beta 0 or 1 "
                         "use divergence='forward-kl' or 'reverse-kl'")
    if isinstance(top_k, bool) or not isinstance(top_k, int) or top_k < 0:
        raise ValueError(f"top_k must be an int >= 0 (0: the full vocabulary), got {top_k!r}")
    if kl_reduction not in KL_REDUCTIONS:
        raise ValueError(f"unknown kl_reduction {kl_reduction!r}; use 'mean' or 'sum'")
    if kl_reduction == "sum":
        if n_sequences is None:
            raise ValueError("kl_reduction='sum' needs n_sequences: pass the number of sequences the rows "
                             "came from (the batch size B of [B, T] tokens)")
        if isinstance(n_sequences, bool) or not isinstance(n_sequences, int) or n_sequences < 1:
            raise ValueError(f"n_sequences must be a positive int, got {n_sequences!r}")
    return DIVERGENCES.index(divergence), beta, top_k


def fused_linear_kl(h_s, w_s, h_t, w_t, labels=None, temperature=1.0, kl_weight=1.0,
                    ce_weight=1.0, ignore_index=-100, chunk_size=None, *, divergence="forward-kl",
                    jsd_beta=0.5, top_k=0, kl_reduction="mean", n_sequences=None, denominator=None):
    """(loss, kl, ce): loss = kl_weight·kl + ce_weight·ce, differentiable w.r.t. h_s, w_s.

    h_s [N, d], w_s [V, d], h_t [N, D], w_t [V, D] (frozen), labels [N] already aligned
    with rows. kl and ce come back detached, fp32, for logging.

    divergence: "forward-kl" KL(teacher‖student) (default), "reverse-kl" KL(student‖teacher)
    or "jsd" (mixture jsd_beta·teacher + (1 − jsd_beta)·student, 0 < jsd_beta < 1), all on
    softmaxes at ``temperature`` and without a T² factor. top_k > 0: over the teacher's
    top-k tokens plus one tail bucket (k ≥ V: the full vocabulary). kl_reduction "mean"
    averages the row divergences over valid rows; "sum" divides their sum by
    ``n_sequences`` (required then; ignored with "mean"). The CE (temperature 1, full
    vocabulary) is always a mean over valid rows. See the module docstring for formulas.

    ``denominator`` (a number or a device scalar, read on the device only): the count the
    means divide by instead of this call's valid rows, e.g. the scored rows of a whole
    optimizer step over all micro-batches and processes, so that the step's loss is the
    mean over its global batch (each call then returns its share of it).
    """
    div, beta, top_k = _check_loss_options(divergence, jsd_beta, top_k, kl_reduction, n_sequences)
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
    top_k = 0 if top_k >= w_s.shape[0] else top_k  # k >= V: the tail is empty
    n_seq = n_sequences if kl_reduction == "sum" else None
    args = (h_s, w_s, h_t.detach(), w_t.detach(), labels, float(temperature), float(kl_weight),
            float(ce_weight), int(ignore_index), chunk_size, backend)
    if div == 0 and top_k == 0 and n_seq is None and denominator is None:
        return _FusedLinearKL.apply(*args)
    return _FusedLinearKL.apply(*args, div, beta, top_k, n_seq, denominator)


def _bucket_divergence(lp, lq, div, beta, top_k):
    """Row divergences (autograd-able) from full log-softmaxes lp (teacher), lq (student)."""
    if top_k:
        idx = torch.topk(lp, top_k, dim=1).indices  # same order as the teacher logits
        lpk, lqk = lp.gather(1, idx), lq.gather(1, idx)
        p_tail = (1.0 - lpk.exp().sum(1, keepdim=True)).clamp(min=0.0)
        q_tail = (1.0 - lqk.exp().sum(1, keepdim=True)).clamp(min=0.0)
        lp = torch.cat([lpk, p_tail.clamp(min=TAIL_FLOOR).log()], 1)
        lq = torch.cat([lqk, q_tail.clamp(min=TAIL_FLOOR).log()], 1)
        p = torch.cat([lpk.exp(), p_tail], 1)
        q = torch.cat([lqk.exp(), q_tail], 1)
    else:
        p, q = lp.exp(), lq.exp()
    if div == 0:
        return (p * (lp - lq)).sum(-1)
    if div == 1:
        return (q * (lq - lp)).sum(-1)
    lm = torch.logaddexp(lp + math.log(beta), lq + math.log1p(-beta))
    return beta * (p * (lp - lm)).sum(-1) + (1.0 - beta) * (q * (lq - lm)).sum(-1)


def naive_fused_linear_kl(h_s, w_s, h_t, w_t, labels=None, temperature=1.0, kl_weight=1.0,
                          ce_weight=1.0, ignore_index=-100, chunk_size=None, *, divergence="forward-kl",
                          jsd_beta=0.5, top_k=0, kl_reduction="mean", n_sequences=None, denominator=None):
    """Eager composition with full [N, V] logits (fp32 softmax math, like HF + a KL), autograd
    through torch ops; same arguments and results as :func:`fused_linear_kl`."""
    div, beta, top_k = _check_loss_options(divergence, jsd_beta, top_k, kl_reduction, n_sequences)
    cdt = compute_dtype(h_s, w_s, h_t, w_t)
    ls = (h_s @ w_s.t()).to(cdt)
    lt = (h_t @ w_t.t()).to(cdt)
    N = h_s.shape[0]
    valid = (labels != ignore_index) if labels is not None else torch.ones(
        N, dtype=torch.bool, device=h_s.device)
    n = (valid.sum() if denominator is None else torch.as_tensor(denominator, device=h_s.device)).clamp(min=1).to(cdt)
    lps = torch.log_softmax(ls / temperature, -1)
    lpt = torch.log_softmax(lt / temperature, -1)
    if div == 0 and (top_k == 0 or top_k >= ls.shape[1]):
        rows = F.kl_div(lps, lpt, log_target=True, reduction="none").sum(-1)
    else:
        rows = _bucket_divergence(lpt, lps, div, beta, top_k if top_k < ls.shape[1] else 0)
    kl = (rows * valid).sum() / (n if kl_reduction == "mean" else float(n_sequences))
    if labels is not None and ce_weight != 0.0:
        ce = F.cross_entropy(ls, labels, ignore_index=ignore_index, reduction="sum") / n
    else:
        ce = torch.zeros((), dtype=cdt, device=h_s.device)
        ce_weight = 0.0
    loss = kl_weight * kl + ce_weight * ce
    return loss, kl.detach(), ce.detach()


class FusedLinearKL(torch.nn.Module):
    """Module form holding the loss settings; call with (h_s, w_s, h_t, w_t, labels), plus
    ``n_sequences`` when ``kl_reduction="sum"`` (it changes with every batch)."""

    def __init__(self, temperature=1.0, kl_weight=1.0, ce_weight=1.0, ignore_index=-100,
                 chunk_size=None, *, divergence="forward-kl", jsd_beta=0.5, top_k=0, kl_reduction="mean"):
        super().__init__()
        _check_loss_options(divergence, jsd_beta, top_k, kl_reduction, 1)
        self.kw = dict(temperature=temperature, kl_weight=kl_weight, ce_weight=ce_weight,
                       ignore_index=ignore_index, chunk_size=chunk_size, divergence=divergence,
                       jsd_beta=jsd_beta, top_k=top_k, kl_reduction=kl_reduction)

    def forward(self, h_s, w_s, h_t, w_t, labels=None, n_sequences=None):
        return fused_linear_kl(h_s, w_s, h_t, w_t, labels, n_sequences=n_sequences, **self.kw)
