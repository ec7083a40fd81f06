"""`red calibrate`: a teacher's channel statistics on a corpus, saved for reuse."""
from __future__ import annotations

from pathlib import Path

from red.commands.checks import check_calibrate_inputs
from red.data.corpus import load_corpus
from red.files import write_file_atomic
from red.model.teacher import load_teacher, teacher_fingerprint
from red.train.calibration import Calibration, calibrate
from red.train.startup import resolve_device
from red.train.trainer import resolve_precision

def run_calibration(teacher_dir: str | Path, data: str | Path, out_file: str | Path, samples: int = 16,
                    seq_len: int = 256, text_field: str = "text", txt_split: str = "line",
                    device: str = "auto", overwrite: bool = False, progress: bool = True) -> Calibration:
    """What `red calibrate` does: statistics of ``samples`` packed sequences saved to ``out_file``."""
    out_file = Path(out_file)
    check_calibrate_inputs(teacher_dir, data, out_file, overwrite)
    dev = resolve_device(device)
    teacher, tok = load_teacher(teacher_dir, dtype=resolve_precision("auto", dev), device=dev)
    corpus = load_corpus(data, tok, seq_len, 0.05, text_field, txt_split)
    cal = calibrate(teacher, corpus.train[:samples], progress=progress)
    cal.meta["teacher"] = str(teacher_dir)
    cal.meta["teacher_fingerprint"] = teacher_fingerprint(teacher_dir)
    out_file.parent.mkdir(parents=True, exist_ok=True)
    check_calibrate_inputs(teacher_dir, data, out_file, overwrite)  # again: it may have appeared meanwhile
    write_file_atomic(out_file, cal.save)
    return cal
