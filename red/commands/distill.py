"""End to end: teacher -> calibrate -> initialize -> distill -> export.

``distill(cfg)`` is what ``red distill`` runs; each stage is also a public function.
"""
from __future__ import annotations

import dataclasses
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

import torch

import red_kernels

from red.train.calibration import Calibration, calibrate, channel_scores, check_calibration_teacher
from red.run.checkpoint import check_checkpoint
from red.config import DistillConfig, config_yaml, files_val_fraction, validate_against_teacher
from red.data.corpus import PackedCorpus, corpus_from_stores, load_corpus
from red.distributed import DistContext, StartupProbe, full_tensor, init_distributed, rank_device, shard_student
from red.errors import RedError
from red.model.export import check_run_width, check_student_width, export_student
from red.train.initialization import initialize, select_channels
from red.commands.checks import check_calibrate_inputs, check_distill_inputs, check_export_inputs, distill_inputs
from red.run.sinks import parse_report_to, sink_folders
from red.train.plan import run_disk_bytes
from red.run.folder import (CALIBRATION, DATA, LOCK, MANIFEST, RESULT, RUN_WRITES, RUN_YAML, STUDENT, OwnedFolder, RunDir,
                  RunIdentity, check_out_path, resume_changes, write_file_atomic)
from red.data.sources import DataSpec, expand_source, is_store, iter_rows, render_chat, split_data
from red.data.store import MANIFEST as STORE_MANIFEST
from red.data.store import TokenStore, prepare_store, source_record, tokenizer_fingerprint
from red.model.student import ProjectedStudent, trainable_shapes
from red.model.teacher import (Arch, check_teacher_files, check_teacher_weights, load_teacher, load_tokenizer,
                      read_teacher_config, teacher_fingerprint)
from red.train.trainer import MetricsLog, resolve_precision, train


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(name)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise RedError(f"device {name} was asked for but CUDA is not available; use --device cpu or auto")
    return dev


def prepare_output(out: str | Path, overwrite: bool = False, entries=()) -> OwnedFolder:
    """Make ``out`` ready for a command that writes the top-level ``entries`` in a folder
    (``red demo``), and lock it: the folder must be new or empty, or ``overwrite`` removes
    what `red` wrote there before (nothing else); an entry the folder already holds that red
    did not write is refused, whatever the flags. Returns the folder, locked (``unlock``
    it when done); ``own`` each entry before writing it."""
    check_out_path(out)
    folder = OwnedFolder(out)
    check_writable(folder.root, 0)

    def check() -> None:
        if [n for n in folder.entries() if n not in (LOCK, MANIFEST)] and not overwrite:
            raise RedError(f"output folder {out} is not empty; choose a new --out or pass --overwrite")
        clash = folder.conflicts(entries)
        if clash:
            raise RedError(folder.clash_message(clash))

    check()  # before anything is written (the lock itself is a file)
    folder.lock()
    try:
        check()  # again, now that no other red can change the folder
        folder.clear_own()
    except RedError:
        folder.unlock()
        raise
    return folder


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


def check_writable(out: str | Path, need_bytes: int = 0) -> None:
    """Raise RedError (and change nothing) unless ``out`` (or the nearest existing parent
    it would be made in) is a writable folder with ``need_bytes`` free."""
    p = Path(out)
    if p.exists() and not p.is_dir():
        raise RedError(f"output path {p} is a file; pass a folder to --out")
    target = p if p.is_dir() else next((q for q in p.absolute().parents if q.exists()), None)
    try:
        if target is None or not target.is_dir():
            raise NotADirectoryError(20, "Not a directory")
        _probe_writable(target)
    except OSError as e:
        raise RedError(f"output folder {p} is not writable ({e.strerror or type(e).__name__}); "
                       "pick a writable --out") from None
    if need_bytes:
        free = free_disk_bytes(p)
        if free < need_bytes:
            raise RedError(f"not enough disk space for {p}: the run's checkpoints and export need about "
                           f"{_fmt_bytes(need_bytes)}, {_fmt_bytes(free)} are free; free space or pick another --out")


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


