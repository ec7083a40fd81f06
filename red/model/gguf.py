"""A GGUF file of a supported architecture becomes an ordinary teacher folder (`red import`).

A GGUF (llama.cpp's single-file format) holds quantized weights, the model's shape as
metadata keys and the tokenizer as arrays of tokens and merges. `red` reads teachers as
Hugging Face folders, so the import writes one: ``config.json``, ``generation_config.json``,
the tokenizer files (with the chat template) and the weights dequantized to ``dtype`` in
``model.safetensors`` (or shards with an index).

Who does what:

- **weights**: read here with the ``gguf`` package's reader, one tensor at a time, each
  dequantized by ``gguf.dequantize`` and cast to ``dtype`` at once, so the peak memory is
  one shard of the output, not the whole model in float32 (what
  ``from_pretrained(gguf_file=...)`` would hold, besides needing ``accelerate`` and
  refusing ``save_pretrained``). Every tensor of the file must map to a parameter of the
  transformers model and every parameter must be filled (``red.model.arch``'s shapes): a
  tensor without a counterpart is refused, not dropped.
- **config and tokenizer**: transformers' own GGUF conversions (``AutoConfig`` /
  ``AutoTokenizer.from_pretrained(..., gguf_file=...)``), which know llama.cpp's key names
  and rebuild the byte-level or sentencepiece tokenizer; re-deriving them here would be a
  second copy of that code. ``head_dim`` is taken from the query weight's rows (the
  config mapping has no key for it on Qwen), the tie flag from whether the file stores a
  separate ``output.weight``.

The checks that need no torch (``check_import_inputs``: the file, the ``gguf`` package,
the architecture, each tensor's name and quantization type, the output folder) run first,
so every user error answers in one line before anything is written; this module imports
torch and transformers only inside ``write_teacher_folder``.
"""
from __future__ import annotations

import json
import os
import re
import shutil
from dataclasses import dataclass
from pathlib import Path

from red.config import TEACHER_DTYPES
from red.errors import RedError
from red.files import LOCK, OwnedFolder, check_out_path, check_separate, read_manifest
from red.model.arch import SUPPORTED

IMPORT_MANIFEST = ".red-import.json"
SHARD_BYTES = 5 * 2**30  # Hugging Face's usual shard size
_INSTALL = "pip install 'red[gguf]'"
_STAGING = re.compile(r"^\.staging-\d+$")

# GGUF's standard tensor names (llama.cpp's "blk.N.*") -> transformers' parameter names
_TOP = {"token_embd": "model.embed_tokens", "output_norm": "model.norm", "output": "lm_head"}
_BLOCK = {"attn_norm": "input_layernorm", "ffn_norm": "post_attention_layernorm",
          "attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj", "attn_v": "self_attn.v_proj",
          "attn_output": "self_attn.o_proj", "attn_q_norm": "self_attn.q_norm", "attn_k_norm": "self_attn.k_norm",
          "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj", "ffn_down": "mlp.down_proj"}
_BLOCK_NAME = re.compile(r"^blk\.(\d+)\.([a-z_]+)\.(weight|bias)$")
_TOP_NAME = re.compile(r"^([a-z_]+)\.(weight|bias)$")


def hf_name(gguf_name: str) -> str | None:
    """The transformers parameter a GGUF tensor fills (None: it has no counterpart)."""
    m = _BLOCK_NAME.match(gguf_name)
    if m and m.group(2) in _BLOCK:
        return f"model.layers.{m.group(1)}.{_BLOCK[m.group(2)]}.{m.group(3)}"
    m = _TOP_NAME.match(gguf_name)
    if m and m.group(1) in _TOP:
        return f"{_TOP[m.group(1)]}.{m.group(2)}"
    return None


@dataclass(frozen=True)
class GGUFSummary:
    """What the checks read from a GGUF's header (no tensor data)."""

    path: Path
    architecture: str
    tensors: tuple[tuple[str, str], ...]  # (GGUF name, quantization type name), file order


