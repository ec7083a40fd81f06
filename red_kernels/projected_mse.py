"""Clone losses of LRC/RED without the [T, D] temporary.

``projected_mse``: mean((h_s·Pᵀ − h_t)²). The eager composition materializes h_s·Pᵀ, the
difference, its square and the backward's copy of it (several [T, D] tensors, 100 MB each
at T=16k, D=3072 in bf16). Here one Triton kernel computes the difference tile by tile
(a GEMM with the subtraction, the squared sum and the gradient scale in its epilogue);
without grad nothing of size [T, D] is ever written. With grad, the scaled difference of
one token chunk (bounded rows, not T) is handed to cuBLAS for dh_s = E·P, and dP = Eᵀ·h_s
is summed over chunks in fp32 by a deterministic Triton kernel. Gradients are computed
in the forward (Liger-style) and scaled by grad_output in the backward.

``projected_mse_student_space``: mean((y_s − y_t·P)²); its difference is [T, d], the size
of the gradient that must be returned anyway, so the kernel writes dy_s directly.

``selected_mse`` / ``selected_mse_student_space``: P = I[:, index] (RED's init), a gather
MSE with no GEMM at all.

Losses are returned in fp32 (fp64 for fp64 inputs) whatever the input dtype. The teacher
activations h_t / y_t never receive a gradient. An empty batch gives loss 0.
"""
from __future__ import annotations

import torch

from ._backend import HAS_TRITON, get_backend
from ._common import (acc_tn_, alloc, cdiv, check_dot_dtypes, compute_dtype, dot_flags, fix_bf16,
                      flatten_rows, launch, next_pow2)

