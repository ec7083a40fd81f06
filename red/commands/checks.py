"""The checks of a command's input paths that need only the standard library.

They run before torch or transformers are imported (``red.cli`` calls
:func:`check_distill_inputs` first), so a wrong path answers at once; the modules that
read the inputs (``red.model.teacher``, ``red.data.corpus``) call the same functions, so each rule and
its message live here once.
"""
from __future__ import annotations

import json
from pathlib import Path

from red.errors import RedError
from red.data.sources import check_corpus_path
from red.model.arch import check_seq_len, check_width, read_teacher_json


def check_bench_inputs(teacher: str | Path, hidden_size: int, seq_len: int) -> None:
    """`red bench`'s teacher, width and sequence length, before any heavy import."""
    raw = read_teacher_json(teacher)
    check_width(raw.get("hidden_size"), hidden_size)
    check_seq_len(raw, seq_len)


def data_inputs(data) -> list[tuple[str, Path]]:
    """Every path the ``--data`` entries read, each checked to exist and be of a known kind
    (contents are read later), globs expanded: ("token store", folder), ("saved dataset",
    folder) or ("data file", file) pairs."""
    from red.data.sources import expand_source, is_hf_dataset, is_store, split_data

    out = []
    for spec in split_data(data):
        if is_store(spec.path):
            out.append(("token store", Path(spec.path)))
            continue
        for f in expand_source(spec.path):
            for one in getattr(f, "files", (f,)):
                out.append(("saved dataset" if is_hf_dataset(one) else "data file", Path(one)))
    return out


def check_data_paths(data) -> None:
    """Every ``--data`` entry names something that exists: a file of a supported format, a
    glob matching such files, a token store or a saved dataset (contents read later)."""
    data_inputs(data)


def distill_inputs(cfg) -> list[tuple[str, Path]]:
    """What a `red distill` run reads (teacher, every data path after glob expansion,
    calibration): its output folder must stay apart from each."""
    found = [("teacher folder", Path(cfg.teacher))] + data_inputs(cfg.data)
    if cfg.calibration:
        found.append(("calibration file", Path(cfg.calibration)))
    return found


def check_run_folder(cfg) -> None:
    """The output folder can take this run: a usable path, apart from every input, no
    symbolic link where red writes, not locked by another process, and in a state these
    flags allow (``red.run.folder.RunDir.check_usable``). Reads only; needs no torch."""
    from red.run.log import sink_folders
    from red.config import parse_report_to
    from red.run.folder import RUN_WRITES, RunDir
    from red.files import check_out_path, check_separate

    check_out_path(cfg.out)
    if Path(cfg.out).exists() and not Path(cfg.out).is_dir():
        raise RedError(f"output path {cfg.out} is a file; pass a folder to --out")
    check_separate(cfg.out, distill_inputs(cfg))
    run = RunDir(cfg.out)
    run.check_links()
    if run._lock_fd is None:
        holder = run.holder()
        if holder is not None:
            raise RedError(f"output folder {cfg.out} is in use by process {holder}; wait for it to finish or "
                           "pick another --out")
    run.check_usable(cfg.overwrite, cfg.resume, (*RUN_WRITES, *sink_folders(parse_report_to(cfg.report_to))))


def check_distill_inputs(cfg) -> None:
    """What `red distill` can check from paths and config.json alone, before any heavy import:
    the teacher folder and its architecture, the width against the teacher's, the corpus
    paths, a given calibration file, and the output folder (``check_run_folder``)."""
    from red.config import validate_against_teacher

    raw = read_teacher_json(cfg.teacher)
    check_width(raw.get("hidden_size"), cfg.hidden_size)
    validate_against_teacher(cfg, raw)  # --seq-len within the teacher's positions
    check_data_paths(cfg.data)
    if cfg.calibration and not Path(cfg.calibration).is_file():
        raise RedError(f"calibration file {cfg.calibration} does not exist; run `red calibrate` or drop --calibration")
    check_run_folder(cfg)


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


def check_analyze_paths(teacher: str | Path, student: str | Path, data: str | Path, out: str | Path | None) -> None:
    """`red analyze`'s paths, before any heavy import: the teacher, a student folder (a run
    folder or an exported model), the corpus, and an output folder path."""
    from red.files import check_out_path

    read_teacher_json(teacher)
    sp = Path(student)
    fix = "pass a `red distill` run folder or an exported model folder (OUT/student) to --student"
    if not sp.exists():
        raise RedError(f"student folder {sp} does not exist; {fix}")
    if not sp.is_dir():
        raise RedError(f"student path {sp} is not a folder; {fix}")
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
