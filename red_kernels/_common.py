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
    rows = 1
    for n in x.shape[:-1]:
        rows *= n
    return x.reshape(rows, x.shape[-1]).contiguous()  # not -1: a zero width would be ambiguous


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
        """acc[M, N] += alpha * a[K, M]^T @ b[K, N]; one program owns one acc tile (no atomics).

        The grid's first axis runs over N: programs launched one after another share the
        same column block of a (for the LM head, a block of the logits, the large operand)
        and differ in b's, which is small, so each block of a is read from memory once and
        served from L2 to the programs beside it."""
        pid_n = tl.program_id(0).to(tl.int64)
        pid_m = tl.program_id(1).to(tl.int64)
        CDT = acc_ptr.dtype.element_ty
        rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        mm = rm < M
        mn = rn < N
        part = tl.zeros((BLOCK_M, BLOCK_N), dtype=CDT)
        for k0 in range(0, K, BLOCK_K):
            rk = (k0 + tl.arange(0, BLOCK_K)).to(tl.int64)  # rk * stride_ak passes 2**31 at long chunks
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


#: When a list, every kernel launched through :func:`launch` appends its signature here
#: (kernel name, pointer dtypes, scalar kinds, constexprs). The ahead-of-time compile check
#: (benchmarks/aot_compile.py) compares these records with what it compiles for the GPU.
RECORD: list | None = None

_DTYPE_NAMES = {torch.float32: "fp32", torch.float64: "fp64", torch.bfloat16: "bf16", torch.float16: "fp16",
                torch.int64: "i64", torch.int32: "i32", torch.int16: "i16", torch.int8: "i8",
                torch.uint8: "u8", torch.bool: "i1"}


def dtype_name(dtype: torch.dtype) -> str:
    """Triton's short name of a torch dtype ("bf16", "fp32", ...)."""
    return _DTYPE_NAMES[dtype]


def launch_signature(kernel, args: tuple, meta: dict) -> dict:
    """The compile-relevant description of one launch: what triton specializes a kernel on.

    Tensors become ``"*<dtype>"``, Python ints ``"i32"``/``"i64"``, floats ``"fp32"``;
    keyword arguments that are ``tl.constexpr`` parameters are returned under "constexprs".
    """
    fn = getattr(kernel, "fn", kernel)
    name = getattr(fn, "__name__", str(fn))
    names = list(getattr(kernel, "arg_names", None) or fn.__code__.co_varnames[:fn.__code__.co_argcount])
    sig = {}
    for n, a in zip(names, args):
        if isinstance(a, torch.Tensor):
            sig[n] = "*" + dtype_name(a.dtype)
        elif isinstance(a, bool):
            sig[n] = "i1"
        elif isinstance(a, int):
            sig[n] = "i32" if -2 ** 31 <= a < 2 ** 31 else "i64"
        elif isinstance(a, float):
            sig[n] = "fp32"
        else:
            sig[n] = type(a).__name__
    constexprs = {k: v for k, v in meta.items() if k not in ("num_warps", "num_stages")}
    return {"kernel": name, "signature": sig, "constexprs": constexprs,
            "num_warps": meta.get("num_warps"), "num_stages": meta.get("num_stages")}


def launch(kernel, grid, *args, **meta) -> None:
    """``kernel[grid](*args, **meta)``, recorded in :data:`RECORD` when that is a list.

    Every kernel of this package is launched through here, so one switch lists exactly the
    specializations a run compiles (dtypes and constexprs), for the ahead-of-time check.
    """
    if RECORD is not None:
        RECORD.append(launch_signature(kernel, args, meta))
    first = next((a for a in args if isinstance(a, torch.Tensor)), None)
    if first is not None and first.is_cuda:
        # Triton launches on the current device: pointers of cuda:1 launched from a
        # process whose current device is cuda:0 would run on the wrong GPU
        with torch.cuda.device(first.device):
            kernel[grid](*args, **meta)
    else:
        kernel[grid](*args, **meta)


def check_dot_dtypes(op: str, **operands: torch.Tensor) -> None:
    """Raise TypeError unless every GEMM operand of ``op`` has the same dtype.

    ``tl.dot`` on the GPU refuses mixed operand dtypes at compile time ("Both operands must
    be same dtype"), while the CPU interpreter upcasts both and runs. Checking at every
    launch makes CPU tests fail exactly where a GPU would. Cast the fp32 master weight to
    the compute dtype before the call (see the precision policy in the README).
    """
    dts = {n: t.dtype for n, t in operands.items()}
    if len(set(dts.values())) > 1:
        desc = ", ".join(f"{n} {str(d).replace('torch.', '')}" for n, d in dts.items())
        raise TypeError(f"{op}: GEMM operands must share one dtype, got {desc}; cast them to the "
                        "compute dtype first (tl.dot on the GPU rejects mixed dtypes)")


def dot_flags(*tensors: torch.Tensor) -> tuple[bool, bool]:
    """(UPCAST, IEEE) constexprs for tl.dot.

    UPCAST: the interpreter multiplies bf16 bits as integers, so upcast there; on GPU keep
    bf16/fp16 operands for the tensor cores. IEEE: fp32/fp64 inputs get exact products
    instead of TF32 (tests compare fp32 against fp64 at 1e-5).
    """
    low = any(t.dtype in (torch.bfloat16, torch.float16) for t in tensors)
    return (INTERPRET or not low), (not low)


def acc_tn_meta(on_gpu: bool) -> dict:
    """Tiles and warps of ``_acc_tn_kernel``: GPU tiles, or small ones for the interpreter."""
    if on_gpu:
        return dict(BLOCK_M=128, BLOCK_N=128, BLOCK_K=32, num_warps=8)
    return dict(BLOCK_M=64, BLOCK_N=32, BLOCK_K=16, num_warps=4)


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
    check_dot_dtypes("acc_tn_", a=a, b=b)
    if backend == "triton":
        assert acc.is_contiguous(), "acc_tn_ accumulates into a contiguous buffer"
        if b.stride(1) != 1:  # the kernel reads b's rows at unit stride (e.g. a transposed h_s)
            b = b.contiguous()
        upcast, ieee = dot_flags(a, b)
        meta = acc_tn_meta(a.is_cuda)
        grid = (cdiv(N, meta["BLOCK_N"]), cdiv(M, meta["BLOCK_M"]))
        launch(_acc_tn_kernel, grid, acc, a, b, M, N, K, a.stride(1), a.stride(0), b.stride(0), b.stride(1),
               acc.stride(0), float(alpha), UPCAST=upcast, IEEE=ieee, **meta)
        return acc
    if a.dtype == acc.dtype and b.dtype == acc.dtype:
        return acc.addmm_(a.t(), b, alpha=alpha)
    rows = max(1, min(M, (K * M) // max(N, 1)))  # temp [rows, N] ~ size of a
    for m0 in range(0, M, rows):
        acc[m0:m0 + rows].add_(torch.mm(a[:, m0:m0 + rows].t(), b).to(acc.dtype), alpha=alpha)
    return acc