if HAS_TRITON:
    import triton
    import triton.language as tl

    from ._common import rne_bf16

    @triton.jit
    def _diff_gemm_kernel(
        a_ptr, b_ptr, t_ptr, e_ptr, part_ptr,
        M, N, K,
        stride_am, stride_ak, stride_bk, stride_bn, stride_tm, stride_em,
        sign, scale,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
        GROUP_M: tl.constexpr, STORE_E: tl.constexpr, UPCAST: tl.constexpr,
        IEEE: tl.constexpr, FIX_BF16: tl.constexpr,
    ):
        """E = sign·(a @ b − t) per tile: part[pid] = Σ E², and e = scale·E if STORE_E."""
        pid = tl.program_id(0).to(tl.int64)
        grid_m = tl.cdiv(M, BLOCK_M)
        grid_n = tl.cdiv(N, BLOCK_N)
        # grouped order: neighbouring programs share rows of a (L2 reuse on GPU)
        width = GROUP_M * grid_n
        group = pid // width
        first_m = group * GROUP_M
        gsize = tl.minimum(grid_m - first_m, GROUP_M)
        pid_m = first_m + (pid % width) % gsize
        pid_n = (pid % width) // gsize
        CDT = part_ptr.dtype.element_ty
        rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        mm = rm < M
        mn = rn < N
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=CDT)
        for k0 in range(0, K, BLOCK_K):
            rk = k0 + tl.arange(0, BLOCK_K)
            mk = rk < K
            a = tl.load(a_ptr + rm[:, None] * stride_am + rk[None, :] * stride_ak,
                        mask=mm[:, None] & mk[None, :], other=0.0)
            b = tl.load(b_ptr + rk[:, None] * stride_bk + rn[None, :] * stride_bn,
                        mask=mk[:, None] & mn[None, :], other=0.0)
            if UPCAST:
                a = a.to(CDT)
                b = b.to(CDT)
            if IEEE:
                acc = tl.dot(a, b, acc, input_precision="ieee")
            else:
                acc = tl.dot(a, b, acc)
        m2 = mm[:, None] & mn[None, :]
        t = tl.load(t_ptr + rm[:, None] * stride_tm + rn[None, :], mask=m2, other=0.0).to(CDT)
        e = tl.where(m2, sign * (acc - t), 0.0)
        tl.store(part_ptr + pid, tl.sum(tl.sum(e * e, axis=1), axis=0))
        if STORE_E:
            g = rne_bf16(e * scale, FIX_BF16)
            tl.store(e_ptr + rm[:, None] * stride_em + rn[None, :],
                     g.to(e_ptr.dtype.element_ty), mask=m2)

    @triton.jit
    def _selected_kernel(
        s_ptr, t_ptr, idx_ptr, g_ptr, part_ptr,
        T, W, stride_s, stride_t, stride_g, scale,
        BLOCK_T: tl.constexpr, BLOCK_W: tl.constexpr, STORE_G: tl.constexpr,
        FIX_BF16: tl.constexpr, TEACHER_SPACE: tl.constexpr,
    ):
        """Selection MSE over one row block, looping over W columns.

        TEACHER_SPACE (W = D): idx is the inverse map (column c of h_t pairs with
        h_s[:, idx[c]], or with 0 when idx[c] < 0). Otherwise (W = d): column j of y_s pairs
        with y_t[:, idx[j]]. The gradient w.r.t. s is written when STORE_G.
        """
        pid = tl.program_id(0).to(tl.int64)
        CDT = part_ptr.dtype.element_ty
        rows = pid * BLOCK_T + tl.arange(0, BLOCK_T)
        rmask = rows < T
        tot = tl.zeros((BLOCK_T,), dtype=CDT)
        for c0 in range(0, W, BLOCK_W):
            cols = c0 + tl.arange(0, BLOCK_W)
            cmask = cols < W
            m = rmask[:, None] & cmask[None, :]
            idx = tl.load(idx_ptr + cols, mask=cmask, other=-1).to(tl.int64)
            if TEACHER_SPACE:
                t = tl.load(t_ptr + rows[:, None] * stride_t + cols[None, :], mask=m, other=0.0)
                sel = m & (idx >= 0)[None, :]
                s = tl.load(s_ptr + rows[:, None] * stride_s + idx[None, :], mask=sel, other=0.0)
                s_cols = idx
            else:
                s = tl.load(s_ptr + rows[:, None] * stride_s + cols[None, :], mask=m, other=0.0)
                t = tl.load(t_ptr + rows[:, None] * stride_t + idx[None, :], mask=m, other=0.0)
                sel = m
                s_cols = cols
            e = tl.where(m, s.to(CDT) - t.to(CDT), 0.0)
            tot += tl.sum(e * e, axis=1)
            if STORE_G:
                g = rne_bf16(e * scale, FIX_BF16)
                tl.store(g_ptr + rows[:, None] * stride_g + s_cols[None, :],
                         g.to(g_ptr.dtype.element_ty), mask=sel)
        tl.store(part_ptr + pid, tl.sum(tot, axis=0))


def diff_gemm_meta(on_gpu: bool, dtype: torch.dtype = torch.bfloat16) -> dict:
    """Tiles, warps and stages of ``_diff_gemm_kernel``: GPU tiles vs tiny interpreter tiles.

    fp32 operands (``--precision fp32``) get smaller tiles: a 128x128x64 fp32 tile without
    tensor cores compiled for sm_80 with 5.8 KB of register spills per thread
    (benchmarks/aot_compile.py)."""
    if on_gpu and dtype in (torch.float32, torch.float64):
        return dict(BLOCK_M=64, BLOCK_N=64, BLOCK_K=32, GROUP_M=8, num_warps=4, num_stages=2)
    if on_gpu:
        return dict(BLOCK_M=128, BLOCK_N=128, BLOCK_K=64, GROUP_M=8, num_warps=8, num_stages=3)
    return dict(BLOCK_M=16, BLOCK_N=32, BLOCK_K=16, GROUP_M=8, num_warps=4, num_stages=1)


