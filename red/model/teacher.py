"""Loading a Hugging Face teacher from a local folder, with clear errors."""
from __future__ import annotations

import json
from pathlib import Path

import torch

from red.errors import RedError
from red.dtypes import BY_NAME
from red.model.arch import SUPPORTED, Arch, check_supported_features, read_teacher_json  # noqa: F401 (re-exported)


def read_teacher_config(path: str | Path, trust_remote_code: bool = False):
    """Read and check a teacher's config.json; raise RedError for anything unsupported."""
    from transformers import AutoConfig

    p = Path(path)
    read_teacher_json(p)  # path and architecture checks, one line each
    cfg_file = p / "config.json"
    try:
        config = AutoConfig.from_pretrained(p, trust_remote_code=trust_remote_code)
    except Exception as e:  # transformers raises many types for bad configs
        raise RedError(f"teacher config {cfg_file} could not be parsed ({type(e).__name__}: {e}); fix config.json") from None
    check_supported_features(config)
    return config


def load_teacher(path: str | Path, dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu",
                 trust_remote_code: bool = False, with_tokenizer: bool = True, checked_config=None):
    """Load a frozen teacher (eval mode, no grads) and its tokenizer from a local folder.

    Only safetensors weights are read (pickle is never unpickled). Returns
    ``(model, tokenizer)``; ``tokenizer`` is None when ``with_tokenizer`` is False.
    ``checked_config``: the folder's config, already read and checked against its weights'
    headers by the caller (``red.commands.distill``'s plan), so not checked again.
    """
    from transformers import AutoModelForCausalLM

    p = Path(path)
    config = checked_config
    if config is None:
        config = read_teacher_config(p, trust_remote_code)
        check_teacher_weights(p, config)
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
    # the dtype config.json declares, which an "auto" export follows (the model may be
    # loaded in another dtype, e.g. fp32 on a CPU)
    model.red_config_dtype = config_dtype(p)
    return model, tokenizer


def meta_teacher(path: str | Path, dtype: torch.dtype = torch.float32, trust_remote_code: bool = False):
    """The teacher's modules on the ``meta`` device (no weights read, no memory), frozen,
    in eval mode, with ``dtype`` parameters: the first step of the sharded start-up
    (``red.distributed``). The same checks as ``load_teacher`` (config and safetensors
    headers); fill it with ``load_teacher_shards`` once FSDP2 has sharded it and
    ``to_empty`` has given every rank its shards."""
    from transformers import AutoModelForCausalLM

    p = Path(path)
    config = read_teacher_config(p, trust_remote_code)
    check_teacher_weights(p, config)
    try:
        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(config, dtype=dtype, trust_remote_code=trust_remote_code)
    except Exception as e:
        raise RedError(f"teacher in {p} could not be built from config.json ({type(e).__name__}: {str(e)[:200]})") from None
    model.eval().requires_grad_(False)
    model.red_config_dtype = config_dtype(p)
    return model


def teacher_tensor_files(folder: str | Path) -> dict[str, Path]:
    """Tensor name -> the safetensors file that holds it (every shard of a sharded
    checkpoint, through model.safetensors.index.json when there is one)."""
    out = {}
    for f in teacher_weight_files(folder):
        for k in read_safetensors_header(f, "teacher weights"):
            out[k] = f
    return out


