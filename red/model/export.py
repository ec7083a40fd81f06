"""Merge a trained student into an ordinary checkpoint of the teacher's architecture.

Every teacher tensor is mapped to its student counterpart by name (so the file uses the
teacher's own key names), the config gets ``hidden_size = d``, an explicit ``head_dim``,
the tie flag the student was trained with and the ``rms_norm_eps`` used in training.
The result loads with ``AutoModelForCausalLM.from_pretrained`` alone.

The tokenizer is the teacher's own files, copied byte for byte (``TOKENIZER_FILES``), never
saved again through transformers: a re-save writes the installed version's format (5.x
names ``TokenizersBackend`` and drops ``special_tokens_map.json`` and a SentencePiece
``tokenizer.model``), which older transformers and llama.cpp's converter then read
differently from the teacher.
"""
from __future__ import annotations

import copy
import os
import re
import shutil
from pathlib import Path

import torch
from safetensors.torch import save_file

from red.config import EXPORT_ARCHS
from red.errors import RedError
from red.dtypes import BY_NAME
from red.model.arch import check_width
from red.model.student import ProjectedStudent

_LAYER_KEY = re.compile(r"^model\.layers\.(\d+)\.(.+)$")
_IN = {"self_attn.q_proj.weight": "q", "self_attn.k_proj.weight": "k", "self_attn.v_proj.weight": "v",
       "mlp.gate_proj.weight": "gate", "mlp.up_proj.weight": "up"}
_OUT = {"self_attn.o_proj.weight": "o", "mlp.down_proj.weight": "down"}
_KEEP = ("self_attn.q_proj.bias", "self_attn.k_proj.bias", "self_attn.v_proj.bias",
         "self_attn.q_norm.weight", "self_attn.k_norm.weight")


def teacher_dtype(teacher) -> torch.dtype:
    """The teacher's dtype as its config.json declares it (what ``--export-dtype auto``
    writes), else the dtype it was loaded in, else float32."""
    declared = getattr(teacher, "red_config_dtype", None)
    if isinstance(declared, torch.dtype):
        return declared
    d = getattr(teacher.config, "dtype", None) or getattr(teacher.config, "torch_dtype", None)
    if isinstance(d, str):
        d = BY_NAME.get(d)
    return d if isinstance(d, torch.dtype) else torch.float32


@torch.no_grad()
def merged_state_dict(student: ProjectedStudent) -> dict[str, torch.Tensor]:
    """The student's weights under the teacher's key names (float32, CPU)."""
    teacher = student.teacher
    out: dict[str, torch.Tensor] = {}
    f32 = lambda t: t.detach().float()
    for key, w in teacher.state_dict().items():
        if key == "lm_head.weight":
            if student.arch.tied:
                continue
            out[key] = f32(w) @ f32(student.lm_head)
        elif key == "model.embed_tokens.weight":
            out[key] = f32(w) @ f32(student.embed)
        elif key == "model.norm.weight":
            out[key] = f32(student.final_norm)
        else:
            m = _LAYER_KEY.match(key)
            if not m:
                raise RedError(f"teacher tensor {key!r} has no student counterpart; this architecture is not supported")
            layer, name = student.layers[int(m.group(1))], m.group(2)
            if name in _IN:
                out[key] = f32(w) @ f32(getattr(layer, _IN[name]))
            elif name in _OUT:
                out[key] = f32(getattr(layer, _OUT[name])).T @ f32(w)
            elif name == "input_layernorm.weight":
                out[key] = f32(layer.input_norm)
            elif name == "post_attention_layernorm.weight":
                out[key] = f32(layer.post_attention_norm)
            elif name in _KEEP:
                out[key] = f32(w)
            else:
                raise RedError(f"teacher tensor {key!r} has no student counterpart; this architecture is not supported")
    return {k: v.cpu().contiguous() for k, v in out.items()}


