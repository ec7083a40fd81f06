"""The checks of a command's input paths that need only the standard library.

They run before torch or transformers are imported (``red.cli`` calls
:func:`check_distill_inputs` first), so a wrong path answers at once; the modules that
read the inputs (``red.model.teacher``, ``red.data.corpus``) call the same functions, so each rule and
its message live here once.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from red.errors import RedError
from red.data.sources import check_corpus_path
from red.model.arch import check_seq_len, check_width, read_teacher_json


def check_bench_inputs(teacher: str | Path, hidden_size: int, seq_len: int) -> None:
    """`red bench`'s teacher, width and sequence length, before any heavy import."""
    raw = read_teacher_json(teacher)
    check_width(raw.get("hidden_size"), hidden_size)
    check_seq_len(raw, seq_len)


@dataclass(frozen=True)
class DataEntryFiles:
    """One ``--data`` entry as the checks found it: its spec, and the files it reads (globs
    expanded once; empty for a token store)."""

    spec: object  # red.data.sources.DataSpec
    store: bool
    files: tuple


@dataclass(frozen=True)
class DistillInputs:
    """What `red distill`'s checks before torch found, handed to the run so that nothing is
    looked up twice: the configuration, the teacher's config.json, and every ``--data``
    entry with its files."""

    cfg: object  # red.config.DistillConfig
    teacher: dict
    data: tuple

    def paths(self) -> list[tuple[str, Path]]:
        """What the run reads (teacher, every data path, calibration): its output folder
        must stay apart from each."""
        from red.data.sources import is_hf_dataset

        found = [("teacher folder", Path(self.cfg.teacher))]
        for e in self.data:
            if e.store:
                found.append(("token store", Path(e.spec.path)))
            for f in e.files:
                for one in getattr(f, "files", (f,)):
                    found.append(("saved dataset" if is_hf_dataset(one) else "data file", Path(one)))
        if self.cfg.calibration:
            found.append(("calibration file", Path(self.cfg.calibration)))
        return found


def data_entries(data) -> tuple:
    """Every ``--data`` entry checked to name something that exists (a file of a supported
    format, a glob matching such files, a token store or a saved dataset), globs expanded;
    contents are read later."""
    from red.data.sources import expand_source, is_store, split_data

    return tuple(DataEntryFiles(spec, True, ()) if is_store(spec.path) else
                 DataEntryFiles(spec, False, tuple(expand_source(spec.path))) for spec in split_data(data))


def check_data_paths(data) -> None:
    """``data_entries`` for commands that only need the check."""
    data_entries(data)


def check_run_folder(inputs: DistillInputs) -> None:
    """The output folder can take this run: a usable path, apart from every input, no
    symbolic link where red writes, not locked by another process, and in a state these
    flags allow (``red.run.folder.RunDir.check_usable``). Reads only; needs no torch."""
    from red.config import parse_report_to
    from red.files import check_out_path, check_separate
    from red.run.folder import RUN_WRITES, RunDir
    from red.run.log import sink_folders

    cfg = inputs.cfg
    check_out_path(cfg.out)
    if Path(cfg.out).exists() and not Path(cfg.out).is_dir():
        raise RedError(f"output path {cfg.out} is a file; pass a folder to --out")
    check_separate(cfg.out, inputs.paths())
    run = RunDir(cfg.out)
    run.check_links()
    holder = run.holder()
    if holder is not None:
        raise RedError(f"output folder {cfg.out} is in use by process {holder}; wait for it to finish or "
                       "pick another --out")
    run.check_usable(cfg.overwrite, cfg.resume, (*RUN_WRITES, *sink_folders(parse_report_to(cfg.report_to))))


def check_distill_inputs(cfg) -> DistillInputs:
    """What `red distill` can check from paths and config.json alone, before any heavy import:
    the teacher folder and its architecture, the width and sequence length against the
    teacher's, the corpus paths, a given calibration file, and the output folder
    (``check_run_folder``). Returns what it found, for the run (``red.commands.distill``)."""
    raw = read_teacher_json(cfg.teacher)
    check_width(raw.get("hidden_size"), cfg.hidden_size)
    check_seq_len(raw, cfg.seq_len)
    inputs = DistillInputs(cfg, raw, data_entries(cfg.data))
    if cfg.calibration and not Path(cfg.calibration).is_file():
        raise RedError(f"calibration file {cfg.calibration} does not exist; run `red calibrate` or drop --calibration")
    check_run_folder(inputs)
    return inputs