def run_inputs(cfg: DistillConfig) -> list:
    """The paths a run reads (globs expanded), which its output folder must stay apart from."""
    return distill_inputs(cfg)


def run_writes(cfg: DistillConfig) -> tuple:
    """The top-level names a run writes in its folder."""
    return (*RUN_WRITES, *sink_folders(parse_report_to(cfg.report_to)))


def disk_need(cfg: DistillConfig, arch: Arch) -> int:
    """Bytes the run's folder needs at its peak (kept checkpoints + one + the export)."""
    dtype_bytes = {"bfloat16": 2, "float16": 2}.get(cfg.export_dtype, 4)
    # the export copies the teacher's tokenizer and small config files
    files = sum(f.stat().st_size for f in Path(cfg.teacher).iterdir()
                if f.is_file() and not f.name.endswith((".safetensors", ".bin", ".pt", ".pth"))) + (64 << 10)
    return run_disk_bytes(arch, cfg.hidden_size, cfg.steps, cfg.save_every, cfg.keep_checkpoints, dtype_bytes, files)


@dataclass
class DataEntry:
    """One ``--data`` entry of a run: a token store ready to read, or the files to
    tokenize into the run folder (``target``, a folder under OUT/data) first."""

    spec: DataSpec
    store: TokenStore | None
    files: list
    records: list
    target: str = ""


def plan_data(cfg: DistillConfig, tokenizer, run: RunDir) -> list[DataEntry]:
    """Check every --data entry without writing anything: stores are opened (manifest,
    file sizes, tokenizer); files are checked to exist, and their first rows to parse (the
    rest is checked while they are tokenized); a store already made from the same files
    in OUT/data is reused, so a resumed or repeated run never tokenizes again."""
    entries = []
    fp = tokenizer_fingerprint(tokenizer)
    for i, spec in enumerate(split_data(cfg.data)):
        if is_store(spec.path):
            # every byte read once: the store's fingerprint then stands for what is trained on
            entries.append(DataEntry(spec, TokenStore(spec.path, tokenizer, verify=True), [], []))
            continue
        files = expand_source(spec.path)
        _check_first_rows(files, cfg, tokenizer)
        records = [source_record(f) for f in files]
        target = f"{DATA}/{i}"
        entries.append(DataEntry(spec, _matching_store(run.root / target, records, cfg, fp, tokenizer),
                                 files, records, target))
    return entries


def _check_first_rows(files, cfg: DistillConfig, tokenizer, n: int = 64) -> None:
    from red.data.store import check_unknown_share, encode_rows

    for f in files:
        rows = []
        for row in iter_rows(f, cfg.text_field, cfg.txt_split):
            rows.append(row)
            if len(rows) >= n:
                break
        if not rows:
            raise RedError(f"corpus {f} holds no text; give a corpus with at least a few documents")
        texts = [r for r in rows if isinstance(r, str)]
        if texts and tokenizer.unk_token_id is not None:  # the whole file is checked again while tokenized
            ids = [i for t in tokenizer(texts, add_special_tokens=False)["input_ids"] for i in t]
            check_unknown_share(f, sum(i == tokenizer.unk_token_id for i in ids), len(ids), tokenizer)
        chat = [r for r in rows if not isinstance(r, str)]
        if chat:
            render_chat(chat[0], tokenizer)
            encode_rows(chat[:1], tokenizer, [])


def _matching_store(root: Path, records: list, cfg: DistillConfig, fp: str, tokenizer) -> TokenStore | None:
    """The store at ``root`` if it was made from exactly these files with these settings."""
    if not (root / STORE_MANIFEST).is_file():
        return None
    try:
        store = TokenStore(root, verify=True)
    except RedError:
        return None  # damaged or changed: tokenized again
    m = store.manifest
    part = m["parts"][0] if len(m["parts"]) == 1 else {}
    same = (m["tokenizer"]["fingerprint"] == fp
            and [s["sha256"] for s in part.get("sources", [])] == [r["sha256"] for r in records]
            and (part.get("text_field"), part.get("txt_split"), part.get("val_fraction"), part.get("split_seed"))
            == (cfg.text_field, cfg.txt_split, files_val_fraction(cfg), 0))
    return store if same else None


