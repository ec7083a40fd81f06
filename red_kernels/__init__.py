"""red_kernels: Triton kernels for RED distillation, each beside a plain-PyTorch reference."""
