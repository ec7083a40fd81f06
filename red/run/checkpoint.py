"""Training checkpoints: trainable tensors, optimizer, scheduler, RNG and data position.

Tensors go to safetensors, everything else to JSON; nothing is pickled. Two layouts, one
reader (every loader below takes both):

- one process: ``step-NNNNNNN/state.safetensors`` (every tensor whole, the RNG state)
  and ``trainer.json`` (step, meta, optimizer hyper-parameters and scalars, scheduler,
  sampler, world size);
- a sharded run (FSDP2, world size N > 1): every rank writes its own
  ``shard-RRRRR-of-NNNNN.safetensors`` in parallel, holding the rows of each trainable
  tensor and optimizer state it owns (its DTensor local shard: FSDP2 shards dim 0 as
  ``torch.chunk`` does, so ranks hold ceil(rows/N) rows, the last ones fewer, possibly
  none) and its own RNG state; rank 0 adds ``index.json`` (see ``_write_index``: every
  tensor's global shape, dtype and which file holds which global rows [start, stop);
  the world size; each file's byte size and sha256; a random save id also stamped in
  every shard file's header) and the same ``trainer.json``. Tensors that are not sharded
  (AdamW's step counts) are written whole by rank 0.

Atomicity: a checkpoint is written into a temporary folder ``.step-NNNNNNN.tmp-PID`` and
renamed into place by rank 0 after every rank has written and fsynced its file (an
all-gather of each rank's status, size and sha256 is the barrier) and rank 0 has checked
that every file the index names is there with its size; so a folder named
``step-NNNNNNN`` is complete, and a crash mid-write leaves only a ``.tmp`` folder that is
ignored and cleaned. ``list_checkpoints`` also rejects a step folder whose index names a
missing file or one of another size (a damaged copy); ``check_checkpoint`` further checks
each shard's header against the index and the save id; the sha256 of every file is
checked where all of it is read anyway (export) and, split over the ranks, on resume.
The sharded layout assumes the run folder is on a file system every rank sees (as the
single-writer layout already did for resuming on another node).

Resharding: a checkpoint of N ranks loads on M ranks (1 -> M, N -> 1 included): each rank
works out the global rows of its own shard for M and reads just those rows, with
``safe_open(...).get_slice(name)[a:b]``, from whichever files hold them, never the whole
tensor. RNG: on the same world size each rank restores its own state; on another world
size every rank restores rank 0's (what a single-process checkpoint always gave). Training
draws no random numbers after initialization (the data order is the sampler's, saved in
trainer.json), so this changes nothing a run computes.
"""
from __future__ import annotations

import errno
import json
import os
import shutil
import uuid
from contextlib import ExitStack
from pathlib import Path

import torch
import torch.distributed as dist
from safetensors import safe_open
from safetensors.torch import save_file

from red.run.checkpoint_files import (INDEX, INDEX_FORMAT, SINGLE_FILE, _files_problem, _parse_index, _read_index,  # noqa: F401
                               list_checkpoints, shard_file_name)
from red.distributed import DistContext, full_tensor, local_tensor
from red.errors import RedError
from red.dtypes import FROM_SAFETENSORS, SAFETENSORS
from red.files import file_sha256, is_write_error, write_error_text
from red.model.teacher import check_safetensors_file



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


