"""End to end: teacher -> calibrate -> initialize -> distill -> export.

``distill(cfg)`` is what ``red distill`` runs; each stage is also a public function.
"""
from __future__ import annotations

import dataclasses
import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

import torch

import red_kernels

from .calibration import Calibration, calibrate, channel_scores
from .checkpoint import check_checkpoint, list_checkpoints
from .config import DistillConfig, save_yaml
from .data import PackedCorpus, load_corpus
from .distributed import DistContext, full_tensor, init_distributed, rank_device, shard_student
from .errors import RedError
from .export import export_student
from .initialization import initialize, select_channels
from .plan import checkpoint_bytes
from .student import ProjectedStudent, trainable_shapes
from .teacher import Arch, check_teacher_files, load_teacher, load_tokenizer, read_teacher_config, teacher_fingerprint
from .trainer import MetricsLog, resolve_precision, train


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(name)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise RedError(f"device {name} was asked for but CUDA is not available; use --device cpu or auto")
    return dev


def prepare_output(out: str | Path, overwrite: bool = False, resume: bool = False,
                   need_bytes: int = 0) -> Path:
    """Check the output folder before any work starts, then make it ready.

    Every check (not a file, empty unless ``overwrite``/``resume``, writable, at least
    ``need_bytes`` free) runs before anything is touched; only then is a folder replaced
    (``overwrite``) or created.
    """
    check_output(out, overwrite, resume, need_bytes)
    p = Path(out)
    if not resume and p.is_dir() and any(p.iterdir()):
        shutil.rmtree(p)  # check_output allowed it: overwrite was asked for
    p.mkdir(parents=True, exist_ok=True)
    return p


def free_disk_bytes(path: str | Path) -> int:
    """Free bytes on the file system that holds ``path`` (or its nearest existing parent)."""
    p = Path(path).absolute()
    while not p.exists() and p != p.parent:
        p = p.parent
    return shutil.disk_usage(p).free


def _probe_writable(folder: Path) -> None:
    probe = folder / f".write-test-{os.getpid()}"
    probe.write_text("ok")
    probe.unlink()


def check_output(out: str | Path, overwrite: bool = False, resume: bool = False, need_bytes: int = 0) -> None:
    """The read-only half of ``prepare_output``: raise RedError (and change nothing) when
    ``out`` cannot take this run."""
    if not str(out):
        raise RedError("no output folder given; pass --out DIR")
    p = Path(out)
    if p.exists() and not p.is_dir():
        raise RedError(f"output path {p} is a file; pass a folder to --out")
    non_empty = p.is_dir() and any(p.iterdir())
    if resume:
        if not (p / "checkpoints").is_dir():
            raise RedError(f"--resume: {p} holds no checkpoints folder; start without --resume")
    elif non_empty and not overwrite:
        raise RedError(f"output folder {p} is not empty; choose a new --out, add --resume to continue, "
                       "or --overwrite to replace it")
    # writable: probe the folder itself, or the nearest existing parent it would be made in
    target = p if p.is_dir() else next((q for q in p.absolute().parents if q.exists()), None)
    try:
        if target is None or not target.is_dir():
            raise NotADirectoryError(20, "Not a directory")
        _probe_writable(target)
        if resume:
            _probe_writable(p / "checkpoints")
    except OSError as e:
        raise RedError(f"output folder {p} is not writable ({e.strerror or type(e).__name__}); "
                       "pick a writable --out") from None
    if need_bytes:
        free = free_disk_bytes(p)
        if free < need_bytes:
            raise RedError(f"not enough disk space for {p}: one checkpoint needs about {_fmt_bytes(need_bytes)}, "
                           f"{_fmt_bytes(free)} are free; free space or pick another --out")


def _fmt_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if n < 1024 or unit == "TiB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1024
    return f"{n} B"


def build_student(teacher, hidden_size: int, init: str = "red", calibration: Calibration | None = None,
                  score: str = "minitron", init_std: float | None = 0.02, norm_eps: float | None = None,
                  seed: int = 0) -> ProjectedStudent:
    """A ProjectedStudent of width ``hidden_size``, initialized by ``init``.

    The red init needs ``calibration`` (its channel scores pick the channel set S).
    """
    student = ProjectedStudent(teacher, hidden_size, norm_eps=norm_eps)
    channels = None
    if init == "red":
        if calibration is None:
            raise RedError("the red init needs calibration statistics; run calibrate() first")
        if calibration.hidden_size != student.arch.hidden_size:
            raise RedError(f"calibration was made for width {calibration.hidden_size}, the teacher has "
                           f"{student.arch.hidden_size}; recalibrate with this teacher")
        channels = select_channels(channel_scores(calibration, score), hidden_size)
    initialize(student, init, channels=channels, std=init_std, seed=seed)
    return student


