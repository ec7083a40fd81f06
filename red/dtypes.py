"""The one table of dtype names: the float dtypes red reads and writes, by the names
config.json and the CLI use ("bfloat16"), by ``--precision``'s ("bf16"), and by the
names safetensors headers use ("BF16")."""
from __future__ import annotations

import torch

#: config.json / CLI name -> torch dtype (what a teacher, an export or a plan can be in)
BY_NAME = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
#: torch dtype -> its config.json name
NAME_OF = {v: k for k, v in BY_NAME.items()}
#: bytes per element, by config.json name
BYTES = {name: torch.finfo(dt).bits // 8 for name, dt in BY_NAME.items()}
#: --precision -> the compute dtype
PRECISIONS = {"bf16": torch.bfloat16, "fp32": torch.float32}
#: torch dtype <-> safetensors header name (everything a checkpoint holds)
SAFETENSORS = {torch.float32: "F32", torch.float64: "F64", torch.float16: "F16", torch.bfloat16: "BF16",
               torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8", torch.uint8: "U8",
               torch.bool: "BOOL"}
FROM_SAFETENSORS = {v: k for k, v in SAFETENSORS.items()}
