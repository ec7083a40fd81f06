"""Shared test set-up.

Triton reads TRITON_INTERPRET when ``@triton.jit`` decorates a kernel, so the variable is
set here, before any test module imports ``red_kernels``, and only when no GPU is present.
"""
import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))