def _gguf():
    try:
        import gguf
    except ImportError:
        raise RedError(f"red import needs the gguf package, an optional extra; install it with {_INSTALL}") from None
    return gguf


def _one_line(e: Exception, limit: int) -> str:
    return f"{type(e).__name__}: {' '.join(str(e).split())[:limit]}"


def read_gguf(path: str | Path):
    """``gguf.GGUFReader`` over ``path`` (a memory map; reads the header only), after the
    path checks; a file that is not a GGUF or is cut short answers in one line."""
    p = Path(path)
    if not str(path):
        raise RedError("no GGUF file given; pass --gguf FILE")
    if p.is_dir():
        raise RedError(f"{p} is a folder; pass --gguf with the .gguf file itself")
    if not p.is_file():
        raise RedError(f"GGUF file {p} does not exist; pass --gguf with an existing .gguf file")
    try:
        with open(p, "rb") as f:
            magic = f.read(4)
    except OSError as e:
        raise RedError(f"GGUF file {p} cannot be read ({e.strerror}); check its permissions") from None
    if magic != b"GGUF":
        raise RedError(f"{p} is not a GGUF file (it does not start with 'GGUF'); pass a llama.cpp .gguf file")
    gguf = _gguf()
    try:
        return gguf.GGUFReader(p)
    except Exception as e:  # the reader raises ValueError, IndexError, ... on a broken header
        raise RedError(f"GGUF file {p} could not be read ({_one_line(e, 160)}); it may be truncated: download it "
                       "again") from None


def _field(reader, key: str):
    f = reader.fields.get(key)
    if f is None:
        return None
    try:
        return f.contents()
    except Exception:
        return None


def dequantizable(qtype) -> bool:
    """Whether the installed ``gguf`` package can dequantize tensors of ``qtype``: tried on
    one zero block, so the answer is the package's own, whatever its version."""
    import numpy as np

    gguf = _gguf()
    block, size = gguf.GGML_QUANT_SIZES[qtype]
    try:
        gguf.dequantize(np.zeros((1, size), dtype=np.uint8), qtype)
    except NotImplementedError:
        return False
    except Exception:
        return True  # an odd zero block of a supported type: the package has the code
    return True


def summarize_gguf(path: str | Path) -> GGUFSummary:
    """The architecture and tensors of a GGUF file, each checked: a supported
    architecture (llama, qwen2, qwen3), every tensor with a transformers counterpart, every
    quantization type one the ``gguf`` package can dequantize."""
    reader = read_gguf(path)
    p = Path(path)
    arch = _field(reader, "general.architecture")
    if arch not in SUPPORTED:
        raise RedError(f"GGUF architecture {arch!r} of {p.name} is not supported; red import reads "
                       f"{', '.join(SUPPORTED)} (the architectures red distills)")
    tensors = tuple((t.name, t.tensor_type) for t in reader.tensors)
    if not tensors:
        raise RedError(f"GGUF file {p} holds no tensors; pass a model file, not a vocabulary-only GGUF")
    extra = [n for n, _ in tensors if hf_name(n) is None]
    if extra:
        why = " (Llama 3's rope scaling, baked into frequencies: no config.json can say it)" \
            if "rope_freqs.weight" in extra else ""
        raise RedError(f"GGUF tensor(s) {', '.join(extra[:4])} of {p.name} have no counterpart in a transformers "
                       f"{arch} model{why}; red import cannot carry them: import the model's Hugging Face folder "
                       "instead")
    odd = sorted({q.name for _, q in tensors if not dequantizable(q)})
    if odd:
        which = [n for n, q in tensors if q.name in odd]
        raise RedError(f"GGUF file {p.name} holds tensors of quantization type {', '.join(odd)} (e.g. {which[0]}), "
                       f"which the installed gguf package cannot dequantize; use a file of another type (F16, "
                       f"Q8_0, Q4_K, ...) or upgrade with pip install -U gguf")
    return GGUFSummary(p, arch, tuple((n, q.name) for n, q in tensors))


