"""Channel gathers for an exact-selection projection P = I[:, index].

While P is still a channel selection (RED's init), W_t·P = W_t[:, index] and
Pᵀ·W_t = W_t[index, :]: gathers instead of GEMMs. The gathers are Triton kernels; the
GEMM in :func:`select_linear` stays cuBLAS (gather + cuBLAS), because fusing a gather along
the contiguous axis into a GEMM can win at most a few percent (decide by measurement on a
GPU before writing one). The scatters in the backward (gradients land in the selected
columns, zeros elsewhere) use ``index_copy_``: a write-only pass with nothing to fuse.
"""
from __future__ import annotations

import torch

from ._backend import HAS_TRITON, get_backend
from ._common import alloc, cdiv, flatten_rows, launch

if HAS_TRITON:
    import triton
    import triton.language as tl

    @triton.jit
    def _gather_cols_kernel(src_ptr, idx_ptr, out_ptr, R, d, stride_src, stride_out,
                            BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr):
        """out[r, j] = src[r, idx[j]]."""
        rows = tl.program_id(0).to(tl.int64) * BLOCK_R + tl.arange(0, BLOCK_R)
        cols = tl.program_id(1).to(tl.int64) * BLOCK_C + tl.arange(0, BLOCK_C)
        rm = rows < R
        cm = cols < d
        src_cols = tl.load(idx_ptr + cols, mask=cm, other=0).to(tl.int64)
        m = rm[:, None] & cm[None, :]
        v = tl.load(src_ptr + rows[:, None] * stride_src + src_cols[None, :], mask=m)
        tl.store(out_ptr + rows[:, None] * stride_out + cols[None, :], v, mask=m)

    @triton.jit
    def _gather_rows_kernel(src_ptr, idx_ptr, out_ptr, n, C, stride_src, stride_out,
                            BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr):
        """out[i, c] = src[idx[i], c]."""
        rows = tl.program_id(0).to(tl.int64) * BLOCK_R + tl.arange(0, BLOCK_R)
        cols = tl.program_id(1).to(tl.int64) * BLOCK_C + tl.arange(0, BLOCK_C)
        rm = rows < n
        cm = cols < C
        src_rows = tl.load(idx_ptr + rows, mask=rm, other=0).to(tl.int64)
        m = rm[:, None] & cm[None, :]
        v = tl.load(src_ptr + src_rows[:, None] * stride_src + cols[None, :], mask=m)
        tl.store(out_ptr + rows[:, None] * stride_out + cols[None, :], v, mask=m)


def gather_meta(on_gpu: bool) -> dict:
    """Row and column blocks of the gather kernels."""
    return dict(BLOCK_R=32, BLOCK_C=128) if on_gpu else dict(BLOCK_R=16, BLOCK_C=32)