def _diff_gemm(a, b, b_kn_strides, t, sign, scale, e_out):
    """Launch the fused diff-GEMM; returns the sum of squares (0-dim, compute dtype)."""
    check_dot_dtypes("projected_mse (diff-GEMM)", activations=a, projection=b)
    M, K = a.shape
    N = t.shape[1]
    cdt = compute_dtype(a, b, t)
    meta = diff_gemm_meta(a.is_cuda, a.dtype)
    grid = cdiv(M, meta["BLOCK_M"]) * cdiv(N, meta["BLOCK_N"])
    part = alloc((grid,), cdt, a.device)
    upcast, ieee = dot_flags(a, b)
    store = e_out is not None
    e_arg = e_out if store else part
    launch(_diff_gemm_kernel, (grid,),
           a, b, t, e_arg, part, M, N, K,
           a.stride(0), a.stride(1), b_kn_strides[0], b_kn_strides[1], t.stride(0),
           e_out.stride(0) if store else 0, float(sign), float(scale),
           STORE_E=store, UPCAST=upcast, IEEE=ieee, FIX_BF16=store and fix_bf16(e_out), **meta)
    return part.sum()


def _chunk_rows(T: int, D: int, chunk_rows: int | None) -> int:
    if chunk_rows:
        return chunk_rows
    return max(1, min(T, max(256, (1 << 23) // max(D, 1))))  # ~16 MB of bf16 a chunk


def _empty_loss(ref: torch.Tensor, cdt):
    return torch.zeros((), dtype=cdt, device=ref.device)


class _ProjectedMSE(torch.autograd.Function):
    @staticmethod
    def forward(ctx, h_s, P, h_t, backend, chunk_rows):
        hs, ht = flatten_rows(h_s), flatten_rows(h_t)
        T, d = hs.shape
        D = P.shape[0]
        cdt = compute_dtype(hs, P, ht)
        n = T * D
        need_hs, need_p = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        need = need_hs or need_p
        scale = 2.0 / max(n, 1)
        dh = alloc((T, d), h_s.dtype, h_s.device) if need_hs else None
        dP = torch.zeros(D, d, dtype=cdt, device=P.device) if need_p else None
        total = _empty_loss(hs, cdt)
        C = _chunk_rows(T, D, chunk_rows)
        Pc = P.to(hs.dtype)  # the GEMMs run in the activations' (compute) dtype; dP stays fp32
        for t0 in range(0, T, C):
            a, t = hs[t0:t0 + C], ht[t0:t0 + C]
            if backend == "triton":
                e = alloc((a.shape[0], D), h_s.dtype, h_s.device) if need else None
                total = total + _diff_gemm(a, Pc, (Pc.stride(1), Pc.stride(0)), t, 1.0, scale, e)
            else:
                e = torch.addmm(t.to(a.dtype), a, Pc.t(), beta=-1)  # h_s·Pᵀ − h_t in one GEMM call
                total = total + e.to(cdt).square().sum()
                e.mul_(scale)
            if need_hs:
                torch.matmul(e, Pc, out=dh[t0:t0 + C])
            if need_p:
                acc_tn_(dP, e, a, backend=backend)
        ctx.save_for_backward(dh, dP)
        ctx.p_dtype = P.dtype
        ctx.hs_shape = h_s.shape
        return total / max(n, 1)

    @staticmethod
    def backward(ctx, go):
        dh, dP = ctx.saved_tensors
        gh = (dh * go.to(dh.dtype)).reshape(ctx.hs_shape) if dh is not None else None
        gp = (dP * go).to(ctx.p_dtype) if dP is not None else None
        return gh, gp, None, None, None


def _projected_mse(h_s, P, h_t, chunk_rows=None):
    if h_s.shape[-1] != P.shape[1] or h_t.shape[-1] != P.shape[0]:
        raise ValueError(f"shapes do not chain: h_s {tuple(h_s.shape)}, P {tuple(P.shape)}, "
                         f"h_t {tuple(h_t.shape)}")
    if not torch.is_grad_enabled():
        P = P.detach()  # a Parameter still asks for dP inside a Function under no_grad
    return _ProjectedMSE.apply(h_s, P, h_t.detach(), get_backend(h_s, P, h_t), chunk_rows)


def projected_mse(h_s: torch.Tensor, P: torch.Tensor, h_t: torch.Tensor) -> torch.Tensor:
    """mean((h_s @ P.T − h_t)²) over all elements; grads for h_s and P, none for h_t."""
    return _projected_mse(h_s, P, h_t)


def naive_projected_mse(h_s, P, h_t):
    """Eager composition: materializes the [T, D] product, difference and square."""
    return (h_s @ P.t() - h_t).pow(2).mean()


class _ProjectedMSEStudent(torch.autograd.Function):
    @staticmethod
    def forward(ctx, y_s, y_t, P, backend):
        ys, yt = flatten_rows(y_s), flatten_rows(y_t)
        T, d = ys.shape
        cdt = compute_dtype(ys, yt, P)
        n = T * d
        scale = 2.0 / max(n, 1)
        need_ys, need_p = ctx.needs_input_grad[0], ctx.needs_input_grad[2]
        dys = None
        if T == 0:
            total = _empty_loss(ys, cdt)
            dys = ys.new_zeros(ys.shape) if (need_ys or need_p) else None
        elif backend == "triton":
            Pc = P.to(yt.dtype)  # the GEMM runs in the activations' (compute) dtype
            dys = alloc((T, d), y_s.dtype, y_s.device) if (need_ys or need_p) else None
            total = _diff_gemm(yt, Pc, (Pc.stride(0), Pc.stride(1)), ys, -1.0, scale, dys)
        else:
            e = torch.addmm(ys.to(yt.dtype), yt, P.to(yt.dtype), alpha=-1)  # y_s − y_t·P
            total = e.to(cdt).square().sum()
            dys = e.mul_(scale)
        dP = None
        if need_p:
            dP = torch.zeros(P.shape, dtype=cdt, device=P.device)
            acc_tn_(dP, yt, dys.to(yt.dtype), alpha=-1.0, backend=backend)
        ctx.save_for_backward(dys if need_ys else None, dP)
        ctx.p_dtype = P.dtype
        ctx.ys_shape = y_s.shape
        return total / max(n, 1)

    @staticmethod
    def backward(ctx, go):
        dys, dP = ctx.saved_tensors
        g = (dys * go.to(dys.dtype)).reshape(ctx.ys_shape) if dys is not None else None
        gp = (dP * go).to(ctx.p_dtype) if dP is not None else None
        return g, None, gp, None


def projected_mse_student_space(y_s: torch.Tensor, y_t: torch.Tensor, P: torch.Tensor):
    """mean((y_s − y_t @ P)²) over all elements; grads for y_s and P, none for y_t."""
    if y_s.shape[-1] != P.shape[1] or y_t.shape[-1] != P.shape[0]:
        raise ValueError(f"shapes do not chain: y_s {tuple(y_s.shape)}, y_t {tuple(y_t.shape)}, "
                         f"P {tuple(P.shape)}")
    if not torch.is_grad_enabled():
        P = P.detach()  # a Parameter still asks for dP inside a Function under no_grad (validation)
    return _ProjectedMSEStudent.apply(y_s, y_t.detach(), P, get_backend(y_s, y_t, P))


def naive_projected_mse_student_space(y_s, y_t, P):
    return (y_s - y_t @ P).pow(2).mean()


if HAS_TRITON:

    @triton.jit
    def _mse_kernel(
        s_ptr, t_ptr, g_ptr, part_ptr,
        T, W, stride_s, stride_t, stride_g, scale,
        BLOCK_T: tl.constexpr, BLOCK_W: tl.constexpr, STORE_G: tl.constexpr,
        FIX_BF16: tl.constexpr,
    ):
        """Same-space MSE over one row block: part[pid] = (Σ (s − t)², Σ t²); g = scale·(s − t)."""
        pid = tl.program_id(0).to(tl.int64)
        CDT = part_ptr.dtype.element_ty
        rows = pid * BLOCK_T + tl.arange(0, BLOCK_T)
        rmask = rows < T
        tot = tl.zeros((BLOCK_T,), dtype=CDT)
        tsq = tl.zeros((BLOCK_T,), dtype=CDT)
        for c0 in range(0, W, BLOCK_W):
            cols = c0 + tl.arange(0, BLOCK_W)
            m = rmask[:, None] & (cols < W)[None, :]
            s = tl.load(s_ptr + rows[:, None] * stride_s + cols[None, :], mask=m, other=0.0).to(CDT)
            t = tl.load(t_ptr + rows[:, None] * stride_t + cols[None, :], mask=m, other=0.0).to(CDT)
            e = s - t
            tot += tl.sum(e * e, axis=1)
            tsq += tl.sum(t * t, axis=1)
            if STORE_G:
                g = rne_bf16(e * scale, FIX_BF16)
                tl.store(g_ptr + rows[:, None] * stride_g + cols[None, :], g.to(g_ptr.dtype.element_ty), mask=m)
        tl.store(part_ptr + 2 * pid, tl.sum(tot, axis=0))
        tl.store(part_ptr + 2 * pid + 1, tl.sum(tsq, axis=0))


def rowwise_meta(on_gpu: bool, W: int) -> dict:
    """Row block, column block and warps of the row-wise MSE kernels (selected and plain)."""
    if on_gpu:
        return dict(BLOCK_T=16, BLOCK_W=min(1024, next_pow2(W)), num_warps=8)
    return dict(BLOCK_T=16, BLOCK_W=32, num_warps=4)


def _selected_launch(s, t, idx, W, scale, g, teacher_space):
    T = s.shape[0]
    cdt = compute_dtype(s, t)
    meta = rowwise_meta(s.is_cuda, W)
    grid = cdiv(T, meta["BLOCK_T"])
    part = alloc((grid,), cdt, s.device)
    store = g is not None
    launch(_selected_kernel, (grid,),
           s, t, idx, g if store else part, part, T, W, s.stride(0), t.stride(0),
           g.stride(0) if store else 0, float(scale), STORE_G=store,
           FIX_BF16=store and fix_bf16(g), TEACHER_SPACE=teacher_space, **meta)
    return part.sum()


class _SelectedMSE(torch.autograd.Function):
    @staticmethod
    def forward(ctx, s, t, index, teacher_space, backend):
        s2, t2 = flatten_rows(s), flatten_rows(t)
        T = s2.shape[0]
        W = t2.shape[1] if teacher_space else s2.shape[1]
        cdt = compute_dtype(s2, t2)
        n = T * W
        scale = 2.0 / max(n, 1)
        need = ctx.needs_input_grad[0]
        g = None
        if T == 0:
            total = _empty_loss(s2, cdt)
            g = s2.new_zeros(s2.shape) if need else None
        elif backend == "triton":
            if teacher_space:
                idx = torch.full((W,), -1, dtype=torch.int64, device=s.device)
                idx[index] = torch.arange(index.numel(), device=s.device)
            else:
                idx = index.contiguous()
            g = alloc(s2.shape, s.dtype, s.device) if need else None
            total = _selected_launch(s2, t2, idx, W, scale, g, teacher_space)
        else:
            e = (s2 - t2.index_select(1, index)).to(cdt)
            total = e.square().sum()
            if teacher_space:  # the unselected teacher channels are compared with 0
                keep = torch.ones(W, dtype=torch.bool, device=s.device)
                keep[index] = False
                total = total + t2[:, keep].to(cdt).square().sum()
            g = (e * scale).to(s.dtype) if need else None
        ctx.save_for_backward(g)
        ctx.s_shape = s.shape
        return total / max(n, 1)

    @staticmethod
    def backward(ctx, go):
        (g,) = ctx.saved_tensors
        if g is None:
            return None, None, None, None, None
        return (g * go.to(g.dtype)).reshape(ctx.s_shape), None, None, None, None


def selected_mse(h_s: torch.Tensor, index: torch.Tensor, h_t: torch.Tensor) -> torch.Tensor:
    """projected_mse with P = I[:, index]: mean over T·D, unselected teacher channels vs 0."""
    if index.numel() != h_s.shape[-1]:
        raise ValueError("index must have one entry per student channel")
    return _SelectedMSE.apply(h_s, h_t.detach(), index, True, get_backend(h_s, h_t))


def selected_mse_student_space(y_s: torch.Tensor, y_t: torch.Tensor, index: torch.Tensor):
    """projected_mse_student_space with P = I[:, index]: mean((y_s − y_t[..., index])²)."""
    if index.numel() != y_s.shape[-1]:
        raise ValueError("index must have one entry per student channel")
    return _SelectedMSE.apply(y_s, y_t.detach(), index, False, get_backend(y_s, y_t))


def naive_selected_mse(h_s, index, h_t):
    P = torch.zeros(h_t.shape[-1], h_s.shape[-1], dtype=h_s.dtype, device=h_s.device)
    P[index, torch.arange(index.numel(), device=h_s.device)] = 1
    return naive_projected_mse(h_s, P, h_t)


def naive_selected_mse_student_space(y_s, y_t, index):
    return (y_s - y_t[..., index]).pow(2).mean()


class _MSE(torch.autograd.Function):
    """mean((s − t)²) and mean(t²) in one read of both; ds is made in the forward.

    Replaces ``F.mse_loss(s.float(), t.float())``, whose autograd keeps fp32 copies of both
    operands until backward (two [T, W] fp32 tensors per clone term); here only ds, in s's
    own dtype, is kept, and the sums are fp32 whatever the inputs.
    """

    @staticmethod
    def forward(ctx, s, t, backend):
        s2, t2 = flatten_rows(s), flatten_rows(t)
        T, W = s2.shape
        cdt = compute_dtype(s2, t2)
        n = max(T * W, 1)
        scale = 2.0 / n
        need = ctx.needs_input_grad[0]
        g = None
        if T * W == 0:
            err, tsq = _empty_loss(s2, cdt), _empty_loss(s2, cdt)
            g = s2.new_zeros(s2.shape) if need else None
        elif backend == "triton":
            meta = rowwise_meta(s.is_cuda, W)
            grid = cdiv(T, meta["BLOCK_T"])
            part = alloc((grid, 2), cdt, s.device)
            g = alloc(s2.shape, s.dtype, s.device) if need else None
            launch(_mse_kernel, (grid,), s2, t2, g if need else part, part, T, W, s2.stride(0),
                   t2.stride(0), g.stride(0) if need else 0, float(scale), STORE_G=need,
                   FIX_BF16=need and fix_bf16(g), **meta)
            err, tsq = part.sum(0).unbind()
        else:
            err, tsq = _empty_loss(s2, cdt), _empty_loss(s2, cdt)
            g = torch.empty_like(s2) if need else None
            C = max(1, min(T, max(16, (1 << 20) // max(W, 1))))  # ~4 MB fp32 temporaries a chunk
            for r0 in range(0, T, C):
                a, b = s2[r0:r0 + C].to(cdt), t2[r0:r0 + C].to(cdt)
                e = a - b
                err = err + e.square().sum()
                tsq = tsq + b.square().sum()
                if need:
                    g[r0:r0 + C] = e.mul_(scale)
        ctx.save_for_backward(g)
        ctx.s_shape = s.shape
        ms = tsq / n
        ctx.mark_non_differentiable(ms)
        return err / n, ms

    @staticmethod
    def backward(ctx, go, _gms):
        (g,) = ctx.saved_tensors
        if g is None:
            return None, None, None
        return (g * go.to(g.dtype)).reshape(ctx.s_shape), None, None


def mse_with_target_ms(s: torch.Tensor, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(mean((s − t)²), mean(t²)), both fp32; only the first is differentiable (w.r.t. s).

    The second is the clone loss's normalizer (teacher mean square), read in the same pass.
    """
    if s.shape != t.shape:
        raise ValueError(f"s and t must have the same shape, got {tuple(s.shape)} and {tuple(t.shape)}")
    return _MSE.apply(s, t.detach(), get_backend(s, t))


def mse(s: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """mean((s − t)²) in fp32 with ds made in the forward; t gets no gradient."""
    return mse_with_target_ms(s, t)[0]


def naive_mse(s, t):
    """Eager composition: fp32 copies of both operands, kept by autograd until backward."""
    return torch.nn.functional.mse_loss(s.float(), t.float())