def student_config(teacher, hidden_size: int, norm_eps: float, dtype: torch.dtype):
    """The teacher's config with the student's width, an explicit head_dim and the eps
    and tie flag the student was trained with. ``teacher`` is the teacher model or its
    config. The result is validated as transformers validates it (on save and load); an
    invalid one raises transformers' own error (``check_student_width`` turns it into a
    RedError up front)."""
    tcfg = getattr(teacher, "config", teacher)
    cfg = copy.deepcopy(tcfg)
    cfg.head_dim = getattr(tcfg, "head_dim", None) or tcfg.hidden_size // tcfg.num_attention_heads
    cfg.hidden_size = int(hidden_size)
    cfg.rms_norm_eps = float(norm_eps)
    cfg.tie_word_embeddings = bool(getattr(tcfg, "tie_word_embeddings", False))
    cfg.dtype = dtype
    # the export copies no Python code, so a teacher's auto_map would name modules that
    # are not there (and invite trust_remote_code for nothing): the student is a plain model
    for key in ("auto_map", "custom_pipelines"):
        if hasattr(cfg, key):
            delattr(cfg, key)
    if callable(getattr(cfg, "validate", None)):
        cfg.validate()
    return cfg


def check_export_arch(teacher_config, arch: str, flag: str = "--arch") -> None:
    """RedError unless a student of this teacher can be written as ``arch`` (``EXPORT_ARCHS``):
    ``auto`` is the teacher's own architecture; ``llama`` takes a Llama (nothing to do) or
    a Qwen2 without sliding-window layers (``as_llama``). Checked before anything loads."""
    if arch not in EXPORT_ARCHS:
        raise RedError(f"{flag} {arch!r} is not one of {', '.join(EXPORT_ARCHS)}; pick one of those")
    kind = teacher_config.model_type
    if arch == "auto" or kind == "llama":
        return
    if kind != "qwen2":
        raise RedError(f"{flag} llama: a {kind} student cannot be written as a Llama (only a Qwen2's layers are "
                       f"a Llama's with attention biases); use {flag} auto")
    types = getattr(teacher_config, "layer_types", None) or []
    sliding = [i for i, t in enumerate(types) if t != "full_attention"]
    if sliding or (not types and getattr(teacher_config, "use_sliding_window", False)):
        raise RedError(f"{flag} llama: this qwen2 teacher uses sliding-window attention "
                       f"(layers {', '.join(map(str, sliding)) or 'from max_window_layers on'}), which a Llama has "
                       f"not; use {flag} auto")


def as_llama(cfg, state: dict) -> tuple:
    """A Qwen2 student's config and weights as a Llama's: the same layers, with
    ``attention_bias`` (a Llama then biases q, k, v and o; Qwen2 biases q, k, v) and a zero
    ``o_proj`` bias, so the logits are the Qwen2's. For stacks whose Qwen2 assumes
    heads x head_dim = hidden_size, which a narrowed student never has (llama.cpp's graph;
    vLLM's Qwen2 in the versions read, see the README), while their Llama reads head_dim."""
    from transformers import LlamaConfig

    known = LlamaConfig().to_dict()
    skip = {"model_type", "architectures", "transformers_version", "_name_or_path"}
    values = {k: v for k, v in cfg.to_dict().items() if k in known and k not in skip}
    llama = LlamaConfig(**{**values, "attention_bias": True, "mlp_bias": False})
    llama.architectures = ["LlamaForCausalLM"]
    llama.dtype = cfg.dtype
    out = dict(state)
    for i in range(cfg.num_hidden_layers):
        o = out[f"model.layers.{i}.self_attn.o_proj.weight"]
        out[f"model.layers.{i}.self_attn.o_proj.bias"] = torch.zeros(o.shape[0], dtype=o.dtype)
    if callable(getattr(llama, "validate", None)):
        llama.validate()
    return llama, out


def _width_error(teacher_config, d: int) -> str | None:
    try:
        student_config(teacher_config, d, float(getattr(teacher_config, "rms_norm_eps", 1e-6)), torch.float32)
    except Exception as e:  # transformers' validators raise several types
        msg = " ".join(str(e).split())
        msg = msg.split("ValueError: ")[-1] if "ValueError: " in msg else f"{type(e).__name__}: {msg}"
        return msg.rstrip(".")
    return None