def _gather_cols_triton(w: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    w2 = w if w.stride(-1) == 1 else w.contiguous()
    R, d = w2.shape[0], index.numel()
    out = alloc((R, d), w.dtype, w.device)
    if R and d:
        meta = gather_meta(w.is_cuda)
        launch(_gather_cols_kernel, (cdiv(R, meta["BLOCK_R"]), cdiv(d, meta["BLOCK_C"])),
               w2, index.contiguous(), out, R, d, w2.stride(0), out.stride(0), **meta)
    return out


def _gather_rows_triton(w: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    w2 = w if w.stride(-1) == 1 else w.contiguous()
    n, C = index.numel(), w2.shape[1]
    out = alloc((n, C), w.dtype, w.device)
    if n and C:
        meta = gather_meta(w.is_cuda)
        launch(_gather_rows_kernel, (cdiv(n, meta["BLOCK_R"]), cdiv(C, meta["BLOCK_C"])),
               w2, index.contiguous(), out, n, C, w2.stride(0), out.stride(0), **meta)
    return out


def _gather_cols(w, index, backend):
    if backend == "triton":
        return _gather_cols_triton(w, index)
    return w.index_select(1, index)


def _gather_rows(w, index, backend):
    if backend == "triton":
        return _gather_rows_triton(w, index)
    return w.index_select(0, index)


def _scatter_cols(g: torch.Tensor, index: torch.Tensor, width: int) -> torch.Tensor:
    out = g.new_zeros(g.shape[0], width)
    return out.index_copy_(1, index, g)


class _GatherColumns(torch.autograd.Function):
    @staticmethod
    def forward(ctx, w, index, backend):
        ctx.save_for_backward(index)
        ctx.width = w.shape[1]
        return _gather_cols(w, index, backend)

    @staticmethod
    def backward(ctx, g):
        (index,) = ctx.saved_tensors
        return _scatter_cols(g, index, ctx.width), None, None


class _GatherRows(torch.autograd.Function):
    @staticmethod
    def forward(ctx, w, index, backend):
        ctx.save_for_backward(index)
        ctx.n = w.shape[0]
        return _gather_rows(w, index, backend)

    @staticmethod
    def backward(ctx, g):
        (index,) = ctx.saved_tensors
        out = g.new_zeros(ctx.n, g.shape[1])
        return out.index_copy_(0, index, g), None, None


def _check_index(index: torch.Tensor, size: int):
    if index.dtype != torch.int64 or index.dim() != 1:
        raise ValueError("index must be a 1-D int64 tensor")
    if index.numel() and (int(index.min()) < 0 or int(index.max()) >= size):
        raise IndexError(f"index out of range for size {size}")


def gather_columns(w: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """w[:, index] (= W·P for P = I[:, index]); differentiable w.r.t. w."""
    _check_index(index, w.shape[1])
    return _GatherColumns.apply(w, index, get_backend(w, index))


def gather_rows(w: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """w[index, :] (= Pᵀ·W for P = I[:, index]); differentiable w.r.t. w."""
    _check_index(index, w.shape[0])
    return _GatherRows.apply(w, index, get_backend(w, index))


def naive_gather_columns(w, index):
    return w[:, index]


def naive_gather_rows(w, index):
    return w[index, :]


class _SelectLinear(torch.autograd.Function):
    """y = x[..., idx] @ w[:, idx]ᵀ + b, saving only x and w (the gathers are re-made)."""

    @staticmethod
    def forward(ctx, x, w, index, bias, backend):
        x2 = flatten_rows(x)
        xs = _gather_cols(x2, index, backend)
        ws = _gather_cols(w, index, backend)
        y = xs @ ws.t()
        if bias is not None:
            y = y + bias
        ctx.save_for_backward(x2, w, index)
        ctx.backend = backend
        ctx.x_shape = x.shape
        ctx.has_bias = bias is not None
        return y.reshape(*x.shape[:-1], w.shape[0])

    @staticmethod
    def backward(ctx, dy):
        x2, w, index = ctx.saved_tensors
        dy2 = dy.reshape(-1, dy.shape[-1])
        dx = dw = db = None
        if ctx.needs_input_grad[0]:
            ws = _gather_cols(w, index, ctx.backend)
            dx = _scatter_cols(dy2.to(ws.dtype) @ ws, index, x2.shape[1]).reshape(ctx.x_shape)
        if ctx.needs_input_grad[1]:
            xs = _gather_cols(x2, index, ctx.backend)
            dw = _scatter_cols(dy2.t().to(xs.dtype) @ xs, index, w.shape[1])
        if ctx.has_bias and ctx.needs_input_grad[3]:
            db = dy2.sum(0)
        return dx, dw, None, db, None


def select_linear(x: torch.Tensor, w: torch.Tensor, index: torch.Tensor,
                  bias: torch.Tensor | None = None) -> torch.Tensor:
    """x[..., index] @ w[:, index].T (+ bias): a linear layer on the selected channels.

    Backward: dx lands in columns ``index`` of x (zeros elsewhere), and dw in columns
    ``index`` of w, when they require grad.
    """
    if x.shape[-1] != w.shape[1]:
        raise ValueError(f"x has {x.shape[-1]} features, w expects {w.shape[1]}")
    _check_index(index, w.shape[1])
    return _SelectLinear.apply(x, w, index, bias, get_backend(x, w))


def naive_select_linear(x, w, index, bias=None):
    y = x[..., index] @ w[:, index].t()
    return y if bias is None else y + bias
