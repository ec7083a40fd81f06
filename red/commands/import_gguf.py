"""`red import`: a GGUF file (Llama, Qwen2, Qwen3) becomes a teacher folder.

The conversion is ``red.model.gguf``'s; the verb checks its inputs before torch is
imported, writes the folder, and says what it wrote."""
from __future__ import annotations

from pathlib import Path

from red.model.gguf import check_import_inputs, write_teacher_folder


def import_command(gguf_file: str | Path, out: str | Path, dtype: str = "bfloat16", overwrite: bool = False,
                   progress: bool = True) -> str:
    """What `red import` does; returns the line it prints. The checks run once, first:
    every user error answers in one line before torch is imported or anything written."""
    summary = check_import_inputs(gguf_file, out, dtype, overwrite)
    folder = write_teacher_folder(summary, out, dtype, progress=progress)
    kinds = sorted({q for _, q in summary.tensors})
    return (f"teacher folder written to {folder} ({summary.architecture}, {len(summary.tensors)} tensors of "
            f"{'/'.join(kinds)} dequantized to {dtype})")