def make_data_ready(entries: list[DataEntry], cfg: DistillConfig, tokenizer, run: RunDir, ctx: DistContext,
                    progress: bool = True) -> PackedCorpus:
    """Tokenize the entries that need it into the run folder (rank 0; the others wait and
    then open what it wrote) and pack every store into training/validation blocks."""
    if ctx.is_main:
        for e in entries:
            if e.store is None:
                run.own(DATA)
                target = run.path(*e.target.split("/"))
                if target.exists():
                    shutil.rmtree(target)  # ours (under OUT/data): a store of other files or settings
                e.store = prepare_store(e.files, target, tokenizer, text_field=cfg.text_field,
                                        txt_split=cfg.txt_split, val_fraction=files_val_fraction(cfg), seed=0,  # split: not the training seed
                                        progress=progress, records=e.records)
    ctx.barrier()
    for e in entries:
        if e.store is None:
            e.store = TokenStore(run.path(*e.target.split("/")), tokenizer)
    weights = [e.spec.weight for e in entries] if entries[0].spec.weight is not None else None
    return corpus_from_stores([e.store for e in entries], cfg.seq_len, weights)


def check_kernels(cfg: DistillConfig, ctx: DistContext) -> None:
    """``--kernels triton`` only where Triton can run: a CUDA device, or the CPU under
    Triton's interpreter (TRITON_INTERPRET=1 set before start)."""
    if cfg.kernels != "triton":
        return
    dev = resolve_device(rank_device(ctx, cfg.device))
    ok, why = red_kernels._backend.triton_runnable(torch.empty(0, device=dev))
    if not ok:
        raise RedError(f"--kernels triton cannot run on {dev}: {why}; use --kernels torch (or auto)")


def check_scored_tokens(entries: list[DataEntry], cfg: DistillConfig) -> None:
    """Under ``--loss-on assistant`` every store trained on must hold assistant tokens in both
    splits: otherwise its KL and LM terms are 0 at every step and the run trains the clone
    terms alone, while its losses look better than a real run's."""
    if cfg.loss_on != "assistant":
        return
    for e in entries:
        for split, what in (("train", "training"), ("val", "validation")):
            if e.store is not None and e.store.has_mask and e.store.scored_tokens(split) == 0:
                raise RedError(f"--data {e.spec.path}: its {what} documents hold no assistant token, and under "
                               "--loss-on assistant (the default) only assistant turns are scored, so the KL and "
                               "LM terms would be 0 at every step; give conversations with assistant turns, or "
                               "--loss-on all to score every token")


def check_store_splits(entries: list[DataEntry], cfg: DistillConfig) -> None:
    """A token store keeps the validation split it was prepared with: a ``--val-fraction``
    given for it must be that split's, or it would be recorded in run.yaml and not applied."""
    if cfg.val_fraction is None:
        return
    for e in entries:
        if e.store is not None and not e.target:  # a store given as --data (not one made here)
            made = sorted({p["val_fraction"] for p in e.store.manifest["parts"]})
            if made != [cfg.val_fraction]:
                raise RedError(f"--val-fraction {cfg.val_fraction:g} cannot apply to token store {e.spec.path}: its "
                               f"validation split was made when it was prepared (--val-fraction "
                               f"{', '.join(f'{v:g}' for v in made)}); drop --val-fraction, or prepare the store "
                               "again with the split you want")


