"""Helpers shared by the ops: launch-size choices and one fp32-accumulating GEMM kernel.

The GEMM kernel exists for a single reason: weight gradients (dW of the LM head, dP of the
projected MSE) are summed over token chunks, and that running sum must be fp32 and
deterministic. cuBLAS cannot add a bf16 x bf16 product into an fp32 buffer in place
(``out_dtype`` is CUDA-only and allocates a new [M, N] result), so without this kernel
every chunk would allocate an [M, N] temporary (400 MB for a 128k x 1536 head).
"""
from __future__ import annotations

import functools

import torch

from ._backend import HAS_TRITON, INTERPRET

if HAS_TRITON:
    import triton
    import triton.language as tl


#: Tests set this to True: every buffer a kernel is meant to fill completely is then
#: created full of NaN, so an element the kernel forgets to write fails the comparison.
POISON = False


def alloc(shape, dtype: torch.dtype, device) -> torch.Tensor:
    """torch.empty for kernel outputs, NaN-filled when POISON is set (tests)."""
    t = torch.empty(shape, dtype=dtype, device=device)
    if POISON and t.is_floating_point():
        t.fill_(float("nan"))
    return t


def next_pow2(n: int) -> int:
    return 1 if n <= 1 else 1 << (int(n) - 1).bit_length()


def cdiv(a: int, b: int) -> int:
    return (a + b - 1) // b


@functools.lru_cache(maxsize=8)
def num_sms(device_index: int) -> int:
    return torch.cuda.get_device_properties(device_index).multi_processor_count


def max_programs(t: torch.Tensor, per_sm: int = 2, interp: int = 4) -> int:
    """Cap for persistent grids: a few programs per SM on GPU, few under the interpreter."""
    if t.device.type != "cuda":
        return interp
    return num_sms(t.device.index or 0) * per_sm


def compute_dtype(*tensors: torch.Tensor) -> torch.dtype:
    """fp64 when any input is fp64 (gradcheck), else fp32: the dtype of all in-kernel math."""
    return torch.float64 if any(t.dtype == torch.float64 for t in tensors) else torch.float32


def flatten_rows(x: torch.Tensor) -> torch.Tensor:
    """[..., D] -> contiguous [T, D] without copying when already contiguous."""
    return x.reshape(-1, x.shape[-1]).contiguous()


def fix_bf16(t: torch.Tensor) -> bool:
    """Whether kernels writing ``t`` must round fp32 -> bf16 by hand (interpreter only).

    The interpreter's fp32 -> bf16 cast is not round-to-nearest-even (errors up to 2 ulp
    were measured here); the GPU's is. Rounding the fp32 bits first makes the cast exact.
    """
    return INTERPRET and t.dtype == torch.bfloat16


if HAS_TRITON:

    @triton.jit
    def rne_bf16(x, ENABLE: tl.constexpr):
        """Round fp32 x to the nearest bf16 value (ties to even), still as fp32."""
        if ENABLE:
            b = x.to(tl.uint32, bitcast=True)
            b = (b + 0x7FFF + ((b >> 16) & 1)) & 0xFFFF0000
            x = b.to(tl.float32, bitcast=True)
        return x

    @triton.jit
    def _acc_tn_kernel(
        acc_ptr, a_ptr, b_ptr,
        M, N, K,
        stride_am, stride_ak, stride_bk, stride_bn, stride_cm,
        alpha,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
        UPCAST: tl.constexpr, IEEE: tl.constexpr,
    ):
        """acc[M, N] += alpha * a[K, M]^T @ b[K, N]; one program owns one acc tile (no atomics)."""
        pid_m = tl.program_id(0).to(tl.int64)
        pid_n = tl.program_id(1).to(tl.int64)
        CDT = acc_ptr.dtype.element_ty
        rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        mm = rm < M
        mn = rn < N
        part = tl.zeros((BLOCK_M, BLOCK_N), dtype=CDT)
        for k0 in range(0, K, BLOCK_K):
            rk = k0 + tl.arange(0, BLOCK_K)
            mk = rk < K
            a = tl.load(a_ptr + rk[None, :] * stride_ak + rm[:, None] * stride_am,
                        mask=mm[:, None] & mk[None, :], other=0.0)
            b = tl.load(b_ptr + rk[:, None] * stride_bk + rn[None, :] * stride_bn,
                        mask=mk[:, None] & mn[None, :], other=0.0)
            if UPCAST:
                a = a.to(CDT)
                b = b.to(CDT)
            if IEEE:
                part = tl.dot(a, b, part, input_precision="ieee")
            else:
                part = tl.dot(a, b, part)
        c_ptrs = acc_ptr + rm[:, None] * stride_cm + rn[None, :]
        cmask = mm[:, None] & mn[None, :]
        c = tl.load(c_ptrs, mask=cmask, other=0.0)
        tl.store(c_ptrs, c + alpha * part, mask=cmask)


def dot_flags(*tensors: torch.Tensor) -> tuple[bool, bool]:
    """(UPCAST, IEEE) constexprs for tl.dot.

    UPCAST: the interpreter multiplies bf16 bits as integers, so upcast there; on GPU keep
    bf16/fp16 operands for the tensor cores. IEEE: fp32/fp64 inputs get exact products
    instead of TF32 (tests compare fp32 against fp64 at 1e-5).
    """
    low = any(t.dtype in (torch.bfloat16, torch.float16) for t in tensors)
    return (INTERPRET or not low), (not low)


def acc_tn_(acc: torch.Tensor, a: torch.Tensor, b: torch.Tensor, alpha: float = 1.0,
            backend: str = "triton") -> torch.Tensor:
    """In place ``acc += alpha * a.T @ b`` with acc fp32/fp64 and a, b in any float dtype.

    Triton: one deterministic kernel. Torch: slices acc's rows so the low-precision product
    temporary stays as small as the chunk of ``a`` instead of acc's full size.
    """
    K, M = a.shape
    N = b.shape[1]
    if K == 0 or M == 0 or N == 0:
        return acc
    if backend == "triton":
        assert acc.is_contiguous() and b.stride(1) == 1
        upcast, ieee = dot_flags(a, b)
        if a.device.type == "cuda":
            bm, bn, bk, nw = 128, 128, 32, 8
        else:
            bm, bn, bk, nw = 64, 32, 16, 4
        grid = (cdiv(M, bm), cdiv(N, bn))
        _acc_tn_kernel[grid](acc, a, b, M, N, K, a.stride(1), a.stride(0), b.stride(0), b.stride(1),
                             acc.stride(0), float(alpha), BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk,
                             UPCAST=upcast, IEEE=ieee, num_warps=nw)
        return acc
    if a.dtype == acc.dtype and b.dtype == acc.dtype:
        return acc.addmm_(a.t(), b, alpha=alpha)
    rows = max(1, min(M, (K * M) // max(N, 1)))  # temp [rows, N] ~ size of a
    for m0 in range(0, M, rows):
        acc[m0:m0 + rows].add_(torch.mm(a[:, m0:m0 + rows].t(), b).to(acc.dtype), alpha=alpha)
    return acc