def check_student_width(teacher_config, hidden_size: int, flag: str = "--hidden-size") -> None:
    """RedError unless transformers accepts the teacher's architecture at width
    ``hidden_size`` (e.g. Llama's hidden_size must be a multiple of num_attention_heads),
    naming the constraint and the nearest valid widths. Used by `red distill`'s pre-flight,
    `red plan` and `red export` (one rule: the exported config is built and validated)."""
    d = int(hidden_size)
    check_width(int(teacher_config.hidden_size), d, flag)  # the width rule first, then transformers' own
    err = _width_error(teacher_config, d)
    if err is None:
        return
    D = int(teacher_config.hidden_size)
    below = next((w for w in range(d - 1, 0, -1) if _width_error(teacher_config, w) is None), None)
    above = next((w for w in range(d + 1, D) if _width_error(teacher_config, w) is None), None)
    near = " or ".join(str(w) for w in (below, above) if w is not None)
    fix = f"pick {flag} {near}" if near else f"no width below {D} is valid for this teacher"
    raise RedError(f"{flag} {d} is not a valid width for a {teacher_config.model_type} student: {err}; {fix}")


#: The files of a Hugging Face tokenizer an export copies from the teacher's folder, where
#: present: the fast tokenizer, its config and special tokens, SentencePiece / BPE /
#: WordPiece vocabularies (what older transformers and llama.cpp's converter read), the
#: chat template files, and transformers' folder of named chat templates.
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json",
                   "tokenizer.model", "vocab.json", "merges.txt", "vocab.txt", "chat_template.jinja",
                   "chat_template.json", "additional_chat_templates")


def tokenizer_folder(tokenizer) -> Path:
    """The folder whose tokenizer files an export copies: ``tokenizer`` itself when it is a
    path, else the folder a loaded tokenizer was read from (its ``name_or_path``)."""
    if isinstance(tokenizer, (str, Path)):
        folder = Path(tokenizer)
    else:
        folder = Path(str(getattr(tokenizer, "name_or_path", "") or ""))
    found = [n for n in TOKENIZER_FILES if (folder / n).exists()] if str(folder) and folder.is_dir() else []
    if not found:
        raise RedError(f"no tokenizer files to copy from {str(folder) or 'a tokenizer made in memory'}: an export "
                       "copies the teacher's tokenizer files byte for byte; pass the teacher's folder (or a "
                       "tokenizer loaded from it)")
    return folder


def copy_tokenizer_files(src: str | Path, dst: str | Path) -> list[str]:
    """Copy the ``TOKENIZER_FILES`` of ``src`` into ``dst`` byte for byte (a link in the
    teacher's folder, as in a Hugging Face cache, is read through: its bytes are copied).
    Returns the names copied."""
    src, dst = Path(src), Path(dst)
    names = []
    for name in TOKENIZER_FILES:
        p = src / name
        if p.is_dir():
            shutil.copytree(p, dst / name, symlinks=False)
        elif p.is_file():
            shutil.copyfile(p, dst / name)
        else:
            continue
        names.append(name)
    return names


def export_student(student: ProjectedStudent, tokenizer, out_dir: str | Path, dtype: str | torch.dtype = "auto",
                   overwrite: bool = False, owned: bool = False, arch: str = "auto") -> Path:
    """Write ``out_dir`` as a Hugging Face checkpoint: config.json, model.safetensors,
    the teacher's tokenizer files copied byte for byte (and generation_config.json when the
    teacher has one). ``tokenizer``: the teacher's folder, or a tokenizer loaded from it.
    ``arch``: ``auto`` (the teacher's architecture) or ``llama`` (a Qwen2 student written
    as a Llama, ``as_llama``).

    The files are written into a staging folder inside ``out_dir`` (nothing is written
    outside it) and moved into place only once all of them are complete; an existing
    export is replaced (with ``overwrite``) only after the new one is fully written, and
    only the files an export wrote (``_write_export``).
    """
    check_export_arch(student.teacher.config, arch)
    return _write_export(student.teacher, student.hidden_size, student.norm_eps, merged_state_dict(student),
                         tokenizer_folder(tokenizer) if tokenizer is not None else None, out_dir, dtype, overwrite,
                         owned, arch)