def preflight(cfg: DistillConfig, tcfg, run: RunDir, ctx: DistContext | None = None):
    """Every check that can fail on the user's input, run before anything is written.

    Returns ``(tokenizer, data entries, corpus or None, calibration or None, identity or None,
    cfg)``: the corpus (and the run's identity, which names the data's fingerprint) is None
    while some --data file still has to be tokenized (``make_data_ready``); ``cfg`` comes back
    with ``resume`` off when the folder holds no checkpoint yet (nothing to resume: the run
    starts from step 0) and, when resuming, with run.yaml's schedule history and this
    invocation's allowed changes appended. Reads the teacher's config, tokenizer and
    safetensors headers (not its weights), the data (``plan_data``), the given calibration file and the
    run folder's run.yaml and last checkpoint; checks the output folder is separate from the
    inputs, writable and has room. Raises RedError naming the first problem.
    """
    ctx = ctx or DistContext()
    check_distill_inputs(cfg)  # paths, architecture, width range, the output folder: the cheapest errors
    arch = Arch.from_config(tcfg)
    if cfg.batch_size % ctx.world_size:
        raise RedError(f"--batch-size {cfg.batch_size} is the global micro-batch and must be divisible by the "
                       f"{ctx.world_size} processes; pick a multiple of {ctx.world_size}")
    check_student_width(tcfg, cfg.hidden_size)
    check_kernels(cfg, ctx)
    check_teacher_files(cfg.teacher)
    check_teacher_weights(cfg.teacher, tcfg)
    tokenizer = load_tokenizer(cfg.teacher, cfg.trust_remote_code)
    if len(tokenizer) > arch.vocab_size:
        raise RedError(f"the tokenizer in {cfg.teacher} has {len(tokenizer)} tokens but the teacher's embedding has "
                       f"{arch.vocab_size} rows; use the teacher's own tokenizer")
    entries = plan_data(cfg, tokenizer, run)
    check_store_splits(entries, cfg)
    corpus = None
    if all(e.store is not None for e in entries):
        weights = [e.spec.weight for e in entries] if entries[0].spec.weight is not None else None
        corpus = corpus_from_stores([e.store for e in entries], cfg.seq_len, weights)
    validate_against_teacher(cfg, tcfg, len(corpus.train) if corpus is not None else None)
    if corpus is not None:
        check_scored_tokens(entries, cfg)
    cal = None
    if cfg.calibration:
        cal = Calibration.load(cfg.calibration)
        # width, and the teacher's fingerprint when the file has one (older files: width only)
        check_calibration_teacher(cal, cfg.calibration, cfg.teacher, arch)
    identity = RunIdentity.from_config(cfg, arch, corpus.fingerprint) if corpus is not None else None
    state = run.state()
    if state == "run" and cfg.resume:
        if corpus is None:
            from red.config import load_yaml

            # a changed setting is named first; then the data
            resume_changes(load_yaml(run.run_yaml) if run.run_yaml.is_file() else {}, cfg, cfg.allowed_changes())
            changed = ", ".join(str(e.spec.path) for e in entries if e.store is None)
            raise RedError(f"--resume with another corpus: {changed} is not the data this run was tokenized from "
                           f"({cfg.out}/{DATA} holds other files or settings); resume with the run's own --data")
        cfg = _resume_config(cfg, run, identity, arch, len(corpus.train))
    elif cfg.resume:
        cfg = dataclasses.replace(cfg, resume=False)  # no checkpoint yet: nothing to resume, start at 0
    elif cfg.allow_change:
        raise RedError("--allow-change only applies with --resume")
    # rank 0 alone checks (and later writes) the output folder; the others hear its verdict
    err = None
    if ctx.is_main:
        try:
            holder = run.holder()
            if holder is not None and run._lock_fd is None:
                raise RedError(f"output folder {cfg.out} is in use by process {holder}; wait for it to finish "
                               "or pick another --out")
            run.check_usable(cfg.overwrite, cfg.resume, run_writes(cfg))
            # what the folder already holds of the run (its checkpoints on --resume) counts toward the need
            need = disk_need(cfg, arch) - run.reusable_bytes(cfg.resume, cfg.overwrite)
            check_writable(cfg.out, need_bytes=max(need, 1))
        except RedError as e:
            err = str(e)
    err = ctx.broadcast_error(err)
    if err:
        raise RedError(err)
    return tokenizer, entries, corpus, cal, identity, cfg