def safetensors_metadata(path: str | Path) -> dict | None:
    """The ``__metadata__`` of a safetensors file's header (None when it is not one),
    read with the standard library."""
    try:
        with open(path, "rb") as f:
            n = int.from_bytes(f.read(8), "little")
            if not 2 <= n <= 100 << 20:
                return None
            header = json.loads(f.read(n))
    except (OSError, ValueError):
        return None
    meta = header.get("__metadata__") if isinstance(header, dict) else None
    return meta if isinstance(meta, dict) else {}


def is_red_calibration(path: str | Path) -> bool:
    """Whether ``path`` is a calibration file red wrote (safetensors with red's metadata)."""
    meta = safetensors_metadata(path)
    return bool(meta) and "red" in meta


def check_calibrate_inputs(teacher: str | Path, data: str | Path, out: str | Path, overwrite: bool = False) -> None:
    """`red calibrate`'s paths, before any heavy import: the teacher and corpus exist, and
    the output is a new .safetensors file apart from them (or, with ``overwrite``, a
    calibration file red wrote)."""
    from red.files import check_output_file

    read_teacher_json(teacher)
    check_corpus_path(data)
    if Path(out).suffix != ".safetensors":
        raise RedError(f"calibration output {out} must end in .safetensors")
    check_output_file(out, overwrite, is_red_calibration, "calibration file",
                      {"teacher folder": teacher, "data file": data})


def check_export_inputs(run_dir: str | Path, out: str | Path, checkpoint: str | Path | None = None,
                        overwrite: bool = False) -> None:
    """`red export`'s paths, before any heavy import: a run folder with its run.yaml, a
    checkpoint folder when one is named, and an export folder apart from the run folder and
    the run's teacher, empty unless ``overwrite``."""
    from red.run.folder import RUN_YAML
    from red.files import check_out_path, check_separate

    run = Path(run_dir)
    if not run.is_dir():
        raise RedError(f"{run} is not a red run folder (it does not exist); pass the --out folder of `red distill` "
                       "to --run")
    if not (run / RUN_YAML).is_file():
        raise RedError(f"{run} is not a red run folder (no run.yaml); pass the --out folder of `red distill`")
    if checkpoint is not None and not Path(checkpoint).is_dir():
        raise RedError(f"checkpoint {checkpoint} does not exist; pass a checkpoints/step-* folder")
    check_out_path(out)
    o = Path(out)
    check_separate(o, {"run folder": run})
    if o.exists() and not o.is_dir():
        raise RedError(f"export path {o} is a file; pass a folder to --out")
    from red.config import make_config

    check_separate(o, {"run's teacher folder": make_config(run / RUN_YAML).teacher})
    if o.exists() and any(o.iterdir()) and not overwrite:
        raise RedError(f"export folder {o} is not empty; choose another --out or pass --overwrite")


STUDENT_FIX = "pass a `red distill` run folder or an exported model folder (OUT/student) to --student"


def check_student_folder(student: str | Path) -> Path:
    """``--student`` names an existing folder (what kind of student it holds is read later)."""
    sp = Path(student)
    if not sp.exists():
        raise RedError(f"student folder {sp} does not exist; {STUDENT_FIX}")
    if not sp.is_dir():
        raise RedError(f"student path {sp} is not a folder; {STUDENT_FIX}")
    return sp


def check_analyze_paths(teacher: str | Path, student: str | Path, data: str | Path, out: str | Path | None) -> None:
    """`red analyze`'s paths, before any heavy import: the teacher, a student folder (a run
    folder or an exported model), the corpus, and an output folder path."""
    from red.files import check_out_path

    read_teacher_json(teacher)
    check_student_folder(student)
    check_corpus_path(data)
    if out is not None:
        check_out_path(out)
        if Path(out).exists() and not Path(out).is_dir():
            raise RedError(f"--out {out} is a file; --out takes a folder for analysis.json and the plots")


def check_plan_inputs(teacher: str | Path, hidden_size: int) -> None:
    """`red plan`'s teacher (a folder or its config.json) and width, before any heavy import."""
    p = Path(teacher)
    raw = read_teacher_json(p.parent if p.name == "config.json" and p.is_file() else p)
    check_width(raw.get("hidden_size"), hidden_size)
