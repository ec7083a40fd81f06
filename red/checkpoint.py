"""Training checkpoints: trainable tensors, optimizer, scheduler, RNG and data position.

Tensors go to safetensors, everything else to JSON. A checkpoint is written into a
temporary folder and renamed into place, so a folder named ``step-NNNNNNN`` is always
complete; a crash mid-write leaves only a ``.tmp`` folder that is ignored and cleaned.
"""
from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from .distributed import DistContext, full_tensor, like_param
from .errors import RedError
from .teacher import check_safetensors_file

_STEP_DIR = re.compile(r"^step-(\d+)$")


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(str(path), os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
    except OSError:
        pass


def _write_json(path: Path, obj) -> None:
    with open(path, "w") as f:
        json.dump(obj, f, indent=1)
        f.flush()
        os.fsync(f.fileno())


def gather_state(student, optimizer) -> tuple[dict[str, torch.Tensor], dict]:
    """Every tensor a checkpoint holds, whole (sharded tensors are all-gathered: call on
    every rank), plus the optimizer's non-tensor state."""
    tensors = {f"student.{k}": full_tensor(v.detach()).float().cpu().contiguous()
               for k, v in student.state_dict().items()}
    opt = optimizer.state_dict()
    opt_scalars: dict = {}
    for idx, st in opt["state"].items():
        for k, v in st.items():
            if torch.is_tensor(v):
                tensors[f"opt.{idx}.{k}"] = full_tensor(v.detach()).cpu().contiguous()
            else:
                opt_scalars[f"{idx}.{k}"] = v
    return tensors, {"optimizer_param_groups": [{k: v for k, v in g.items() if k != "params"}
                                                for g in opt["param_groups"]],
                     "optimizer_scalars": opt_scalars}


def save_checkpoint(root: str | Path, step: int, student, optimizer, scheduler, sampler, meta: dict,
                    keep: int = 2, ctx: DistContext | None = None) -> Path:
    """Write checkpoint ``root/step-<step>`` atomically and prune old ones (keep the last ``keep``).

    In a sharded run every rank must call this (the tensors are gathered from all ranks);
    rank 0 alone writes, the others wait at a barrier. The layout is the same for every
    number of processes, so a checkpoint resumes on any number of processes.
    """
    ctx = ctx or DistContext()
    root = Path(root)
    final = root / f"step-{step:07d}"
    tensors, opt_info = gather_state(student, optimizer)
    err = None
    if ctx.is_main:
        if root.is_symlink():
            raise RedError(f"{root} is a symbolic link; red writes checkpoints only inside its output folder")
        root.mkdir(parents=True, exist_ok=True)
        tmp = root / f".step-{step:07d}.tmp-{os.getpid()}"
        try:
            _write_checkpoint(tmp, final, tensors, {
                "step": step,
                "meta": meta,
                "world_size": ctx.world_size,
                **opt_info,
                "scheduler": scheduler.state_dict(),
                "sampler": sampler.state_dict(),
            }, step, root)
        except OSError as e:  # disk full, I/O error, read-only: keep what was complete
            shutil.rmtree(tmp, ignore_errors=True)
            kept = list_checkpoints(root)
            err = (f"could not write checkpoint {final} ({e.strerror or type(e).__name__}); "
                   + (f"the last complete checkpoint {kept[-1]} is kept" if kept else "no checkpoint is complete")
                   + "; free space and rerun with --resume")
        else:
            for old in list_checkpoints(root)[:-keep] if keep > 0 else []:
                shutil.rmtree(old, ignore_errors=True)
            for stale in root.glob(".step-*.tmp-*"):
                if stale != tmp and not stale.is_symlink():
                    shutil.rmtree(stale, ignore_errors=True)
    err = ctx.broadcast_error(err)
    if err:
        raise RedError(err)
    ctx.barrier()
    return final


def _write_checkpoint(tmp: Path, final: Path, tensors: dict, info: dict, step: int, root: Path) -> None:
    """Tensors and trainer.json into ``tmp``, then one rename to ``final`` (never half there)."""
    from .run import emit

    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()
    tensors["rng.cpu"] = torch.get_rng_state()
    if torch.cuda.is_available():
        for i, s in enumerate(torch.cuda.get_rng_state_all()):
            tensors[f"rng.cuda.{i}"] = s
    save_file(tensors, str(tmp / "state.safetensors"))
    with open(tmp / "state.safetensors", "rb+") as f:
        os.fsync(f.fileno())
    emit("checkpoint-written", step, root)
    _write_json(tmp / "trainer.json", info)
    _fsync_dir(tmp)
    if final.exists():
        shutil.rmtree(final)
    os.replace(tmp, final)
    _fsync_dir(root)


def list_checkpoints(root: str | Path) -> list[Path]:
    """Complete checkpoints under ``root``, oldest first."""
    root = Path(root)
    if not root.is_dir():
        return []
    found = []
    for p in root.iterdir():
        m = _STEP_DIR.match(p.name)
        if m and (p / "trainer.json").is_file() and (p / "state.safetensors").is_file():
            found.append((int(m.group(1)), p))
    return [p for _, p in sorted(found)]


# meta keys that older checkpoints may lack; compared only when the checkpoint has them
_OPTIONAL_META = ("teacher_fingerprint", "data_fingerprint", "identity")


def check_checkpoint(path: str | Path, expect_meta: dict, expect_shapes: dict[str, tuple] | None = None) -> dict:
    """Validate checkpoint ``path`` without loading its tensors; returns its trainer.json.

    Raises RedError (naming the problem) when trainer.json is unreadable, the checkpoint
    was made for another teacher or width (``expect_meta``), its safetensors file is
    truncated or corrupt, or its student tensors do not have ``expect_shapes``.
    """
    path = Path(path)
    try:
        info = json.loads((path / "trainer.json").read_text())
        saved_meta = info["meta"]
        int(info["step"])
    except (OSError, json.JSONDecodeError, KeyError, TypeError, ValueError) as e:
        raise RedError(f"checkpoint {path} is unreadable ({type(e).__name__} in trainer.json); "
                       "delete it to resume from an older one") from None
    for key, want in expect_meta.items():
        if key in _OPTIONAL_META and key not in saved_meta:
            continue
        have = saved_meta.get(key)
        if have != want:
            if key == "teacher_fingerprint":
                raise RedError(f"checkpoint {path} belongs to another teacher (its weights fingerprint differs); "
                               "use the run's own teacher, or start a new output folder")
            if key == "data_fingerprint":
                raise RedError(f"checkpoint {path} was trained on another corpus (the data file's contents "
                               "differ); resume with the run's own --data, or start a new output folder")
            if key == "identity" and isinstance(have, dict):
                diff = ", ".join(f"{k} {have.get(k)!r} -> {v!r}" for k, v in want.items() if have.get(k) != v)
                raise RedError(f"checkpoint {path} was made with other settings ({diff}); resume with the run's "
                               "own settings, or start a new output folder")
            raise RedError(f"checkpoint {path} was made with {key}={have!r}, this run has {key}={want!r}; "
                           "resume with the same teacher and width, or start a new output folder")
    f = path / "state.safetensors"
    check_safetensors_file(f, what="checkpoint")
    if expect_shapes is not None:
        header = _safetensors_header(f)
        have = {k[len("student."):]: tuple(v["shape"]) for k, v in header.items() if k.startswith("student.")}
        if set(have) != set(expect_shapes):
            raise RedError(f"checkpoint {path} does not match this student ({len(set(have) ^ set(expect_shapes))} "
                           "tensors differ); resume with the same teacher and width")
        for k, shape in expect_shapes.items():
            if have[k] != tuple(shape):
                raise RedError(f"checkpoint {path} tensor {k} has shape {have[k]}, expected {tuple(shape)}; "
                               "resume with the same teacher and width")
    return info


def _safetensors_header(f: Path) -> dict:
    with f.open("rb") as fh:
        n = int.from_bytes(fh.read(8), "little")
        return {k: v for k, v in json.loads(fh.read(n)).items() if k != "__metadata__"}


IMPL_KEYS = ("fused", "foreach", "capturable", "differentiable")


def load_checkpoint(path: str | Path, student, optimizer, scheduler, sampler, expect_meta: dict) -> int:
    """Restore everything saved by ``save_checkpoint``; returns the step to continue from.

    Works for a sharded student too (every rank reads the file and keeps its shard), and
    for any number of processes, whatever the number that saved it.
    """
    path = Path(path)
    info = check_checkpoint(path, expect_meta)
    tensors = load_file(str(path / "state.safetensors"))
    sd = {k[len("student."):]: v for k, v in tensors.items() if k.startswith("student.")}
    own = student.state_dict()
    missing = set(own) ^ set(sd)
    if missing:
        raise RedError(f"checkpoint {path} does not match this student ({len(missing)} tensors differ); "
                       "resume with the same teacher and width")
    with torch.no_grad():
        for k, v in own.items():
            if v.shape != sd[k].shape:
                raise RedError(f"checkpoint {path} tensor {k} has shape {tuple(sd[k].shape)}, expected {tuple(v.shape)}")
            v.copy_(like_param(sd[k].to(v.dtype), v))
    params = [p for g in optimizer.param_groups for p in g["params"]]
    state: dict = {}
    for k, v in tensors.items():
        if k.startswith("opt."):
            _, idx, name = k.split(".", 2)
            param = params[int(idx)]
            state.setdefault(int(idx), {})[name] = like_param(v, param) if v.shape == param.shape and v.dim() else v
    for k, v in info["optimizer_scalars"].items():
        idx, name = k.split(".", 1)
        state.setdefault(int(idx), {})[name] = v
    groups = optimizer.state_dict()["param_groups"]
    saved_groups = info["optimizer_param_groups"]
    if len(groups) != len(saved_groups):
        raise RedError(f"checkpoint {path} has {len(saved_groups)} optimizer groups, expected {len(groups)}")
    optimizer.load_state_dict({"state": state,
                               # hyper-parameters from the checkpoint; the implementation (fused on
                               # CUDA, foreach...) is this process's own choice for its device
                               "param_groups": [dict(sg, params=g["params"], **{k: g[k] for k in IMPL_KEYS if k in g})
                                                for g, sg in zip(groups, saved_groups)]})
    scheduler.load_state_dict(info["scheduler"])
    sampler.load_state_dict(info["sampler"])
    torch.set_rng_state(tensors["rng.cpu"])
    if torch.cuda.is_available():
        cuda_states = [tensors[k] for k in sorted(t for t in tensors if t.startswith("rng.cuda."))]
        if cuda_states:
            torch.cuda.set_rng_state_all(cuda_states[: torch.cuda.device_count()])
    return int(info["step"])


def load_trainable(path: str | Path) -> dict[str, torch.Tensor]:
    """Only the student's trainable tensors of a checkpoint (for export)."""
    f = Path(path) / "state.safetensors"
    if not f.is_file():
        raise RedError(f"{path} is not a red checkpoint (no state.safetensors); pick a checkpoints/step-* folder")
    check_safetensors_file(f, what="checkpoint")
    return {k[len("student."):]: v for k, v in load_file(str(f)).items() if k.startswith("student.")}


def read_meta(path: str | Path) -> dict:
    try:
        return json.loads((Path(path) / "trainer.json").read_text())["meta"]
    except (OSError, json.JSONDecodeError, KeyError):
        raise RedError(f"{path} is not a readable red checkpoint (trainer.json missing or corrupt)") from None