def check_import_inputs(gguf_file: str | Path, out: str | Path, dtype: str = "bfloat16",
                        overwrite: bool = False) -> GGUFSummary:
    """Everything `red import` can check before torch is imported: the dtype, the GGUF file
    (``summarize_gguf``) and the output folder: a usable path apart from the file, not a
    link, empty -- or, with ``overwrite``, a folder that holds only what an earlier
    `red import` wrote there (a teacher folder with foreign files in it would load them
    too)."""
    if dtype not in TEACHER_DTYPES:
        raise RedError(f"--dtype {dtype!r} is not one of {', '.join(TEACHER_DTYPES)}")
    check_out_path(out)
    o = Path(out)
    if o.is_symlink():
        raise RedError(f"--out {o} is a symbolic link; red does not write through links: pick a folder")
    if o.exists() and not o.is_dir():
        raise RedError(f"--out {o} is a file; pass a folder for the teacher")
    summary = summarize_gguf(gguf_file)
    check_separate(o, {"GGUF file": gguf_file})
    if o.is_dir() and any(o.iterdir()):
        if not overwrite:
            raise RedError(f"teacher folder {o} is not empty; choose another --out or pass --overwrite")
        m = read_manifest(o, IMPORT_MANIFEST)
        mine = (m[0] if m else set()) | {IMPORT_MANIFEST, LOCK}
        theirs = sorted(n for n in os.listdir(o) if n not in mine and not _STAGING.match(n))
        if m is None or theirs:
            raise RedError(f"{o} holds {', '.join(theirs[:3]) or 'files'} that red import did not write; "
                           "--overwrite replaces only a teacher folder red import wrote: pick another --out")
    return summary


def import_gguf(gguf_file: str | Path, out: str | Path, dtype: str = "bfloat16", overwrite: bool = False,
                shard_bytes: int = SHARD_BYTES, progress: bool = False) -> Path:
    """Write a teacher folder ``out`` from a GGUF file (Python API of `red import`).

    Args:
        gguf_file: a llama.cpp ``.gguf`` of a Llama, Qwen2 or Qwen3 model, any quantization
            type the ``gguf`` package dequantizes.
        out: the teacher folder to write (created; or, with ``overwrite``, one red import
            wrote before, whose files are replaced).
        dtype: ``"bfloat16"`` (default), ``"float16"`` or ``"float32"`` -- the dtype of the
            safetensors; float32 keeps the dequantized values exactly.
        shard_bytes: largest safetensors file; more weight bytes than this are written as
            ``model-0000i-of-0000n.safetensors`` with an index.
        progress: a progress bar over the tensors.

    Returns the folder. Nothing is written before every check passed; the files are built
    in a staging folder inside ``out`` and moved into place when all are complete.

    Example::

        import red
        red.import_gguf("SmolLM2-135M-Instruct.Q4_1.gguf", "teachers/smollm2")
        # then: red distill --teacher teachers/smollm2 ...
    """
    summary = check_import_inputs(gguf_file, out, dtype, overwrite)
    return write_teacher_folder(summary, out, dtype, shard_bytes, progress)