@torch.no_grad()
def load_teacher_shards(model, path: str | Path, on_tensor=None) -> None:
    """Fill a materialized (``to_empty``) teacher from its safetensors, reading for every
    parameter only the rows this rank holds (``safe_open(...).get_slice(name)[start:stop]``,
    rows from ``red.distributed.shard_rows``; a plain parameter is read whole), cast to
    the parameter's dtype. A tied head is the embedding (read once, under the embedding's
    name). ``on_tensor(nbytes)`` is called after each tensor with the bytes of the slice
    just read (still alive then), for start-up observers (``red.train.startup``). Then the rotary embedding's
    buffers, which ``to_empty`` left uninitialized, are recomputed from the config."""
    from safetensors import safe_open

    from red.distributed import local_tensor, shard_rows

    files = teacher_tensor_files(path)
    tied = bool(getattr(model.config, "tie_word_embeddings", False))
    emb = model.model.embed_tokens
    if tied and model.lm_head.weight is not emb.weight and type(emb.weight) is torch.nn.Parameter:
        model.lm_head.weight = emb.weight  # to_empty of a plain (unsharded) module unties them
    handles = {}
    try:
        seen = set()
        for name, param in model.named_parameters():
            if id(param) in seen:
                continue
            seen.add(id(param))
            key = "model.embed_tokens.weight" if tied and name == "lm_head.weight" else name
            if key not in files:
                raise RedError(f"teacher weights in {path} lack {key}; restore the complete checkpoint (all shards)")
            f = files[key]
            if f not in handles:
                handles[f] = safe_open(str(f), framework="pt", device="cpu")
            sl = handles[f].get_slice(key)
            start, stop = shard_rows(param)
            part = sl[start:stop] if len(sl.get_shape()) else sl[:]
            local = local_tensor(param)
            if tuple(part.shape) != tuple(local.shape):
                raise RedError(f"teacher tensor {key} rows {start}:{stop} have shape {tuple(part.shape)}, this rank "
                               f"holds {tuple(local.shape)}; check that config.json belongs to these weights")
            local.copy_(part.to(local.dtype))
            if on_tensor is not None:
                on_tensor(part.numel() * part.element_size())
            del part
    finally:
        handles.clear()
    reset_rotary(model)


@torch.no_grad()
def reset_rotary(model) -> None:
    """Recompute the rotary embedding's buffers (``inv_freq``...) of a teacher built on
    ``meta``: a fresh module of the same class from the same config, copied in place."""
    rot = model.model.rotary_emb
    fresh = type(rot)(config=model.config)
    for name, buf in fresh.named_buffers():
        target = rot.get_buffer(name)
        target.copy_(buf.to(target.dtype))
    for k, v in vars(fresh).items():
        if not k.startswith("_") and isinstance(v, (int, float, str)):
            setattr(rot, k, v)


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
    read_safetensors_header(f, what)


def read_safetensors_header(f: str | Path, what: str = "file") -> dict:
    """The tensor entries of a safetensors header (name -> {"dtype", "shape", "data_offsets"},
    no ``__metadata__``); RedError if the file is corrupt or shorter than its header says."""
    f = Path(f)
    try:
        size = f.stat().st_size
        with f.open("rb") as fh:
            header_len = int.from_bytes(fh.read(8), "little")
            if header_len <= 0 or 8 + header_len > size:
                raise ValueError("header length is out of range")
            header = json.loads(fh.read(header_len))
        if not isinstance(header, dict):
            raise ValueError("header is not a JSON object")
        tensors = {k: v for k, v in header.items() if k != "__metadata__"}
        for k, v in tensors.items():
            if not (isinstance(v, dict) and isinstance(v.get("dtype"), str) and isinstance(v.get("shape"), list)
                    and len(v.get("data_offsets", ())) == 2):
                raise ValueError(f"entry {k!r} is malformed")
        data_end = max((v["data_offsets"][1] for v in tensors.values()), default=0)
        if 8 + header_len + data_end > size:
            raise ValueError(f"file has {size} bytes, its header needs {8 + header_len + data_end}")
    except Exception as e:
        raise RedError(f"{what} {f} is corrupt or truncated ({type(e).__name__}: {str(e)[:120]}); "
                       "restore or re-save it") from None
    return tensors


FLOAT_DTYPES = {"F64", "F32", "F16", "BF16"}
#: buffers some older checkpoints carry; transformers ignores them on load
_IGNORED_SUFFIXES = ("rotary_emb.inv_freq",)


def _names(names, n: int = 4) -> str:
    names = sorted(names)
    more = f" and {len(names) - n} more" if len(names) > n else ""
    return ", ".join(names[:n]) + more


def teacher_weight_files(folder: str | Path) -> list[Path]:
    """The safetensors files transformers would read: those named by
    model.safetensors.index.json when there is one, else every ``*.safetensors``."""
    folder = Path(folder)
    index = folder / "model.safetensors.index.json"
    if not index.is_file():
        return sorted(folder.glob("*.safetensors"))
    try:
        weight_map = json.loads(index.read_text())["weight_map"]
        names = sorted(set(weight_map.values()))
        if not all(isinstance(n, str) and "/" not in n for n in names):
            raise ValueError("weight_map names a file outside the folder")
    except Exception as e:
        raise RedError(f"{index} is unreadable ({type(e).__name__}: {str(e)[:120]}); restore it or delete it "
                       "(then every *.safetensors file in the folder is read)") from None
    missing = [n for n in names if not (folder / n).is_file()]
    if missing:
        raise RedError(f"teacher shard(s) {_names(missing)} named by {index.name} are missing from {folder}; "
                       "copy every shard of the checkpoint")
    return [folder / n for n in names]


