"""Peak CPU memory of a torch callable, for benchmarks on machines without a GPU.

The measurement lives in the product (``red.commands.bench``, used by ``red bench`` on a CPU); the
benchmarks import it from there so that both report the same thing: glibc's in-use byte
count (``mallinfo2``) sampled after every aten op. Linux/glibc only.
"""
from red.commands.bench import CPU_MEMORY_AVAILABLE as AVAILABLE
from red.commands.bench import cpu_peak_extra_bytes as peak_extra_bytes
from red.commands.bench import in_use_bytes

__all__ = ["AVAILABLE", "peak_extra_bytes", "in_use_bytes"]
