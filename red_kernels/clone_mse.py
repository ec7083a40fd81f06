"""The clone MSE of LRC/RED as a tap on the student's activation.

``clone_mse(s, t) -> (s, mse, ms)``: mean((s − t)²) and the teacher's mean square
mean(t²), both fp32, read in one pass over s and t; the first output is s itself, and the
student keeps using it. The op sits on the activation's path instead of beside it, so its
backward adds the clone gradient into the gradient that flows back through s in one
fused ``addcmul`` (ds = ds_downstream + go·g), instead of handing autograd a separate
g·go tensor to sum with it. g = 2(s − t)/n is made in the forward, in s's own dtype (the
compute dtype; the torch path keeps s − t and applies 2/n with go), and is the only thing
kept for backward: no fp32 copy of either operand.

When t needs a gradient (the FFN term compares with the teacher's output pushed through
the student's own P_down), dt = −go·g.

Triton: one kernel reads s and t once per row block, writes g, and its last program to
finish adds the row blocks' partial sums up (one launch per tap, nothing else). Torch: the
same arithmetic as a difference and two dot products (inputs in the accumulation dtype) or
in chunks of rows (fp32 temporaries of ~4 MB).
"""
from __future__ import annotations

import torch

from ._backend import HAS_TRITON, get_backend
from ._common import alloc, cdiv, compute_dtype, fix_bf16, flatten_rows, launch, next_pow2

if HAS_TRITON:
    import triton
    import triton.language as tl

    from ._common import rne_bf16

    @triton.jit
    def _mse_kernel(
        s_ptr, t_ptr, g_ptr, part_ptr, out_ptr, count_ptr,
        T, W, stride_s, stride_t, stride_g, scale,
        BLOCK_T: tl.constexpr, BLOCK_W: tl.constexpr, STORE_G: tl.constexpr,
        FIX_BF16: tl.constexpr, BLOCK_P: tl.constexpr,
    ):
        """One row block: part[pid] = (Σ (s − t)², Σ t²); g = scale·(s − t) if STORE_G.

        The program that finishes last (an atomic count of finished programs) sums every
        program's partials in program order into out[0:2] and resets the count to 0 for
        the next launch: the op needs no second kernel to reduce, and the sum does not
        depend on which program finished when (deterministic)."""
        pid = tl.program_id(0).to(tl.int64)
        n_prog = tl.num_programs(0)
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
        tl.debug_barrier()  # every thread's partial stored before this program counts itself done
        done = tl.atomic_add(count_ptr, 1, sem="acq_rel")
        if done == n_prog - 1:
            acc0 = tl.zeros((BLOCK_P,), dtype=CDT)
            acc1 = tl.zeros((BLOCK_P,), dtype=CDT)
            for p0 in range(0, n_prog, BLOCK_P):
                idx = p0 + tl.arange(0, BLOCK_P)
                pm = idx < n_prog
                # .cg: read through L2, where the other programs' stores are, not a stale L1 line
                acc0 += tl.load(part_ptr + 2 * idx, mask=pm, other=0.0, cache_modifier=".cg")
                acc1 += tl.load(part_ptr + 2 * idx + 1, mask=pm, other=0.0, cache_modifier=".cg")
            tl.store(out_ptr, tl.sum(acc0, axis=0))
            tl.store(out_ptr + 1, tl.sum(acc1, axis=0))
            tl.atomic_xchg(count_ptr, 0)


def rowwise_meta(on_gpu: bool, W: int) -> dict:
    """Row block, column block, partials block of the final sum and warps of ``_mse_kernel``."""
    if on_gpu:
        return dict(BLOCK_T=16, BLOCK_W=min(1024, next_pow2(W)), BLOCK_P=1024, num_warps=8)
    return dict(BLOCK_T=16, BLOCK_W=32, BLOCK_P=16, num_warps=4)


_COUNTERS: dict = {}


def _counter(device) -> torch.Tensor:
    """The int32 count of finished programs ``_mse_kernel`` uses, one per device; 0 between
    launches (the last program resets it). Launches on one device run in stream order,
    which is how red runs them (one stream)."""
    key = (device.type, device.index)
    c = _COUNTERS.get(key)
    if c is None:
        c = _COUNTERS[key] = torch.zeros(1, dtype=torch.int32, device=device)
    return c


