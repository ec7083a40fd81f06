"""red_kernels: Triton kernels for RED distillation, each beside a plain-PyTorch reference.

Every functional API dispatches through :func:`get_backend` ("triton" on CUDA tensors,
"torch" otherwise; force with ``RED_KERNELS=triton|torch``, :func:`set_backend` or
:func:`use_backend`). The ``naive_*`` functions are the eager compositions the kernels are
tested and benchmarked against.

Which command runs which op: ``fused_linear_kl`` and ``clone_mse`` run in every step of
`red distill` (and its validation); ``rmsnorm_with_stats`` runs in calibration (`red
distill`, `red calibrate`).
"""
from ._backend import VALID_BACKENDS, get_backend, set_backend, use_backend
from .clone_mse import clone_mse, naive_clone_mse
from .fused_linear_kl import FusedLinearKL, fused_linear_kl, naive_fused_linear_kl
from .norm_stats import RMSNormWithStats, naive_rmsnorm_with_stats, rmsnorm_with_stats

__all__ = [
    "VALID_BACKENDS", "get_backend", "set_backend", "use_backend",
    "clone_mse", "naive_clone_mse",
    "fused_linear_kl", "naive_fused_linear_kl", "FusedLinearKL",
    "rmsnorm_with_stats", "naive_rmsnorm_with_stats", "RMSNormWithStats",
]