def _unpermute_rows(w, n_heads: int):
    """Undo llama.cpp's reordering of Llama's query/key rows. Transformers rotates dimension
    i of a head with i + head_dim/2 (``rotate_half``); llama.cpp rotates neighbours 2i and
    2i + 1, so its converter interleaves the two halves of every head. Back: per head, the
    rows (pair p, member j) go to (half j, position p)."""
    rows = w.shape[0]
    half = rows // n_heads // 2
    return w.reshape(n_heads, half, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _read_config_and_tokenizer(src: Path):
    """transformers' own GGUF mappings of the file's config keys and tokenizer."""
    from transformers import AutoConfig, AutoTokenizer

    try:
        config = AutoConfig.from_pretrained(src.parent, gguf_file=src.name)
        tokenizer = AutoTokenizer.from_pretrained(src.parent, gguf_file=src.name)
    except Exception as e:
        raise RedError(f"transformers could not read the config or tokenizer of {src.name} ({_one_line(e, 200)}); "
                       "the file's metadata is incomplete") from None
    return config, tokenizer


def _complete_config(config, summary: GGUFSummary, by_name: dict, dtype: str) -> None:
    """What transformers' GGUF config lacks or gets wrong for a saved folder: head_dim from
    the query rows, the tie flag from ``output.weight``, the architecture class, the dtype,
    no quantization_config; then red's own feature checks."""
    from red.model.arch import check_supported_features

    q = by_name.get("blk.0.attn_q.weight")
    q_rows = int(q.shape[-1]) if q is not None else None
    if q_rows is None or q_rows % config.num_attention_heads:
        raise RedError(f"GGUF file {summary.path.name} has no usable blk.0.attn_q.weight; it is not a complete model")
    config.head_dim = q_rows // config.num_attention_heads
    config.tie_word_embeddings = "output.weight" not in by_name
    config.architectures = [SUPPORTED[summary.architecture]]
    config.dtype = dtype
    for stray in ("_model_name_or_path", "quantization_config"):
        if hasattr(config, stray):
            delattr(config, stray)
    try:
        check_supported_features(config)
    except RedError as e:
        raise RedError(f"{summary.path.name}: {e}") from None


def _checked_shapes(summary: GGUFSummary, reader, config) -> dict[str, tuple[int, ...]]:
    """transformers name -> shape of every tensor in the file, checked against the shapes
    the config's architecture needs (``expected_teacher_shapes``): nothing missing, nothing
    extra, no shape the metadata contradicts."""
    from red.model.arch import expected_teacher_shapes

    expected = expected_teacher_shapes(config)
    shapes = {hf_name(t.name): tuple(int(s) for s in reversed(t.shape)) for t in reader.tensors}  # GGUF: [in, out]
    missing = [k for k in expected if k not in shapes and not (k == "lm_head.weight" and config.tie_word_embeddings)]
    unexpected = [k for k in shapes if k not in expected]
    wrong = [f"{k} {shapes[k]} (config: {tuple(expected[k])})" for k in shapes
             if k in expected and shapes[k] != tuple(expected[k])]
    if missing or unexpected or wrong:
        what = (f"lacks {', '.join(missing[:3])}" if missing else
                f"holds {', '.join(unexpected[:3])}, which the architecture has no place for" if unexpected else
                f"has shapes its metadata contradicts: {', '.join(wrong[:2])}")
        raise RedError(f"GGUF file {summary.path.name} {what}; it is not a complete {summary.architecture} model")
    return shapes


def _shard_plan(tensors, shapes: dict, item_bytes: int, shard_bytes: int) -> list[tuple[str, list]]:
    """(file name, tensors) of each safetensors file: file order, at most ``shard_bytes``
    each (a larger tensor alone)."""
    import math

    shards, size = [[]], 0
    for t in tensors:
        n = math.prod(shapes[hf_name(t.name)]) * item_bytes
        if shards[-1] and size + n > shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append(t)
        size += n
    if len(shards) == 1:
        return [("model.safetensors", shards[0])]
    return [(f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors", s) for i, s in enumerate(shards)]


class _Dequantizer:
    """One GGUF tensor as the torch tensor of its transformers parameter, in ``dtype``."""

    def __init__(self, gguf, summary: GGUFSummary, config, shapes: dict, dtype: str):
        from red.dtypes import BY_NAME

        self.gguf, self.shapes, self.torch_dtype = gguf, shapes, BY_NAME[dtype]
        self.llama = summary.architecture == "llama"
        self.heads = config.num_attention_heads
        self.kv_heads = getattr(config, "num_key_value_heads", None) or config.num_attention_heads

    def __call__(self, t):
        import numpy as np
        import torch

        w = self.gguf.dequantize(t.data, t.tensor_type)  # numpy float32, [out, in] rows as transformers has them
        w = np.array(w, dtype=np.float32).reshape(self.shapes[hf_name(t.name)])  # a copy: the file is mapped read-only
        if self.llama and t.name.endswith(("attn_q.weight", "attn_k.weight")):
            w = _unpermute_rows(w, self.heads if ".attn_q." in t.name else self.kv_heads)
        return torch.from_numpy(np.ascontiguousarray(w)).to(self.torch_dtype)


def _write_files(staging: Path, plan, tensor, config, tokenizer, item_bytes: int, bar=None) -> None:
    """The teacher folder's files into ``staging``: each shard dequantized, written, then
    freed; the index when there are several; config, generation config, tokenizer."""
    from safetensors.torch import save_file
    from transformers import GenerationConfig

    weight_map, total = {}, 0
    for fname, shard in plan:
        state = {}
        for t in shard:
            state[hf_name(t.name)] = tensor(t)
            weight_map[hf_name(t.name)] = fname
            total += state[hf_name(t.name)].numel() * item_bytes
            if bar is not None:
                bar.update()
        save_file(state, str(staging / fname), metadata={"format": "pt"})
        del state
    if len(plan) > 1:  # inside the staging folder, which is the unit moved into place
        (staging / "model.safetensors.index.json").write_text(json.dumps(
            {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}, indent=2))
    config.save_pretrained(staging)
    GenerationConfig.from_model_config(config).save_pretrained(staging)
    tokenizer.save_pretrained(staging)


def _move_into_place(folder: OwnedFolder, staging: Path, previous: set) -> None:
    """Replace the earlier import's files (``previous``) by the staged ones: each name
    recorded as red's before it is moved in; files the new import no longer writes are
    removed and forgotten."""
    from red.files import remove_owned

    written = sorted(f.name for f in staging.iterdir())
    for name in sorted((previous - {IMPORT_MANIFEST}) | set(written)):
        if os.path.lexists(folder.root / name):
            remove_owned(folder.path(name))  # path() refuses links
    folder.own(*written)
    for name in written:
        os.replace(staging / name, folder.root / name)
    folder.forget(*(previous - set(written) - {IMPORT_MANIFEST}))


def write_teacher_folder(summary: GGUFSummary, out: str | Path, dtype: str = "bfloat16",
                         shard_bytes: int = SHARD_BYTES, progress: bool = False) -> Path:
    """``import_gguf`` after ``check_import_inputs`` (whose ``summary`` it takes): the
    config and tokenizer read and checked, the weights written shard by shard into a
    staging folder inside ``out``, checked as `red distill` will check them, then moved
    into place. On any failure a folder this call created is removed again."""
    from red.dtypes import BYTES
    from red.files import is_write_error, write_error_text
    from red.model.teacher import check_teacher_weights

    gguf, out = _gguf(), Path(out)
    reader = gguf.GGUFReader(summary.path)
    config, tokenizer = _read_config_and_tokenizer(summary.path)
    _complete_config(config, summary, {t.name: t for t in reader.tensors}, dtype)
    shapes = _checked_shapes(summary, reader, config)
    plan = _shard_plan(reader.tensors, shapes, BYTES[dtype], shard_bytes)
    folder = OwnedFolder(out, IMPORT_MANIFEST, "teacher folder")
    previous, created = folder.manifest(), not out.exists()
    staging = out / f".staging-{os.getpid()}"
    if staging.exists():
        shutil.rmtree(staging)
    staging.mkdir(parents=True)
    bar = _progress_bar(len(reader.tensors), summary.path.name) if progress else None
    try:
        try:
            _write_files(staging, plan, _Dequantizer(gguf, summary, config, shapes, dtype), config, tokenizer,
                         BYTES[dtype], bar)
        except Exception as e:
            if not is_write_error(e):
                raise
            raise RedError(f"could not write the teacher folder {out} ({write_error_text(e)}); free space and "
                           "import again") from None
        check_teacher_weights(staging, config)  # what red distill will check: refuse it here, not there
        _move_into_place(folder, staging, previous)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        if created and out.is_dir() and not any(out.iterdir()):
            out.rmdir()
        raise
    finally:
        if bar is not None:
            bar.close()
        shutil.rmtree(staging, ignore_errors=True)
    return out


def _progress_bar(total: int, name: str):
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=f"importing {name}", unit="tensor")
