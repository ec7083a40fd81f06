"""`red analyze`: per-layer eRank of teacher vs student and the spectra of the projections."""
from __future__ import annotations

import json
from pathlib import Path

import torch

from red.errors import RedError
from red.commands.checks import STUDENT_FIX, check_student_folder
from red.model.metrics import layer_eranks, mean_token_cosine, hidden_states, spectrum


ANALYZE_FILES = ("analysis.json", "erank.png", "spectra.png")  # what `red analyze` writes in --out


def check_analyze_inputs(samples: int, seq_len: int, out: str | Path | None = None) -> None:
    """Every check of `red analyze`'s own inputs that needs no model, run before any work."""
    from red.config import at_least, check_values

    check_values({"--samples": samples, "--seq-len": seq_len},
                 (("--samples", at_least(1)), ("--seq-len", at_least(2))))
    if out is not None and Path(out).exists() and not Path(out).is_dir():
        raise RedError(f"--out {out} is a file; --out takes a folder for analysis.json and the plots")
    if out is not None:
        from red.files import OwnedFolder

        folder = OwnedFolder(out, what="analysis folder")
        clash = folder.conflicts(ANALYZE_FILES)
        if clash:  # refused before any model is loaded
            raise RedError(folder.clash_message(clash))


def check_analyze_models(teacher_dir: str | Path, student: str | Path) -> None:
    """Refuse a --student that was not made from --teacher, before any model is loaded.

    A run folder (it holds run.yaml) must have been distilled from this teacher: the
    teacher fingerprint of its last checkpoint (or, before its first checkpoint, of the
    teacher run.yaml names) must equal that of ``teacher_dir``. An exported model folder
    must be a model of the teacher's architecture, depth and vocabulary, no wider.
    """
    from red.model.teacher import read_teacher_config
    from red.model.arch import Arch

    arch = Arch.from_config(read_teacher_config(teacher_dir))
    sp = check_student_folder(student)
    fix = STUDENT_FIX
    if (sp / "run.yaml").is_file():
        _check_run_teacher(sp, teacher_dir)
        return
    if not (sp / "config.json").is_file():
        raise RedError(f"student folder {sp} has no config.json (and no run.yaml); {fix}")
    try:
        raw = json.loads((sp / "config.json").read_text())
        if not isinstance(raw, dict):
            raise ValueError("not a JSON object")
    except (OSError, ValueError) as e:
        raise RedError(f"student config {sp / 'config.json'} is unreadable ({type(e).__name__}); {fix}") from None
    if not any(sp.glob("*.safetensors")):
        raise RedError(f"student folder {sp} has no *.safetensors weights; {fix}")
    mismatch = []
    if raw.get("model_type") != arch.model_type:
        mismatch.append(f"model_type {raw.get('model_type')!r}, the teacher's is {arch.model_type!r}")
    if raw.get("num_hidden_layers") != arch.num_layers:
        mismatch.append(f"{raw.get('num_hidden_layers')} layers, the teacher has {arch.num_layers}")
    if raw.get("vocab_size") != arch.vocab_size:
        mismatch.append(f"vocab_size {raw.get('vocab_size')}, the teacher's is {arch.vocab_size}")
    width = raw.get("hidden_size")
    if not isinstance(width, int) or not 0 < width <= arch.hidden_size:
        mismatch.append(f"hidden_size {width}, the teacher's is {arch.hidden_size}")
    if mismatch:
        raise RedError(f"student {sp} was not distilled from teacher {teacher_dir}: it has {'; '.join(mismatch)}; "
                       "pass the student's own teacher to --teacher")


def _check_run_teacher(run: Path, teacher_dir: str | Path) -> None:
    from red.run.checkpoint import list_checkpoints, read_meta
    from red.config import make_config
    from red.model.teacher import teacher_fingerprint, teacher_matches

    cfg = make_config(run / "run.yaml")
    found = list_checkpoints(run / "checkpoints")
    theirs = read_meta(found[-1]).get("teacher_fingerprint") if found else None
    if theirs is None and (Path(cfg.teacher) / "config.json").is_file():
        theirs = teacher_fingerprint(cfg.teacher)
    if theirs is not None and not teacher_matches(theirs, teacher_dir):
        raise RedError(f"--teacher {teacher_dir} is not the teacher of run {run} (it was distilled from "
                       f"{cfg.teacher}); pass the run's own teacher to --teacher")