def _resume_config(cfg: DistillConfig, run: RunDir, identity: RunIdentity, arch: Arch, n_train: int):
    """This invocation's config for resuming ``run``: identity checked against run.yaml and
    the last checkpoint, schedule changes allowed by --allow-change appended to the history."""
    from red.config import load_yaml

    last = run.complete_checkpoints()[-1]
    saved = load_yaml(run.run_yaml) if run.run_yaml.is_file() else {}
    changes = resume_changes(saved, cfg, cfg.allowed_changes())  # names every changed setting
    info = check_checkpoint(last, identity.checkpoint_meta(), trainable_shapes(arch, cfg.hidden_size))
    if cfg.steps < int(info["step"]):
        raise RedError(f"--steps {cfg.steps} is below step {int(info['step'])}, which this run has reached: "
                       "--resume continues a run and cannot shorten it (run.yaml would then describe a shorter "
                       "run than the model had); export an earlier checkpoint with red export --checkpoint, or "
                       "start a new --out")
    n = info.get("sampler", {}).get("n")
    if n != n_train:
        raise RedError(f"checkpoint {last} was made with {n} training sequences, this corpus packs to "
                       f"{n_train}; resume with the same --data and --seq-len")
    history = list(saved.get("history") or [])
    if changes:
        history.append({"step": int(info["step"]), "changed": changes})
    return dataclasses.replace(cfg, history=history)


def distill(cfg: DistillConfig, progress: bool = True) -> RunResult:
    """Run a whole distillation as configured and export the student to ``cfg.out/student``.

    The output folder is a ``red.run.folder.RunDir``: locked for the whole run, written only by
    `red` (temp + rename), never through symbolic links; ``--resume`` continues its last
    checkpoint under the rules of ``red.run.folder`` (a folder without a checkpoint simply starts
    again). Under ``torchrun`` (RANK/WORLD_SIZE in the environment) this is one rank of an
    FSDP2 run: the student and teacher are sharded over the ranks, each micro-batch of
    ``cfg.batch_size`` sequences is split across them, and rank 0 alone writes run.yaml,
    metrics, checkpoints, the export and ``result.json``. See ``red.distributed``.
    """
    cfg.validate()
    tcfg = read_teacher_config(cfg.teacher, cfg.trust_remote_code)
    ctx = init_distributed(cfg.device)
    run = RunDir(cfg.out)
    try:
        tokenizer, entries, corpus, cal, identity, cfg = preflight(cfg, tcfg, run, ctx)
        created = not run.root.exists()
        if ctx.is_main:
            run.lock()  # one writer; a second red on this folder is refused from here on
            reused = {DATA} if any(e.store is not None and e.target for e in entries) else set()
            state = run.prepare(cfg.overwrite, cfg.resume, keep=reused, writes=run_writes(cfg))
            # run.yaml repeats the run; overwrite/resume/allow_change are per-invocation
            run.write_text(RUN_YAML, config_yaml(dataclasses.replace(cfg, overwrite=False, resume=False,
                                                                     allow_change="")))
        ctx.barrier()
        if corpus is None:  # tokenize the --data files into OUT/data, once
            try:
                corpus = make_data_ready(entries, cfg, tokenizer, run, ctx, progress)
                validate_against_teacher(cfg, tcfg, len(corpus.train))
                check_scored_tokens(entries, cfg)
            except RedError:
                if ctx.is_main and state != "run":
                    run.discard(remove_root=created)  # a failed start leaves nothing behind
                raise
            identity = RunIdentity.from_config(cfg, Arch.from_config(tcfg), corpus.fingerprint)
        return _distill_locked(cfg, run, ctx, tokenizer, corpus, cal, identity, progress)
    finally:
        run.unlock()


