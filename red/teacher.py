"""Loading a Hugging Face teacher from a local folder, with clear errors."""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch

from .errors import RedError

SUPPORTED = {
    "llama": "LlamaForCausalLM",
    "qwen2": "Qwen2ForCausalLM",
    "qwen3": "Qwen3ForCausalLM",
}


@dataclass(frozen=True)
class Arch:
    """The shape facts of a teacher that the student and the export need."""

    model_type: str
    num_layers: int
    hidden_size: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    intermediate_size: int
    vocab_size: int
    tied: bool
    qk_norm: bool
    rms_norm_eps: float

    @classmethod
    def from_config(cls, config) -> "Arch":
        head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
        return cls(
            model_type=config.model_type,
            num_layers=config.num_hidden_layers,
            hidden_size=config.hidden_size,
            num_heads=config.num_attention_heads,
            num_kv_heads=getattr(config, "num_key_value_heads", None) or config.num_attention_heads,
            head_dim=head_dim,
            intermediate_size=config.intermediate_size,
            vocab_size=config.vocab_size,
            tied=bool(getattr(config, "tie_word_embeddings", False)),
            qk_norm=config.model_type == "qwen3",
            rms_norm_eps=float(config.rms_norm_eps),
        )


def read_teacher_config(path: str | Path, trust_remote_code: bool = False):
    """Read and check a teacher's config.json; raise RedError for anything unsupported."""
    from transformers import AutoConfig

    p = Path(path)
    if not str(path):
        raise RedError("no teacher given; pass --teacher DIR (a local Hugging Face model folder)")
    if not p.exists():
        raise RedError(f"teacher folder {p} does not exist; pass --teacher DIR with a local Hugging Face model folder")
    if not p.is_dir():
        raise RedError(f"teacher path {p} is not a folder; pass the folder that holds config.json and *.safetensors")
    cfg_file = p / "config.json"
    if not cfg_file.is_file():
        raise RedError(f"teacher folder {p} has no config.json; point --teacher at a Hugging Face model folder")
    try:
        raw = json.loads(cfg_file.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise RedError(f"teacher config {cfg_file} is unreadable ({e}); restore the file") from None
    model_type = raw.get("model_type")
    if model_type not in SUPPORTED:
        names = ", ".join(SUPPORTED.values())
        raise RedError(f"teacher architecture {model_type!r} is not supported; supported: {names}")
    try:
        config = AutoConfig.from_pretrained(p, trust_remote_code=trust_remote_code)
    except Exception as e:  # transformers raises many types for bad configs
        raise RedError(f"teacher config {cfg_file} could not be parsed ({type(e).__name__}: {e}); fix config.json") from None
    if getattr(config, "use_sliding_window", False):
        raise RedError("teachers with sliding-window attention are not supported; set use_sliding_window=false in config.json if it is unused")
    if getattr(config, "mlp_bias", False) or (model_type == "llama" and getattr(config, "attention_bias", False)):
        raise RedError("Llama teachers with attention_bias or mlp_bias are not supported; use a teacher without those biases")
    return config


def load_teacher(path: str | Path, dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu",
                 trust_remote_code: bool = False, with_tokenizer: bool = True):
    """Load a frozen teacher (eval mode, no grads) and its tokenizer from a local folder.

    Only safetensors weights are read (pickle is never unpickled). Returns
    ``(model, tokenizer)``; ``tokenizer`` is None when ``with_tokenizer`` is False.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    p = Path(path)
    config = read_teacher_config(p, trust_remote_code)
    check_teacher_files(p)
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # red shows its own progress; loading bars are noise
    tokenizer = None
    if with_tokenizer:
        tokenizer = load_tokenizer(p, trust_remote_code)
    try:
        model = AutoModelForCausalLM.from_pretrained(p, config=config, dtype=dtype, use_safetensors=True,
                                                     trust_remote_code=trust_remote_code)
    except Exception as e:
        raise RedError(f"teacher weights in {p} could not be loaded ({type(e).__name__}: {str(e)[:200]}); "
                       "check that the safetensors files are complete and match config.json") from None
    model.to(device).eval().requires_grad_(False)
    return model, tokenizer


def load_tokenizer(path: str | Path, trust_remote_code: bool = False):
    from transformers import AutoTokenizer

    p = Path(path)
    has_files = any((p / f).is_file() for f in ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json"))
    if not has_files:
        raise RedError(f"teacher folder {p} has no tokenizer files (tokenizer.json / tokenizer_config.json); "
                       "copy the teacher's tokenizer into it")
    try:
        return AutoTokenizer.from_pretrained(p, trust_remote_code=trust_remote_code)
    except Exception as e:
        raise RedError(f"tokenizer in {p} could not be loaded ({type(e).__name__}: {str(e)[:200]}); "
                       "restore the teacher's tokenizer files") from None


def check_teacher_files(folder: str | Path) -> None:
    """The teacher folder has safetensors weights (pickled .bin files are never loaded)
    and every safetensors file is complete; a truncated or corrupt one fails with its name."""
    folder = Path(folder)
    files = sorted(folder.glob("*.safetensors"))
    if not files:
        raise RedError(f"teacher folder {folder} has no *.safetensors weights; convert the checkpoint to safetensors "
                       "(pickled .bin files are never loaded)")
    for f in files:
        check_safetensors_file(f, what="teacher weights")


def check_safetensors_file(f: str | Path, what: str = "file") -> None:
    """Raise RedError unless ``f`` has a readable safetensors header covering all its tensor data."""
    f = Path(f)
    try:
        size = f.stat().st_size
        with f.open("rb") as fh:
            header_len = int.from_bytes(fh.read(8), "little")
            if header_len <= 0 or 8 + header_len > size:
                raise ValueError("header length is out of range")
            header = json.loads(fh.read(header_len))
        data_end = max((v["data_offsets"][1] for k, v in header.items() if k != "__metadata__"), default=0)
        if 8 + header_len + data_end > size:
            raise ValueError(f"file has {size} bytes, its header needs {8 + header_len + data_end}")
    except Exception as e:
        raise RedError(f"{what} {f} is corrupt or truncated ({type(e).__name__}: {str(e)[:120]}); "
                       "restore or re-save it") from None


def teacher_fingerprint(path: str | Path) -> str:
    """A short digest that tells one teacher from another without reading all its weights:
    config.json plus, for every safetensors file, its size, header and the first and last
    64 KiB of tensor data. Stored in checkpoints so that resuming or exporting with a
    different teacher of the same shape is refused."""
    import hashlib

    p = Path(path)
    h = hashlib.sha256()
    h.update((p / "config.json").read_bytes())
    for f in sorted(p.glob("*.safetensors")):
        size = f.stat().st_size
        with f.open("rb") as fh:
            n = int.from_bytes(fh.read(8), "little")
            h.update(f.name.encode() + size.to_bytes(8, "little"))
            h.update(fh.read(min(n, 1 << 24)))
            h.update(fh.read(1 << 16))
            fh.seek(max(8 + n, size - (1 << 16)))
            h.update(fh.read(1 << 16))
    return h.hexdigest()[:16]