@dataclass
class RunResult:
    out: Path
    student: ProjectedStudent
    tokenizer: object
    corpus: PackedCorpus
    calibration: Calibration
    metrics: MetricsLog


def preflight(cfg: DistillConfig, tcfg, ctx: DistContext | None = None):
    """Every check that can fail on the user's input, run before anything is written.

    Returns ``(tokenizer, corpus, calibration or None, expect_meta)``. Reads the teacher's
    config, tokenizer and safetensors headers (not its weights), the corpus, the given
    calibration file and, with ``--resume``, the last checkpoint; checks the output folder
    is usable and has room for one checkpoint. Raises RedError naming the first problem.
    """
    ctx = ctx or DistContext()
    arch = Arch.from_config(tcfg)
    D = arch.hidden_size
    if not 0 < cfg.hidden_size < D:
        raise RedError(f"--hidden-size {cfg.hidden_size} must be between 1 and {D - 1} (the teacher's width is {D})")
    if cfg.batch_size % ctx.world_size:
        raise RedError(f"--batch-size {cfg.batch_size} is the global micro-batch and must be divisible by the "
                       f"{ctx.world_size} processes; pick a multiple of {ctx.world_size}")
    check_teacher_files(cfg.teacher)
    tokenizer = load_tokenizer(cfg.teacher, cfg.trust_remote_code)
    if len(tokenizer) > arch.vocab_size:
        raise RedError(f"the tokenizer in {cfg.teacher} has {len(tokenizer)} tokens but the teacher's embedding has "
                       f"{arch.vocab_size} rows; use the teacher's own tokenizer")
    corpus = load_corpus(cfg.data, tokenizer, cfg.seq_len, cfg.val_fraction, cfg.text_field, cfg.txt_split)
    cal = None
    if cfg.calibration:
        cal = Calibration.load(cfg.calibration)
        if cal.hidden_size != D:
            raise RedError(f"calibration {cfg.calibration} was made for width {cal.hidden_size}, the teacher has "
                           f"{D}; recalibrate with this teacher or drop --calibration")
    expect_meta = {"init": cfg.init, "teacher_fingerprint": teacher_fingerprint(cfg.teacher),
                   "hidden_size": cfg.hidden_size, "teacher_hidden_size": D, "model_type": arch.model_type,
                   "num_layers": arch.num_layers}
    if cfg.resume:
        if not (Path(cfg.out) / "checkpoints").is_dir():
            raise RedError(f"--resume: {cfg.out} holds no checkpoints folder; start without --resume")
        found = list_checkpoints(Path(cfg.out) / "checkpoints")
        if not found:
            raise RedError(f"--resume: no complete checkpoint in {Path(cfg.out) / 'checkpoints'}; start without --resume")
        info = check_checkpoint(found[-1], expect_meta, trainable_shapes(arch, cfg.hidden_size))
        n = info.get("sampler", {}).get("n")
        if n != len(corpus.train):
            raise RedError(f"checkpoint {found[-1]} was made with {n} training sequences, this corpus packs to "
                           f"{len(corpus.train)}; resume with the same --data and --seq-len")
    # rank 0 alone checks (and later writes) the output folder; the others hear its verdict
    err = None
    if ctx.is_main:
        try:
            check_output(cfg.out, cfg.overwrite, cfg.resume, need_bytes=checkpoint_bytes(arch, cfg.hidden_size))
        except RedError as e:
            err = str(e)
    err = ctx.broadcast_error(err)
    if err:
        raise RedError(err)
    return tokenizer, corpus, cal, expect_meta


