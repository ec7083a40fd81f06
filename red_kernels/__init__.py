"""red_kernels: Triton kernels for RED distillation, each beside a plain-PyTorch reference.

Every functional API dispatches through :func:`get_backend` ("triton" on CUDA tensors,
"torch" otherwise; force with ``RED_KERNELS=triton|torch``, :func:`set_backend` or
:func:`use_backend`). The ``naive_*`` functions are the eager compositions the kernels are
tested and benchmarked against.
"""
from ._backend import VALID_BACKENDS, get_backend, set_backend, use_backend
from .channel_gather import (
    gather_columns, gather_rows, naive_gather_columns, naive_gather_rows, naive_select_linear,
    select_linear,
)
from .projected_mse import (
    mse, mse_with_target_ms, naive_mse, naive_projected_mse, naive_projected_mse_student_space, naive_selected_mse,
    naive_selected_mse_student_space, projected_mse, projected_mse_student_space, selected_mse,
    selected_mse_student_space,
)
from .projected_linear import (
    ProjectedLinear, naive_projected_linear, naive_projected_linear_group, projected_linear,
    projected_linear_group,
)
from .fused_linear_kl import FusedLinearKL, fused_linear_kl, naive_fused_linear_kl
from .norm_stats import RMSNormWithStats, naive_rmsnorm_with_stats, rmsnorm_with_stats

__all__ = [
    "VALID_BACKENDS", "get_backend", "set_backend", "use_backend",
    "gather_columns", "gather_rows", "select_linear",
    "naive_gather_columns", "naive_gather_rows", "naive_select_linear",
    "mse", "mse_with_target_ms", "naive_mse",
    "projected_mse", "projected_mse_student_space", "selected_mse", "selected_mse_student_space",
    "naive_projected_mse", "naive_projected_mse_student_space", "naive_selected_mse",
    "naive_selected_mse_student_space",
    "projected_linear", "projected_linear_group", "ProjectedLinear",
    "naive_projected_linear", "naive_projected_linear_group",
    "fused_linear_kl", "naive_fused_linear_kl", "FusedLinearKL",
    "rmsnorm_with_stats", "naive_rmsnorm_with_stats", "RMSNormWithStats",
]