def _read_teacher_headers(folder: Path) -> tuple[dict, dict]:
    """``(headers, where)``: every tensor's safetensors header entry over the teacher's weight
    files (those with an ignored suffix dropped) and the file each came from; RedError for a
    tensor stored twice."""
    headers: dict[str, dict] = {}
    where: dict[str, Path] = {}
    for f in teacher_weight_files(folder):
        for k, v in read_safetensors_header(f, "teacher weights").items():
            if k in headers:
                raise RedError(f"teacher tensor {k!r} is stored twice ({where[k].name} and {f.name}); "
                               "keep one copy (re-save the checkpoint)")
            headers[k], where[k] = v, f
    return {k: v for k, v in headers.items() if not k.endswith(_IGNORED_SUFFIXES)}, where


def _check_teacher_names(folder: Path, config, headers: dict, expected: dict, tied: bool) -> None:
    """The stored tensor names against the architecture's: RedError naming what is missing or
    unexpected, with the likeliest fix (another model's folder, the tie flag, lost shards,
    another model's config.json)."""
    missing = [k for k in expected if k not in headers]
    unexpected = [k for k in headers if k not in expected]
    if missing and set(headers).isdisjoint(expected):
        raise RedError(f"the safetensors files in {folder} hold no {config.model_type} weights (found "
                       f"{_names(headers) or 'no tensors'}); point --teacher at the model's own folder")
    if missing == ["lm_head.weight"] and not tied:
        raise RedError(f"teacher weights in {folder} have no lm_head.weight but config.json says "
                       "tie_word_embeddings: false; set \"tie_word_embeddings\": true if the head is the "
                       "embedding, or restore the missing tensor")
    if missing:
        raise RedError(f"teacher weights in {folder} lack {len(missing)} tensor(s) config.json's architecture "
                       f"needs: {_names(missing)}; restore the complete checkpoint (all shards)")
    if unexpected:
        raise RedError(f"teacher weights in {folder} hold {len(unexpected)} tensor(s) a {config.model_type} with this "
                       f"config.json does not have: {_names(unexpected)}; check that config.json belongs to "
                       "these weights")


def _check_teacher_dtypes(folder: Path, headers: dict) -> None:
    """RedError when a stored tensor is not a float (a quantized or integer checkpoint) or
    the tensors mix float dtypes (naming the ones that differ from the most common)."""
    not_float = [f"{k} ({v['dtype']})" for k, v in headers.items() if v["dtype"] not in FLOAT_DTYPES]
    if not_float:
        raise RedError(f"teacher weights in {folder} hold non-float tensors: {_names(not_float)}; quantized or "
                       "integer checkpoints are not supported: use the float (bf16/fp16/fp32) checkpoint")
    dtypes: dict[str, list[str]] = {}
    for k, v in headers.items():
        dtypes.setdefault(v["dtype"], []).append(k)
    if len(dtypes) > 1:
        common = max(dtypes, key=lambda d: len(dtypes[d]))
        odd = [f"{k} ({d})" for d, ks in dtypes.items() if d != common for k in ks]
        raise RedError(f"teacher weights in {folder} mix dtypes: most are {common} but {_names(odd)}; re-save the "
                       f"checkpoint in one dtype")


