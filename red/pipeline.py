"""End to end: teacher -> calibrate -> initialize -> distill -> export.

``distill(cfg)`` is what ``red distill`` runs; each stage is also a public function.
"""
from __future__ import annotations

import dataclasses
import shutil
from dataclasses import dataclass
from pathlib import Path

import torch

import red_kernels

from .calibration import Calibration, calibrate, channel_scores
from .config import DistillConfig, save_yaml
from .data import PackedCorpus, load_corpus
from .errors import RedError
from .export import export_student
from .initialization import initialize, select_channels
from .student import ProjectedStudent
from .teacher import load_teacher, read_teacher_config
from .trainer import MetricsLog, train


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(name)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise RedError(f"device {name} was asked for but CUDA is not available; use --device cpu or auto")
    return dev


def prepare_output(out: str | Path, overwrite: bool = False, resume: bool = False) -> Path:
    """Check the output folder before any work starts; nothing existing is touched
    unless ``overwrite`` (replace) or ``resume`` (continue) says so."""
    if not str(out):
        raise RedError("no output folder given; pass --out DIR")
    p = Path(out)
    if p.exists() and not p.is_dir():
        raise RedError(f"output path {p} is a file; pass a folder to --out")
    non_empty = p.is_dir() and any(p.iterdir())
    if resume:
        if not (p / "checkpoints").is_dir():
            raise RedError(f"--resume: {p} holds no checkpoints folder; start without --resume")
        return p
    if non_empty:
        if not overwrite:
            raise RedError(f"output folder {p} is not empty; choose a new --out, add --resume to continue, "
                           "or --overwrite to replace it")
        shutil.rmtree(p)
    try:
        p.mkdir(parents=True, exist_ok=True)
        probe = p / ".write-test"
        probe.write_text("ok")
        probe.unlink()
    except OSError as e:
        raise RedError(f"output folder {p} is not writable ({e.strerror}); pick a writable --out") from None
    return p


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


def distill(cfg: DistillConfig, progress: bool = True) -> RunResult:
    """Run a whole distillation as configured and export the student to ``cfg.out/student``."""
    cfg.validate()
    tcfg = read_teacher_config(cfg.teacher, cfg.trust_remote_code)  # fail fast, before any work
    D = tcfg.hidden_size
    if not 0 < cfg.hidden_size < D:
        raise RedError(f"--hidden-size {cfg.hidden_size} must be between 1 and {D - 1} (the teacher's width is {D})")
    out = prepare_output(cfg.out, cfg.overwrite, cfg.resume)
    # run.yaml repeats the run; overwrite/resume are per-invocation and never persisted
    save_yaml(dataclasses.replace(cfg, overwrite=False, resume=False), out / "run.yaml")
    red_kernels.set_backend(cfg.kernels)
    device = resolve_device(cfg.device)
    torch.manual_seed(cfg.seed)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    teacher, tokenizer = load_teacher(cfg.teacher, dtype=dtype, device=device, trust_remote_code=cfg.trust_remote_code)
    corpus = load_corpus(cfg.data, tokenizer, cfg.seq_len, cfg.val_fraction, cfg.text_field, cfg.txt_split)
    if cfg.calibration:
        cal = Calibration.load(cfg.calibration)
    else:
        cal = calibrate(teacher, corpus.train[: cfg.calib_samples], progress=progress)
        cal.meta["teacher"] = str(cfg.teacher)
    cal_path = out / "calibration.safetensors"
    if not cal_path.exists():
        cal.save(cal_path)
    student = build_student(teacher, cfg.hidden_size, cfg.init, cal, cfg.score, cfg.init_std, cfg.norm_eps, cfg.seed)
    metrics = train(student, corpus, cfg, out, progress=progress, meta={"init": cfg.init})
    export_student(student, tokenizer, out / "student", dtype=cfg.export_dtype, overwrite=True)
    return RunResult(out=out, student=student, tokenizer=tokenizer, corpus=corpus, calibration=cal, metrics=metrics)


def export_run(run_dir: str | Path, out: str | Path, checkpoint: str | Path | None = None,
               dtype: str = "auto", overwrite: bool = False) -> Path:
    """Export a checkpoint of a `red distill` run folder (default: its last) as a
    Hugging Face model folder."""
    from .analyze import load_run_student

    out = Path(out)
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
    teacher, tok = load_teacher(teacher_dir, dtype=torch.bfloat16 if dev.type == "cuda" else torch.float32, device=dev)
    corpus = load_corpus(data, tok, seq_len, 0.05, text_field, txt_split)
    cal = calibrate(teacher, corpus.train[:samples], progress=progress)
    cal.meta["teacher"] = str(teacher_dir)
    out_file.parent.mkdir(parents=True, exist_ok=True)
    cal.save(out_file)
    return cal
