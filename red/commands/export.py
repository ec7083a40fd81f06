"""`red export`: merge a run's checkpoint into a Hugging Face model folder."""
from __future__ import annotations

from pathlib import Path

from red.commands.checks import check_export_inputs
from red.config import make_config
from red.model.export import check_export_arch, check_student_width, export_student
from red.model.teacher import read_teacher_config
from red.run.folder import RUN_YAML


def export_run(run_dir: str | Path, out: str | Path, checkpoint: str | Path | None = None,
               dtype: str = "auto", overwrite: bool = False, arch: str = "auto") -> Path:
    """Export a checkpoint of a `red distill` run folder (default: its last) as a
    Hugging Face model folder, of the teacher's architecture or (``arch="llama"``) as a Llama."""
    from red.commands.analyze import load_run_student

    out = Path(out)
    check_export_inputs(run_dir, out, checkpoint, overwrite)
    check_run_export(run_dir, arch)
    student, _, cfg = load_run_student(run_dir, checkpoint)
    return export_student(student, cfg.teacher, out, dtype=dtype, overwrite=overwrite, arch=arch)


def check_run_export(run_dir: str | Path, arch: str = "auto") -> None:
    """``check_student_width`` and ``check_export_arch`` for an existing run folder (its
    run.yaml's teacher and width), before `red export` loads anything; a folder without
    run.yaml is left to the loader."""
    yaml_file = Path(run_dir, RUN_YAML)
    if not yaml_file.is_file():
        return
    cfg = make_config(yaml_file)
    tcfg = read_teacher_config(cfg.teacher, cfg.trust_remote_code)
    check_student_width(tcfg, cfg.hidden_size)
    check_export_arch(tcfg, arch)
