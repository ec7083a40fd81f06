"""Peak CPU memory of a torch callable, for benchmarks on machines without a GPU.

tracemalloc does not see torch's CPU allocator, so this reads glibc's in-use byte count
(``mallinfo2``: small blocks + mmapped blocks) after every aten op through a
TorchDispatchMode. The peak is therefore sampled at op boundaries, which is where
tensors are born; scratch memory inside a single op is not seen. Linux/glibc only.
"""
from __future__ import annotations

import ctypes

import torch
from torch.utils._python_dispatch import TorchDispatchMode


class _MallInfo2(ctypes.Structure):
    _fields_ = [(n, ctypes.c_size_t) for n in (
        "arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks",
        "fordblks", "keepcost")]


try:
    _libc = ctypes.CDLL("libc.so.6")
    _libc.mallinfo2.restype = _MallInfo2
    AVAILABLE = True
except (OSError, AttributeError):  # pragma: no cover - non-glibc
    AVAILABLE = False


def in_use_bytes() -> int:
    m = _libc.mallinfo2()
    return int(m.uordblks + m.hblkhd)


class _PeakMode(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.peak = in_use_bytes()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        cur = in_use_bytes()
        if cur > self.peak:
            self.peak = cur
        return out


def peak_extra_bytes(fn) -> int:
    """Peak bytes allocated above the level at entry while ``fn()`` runs (fwd + bwd)."""
    base = in_use_bytes()  # no gc.collect(): 0.25 s a call here; refcounting frees tensors
    mode = _PeakMode()
    with mode:
        fn()
    return max(0, mode.peak - base)
