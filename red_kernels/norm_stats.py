"""RMSNorm that also returns per-channel activation statistics, from one read of x.

RED's calibration scores every residual channel by statistics of the RMSNorm inputs and
outputs. Computing them with separate torch reductions reads the activations 4-5 more
times; here one pass over x yields y and the four channel sums. The op is memory-bound, so
the goal on GPU is copy bandwidth. Forward only: calibration runs under ``no_grad``.

Determinism: each program writes its own partial [4, D] sums and they are reduced in a
fixed order afterwards (no atomics), so repeated calls give bit-identical stats.
"""
from __future__ import annotations

import torch

from ._backend import HAS_TRITON, get_backend
from ._common import alloc, fix_bf16, cdiv, compute_dtype, flatten_rows, launch, max_programs, next_pow2

if HAS_TRITON:
    import triton
    import triton.language as tl

    from ._common import rne_bf16

    @triton.jit
    def _rmsnorm_stats_kernel(
        x_ptr, w_ptr, y_ptr, part_ptr,
        T, D, stride_x, stride_y, eps,
        BLOCK_T: tl.constexpr, BLOCK_D: tl.constexpr, FIX_BF16: tl.constexpr,
    ):
        """Persistent over row blocks; program p writes partial stats part[p, 4, D]."""
        pid = tl.program_id(0).to(tl.int64)
        nprog = tl.num_programs(0)
        CDT = part_ptr.dtype.element_ty
        cols = tl.arange(0, BLOCK_D)
        cmask = cols < D
        w = tl.load(w_ptr + cols, mask=cmask, other=0.0).to(CDT)
        s_ax = tl.zeros((BLOCK_D,), dtype=CDT)
        s_x2 = tl.zeros((BLOCK_D,), dtype=CDT)
        s_ay = tl.zeros((BLOCK_D,), dtype=CDT)
        s_y2 = tl.zeros((BLOCK_D,), dtype=CDT)
        n_blocks = tl.cdiv(T, BLOCK_T)
        for blk in range(pid, n_blocks, nprog):
            rows = blk * BLOCK_T + tl.arange(0, BLOCK_T)  # blk is int64: range starts at int64 pid
            rmask = rows < T
            m = rmask[:, None] & cmask[None, :]
            x = tl.load(x_ptr + rows[:, None] * stride_x + cols[None, :], mask=m, other=0.0)
            x = x.to(CDT)  # upcast right after the load (bf16 math is wrong in the interpreter)
            rstd = 1.0 / tl.sqrt(tl.sum(x * x, axis=1) / D + eps)
            normed = rne_bf16(x * rstd[:, None], FIX_BF16).to(y_ptr.dtype.element_ty).to(CDT)  # HF: .to(x.dtype)
            y = rne_bf16(w[None, :] * normed, FIX_BF16).to(y_ptr.dtype.element_ty)
            tl.store(y_ptr + rows[:, None] * stride_y + cols[None, :], y, mask=m)
            yf = y.to(CDT)  # stats of y as returned (after rounding)
            s_ax += tl.sum(tl.abs(x), axis=0)
            s_x2 += tl.sum(x * x, axis=0)
            s_ay += tl.sum(tl.abs(yf), axis=0)
            s_y2 += tl.sum(yf * yf, axis=0)
        base = part_ptr + pid * 4 * D + cols
        tl.store(base, s_ax, mask=cmask)
        tl.store(base + D, s_x2, mask=cmask)
        tl.store(base + 2 * D, s_ay, mask=cmask)
        tl.store(base + 3 * D, s_y2, mask=cmask)


def naive_rmsnorm_with_stats(x: torch.Tensor, weight: torch.Tensor, eps: float):
    """Reference: HF LlamaRMSNorm then four torch reductions (reads x and y again)."""
    cdt = compute_dtype(x)
    xf = x.to(cdt)
    normed = (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)).to(x.dtype)
    y = (weight * normed).to(x.dtype)
    x2 = xf.reshape(-1, x.shape[-1])
    y2 = y.to(cdt).reshape(-1, x.shape[-1])
    stats = torch.stack([x2.abs().sum(0), x2.pow(2).sum(0), y2.abs().sum(0), y2.pow(2).sum(0)])
    return y, stats.float()


def norm_stats_meta(on_gpu: bool, D: int) -> dict:
    """Row block (about 32 fp32 values a thread on GPU), channel block and warps."""
    block_d = next_pow2(D)
    block_t = max(1, min(64, 8192 // block_d)) if on_gpu else 4
    return dict(BLOCK_T=block_t, BLOCK_D=block_d, num_warps=8 if block_d >= 2048 else 4)


def _rmsnorm_with_stats_triton(x, weight, eps, block_t=None, programs=None):
    D = x.shape[-1]
    x2 = flatten_rows(x)
    T = x2.shape[0]
    y = alloc(x2.shape, x2.dtype, x2.device)
    if T == 0:
        return y.reshape(x.shape), torch.zeros(4, D, dtype=torch.float32, device=x.device)
    meta = norm_stats_meta(x.is_cuda, D)
    if block_t is not None:
        meta["BLOCK_T"] = block_t
    n_blocks = cdiv(T, meta["BLOCK_T"])
    grid = min(n_blocks, programs or max_programs(x, per_sm=2, interp=4))
    part = alloc((grid, 4, D), compute_dtype(x), x.device)
    launch(_rmsnorm_stats_kernel, (grid,),
           x2, weight.contiguous(), y, part, T, D, x2.stride(0), y.stride(0), float(eps),
           FIX_BF16=fix_bf16(y), **meta)
    return y.reshape(x.shape), part.sum(0).float()


@torch.no_grad()
def rmsnorm_with_stats(x: torch.Tensor, weight: torch.Tensor, eps: float):
    """y = LlamaRMSNorm(x) and stats [4, D] = (Σ|x|, Σx², Σ|y|, Σy²) over all rows, fp32."""
    if x.shape[-1] != weight.shape[-1]:
        raise ValueError(f"weight has {weight.shape[-1]} channels, x has {x.shape[-1]}")
    if get_backend(x, weight) == "triton" and x.shape[-1] <= 65536:
        return _rmsnorm_with_stats_triton(x, weight, eps)
    return naive_rmsnorm_with_stats(x, weight, eps)


class RMSNormWithStats(torch.nn.Module):
    """RMSNorm whose forward also adds the channel stats of every batch into ``self.stats``."""

    def __init__(self, weight: torch.Tensor, eps: float = 1e-6):
        super().__init__()
        self.weight = torch.nn.Parameter(weight.detach().clone(), requires_grad=False)
        self.eps = eps
        self.register_buffer("stats", torch.zeros(4, weight.shape[-1], device=weight.device))
        self.register_buffer("rows", torch.zeros((), dtype=torch.int64, device=weight.device))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y, stats = rmsnorm_with_stats(x, self.weight, self.eps)
        self.stats += stats
        self.rows += x.numel() // x.shape[-1]
        return y