def load_run_student(run_dir: str | Path, checkpoint: str | Path | None = None, device="cpu"):
    """Rebuild the ProjectedStudent of a `red distill` output folder from a checkpoint
    (default: the last complete one). Returns (student, tokenizer, config)."""
    from red.run.checkpoint import check_checkpoint, list_checkpoints, load_trainable, read_meta
    from red.config import make_config
    from red.model.student import ProjectedStudent
    from red.model.arch import trainable_shapes
    from red.model.teacher import load_teacher, read_teacher_config, teacher_meta
    from red.model.arch import Arch

    run = Path(run_dir)
    if not (run / "run.yaml").is_file():
        raise RedError(f"{run} is not a red run folder (no run.yaml); pass the --out folder of `red distill`")
    cfg = make_config(run / "run.yaml")
    if checkpoint is None:
        found = list_checkpoints(run / "checkpoints")
        if not found:
            raise RedError(f"run folder {run} has no complete checkpoint; train first or pass --checkpoint")
        checkpoint = found[-1]
    if not Path(checkpoint).is_dir():
        raise RedError(f"checkpoint {checkpoint} does not exist; pass a checkpoints/step-* folder")
    if not (Path(checkpoint) / "trainer.json").is_file():
        raise RedError(f"{checkpoint} is not a red checkpoint (no trainer.json); pass a checkpoints/step-* folder "
                       "of the run to --checkpoint, or leave it out for the last one")
    meta = read_meta(checkpoint)
    arch = Arch.from_config(read_teacher_config(cfg.teacher, cfg.trust_remote_code))
    if meta.get("teacher_hidden_size") != arch.hidden_size:
        raise RedError(f"checkpoint {checkpoint} belongs to a teacher of width {meta.get('teacher_hidden_size')}, "
                       f"{cfg.teacher} has {arch.hidden_size}; use the run's own teacher")
    expect = {"hidden_size": cfg.hidden_size, "model_type": arch.model_type, "num_layers": arch.num_layers,
              **teacher_meta(cfg.teacher)}
    check_checkpoint(checkpoint, expect, trainable_shapes(arch, cfg.hidden_size))
    teacher, tok = load_teacher(cfg.teacher, device=device, trust_remote_code=cfg.trust_remote_code)
    student = ProjectedStudent(teacher, meta["hidden_size"], norm_eps=cfg.norm_eps)
    sd = load_trainable(checkpoint)
    if set(sd) != set(student.state_dict()):
        raise RedError(f"checkpoint {checkpoint} does not match the student built from {cfg.teacher}")
    student.load_state_dict(sd)
    return student, tok, cfg


def analyze(teacher, student, input_ids: torch.Tensor, out_dir: str | Path | None = None) -> dict:
    """Compare per-layer eRank (and mean token cosine) of teacher and student on
    ``input_ids``, and list the singular-value spread of every projection when the
    student is a ProjectedStudent. Writes analysis.json and PNG plots to ``out_dir`` (the
    plots only when matplotlib is installed)."""
    report: dict = {
        "teacher_erank": layer_eranks(teacher, input_ids),
        "student_erank": layer_eranks(student, input_ids),
        "teacher_last_cosine": mean_token_cosine(hidden_states(teacher, input_ids)[-1]),
        "student_last_cosine": mean_token_cosine(hidden_states(student, input_ids)[-1]),
        "projections": {},
    }
    if hasattr(student, "projections"):
        report["projections"] = {n: spectrum(p) for n, p in student.projections().items()}
    if out_dir is not None:
        from red.files import OwnedFolder

        # the rule of every folder red writes into: its own names only, never a user's file of that name
        folder = OwnedFolder(out_dir, what="analysis folder")
        folder.own(*ANALYZE_FILES)
        out = folder.root
        (out / "analysis.json").write_text(json.dumps(report, indent=1))
        plot_analysis(report, out)
    return report


def plot_analysis(report: dict, out: Path) -> list[Path]:
    """erank.png (and spectra.png for a ProjectedStudent) in ``out``; none, after one line
    on stderr, when matplotlib (the ``plots`` extra) is not installed."""
    from red.commands.plots import pyplot

    plt = pyplot("analyze", "analysis.json")
    if plt is None:
        return []
    paths = []
    fig, ax = plt.subplots(figsize=(6, 4))
    for key, label in (("teacher_erank", "teacher"), ("student_erank", "student")):
        ax.plot(range(len(report[key])), report[key], marker="o", label=label)
    ax.set_xlabel("hidden state (0 = embedding, last = after final norm)")
    ax.set_ylabel("eRank")
    ax.set_title("Per-layer effective rank")
    ax.legend()
    fig.tight_layout()
    paths.append(out / "erank.png")
    fig.savefig(paths[-1], dpi=120)
    plt.close(fig)
    if report["projections"]:
        names = list(report["projections"])
        fig, ax = plt.subplots(figsize=(max(6, len(names) * 0.25), 4))
        mx = [report["projections"][n]["max"] for n in names]
        mn = [report["projections"][n]["min"] for n in names]
        ax.vlines(range(len(names)), mn, mx)
        ax.scatter(range(len(names)), mx, s=8, label="max singular value")
        ax.scatter(range(len(names)), mn, s=8, label="min singular value")
        ax.set_xticks(range(len(names)), names, rotation=90, fontsize=6)
        ax.set_ylabel("singular value")
        ax.set_title("Projection spectra")
        ax.legend()
        fig.tight_layout()
        paths.append(out / "spectra.png")
        fig.savefig(paths[-1], dpi=120)
        plt.close(fig)
    return paths


def format_report(report: dict) -> str:
    lines = ["layer  teacher_eRank  student_eRank"]
    for i, (t, s) in enumerate(zip(report["teacher_erank"], report["student_erank"])):
        lines.append(f"{i:5d}  {t:13.2f}  {s:13.2f}")
    lines.append(f"mean token cosine (last): teacher {report['teacher_last_cosine']:.3f}  "
                 f"student {report['student_last_cosine']:.3f}")
    if report["projections"]:
        lines.append("projection            s_max    s_min  s_max/s_min   eRank")
        for n, s in report["projections"].items():
            lines.append(f"{n:18s} {s['max']:8.3f} {s['min']:8.3f} {s['ratio']:12.2f} {s['erank']:7.2f}")
    return "\n".join(lines)
