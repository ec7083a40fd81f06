"""Backend dispatch for red_kernels.

Every functional API asks :func:`get_backend` which implementation to run, so that one
switch (``RED_KERNELS`` env var, :func:`set_backend`, :func:`use_backend`) moves the whole
engine between the Triton kernels and the plain-PyTorch paths, e.g. to bisect a
numerical difference or to run the kernels on CPU under ``TRITON_INTERPRET=1``.
"""
from __future__ import annotations

import contextlib
import os
import threading

import torch

VALID_BACKENDS = ("auto", "triton", "torch")

try:  # triton is optional (e.g. macOS / Windows installs)
    import triton
    import triton.language as tl  # noqa: F401

    HAS_TRITON = True
except Exception:  # pragma: no cover - depends on the install
    triton = None
    HAS_TRITON = False


def _probe_interpreter() -> bool:
    """True when ``@triton.jit`` builds interpreter functions (TRITON_INTERPRET=1 at import)."""
    if not HAS_TRITON:
        return False

    @triton.jit
    def _probe():
        pass

    return type(_probe).__name__ == "InterpretedFunction"


#: Whether the kernels in this package were decorated in interpreter mode. Fixed at import,
#: because triton reads TRITON_INTERPRET when ``@triton.jit`` runs.
INTERPRET = _probe_interpreter()

_state = threading.local()
_global_forced: str | None = None


def _check_name(name: str) -> str:
    if not isinstance(name, str) or name.lower() not in VALID_BACKENDS:
        raise ValueError(f"unknown red_kernels backend {name!r}; valid: {', '.join(VALID_BACKENDS)}")
    return name.lower()


def set_backend(name: str) -> None:
    """Force a backend for the whole process ("auto" restores the automatic choice)."""
    global _global_forced
    name = _check_name(name)
    _global_forced = None if name == "auto" else name


@contextlib.contextmanager
def use_backend(name: str):
    """Force a backend inside a ``with`` block (thread-local, nests, restores on exit)."""
    name = _check_name(name)
    stack = getattr(_state, "stack", None)
    if stack is None:
        stack = _state.stack = []
    stack.append(name)
    try:
        yield
    finally:
        stack.pop()


def forced_backend() -> str:
    """The backend requested by context manager > set_backend > RED_KERNELS, or "auto"."""
    stack = getattr(_state, "stack", None)
    if stack:
        return stack[-1]
    if _global_forced is not None:
        return _global_forced
    return _check_name(os.environ.get("RED_KERNELS", "auto") or "auto")


def triton_runnable(*tensors: torch.Tensor) -> tuple[bool, str]:
    """Whether the Triton kernels can run on these tensors, and why not."""
    if not HAS_TRITON:
        return False, "triton is not installed"
    ts = [t for t in tensors if isinstance(t, torch.Tensor)]
    on_cpu = any(t.device.type == "cpu" for t in ts)
    if on_cpu and not INTERPRET:
        return False, ("CPU tensors need the Triton interpreter: set TRITON_INTERPRET=1 "
                       "before red_kernels is imported")
    if not on_cpu and INTERPRET:
        return False, "red_kernels was imported with TRITON_INTERPRET=1, which cannot run GPU tensors"
    if any(t.device.type not in ("cpu", "cuda") for t in ts):
        return False, "triton kernels need CUDA tensors"
    return True, ""


def get_backend(*tensors: torch.Tensor) -> str:
    """"triton" or "torch" for an op on ``tensors`` (forced choice first, else CUDA+triton)."""
    forced = forced_backend()
    if forced == "torch":
        return "torch"
    if forced == "triton":
        ok, why = triton_runnable(*tensors)
        if not ok:
            raise RuntimeError(f"red_kernels backend 'triton' was forced but cannot run: {why}")
        return "triton"
    ts = [t for t in tensors if isinstance(t, torch.Tensor)]
    if HAS_TRITON and not INTERPRET and ts and all(t.is_cuda for t in ts):
        return "triton"
    return "torch"