def distill(cfg: DistillConfig, progress: bool = True) -> RunResult:
    """Run a whole distillation as configured and export the student to ``cfg.out/student``.

    Under ``torchrun`` (RANK/WORLD_SIZE in the environment) this is one rank of an FSDP2
    run: the student and teacher are sharded over the ranks, each micro-batch of
    ``cfg.batch_size`` sequences is split across them, and rank 0 alone writes run.yaml,
    metrics, checkpoints, the export and ``result.json``. See ``red.distributed``.
    """
    cfg.validate()
    tcfg = read_teacher_config(cfg.teacher, cfg.trust_remote_code)  # fail fast, before any work
    ctx = init_distributed(cfg.device)
    tokenizer, corpus, cal, meta = preflight(cfg, tcfg, ctx)
    out = Path(cfg.out)
    if ctx.is_main:
        prepare_output(cfg.out, cfg.overwrite, cfg.resume)
        # run.yaml repeats the run; overwrite/resume are per-invocation and never persisted
        save_yaml(dataclasses.replace(cfg, overwrite=False, resume=False), out / "run.yaml")
    ctx.barrier()
    red_kernels.set_backend(cfg.kernels)
    device = resolve_device(rank_device(ctx, cfg.device))
    torch.manual_seed(cfg.seed)
    dtype = resolve_precision(cfg.precision, device)  # the teacher's dtype is the compute dtype
    teacher, _ = load_teacher(cfg.teacher, dtype=dtype, device=device, trust_remote_code=cfg.trust_remote_code,
                              with_tokenizer=False)
    if cal is None:
        cal = calibrate(teacher, corpus.train[: cfg.calib_samples], progress=progress and ctx.is_main)
        cal.meta["teacher"] = str(cfg.teacher)
    cal_path = out / "calibration.safetensors"
    if ctx.is_main and not cal_path.exists():
        cal.save(cal_path)
    student = build_student(teacher, cfg.hidden_size, cfg.init, cal, cfg.score, cfg.init_std, cfg.norm_eps, cfg.seed)
    if ctx.distributed:
        shard_student(student, ctx)
    metrics = train(student, corpus, cfg, out, progress=progress, meta={"init": cfg.init,
                    "teacher_fingerprint": meta["teacher_fingerprint"]}, ctx=ctx)
    if ctx.distributed:
        student = unsharded_student(student, cfg, dtype, ctx)  # rank 0: a plain copy; others: None
    if ctx.is_main:
        export_student(student, tokenizer, out / "student", dtype=cfg.export_dtype, overwrite=True)
        last = {k: v for r in metrics.rows for k, v in r.items()}
        _write_result(out / "result.json", {"status": "ok", "steps": cfg.steps, "world_size": ctx.world_size,
                                            "last": last})
    ctx.barrier()
    return RunResult(out=out, student=student, tokenizer=tokenizer, corpus=corpus, calibration=cal, metrics=metrics)


def _write_result(path: Path, obj: dict) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(obj, indent=1))
    os.replace(tmp, path)


def unsharded_student(student: ProjectedStudent, cfg: DistillConfig, dtype, ctx: DistContext):
    """Gather a sharded student's trainable tensors (collective: every rank calls this) and,
    on rank 0, load them into a plain ProjectedStudent over a freshly loaded teacher on the
    CPU (FSDP2 turned the in-memory teacher into shards). Other ranks get None.

    The export of a sharded run is therefore the same ordinary checkpoint a single
    process writes."""
    full = {k: full_tensor(v.detach()).float().cpu() for k, v in student.state_dict().items()}
    if not ctx.is_main:
        return None
    teacher, _ = load_teacher(cfg.teacher, dtype=dtype, device="cpu", trust_remote_code=cfg.trust_remote_code,
                              with_tokenizer=False)
    plain = ProjectedStudent(teacher, student.hidden_size, norm_eps=student.norm_eps)
    plain.load_state_dict(full)
    plain.channels = student.channels
    return plain


def export_run(run_dir: str | Path, out: str | Path, checkpoint: str | Path | None = None,
               dtype: str = "auto", overwrite: bool = False) -> Path:
    """Export a checkpoint of a `red distill` run folder (default: its last) as a
    Hugging Face model folder."""
    from .analyze import load_run_student

    out = Path(out)
    if out.exists() and not out.is_dir():
        raise RedError(f"export path {out} is a file; pass a folder to --out")
    if out.exists() and any(out.iterdir()) and not overwrite:
        raise RedError(f"export folder {out} is not empty; choose another --out or pass --overwrite")
    student, tok, _ = load_run_student(run_dir, checkpoint)
    return export_student(student, tok, out, dtype=dtype, overwrite=overwrite)


def run_calibration(teacher_dir: str | Path, data: str | Path, out_file: str | Path, samples: int = 16,
                    seq_len: int = 256, text_field: str = "text", txt_split: str = "line",
                    device: str = "auto", overwrite: bool = False, progress: bool = True) -> Calibration:
    """What `red calibrate` does: statistics of ``samples`` packed sequences saved to ``out_file``."""
    out_file = Path(out_file)
    if out_file.exists() and not overwrite:
        raise RedError(f"{out_file} already exists; choose another --out or pass --overwrite")
    if out_file.suffix != ".safetensors":
        raise RedError(f"calibration output {out_file} must end in .safetensors")
    dev = resolve_device(device)
    teacher, tok = load_teacher(teacher_dir, dtype=resolve_precision("auto", dev), device=dev)
    corpus = load_corpus(data, tok, seq_len, 0.05, text_field, txt_split)
    cal = calibrate(teacher, corpus.train[:samples], progress=progress)
    cal.meta["teacher"] = str(teacher_dir)
    out_file.parent.mkdir(parents=True, exist_ok=True)
    cal.save(out_file)
    return cal