def check_teacher_weights(folder: str | Path, config, arch: Arch | None = None) -> None:
    """From the safetensors headers alone (plus the head and embedding when a tied config
    also stores a head): every parameter ``config``'s architecture has is present with its
    shape, nothing unexpected is there, every tensor is of one float dtype, and the tie
    flag agrees with the file. RedError naming the tensors and the fix otherwise. ``arch``:
    ``Arch.from_config(config)`` when the caller has it."""
    from red.model.arch import has_attention_bias, teacher_shapes

    folder = Path(folder)
    check_teacher_files(folder)
    headers, where = _read_teacher_headers(folder)
    expected = teacher_shapes(arch or Arch.from_config(config), has_attention_bias(config))
    tied = bool(getattr(config, "tie_word_embeddings", False))
    head = headers.get("lm_head.weight")
    if tied and head is not None:
        if not _head_is_embedding(headers, where):
            raise RedError(f"teacher config.json in {folder} says tie_word_embeddings: true but the weights hold an "
                           "lm_head.weight that differs from model.embed_tokens.weight; set "
                           "\"tie_word_embeddings\": false in config.json if the head is separate, or drop "
                           "lm_head.weight from the safetensors")
        headers = {k: v for k, v in headers.items() if k != "lm_head.weight"}
    _check_teacher_names(folder, config, headers, expected, tied)
    bad = [f"{k} {tuple(headers[k]['shape'])} (expected {tuple(s)})" for k, s in expected.items()
           if tuple(headers[k]["shape"]) != tuple(s)]
    if bad:
        raise RedError(f"teacher weights in {folder} do not match config.json's shapes: {_names(bad, 3)}; "
                       "check that config.json belongs to these weights")
    _check_teacher_dtypes(folder, headers)


def _head_is_embedding(headers: dict, where: dict) -> bool:
    """Whether a stored lm_head.weight equals model.embed_tokens.weight (reads those two)."""
    from safetensors import safe_open

    h, e = headers["lm_head.weight"], headers.get("model.embed_tokens.weight")
    if e is None or h["shape"] != e["shape"] or h["dtype"] != e["dtype"]:
        return False
    with safe_open(str(where["lm_head.weight"]), "pt") as fh:
        head = fh.get_tensor("lm_head.weight")
    with safe_open(str(where["model.embed_tokens.weight"]), "pt") as fe:
        emb = fe.get_tensor("model.embed_tokens.weight")
    return torch.equal(head, emb)


def config_dtype(folder: str | Path) -> torch.dtype | None:
    """The dtype config.json declares (``dtype`` or the older ``torch_dtype``), if any."""
    try:
        raw = json.loads((Path(folder) / "config.json").read_text())
    except (OSError, json.JSONDecodeError):
        return None
    d = raw.get("dtype") or raw.get("torch_dtype") if isinstance(raw, dict) else None
    return BY_NAME.get(d)


def teacher_fingerprint(path: str | Path) -> str:
    """A digest (32 hex digits) of every byte of the teacher: config.json and each
    safetensors file (name and sha256). Stored in checkpoints and calibration files so that
    resuming, exporting or reusing a calibration with another teacher is refused, even one
    edited in the middle of a weight file. Each file is hashed once per process
    (``red.run.folder.file_sha256``)."""
    import hashlib

    from red.files import file_sha256

    p = Path(path)
    h = hashlib.sha256(b"red-teacher-v2\0")
    h.update(file_sha256(p / "config.json").encode())
    for f in sorted(p.glob("*.safetensors")):
        h.update(f.name.encode() + b"\0" + file_sha256(f).encode())
    return h.hexdigest()[:32]


def legacy_teacher_fingerprint(path: str | Path) -> str:
    """The 16-digit digest red stored before whole-file fingerprints: config.json plus, for
    every safetensors file, its size, header and the first and last 64 KiB of tensor data.
    Used only to recognize the teacher of checkpoints and calibration files written then."""
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


def is_legacy_fingerprint(fp) -> bool:
    return isinstance(fp, str) and len(fp) == 16


def teacher_meta(path: str | Path) -> dict:
    """What checkpoints record of their teacher: the whole-file fingerprint, and the legacy
    one under ``teacher_fingerprint_v1`` so that a checkpoint written before whole-file
    fingerprints is still recognized (``red.run.checkpoint.check_checkpoint``)."""
    return {"teacher_fingerprint": teacher_fingerprint(path), "teacher_fingerprint_v1": legacy_teacher_fingerprint(path)}


def teacher_matches(saved, path: str | Path) -> bool:
    """Whether a stored fingerprint ``saved`` is that of the teacher in ``path`` (a legacy
    16-digit one is compared with the legacy digest, the only one it can be checked with)."""
    if is_legacy_fingerprint(saved):
        return saved == legacy_teacher_fingerprint(path)
    return saved == teacher_fingerprint(path)