def _distill_locked(cfg, run: RunDir, ctx, tokenizer, corpus, cal, identity, progress) -> RunResult:
    red_kernels.set_backend(cfg.kernels)
    device = resolve_device(rank_device(ctx, cfg.device))
    torch.manual_seed(cfg.seed)
    dtype = resolve_precision(cfg.precision, device)  # the teacher's dtype is the compute dtype
    probe = StartupProbe(ctx.rank, ctx.world_size)
    t_mode, w_mode = sharding(cfg, ctx, device, dtype) if ctx.distributed else ("replicate", "replicate")
    shard_teacher = t_mode == "shard"
    if shard_teacher and sharded_startup():
        student, cal = build_sharded_student(cfg, ctx, device, dtype, corpus, cal, progress, probe,
                                             on_calibration=lambda c: _save_calibration(c, run, ctx))
    else:
        # one process, a replicated teacher (or RED_SHARDED_STARTUP=0): the whole teacher on
        # this device, then the student's tensors (and the teacher, when sharded) are sharded
        teacher, _ = load_teacher(cfg.teacher, dtype=dtype, device=device, trust_remote_code=cfg.trust_remote_code,
                                  with_tokenizer=False)
        probe.watch(teacher)
        probe.sample("load")
        if cal is None:
            cal = calibrate(teacher, corpus.train[: cfg.calib_samples], progress=progress and ctx.is_main)
            _stamp_calibration(cal, cfg)
        probe.sample("calibrate")
        _save_calibration(cal, run, ctx)
        student = build_student(teacher, cfg.hidden_size, cfg.init, cal, cfg.score, cfg.init_std, cfg.norm_eps,
                                cfg.seed)
        probe.sample("initialize")
        if ctx.distributed:
            shard_student(student, ctx, shard_teacher=shard_teacher)
        probe.sample("sharded")
    probe.write()
    student.shard_step_weights = w_mode == "shard"
    metrics = train(student, corpus, cfg, run, progress=progress, identity=identity, ctx=ctx)
    if ctx.distributed:
        student = unsharded_student(student, cfg, dtype, ctx)  # rank 0: a plain copy; others: None
    if ctx.is_main:
        run.own(STUDENT)
        export_student(student, tokenizer, run.student, dtype=cfg.export_dtype, overwrite=True, owned=True)
        last = {k: v for r in metrics.rows for k, v in r.items()}
        run.write_json(RESULT, {"status": "ok", "steps": cfg.steps, "world_size": ctx.world_size, "last": last})
    ctx.barrier()
    return RunResult(out=run.root, student=student, tokenizer=tokenizer, corpus=corpus, calibration=cal,
                     metrics=metrics)


def _save_calibration(cal: Calibration, run: RunDir, ctx: DistContext) -> None:
    if ctx.is_main and not run.calibration.exists():
        run.own(CALIBRATION)
        write_file_atomic(run.calibration, cal.save)  # a full disk: one line, no half-written file


def _stamp_calibration(cal: Calibration, cfg: DistillConfig) -> None:
    cal.meta["teacher"] = str(cfg.teacher)
    cal.meta["teacher_fingerprint"] = teacher_fingerprint(cfg.teacher)


def sharding(cfg: DistillConfig, ctx: DistContext, device, dtype) -> tuple[str, str]:
    """``(teacher, step weights)``, each "replicate" or "shard", for ``--teacher-sharding``
    and ``--step-weights`` under torchrun (see the options' help). ``auto`` asks
    ``red.train.plan.choose_sharding`` with the GPU's memory on CUDA; on the CPU it shards the
    teacher and replicates the step weights."""
    t, w = cfg.teacher_sharding, cfg.step_weights
    if "auto" not in (t, w):
        return t, w
    if torch.device(device).type != "cuda":
        auto = ("shard", "replicate")
    else:
        from red.train.plan import DTYPE_NAMES, choose_sharding

        total = torch.cuda.get_device_properties(torch.device(device)).total_memory
        auto = choose_sharding(cfg.teacher, cfg.hidden_size, cfg.seq_len, cfg.batch_size, ctx.world_size, total,
                               activation_checkpointing=cfg.activation_checkpointing,
                               teacher_dtype=DTYPE_NAMES[dtype], grad_accum=cfg.grad_accum)
    return (auto[0] if t == "auto" else t), (auto[1] if w == "auto" else w)