def _sums(s2, t2, g, scale, backend):
    """(Σ (s − t)², Σ t²) in fp32 (fp64 for fp64 inputs), writing g = scale·(s − t) when g is
    given (s − t itself when ``scale`` is None: the torch path for inputs already in the
    accumulation dtype)."""
    T, W = s2.shape
    cdt = compute_dtype(s2, t2)
    if T * W == 0:
        z = torch.zeros((), dtype=cdt, device=s2.device)
        return z, z
    if backend == "triton":
        meta = rowwise_meta(s2.is_cuda, W)
        grid = cdiv(T, meta["BLOCK_T"])
        part = alloc((grid, 2), cdt, s2.device)
        out = alloc((2,), cdt, s2.device)
        store = g is not None
        launch(_mse_kernel, (grid,), s2, t2, g if store else part, part, out, _counter(s2.device), T, W,
               s2.stride(0), t2.stride(0), g.stride(0) if store else 0, float(scale), STORE_G=store,
               FIX_BF16=store and fix_bf16(g), **meta)
        return out.unbind()
    if s2.dtype == cdt and t2.dtype == cdt and scale is None:
        # already the accumulation dtype: three passes, no temporaries; g is left unscaled
        # and the backward applies the scale with the incoming gradient (a scalar)
        e = torch.sub(s2, t2, out=g) if g is not None else s2 - t2
        ev, tv = e.reshape(-1), t2.reshape(-1)
        return torch.dot(ev, ev), torch.dot(tv, tv)
    scale = 2.0 / max(T * W, 1) if scale is None else scale
    err = torch.zeros((), dtype=cdt, device=s2.device)
    tsq = torch.zeros((), dtype=cdt, device=s2.device)
    C = max(1, min(T, max(16, (1 << 20) // max(W, 1))))  # ~4 MB fp32 temporaries a chunk
    for r0 in range(0, T, C):
        a, b = s2[r0:r0 + C].to(cdt), t2[r0:r0 + C].to(cdt)
        e = a - b
        err = err + e.square().sum()
        tsq = tsq + b.square().sum()
        if g is not None:
            g[r0:r0 + C] = e.mul_(scale)
    return err, tsq


class _CloneMSE(torch.autograd.Function):
    @staticmethod
    def forward(ctx, s, t, backend, mean):
        s2, t2 = flatten_rows(s), flatten_rows(t)
        n = max(s2.numel(), 1)
        k = 1.0 / n if mean else 1.0  # what the two sums are multiplied by
        need = ctx.needs_input_grad[0] or ctx.needs_input_grad[1]
        g = alloc(s2.shape, s.dtype, s.device) if need else None
        # Triton writes g = 2k(s − t), so the backward is one addcmul; the torch path keeps
        # s − t (one pass fewer) and scales the incoming gradient, a scalar, instead
        unscaled = backend != "triton" and s2.dtype == t2.dtype == compute_dtype(s2, t2)
        err, tsq = _sums(s2, t2, g, None if unscaled else 2.0 * k, backend)
        ctx.scale = 2.0 * k if unscaled else None
        ctx.save_for_backward(g)
        ctx.s_shape = s.shape
        ctx.set_materialize_grads(False)  # no zero tensors made for the gradients nobody sent
        if mean:
            err, tsq = err * k, tsq * k
        ctx.mark_non_differentiable(tsq)
        return s.view_as(s), err, tsq

    @staticmethod
    def backward(ctx, ds, go, _gms):
        (g,) = ctx.saved_tensors
        if g is None or go is None:
            return ds, None, None, None
        g = g.view(ctx.s_shape)
        if ctx.scale is not None:
            go = go * ctx.scale
        grad_s = g * go if ds is None else torch.addcmul(ds, g, go)
        grad_t = g * (-go) if ctx.needs_input_grad[1] else None
        return grad_s if ctx.needs_input_grad[0] else None, grad_t, None, None


def clone_mse(s: torch.Tensor, t: torch.Tensor, mean: bool = True) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(s, mean((s − t)²), mean(t²))``: use the returned s in place of the input.

    The MSE is differentiable w.r.t. s (and t, when t requires grad); the mean square (the
    clone loss's normalizer) is not. Both are fp32 (fp64 for fp64 inputs). ``mean=False``
    returns the sums Σ(s − t)² and Σt² instead: a caller that divides many terms at once
    (the student divides all of a micro-batch's in one op) saves two ops per term."""
    if s.shape[-1] != t.shape[-1] or s.numel() != t.numel():
        raise ValueError(f"s and t must have the same shape, got {tuple(s.shape)} and {tuple(t.shape)}")
    return _CloneMSE.apply(s, t, get_backend(s, t), bool(mean))


def naive_clone_mse(s, t):
    """Eager composition: fp32 copies of both operands, kept by autograd until backward."""
    return s, torch.nn.functional.mse_loss(s.float(), t.float()), t.float().square().mean()