EXPORT_MANIFEST = ".red-export.json"


def _write_files(teacher, hidden_size, norm_eps, state: dict, tokenizer_dir, folder: Path,
                 dtype: torch.dtype, arch: str = "auto") -> None:
    """The export's files, written into ``folder`` (the staging folder ``_write_export``
    moves into place): the weights in ``dtype``, the student's config (relabelled as a
    Llama with ``arch="llama"``), the teacher's generation config and tokenizer files."""
    sd = {k: v.to(dtype) for k, v in state.items()}
    cfg = student_config(teacher, hidden_size, norm_eps, dtype)
    if arch == "llama" and cfg.model_type != "llama":
        cfg, sd = as_llama(cfg, sd)
    save_file(sd, str(folder / "model.safetensors"), metadata={"format": "pt"})
    cfg.save_pretrained(folder)
    gen = getattr(teacher, "generation_config", None)
    if gen is not None:
        gen.save_pretrained(folder)
    if tokenizer_dir is not None:
        copy_tokenizer_files(tokenizer_dir, folder)


def _write_export(teacher, hidden_size, norm_eps, state: dict, tokenizer_dir, out_dir, dtype, overwrite,
                  owned: bool = False, arch: str = "auto") -> Path:
    """Write the export into a staging folder inside ``out_dir``, then move each file into
    place. ``out_dir`` is an ``red.run.folder.OwnedFolder`` with the manifest ``.red-export.json``:
    a re-export replaces the previous export's files; a name the export writes that is
    already there and not red's (a user's config.json) is refused, nothing moved.
    ``owned``: the whole folder is red's (a run's ``student/``), so its names are replaced."""
    from red.files import OwnedFolder, is_write_error, remove_owned, write_error_text

    out_dir = Path(out_dir)
    if out_dir.is_symlink():
        raise RedError(f"export path {out_dir} is a symbolic link; red does not write through links: pick a folder")
    if out_dir.exists() and not out_dir.is_dir():
        raise RedError(f"export path {out_dir} is a file; pass a folder")
    if out_dir.exists() and any(out_dir.iterdir()) and not overwrite:
        raise RedError(f"export folder {out_dir} is not empty; choose another folder or pass --overwrite")
    folder = OwnedFolder(out_dir, EXPORT_MANIFEST, "export folder", legacy_key="files")
    previous = folder.manifest()  # an invalid manifest is refused here, before anything is written
    if isinstance(dtype, str):
        dtype = teacher_dtype(teacher) if dtype == "auto" else BY_NAME[dtype]
    out_dir.mkdir(parents=True, exist_ok=True)
    tmp = out_dir / f".staging-{os.getpid()}"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()
    try:
        try:
            _write_files(teacher, hidden_size, norm_eps, state, tokenizer_dir, tmp, dtype, arch)
        except Exception as e:
            if not is_write_error(e):
                raise
            raise RedError(f"could not write the export {out_dir} ({write_error_text(e)}); nothing of an earlier "
                           "export was replaced: free space and export again") from None
        written = sorted(f.name for f in tmp.iterdir())
        clash = [] if owned else folder.conflicts(written)
        if clash:
            raise RedError(folder.clash_message(clash))
        # replace only what an earlier export wrote here and the names this one writes;
        # anything else in the folder is the user's and stays
        for name in sorted((previous - {EXPORT_MANIFEST}) | set(written)):
            old = out_dir / name
            if old.is_symlink():
                raise RedError(f"{old} is a symbolic link; red does not write through links: remove it")
            if os.path.lexists(old):
                remove_owned(old)
        folder.own(*written)
        for name in written:
            os.replace(tmp / name, out_dir / name)
        stale = (previous - set(written)) - {EXPORT_MANIFEST}
        if stale:  # files of an earlier export this one no longer writes are gone: forget them
            entries = folder.manifest() - stale
            folder._write_manifest(entries, folder.foreign())
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return out_dir