def sharded_startup() -> bool:
    """Whether a multi-process run starts sharded (the default); RED_SHARDED_STARTUP=0
    falls back to loading the whole teacher on every rank first."""
    return os.environ.get("RED_SHARDED_STARTUP", "1") != "0"


def build_sharded_student(cfg: DistillConfig, ctx: DistContext, device, dtype, corpus, cal, progress: bool = True,
                          probe: StartupProbe | None = None, on_calibration=None):
    """The sharded start-up of a multi-process run: ``(sharded student, calibration)``.

    No rank ever holds the whole teacher: (1) teacher and student are built on the
    ``meta`` device; (2) FSDP2 makes its units exactly as ``shard_student`` does (each
    StudentLayer = teacher decoder layer + its projections and gains; the root = teacher
    embedding, final norm, LM head + the student's embedding/head projections and final
    gain), so the teacher's units are made once and the student's tensors join them;
    (3) ``to_empty`` gives each rank storage for its shards only, and each rank reads from
    the safetensors just its rows of every teacher tensor; (4) calibration (unless
    ``cal`` is given) runs on the sharded teacher, one layer gathered at a time, each rank
    on its share of the batches, statistics summed over ranks (``calibrate_sharded``);
    (5) the projections are initialized shard by shard (``initialize(..., sharded=True)``:
    one full D x d matrix made at a time, the same values as a single process).
    ``on_calibration(cal)`` is called once the statistics are known (the run saves them).
    """
    from red.train.calibration import calibrate_sharded
    from red.distributed import wrap_student
    from red.model.teacher import load_teacher_shards, meta_teacher

    probe = probe or StartupProbe(ctx.rank, ctx.world_size)
    teacher = meta_teacher(cfg.teacher, dtype=dtype, trust_remote_code=cfg.trust_remote_code)
    probe.watch(teacher)
    with torch.device("meta"):
        student = ProjectedStudent(teacher, cfg.hidden_size, norm_eps=cfg.norm_eps)
    if cfg.init == "red" and cal is not None and cal.hidden_size != student.arch.hidden_size:
        raise RedError(f"calibration was made for width {cal.hidden_size}, the teacher has "
                       f"{student.arch.hidden_size}; recalibrate with this teacher")
    wrap_student(student, ctx, device)
    probe.sample("build")
    student.to_empty(device=device)
    probe.sample("materialize")
    load_teacher_shards(teacher, cfg.teacher, on_tensor=lambda n: probe.sample("load", extra=n))
    probe.sample("load")
    if cal is None:
        cal = calibrate_sharded(teacher, corpus.train[: cfg.calib_samples], ctx,
                                progress=progress and ctx.is_main, probe=probe)
        _stamp_calibration(cal, cfg)
    probe.sample("calibrate")
    if on_calibration is not None:
        on_calibration(cal)  # saved before the student is made, as in a single process
    channels = None
    if cfg.init == "red":
        channels = select_channels(channel_scores(cal, cfg.score), cfg.hidden_size)
    initialize(student, cfg.init, channels=channels, std=cfg.init_std, seed=cfg.seed, sharded=True)
    probe.sample("initialize")
    return student, cal


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
    from red.commands.analyze import load_run_student

    out = Path(out)
    check_export_inputs(run_dir, out, checkpoint, overwrite)
    check_run_width(run_dir)
    student, tok, _ = load_run_student(run_dir, checkpoint)
    return export_student(student, tok, out, dtype=dtype, overwrite=overwrite)


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