def row_range(rows: int, rank: int, world: int) -> tuple[int, int]:
    """Global rows [start, stop) of ``rank``'s dim-0 shard of a tensor of ``rows`` rows on
    ``world`` ranks, as DTensor's ``Shard(0)`` lays them out (``torch.chunk``: ceil(rows /
    world) rows each, the last ranks fewer or none)."""
    chunk = -(-rows // world)
    start = min(rank * chunk, rows)
    return start, min(start + chunk, rows)


def _sharding(t: torch.Tensor) -> str:
    """"shard0" (a DTensor sharded on dim 0 over a 1-D mesh), "replicate" or "plain"."""
    from torch.distributed.tensor import DTensor, Replicate, Shard

    if not isinstance(t, DTensor):
        return "plain"
    placements = tuple(t.placements)
    if t.device_mesh.ndim == 1 and len(placements) == 1:
        if isinstance(placements[0], Shard) and placements[0].dim == 0 and t.dim() > 0:
            return "shard0"
        if isinstance(placements[0], Replicate):
            return "replicate"
    raise RedError(f"cannot checkpoint a tensor laid out as {placements} on a {t.device_mesh.ndim}-D mesh; "
                   "red's sharded checkpoints hold dim-0 shards over one mesh dimension")


def _pieces(t: torch.Tensor, world: int) -> list[tuple[int, int | None, int | None]]:
    """(rank, start, stop) of each non-empty piece of ``t`` that a rank writes; a tensor
    that is not sharded is written whole by rank 0 (start/stop None for a 0-dim one)."""
    if _sharding(t) == "shard0":
        ranges = [(r, *row_range(t.shape[0], r, world)) for r in range(world)]
        return [(r, a, b) for r, a, b in ranges if b > a]
    return [(0, 0, t.shape[0])] if t.dim() else [(0, None, None)]


def _shard_rows(name: str, t: torch.Tensor, rank: int, world: int) -> tuple[int, int]:
    """This rank's global rows of the sharded ``t``, checked against its local shard."""
    a, b = row_range(t.shape[0], rank, world)
    rows = t.to_local().shape[0]
    if rows != b - a:
        raise RedError(f"rank {rank} holds {rows} rows of {name} {tuple(t.shape)}, expected rows [{a}, {b}) of "
                       f"{world} dim-0 shards; red's checkpoints follow torch.chunk's layout")
    return a, b


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
    return tensors, _optimizer_info(opt, opt_scalars, optimizer_param_names(student, optimizer))


def optimizer_param_names(student, optimizer) -> list[str]:
    """The student's name of each tensor the optimizer steps, in its index order (groups
    one after the other): what ``opt.<index>.*`` of a checkpoint belongs to."""
    names = {id(p): n for n, p in student.named_trainable_parameters()}
    return [names[id(p)] for g in optimizer.param_groups for p in g["params"]]


def _optimizer_info(opt: dict, scalars: dict, names: list[str]) -> dict:
    return {"optimizer_param_groups": [{k: v for k, v in g.items() if k != "params"} for g in opt["param_groups"]],
            "optimizer_scalars": scalars, "optimizer_param_names": names}


def local_state(student, optimizer, rank: int, world: int) -> tuple[dict[str, torch.Tensor], dict, dict]:
    """This rank's pieces of every checkpointed tensor (no communication), the index
    entries of all tensors (the same on every rank), and the optimizer's non-tensor state."""
    items = [(f"student.{k}", v.detach(), torch.float32) for k, v in student.state_dict().items()]
    opt = optimizer.state_dict()
    scalars: dict = {}
    for idx, st in opt["state"].items():
        for k, v in st.items():
            if torch.is_tensor(v):
                items.append((f"opt.{idx}.{k}", v.detach(), v.dtype))
            else:
                scalars[f"{idx}.{k}"] = v
    mine: dict[str, torch.Tensor] = {}
    entries: dict[str, dict] = {}
    for name, t, dtype in items:
        pieces = _pieces(t, world)
        entries[name] = {"dtype": SAFETENSORS[dtype], "shape": list(t.shape),
                         "shards": [{"file": r} if a is None else {"file": r, "start": a, "stop": b}
                                    for r, a, b in pieces]}
        if any(r == rank for r, _, _ in pieces):
            if _sharding(t) == "shard0":
                _shard_rows(name, t, rank, world)
            mine[name] = local_tensor(t).to(dtype).cpu().contiguous()
    return mine, entries, _optimizer_info(opt, scalars, optimizer_param_names(student, optimizer))


def _rng_tensors(sharded: bool) -> dict[str, torch.Tensor]:
    out = {"rng.cpu": torch.get_rng_state()}
    if torch.cuda.is_available():
        if sharded:  # each rank its own GPU's generator
            out[f"rng.cuda.{torch.cuda.current_device()}"] = torch.cuda.get_rng_state()
        else:
            for i, s in enumerate(torch.cuda.get_rng_state_all()):
                out[f"rng.cuda.{i}"] = s
    return out


def _trainer_info(step: int, meta: dict, world: int, opt_info: dict, scheduler, sampler) -> dict:
    return {"step": step, "meta": meta, "world_size": world, **opt_info,
            "scheduler": scheduler.state_dict(), "sampler": sampler.state_dict()}


def _not_written(root: Path, final: Path, why: str) -> str:
    kept = list_checkpoints(root)
    return (f"could not write checkpoint {final} ({why}); "
            + (f"the last complete checkpoint {kept[-1]} is kept" if kept else "no checkpoint is complete")
            + "; free space and rerun with --resume")


def _prune(root: Path, tmp: Path, keep: int) -> None:
    for old in list_checkpoints(root)[:-keep] if keep > 0 else []:
        shutil.rmtree(old, ignore_errors=True)
    for stale in root.glob(".step-*.tmp-*"):
        if stale != tmp and not stale.is_symlink():
            shutil.rmtree(stale, ignore_errors=True)


def save_checkpoint(root: str | Path, step: int, student, optimizer, scheduler, sampler, meta: dict,
                    keep: int = 2, ctx: DistContext | None = None) -> Path:
    """Write checkpoint ``root/step-<step>`` atomically and prune old ones (keep the last ``keep``).

    In a sharded run every rank must call this: each writes its own shard file, rank 0
    the index and trainer.json, then renames the folder into place (see the module's
    docstring). A single process writes one ``state.safetensors``. Either resumes on
    any number of processes. A disk full (or another I/O error) on any rank is one
    RedError on every rank; the partial folder is removed and the last checkpoint kept.
    """
    ctx = ctx or DistContext()
    root = Path(root)
    final = root / f"step-{step:07d}"
    if ctx.distributed:
        _save_sharded(root, final, step, student, optimizer, scheduler, sampler, meta, keep, ctx)
        return final
    tensors, opt_info = gather_state(student, optimizer)
    if root.is_symlink():
        raise RedError(f"{root} is a symbolic link; red writes checkpoints only inside its output folder")
    root.mkdir(parents=True, exist_ok=True)
    tmp = root / f".step-{step:07d}.tmp-{os.getpid()}"
    try:
        _write_checkpoint(tmp, final, tensors, _trainer_info(step, meta, 1, opt_info, scheduler, sampler),
                          step, root)
    except Exception as e:  # disk full (safetensors raises its own error type), I/O error, read-only
        if not is_write_error(e):
            raise
        shutil.rmtree(tmp, ignore_errors=True)  # the last complete checkpoint stays, nothing blocks a resume
        raise RedError(_not_written(root, final, write_error_text(e))) from None
    _prune(root, tmp, keep)
    return final


def _write_checkpoint(tmp: Path, final: Path, tensors: dict, info: dict, step: int, root: Path) -> None:
    """Tensors and trainer.json into ``tmp``, then one rename to ``final`` (never half there)."""
    from red.run.folder import emit

    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()
    tensors.update(_rng_tensors(sharded=False))
    save_file(tensors, str(tmp / SINGLE_FILE))
    with open(tmp / SINGLE_FILE, "rb+") as f:
        os.fsync(f.fileno())
    emit("checkpoint-written", step, root)
    _write_json(tmp / "trainer.json", info)
    _fsync_dir(tmp)
    if final.exists():
        shutil.rmtree(final)
    os.replace(tmp, final)
    _fsync_dir(root)


def _comm_device() -> torch.device:
    if dist.is_initialized() and dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def _gather_status(ctx: DistContext, ok: bool, err: int, size: int, digest: str) -> list[tuple[bool, int, int, str]]:
    """(ok, errno, bytes, sha256) of every rank's shard write; a collective, and the
    barrier after which every rank's file is written and fsynced."""
    row = torch.zeros(7, dtype=torch.int64)
    row[0], row[1], row[2] = int(ok), err, size
    row[3:] = torch.frombuffer(bytearray(bytes.fromhex(digest) if digest else bytes(32)), dtype=torch.int64)
    dev = _comm_device()
    parts = [torch.empty(7, dtype=torch.int64, device=dev) for _ in range(ctx.world_size)]
    dist.all_gather(parts, row.to(dev))
    out = []
    for p in parts:
        p = p.cpu()
        out.append((bool(p[0]), int(p[1]), int(p[2]), bytes(p[3:].contiguous().view(torch.uint8).tolist()).hex()))
    return out


def _save_sharded(root: Path, final: Path, step: int, student, optimizer, scheduler, sampler, meta: dict,
                  keep: int, ctx: DistContext) -> None:
    from red.run.folder import emit

    # 1. rank 0 makes the temporary folder and names it (and a save id) to every rank
    word = ""
    if ctx.is_main:
        try:
            if root.is_symlink():
                raise RedError(f"{root} is a symbolic link; red writes checkpoints only inside its output folder")
            root.mkdir(parents=True, exist_ok=True)
            tmp = root / f".step-{step:07d}.tmp-{os.getpid()}"
            if tmp.exists():
                shutil.rmtree(tmp)
            tmp.mkdir()
            word = f"ok {tmp.name} {uuid.uuid4().hex}"
        except RedError as e:
            word = str(e)
        except OSError as e:
            word = _not_written(root, final, e.strerror or type(e).__name__)
    word = ctx.broadcast_error(word) or ""  # a string from rank 0 to all, without pickle
    if not word.startswith("ok "):
        raise RedError(word)
    _, tmp_name, save_id = word.split(" ")
    tmp = root / tmp_name
    # 2. every rank writes and fsyncs its own shard, in parallel
    own_error: BaseException | None = None
    size, digest, errno_ = 0, "", 0
    try:
        mine, entries, opt_info = local_state(student, optimizer, ctx.rank, ctx.world_size)
        mine.update(_rng_tensors(sharded=True))
        f = tmp / shard_file_name(ctx.rank, ctx.world_size)
        save_file(mine, str(f), metadata={"format": INDEX_FORMAT, "save_id": save_id, "step": str(step),
                                          "rank": str(ctx.rank), "world_size": str(ctx.world_size)})
        with open(f, "rb+") as fh:
            os.fsync(fh.fileno())
        size, digest = f.stat().st_size, file_sha256(f)
    except Exception as e:  # reported to rank 0 first, so that no rank waits forever
        own_error = e
        errno_ = e.errno if isinstance(e, OSError) and e.errno else (errno.ENOSPC if is_write_error(e) and
                                                                      "No space" in str(e) else -1)
    status = _gather_status(ctx, own_error is None, errno_, size, digest)
    # 3. rank 0: the index, trainer.json, a check of the set, the rename
    err = None
    if ctx.is_main:
        failed = [(r, e) for r, (ok, e, _, _) in enumerate(status) if not ok]
        try:
            if failed:
                r, e = failed[0]
                raise OSError(e if e > 0 else None, f"{os.strerror(e) if e > 0 else 'error'} on rank {r}")
            _write_json(tmp / INDEX, {
                "format": INDEX_FORMAT, "version": 1, "step": step, "world_size": ctx.world_size,
                "save_id": save_id,
                "files": [{"rank": r, "name": shard_file_name(r, ctx.world_size), "bytes": s, "sha256": h}
                          for r, (_, _, s, h) in enumerate(status)],
                "tensors": entries})
            emit("checkpoint-written", step, root)  # every shard file is on disk, not yet renamed
            _write_json(tmp / "trainer.json", _trainer_info(step, meta, ctx.world_size, opt_info, scheduler, sampler))
            problem = _files_problem(tmp)
            if problem:  # e.g. a run folder that is not one shared file system for all ranks
                raise OSError(None, f"{problem} after writing")
            _fsync_dir(tmp)
            if final.exists():
                shutil.rmtree(final)
            os.replace(tmp, final)
            _fsync_dir(root)
        except OSError as e:
            shutil.rmtree(tmp, ignore_errors=True)
            err = _not_written(root, final, e.strerror or type(e).__name__)
        else:
            _prune(root, tmp, keep)
    err = ctx.broadcast_error(err)
    if own_error is not None and not is_write_error(own_error):
        raise own_error
    if err:
        raise RedError(err)
    ctx.barrier()


# -- reading --------------------------------------------------------------------------------------


class _Layout:
    """Where each tensor of checkpoint ``path`` lives, for both layouts: the index of a
    sharded checkpoint, or one file holding every tensor whole (its header)."""

    def __init__(self, path: Path):
        self.path = path
        self.sharded = (path / INDEX).is_file()
        if self.sharded:
            self.index = _read_index(path)
            self.files = [f["name"] for f in self.index["files"]]
            self.tensors = self.index["tensors"]
        else:
            f = path / SINGLE_FILE
            if not f.is_file():
                raise RedError(f"{path} is not a red checkpoint (no {SINGLE_FILE} or {INDEX}); "
                               "pick a checkpoints/step-* folder")
            check_safetensors_file(f, what="checkpoint")
            self.index, self.files = None, [SINGLE_FILE]
            self.tensors = {k: {"dtype": v["dtype"], "shape": v["shape"],
                                "shards": [{"file": 0, "start": 0, "stop": v["shape"][0]}] if v["shape"] else [{"file": 0}]}
                            for k, v in _safetensors_header(f).items() if not k.startswith("rng.")}

    @property
    def world_size(self) -> int:
        return len(self.files)

    def check_files(self) -> None:
        """Each shard file's header against the index: readable, of this save, holding
        exactly the pieces the index gives it, with their shapes and dtypes."""
        if not self.sharded:
            return
        want: list[dict] = [{} for _ in self.files]
        for name, e in self.tensors.items():
            for s in e["shards"]:
                rows = [s["stop"] - s["start"]] if e["shape"] else []
                want[s["file"]][name] = (e["dtype"], rows + list(e["shape"][1:]))
        for i, name in enumerate(self.files):
            f = self.path / name
            check_safetensors_file(f, what="checkpoint shard")
            header = _safetensors_header(f, with_metadata=True)
            if (header.get("__metadata__") or {}).get("save_id") != self.index["save_id"]:
                raise RedError(f"checkpoint {self.path}: shard file {name} belongs to another save (its save id "
                               "differs from the index's); the set is mixed, pick another checkpoint")
            have = {k: (v["dtype"], list(v["shape"])) for k, v in header.items()
                    if k != "__metadata__" and not k.startswith("rng.")}
            if have != want[i]:
                bad = sorted(set(have) ^ set(want[i]) or {k for k in have if have[k] != want[i][k]})
                raise RedError(f"checkpoint {self.path}: shard file {name} does not match the index "
                               f"({len(bad)} tensors differ, e.g. {bad[0]}); pick another checkpoint")

    def verify_hashes(self, ctx: DistContext | None = None) -> None:
        """Compare each shard file's sha256 with the index; in a sharded run the files are
        split over the ranks (each reads 1/N of them) and the verdict is shared."""
        if not self.sharded:
            return
        rank, world = (ctx.rank, ctx.world_size) if ctx is not None and ctx.distributed else (0, 1)
        bad = torch.zeros(len(self.files), dtype=torch.int64)
        for i in range(rank, len(self.files), world):
            if file_sha256(self.path / self.files[i]) != self.index["files"][i]["sha256"]:
                bad[i] = 1
        if world > 1:
            t = bad.to(_comm_device())
            dist.all_reduce(t, op=dist.ReduceOp.MAX)
            bad = t.cpu()
        if bool(bad.any()):
            name = self.files[int(bad.nonzero()[0])]
            raise RedError(f"checkpoint {self.path} is damaged: shard file {name} does not have the sha256 "
                           "its index records; pick another checkpoint")


class _Reader:
    """Rows of checkpointed tensors, read slice by slice from the files that hold them."""

    def __init__(self, layout: _Layout):
        self.layout = layout
        self._stack = ExitStack()
        self._open: dict[int, object] = {}

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self._stack.close()

    def _file(self, i: int):
        if i not in self._open:
            self._open[i] = self._stack.enter_context(
                safe_open(str(self.layout.path / self.layout.files[i]), framework="pt", device="cpu"))
        return self._open[i]

    def rows(self, name: str, start: int, stop: int) -> torch.Tensor:
        """Global rows [start, stop) of tensor ``name`` (the whole tensor if it is 0-dim)."""
        e = self.layout.tensors[name]
        if not e["shape"]:
            return self._file(e["shards"][0]["file"]).get_tensor(name)
        parts = []
        for s in e["shards"]:
            a, b = max(start, s["start"]), min(stop, s["stop"])
            if a < b:
                parts.append(self._file(s["file"]).get_slice(name)[a - s["start"]: b - s["start"]])
        if not parts:
            return torch.empty((0, *e["shape"][1:]), dtype=FROM_SAFETENSORS[e["dtype"]])
        return parts[0] if len(parts) == 1 else torch.cat(parts)

    def whole(self, name: str) -> torch.Tensor:
        shape = self.layout.tensors[name]["shape"]
        return self.rows(name, 0, shape[0] if shape else 0)

    def like(self, name: str, param: torch.Tensor) -> torch.Tensor:
        """The rows of ``name`` that ``param`` holds on this rank: its dim-0 shard for a
        sharded DTensor (only those rows are read), else the whole tensor."""
        if _sharding(param) == "shard0":
            mesh = param.device_mesh
            a, b = _shard_rows(name, param, mesh.get_local_rank(), mesh.size())
            return self.rows(name, a, b)
        return self.whole(name)

    def rng(self, file: int) -> dict[str, torch.Tensor]:
        f = self._file(file)
        return {k: f.get_tensor(k) for k in f.keys() if k.startswith("rng.")}


# meta keys that older checkpoints may lack; compared only when the checkpoint has them
_OPTIONAL_META = ("teacher_fingerprint", "data_fingerprint", "identity", "teacher_fingerprint_v1")


def check_checkpoint(path: str | Path, expect_meta: dict, expect_shapes: dict[str, tuple] | None = None,
                     verify_hashes: bool = False) -> dict:
    """Validate checkpoint ``path`` without loading its tensors; returns its trainer.json.

    Raises RedError (naming the problem) when trainer.json is unreadable, the checkpoint
    was made for another teacher or width (``expect_meta``), a tensor file is missing,
    truncated or corrupt (a sharded set: a shard file missing, of another size than the
    index records, of another save, or not holding what the index says), or its student
    tensors do not have ``expect_shapes``. ``verify_hashes`` also reads every shard file
    to compare its sha256 with the index's.
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
        if key == "teacher_fingerprint" and have != want and "teacher_fingerprint_v1" in expect_meta \
                and isinstance(have, str) and len(have) == 16:
            want = expect_meta["teacher_fingerprint_v1"]  # written before whole-file fingerprints
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
    layout = _open_layout(path, verify_hashes)
    if expect_shapes is not None:
        have = {k[len("student."):]: tuple(v["shape"]) for k, v in layout.tensors.items() if k.startswith("student.")}
        if set(have) != set(expect_shapes):
            raise RedError(f"checkpoint {path} does not match this student ({len(set(have) ^ set(expect_shapes))} "
                           "tensors differ); resume with the same teacher and width")
        for k, shape in expect_shapes.items():
            if have[k] != tuple(shape):
                raise RedError(f"checkpoint {path} tensor {k} has shape {have[k]}, expected {tuple(shape)}; "
                               "resume with the same teacher and width")
    return info


def _safetensors_header(f: Path, with_metadata: bool = False) -> dict:
    with f.open("rb") as fh:
        n = int.from_bytes(fh.read(8), "little")
        return {k: v for k, v in json.loads(fh.read(n)).items() if with_metadata or k != "__metadata__"}


IMPL_KEYS = ("fused", "foreach", "capturable", "differentiable")


def load_checkpoint(path: str | Path, student, optimizer, scheduler, sampler, expect_meta: dict,
                    ctx: DistContext | None = None) -> int:
    """Restore everything saved by ``save_checkpoint``; returns the step to continue from.

    Either layout, saved by any number of processes, onto this run's (``ctx``) number:
    each rank reads only the rows of its own shards (see the module's docstring). In a
    sharded run every rank calls this (the shard files' sha256 are checked, split over
    the ranks).
    """
    from torch.distributed.tensor import DTensor

    ctx = ctx or DistContext()
    path = Path(path)
    info = check_checkpoint(path, expect_meta)
    layout = _Layout(path)
    layout.verify_hashes(ctx)
    own = student.state_dict()
    saved = {k[len("student."):] for k in layout.tensors if k.startswith("student.")}
    if set(own) != saved:
        raise RedError(f"checkpoint {path} does not match this student ({len(set(own) ^ saved)} tensors differ); "
                       "resume with the same teacher and width")
    params = [p for g in optimizer.param_groups for p in g["params"]]
    index = _saved_index(path, info, student, optimizer)  # saved optimizer index -> this optimizer's
    state: dict = {}
    with _Reader(layout) as rd, torch.no_grad():
        for k, v in own.items():
            shape = tuple(layout.tensors[f"student.{k}"]["shape"])
            if tuple(v.shape) != shape:
                raise RedError(f"checkpoint {path} tensor {k} has shape {shape}, expected {tuple(v.shape)}")
            local_tensor(v).copy_(rd.like(f"student.{k}", v))
        for name, e in layout.tensors.items():
            if not name.startswith("opt."):
                continue
            _, idx, key = name.split(".", 2)
            if int(idx) >= len(index):
                raise RedError(f"checkpoint {path} has optimizer state for {int(idx) + 1}+ tensors, this student "
                               f"trains {len(params)}; resume with the same teacher and width")
            idx = index[int(idx)]
            param = params[idx]
            if e["shape"] and tuple(e["shape"]) == tuple(param.shape):  # moments: laid out like the parameter
                local = rd.like(name, param).to(param.device)
                value = DTensor.from_local(local, param.device_mesh, param.placements, run_check=False,
                                           shape=param.shape, stride=param.stride()) \
                    if isinstance(param, DTensor) else local
            else:  # AdamW's step count
                value = rd.whole(name)
            state.setdefault(idx, {})[key] = value
        # RNG: each rank its own on the same world size, else rank 0's (training draws none)
        rng = rd.rng(ctx.rank if layout.world_size == ctx.world_size else 0)
    _load_optimizer(path, info, index, state, optimizer, scheduler)
    sampler.load_state_dict(info["sampler"])
    _restore_rng(rng, ctx)
    return int(info["step"])


def _load_optimizer(path: Path, info: dict, index: list[int], state: dict, optimizer, scheduler) -> None:
    """Load AdamW's ``state`` (tensors read, keyed by this optimizer's index) with the
    checkpoint's scalars and group settings, and the scheduler. A checkpoint of one group
    (red before weight decay) gives its settings and its lr to each group."""
    for k, v in info["optimizer_scalars"].items():
        idx, name = k.split(".", 1)
        state.setdefault(index[int(idx)], {})[name] = v
    groups = optimizer.state_dict()["param_groups"]
    saved_groups = info["optimizer_param_groups"]
    if len(saved_groups) == 1:  # a checkpoint of one group: its settings for each
        saved_groups = saved_groups * len(groups)
    if len(groups) != len(saved_groups):
        raise RedError(f"checkpoint {path} has {len(saved_groups)} optimizer groups, expected {len(groups)}")
    optimizer.load_state_dict({"state": state,
                               # hyper-parameters from the checkpoint; the implementation (fused on
                               # CUDA, foreach...) is this process's own choice for its device
                               "param_groups": [dict(sg, params=g["params"], **{k: g[k] for k in IMPL_KEYS if k in g})
                                                for g, sg in zip(groups, saved_groups)]})
    sched = dict(info["scheduler"])
    for key in ("base_lrs", "_last_lr"):  # a one-group checkpoint: its one lr for each group
        if isinstance(sched.get(key), list) and len(sched[key]) == 1:
            sched[key] = sched[key] * len(groups)
    scheduler.load_state_dict(sched)


def _saved_index(path: Path, info: dict, student, optimizer) -> list[int]:
    """For each optimizer index of the checkpoint, this optimizer's index of the same tensor,
    matched by name: the names the checkpoint records, or, for a checkpoint written before
    it recorded them (one group), the student's registration order, which its index was."""
    own = optimizer_param_names(student, optimizer)
    saved = info.get("optimizer_param_names") or [n for n, _ in student.named_trainable_parameters()]
    where = {n: i for i, n in enumerate(own)}
    missing = [n for n in saved if n not in where]
    if missing or len(saved) != len(own):
        raise RedError(f"checkpoint {path} has optimizer state for tensors this student does not train "
                       f"({', '.join(missing[:4]) or f'{len(saved)} tensors, this student trains {len(own)}'}); "
                       "resume with the same teacher and width")
    return [where[n] for n in saved]


def _restore_rng(rng: dict[str, torch.Tensor], ctx: DistContext) -> None:
    if "rng.cpu" in rng:
        torch.set_rng_state(rng["rng.cpu"])
    cuda = sorted((int(k.rsplit(".", 1)[1]), v) for k, v in rng.items() if k.startswith("rng.cuda."))
    if not cuda or not torch.cuda.is_available():
        return
    if ctx.distributed:  # this rank's GPU only: the saved state of the same device, or the first
        dev = torch.cuda.current_device()
        torch.cuda.set_rng_state(dict(cuda).get(dev, cuda[0][1]))
    else:
        for i, s in cuda:
            if i < torch.cuda.device_count():
                torch.cuda.set_rng_state(s, i)


def _open_layout(path: Path, verify_hashes: bool) -> _Layout:
    """The layout of checkpoint ``path`` after its file checks (and sha256 when asked)."""
    problem = _files_problem(path)
    if problem:
        raise RedError(f"checkpoint {path} is incomplete: {problem}; pick another checkpoint or delete this one")
    layout = _Layout(path)
    layout.check_files()
    if verify_hashes:
        layout.verify_hashes()
    return layout


def _checked_layout(path: Path) -> _Layout:
    """The layout of ``path`` after every integrity check, sha256 included (for readers
    that read every tensor anyway)."""
    if not (path / SINGLE_FILE).is_file() and not (path / INDEX).is_file():
        raise RedError(f"{path} is not a red checkpoint (no {SINGLE_FILE} or {INDEX}); "
                       "pick a checkpoints/step-* folder")
    return _open_layout(path, verify_hashes=True)


def load_tensors(path: str | Path, prefix: str = "") -> dict[str, torch.Tensor]:
    """Every tensor of checkpoint ``path`` whose name starts with ``prefix``, whole (the
    row pieces of a sharded checkpoint concatenated), without the RNG states."""
    layout = _checked_layout(Path(path))
    with _Reader(layout) as rd:
        return {k: rd.whole(k) for k in layout.tensors if k.startswith(prefix)}


def load_trainable(path: str | Path) -> dict[str, torch.Tensor]:
    """Only the student's trainable tensors of a checkpoint, whole (for export)."""
    return {k[len("student."):]: v for k, v in load_tensors(path, "student.").items()}


def read_meta(path: str | Path) -> dict:
    try:
        return json.loads((Path(path) / "trainer.json").read_text())["meta"]
    except (OSError, json.JSONDecodeError, KeyError):
        raise RedError(f"{path} is not a readable red checkpoint (trainer.json missing or corrupt)") from None
