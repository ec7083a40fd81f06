"""End to end: teacher -> calibrate -> initialize -> distill -> export.

``distill(cfg)`` is what ``red distill`` runs; each stage is also a public function.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path

import torch

import red_kernels

from red.train.calibration import Calibration, calibrate, check_calibration_teacher
from red.run.checkpoint import check_checkpoint
from red.config import DistillConfig, check_calib_samples, config_yaml
from red.data.corpus import PackedCorpus, corpus_from_stores
from red.distributed import DistContext, init_distributed, rank_device, shard_student
from red.errors import RedError
from red.model.export import check_export_arch, check_student_width, export_student
from red.commands.checks import DistillInputs, check_distill_inputs
from red.run.log import sink_folders
from red.config import parse_report_to
from red.train.plan import run_disk_bytes
from red.run.folder import CALIBRATION, DATA, RESULT, RUN_WRITES, RUN_YAML, STUDENT, RunDir
from red.run.identity import RunIdentity, resume_changes
from red.files import write_file_atomic
from red.model.student import ProjectedStudent
from red.model.arch import trainable_shapes
from red.model.teacher import check_teacher_weights, load_teacher, load_tokenizer, read_teacher_config
from red.model.arch import Arch
from red.train.trainer import resolve_precision, train
from red.run.log import MetricsLog
from red.data.staging import check_scored_tokens, check_store_splits, make_data_ready, plan_data
from red.files import check_writable
from red.train.startup import (StartupEvents, _stamp_calibration, build_sharded_student, build_student, resolve_device, sharded_startup,
                               sharding, unsharded_student)


@dataclass
class RunResult:
    out: Path
    student: ProjectedStudent
    tokenizer: object
    corpus: PackedCorpus
    calibration: Calibration
    metrics: MetricsLog


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


def check_kernels(cfg: DistillConfig, dev: torch.device) -> None:
    """``--kernels triton`` only where Triton can run: a CUDA device, or the CPU under
    Triton's interpreter (TRITON_INTERPRET=1 set before start)."""
    if cfg.kernels != "triton":
        return
    ok, why = red_kernels._backend.triton_runnable(torch.empty(0, device=dev))
    if not ok:
        raise RedError(f"--kernels triton cannot run on {dev}: {why}; use --kernels torch (or auto)")


@dataclass(frozen=True)
class DistillPlan:
    """One `red distill` run with every input checked once (``plan_distill``); the steps
    below take their parts from it, none looks an input up again.

    ``corpus`` and ``identity`` (which names the data's fingerprint) are None while some
    --data file still has to be tokenized into the run folder (``with_data``)."""

    cfg: DistillConfig  # resume and the schedule history settled
    teacher_config: object  # the teacher's transformers config
    arch: Arch
    tokenizer: object
    data: tuple  # red.data.staging.DataEntry of every --data entry
    corpus: PackedCorpus | None
    calibration: Calibration | None
    identity: RunIdentity | None
    device: torch.device
    dtype: torch.dtype

    def with_data(self, corpus: PackedCorpus) -> "DistillPlan":
        """The plan once the --data files are tokenized: the corpus checked, the identity made."""
        check_calib_samples(self.cfg, len(corpus.train))
        check_scored_tokens(list(self.data), self.cfg)
        return dataclasses.replace(self, corpus=corpus,
                                   identity=RunIdentity.from_config(self.cfg, self.arch, corpus.fingerprint))


def _plan_teacher(cfg: DistillConfig, ctx: DistContext):
    """``(tcfg, arch, device, tokenizer)``: the teacher's transformers config, its Arch, this
    rank's device and the tokenizer, after the checks they allow (the global micro-batch
    against the processes, the student's width, the kernels on the device, the
    safetensors headers, the tokenizer against the embedding)."""
    tcfg = read_teacher_config(cfg.teacher, cfg.trust_remote_code)
    arch = Arch.from_config(tcfg)
    if cfg.batch_size % ctx.world_size:
        raise RedError(f"--batch-size {cfg.batch_size} is the global micro-batch and must be divisible by the "
                       f"{ctx.world_size} processes; pick a multiple of {ctx.world_size}")
    check_student_width(tcfg, cfg.hidden_size)
    check_export_arch(tcfg, cfg.export_arch, "--export-arch")
    device = resolve_device(rank_device(ctx, cfg.device))
    check_kernels(cfg, device)
    check_teacher_weights(cfg.teacher, tcfg, arch)
    tokenizer = load_tokenizer(cfg.teacher, cfg.trust_remote_code)
    if len(tokenizer) > arch.vocab_size:
        raise RedError(f"the tokenizer in {cfg.teacher} has {len(tokenizer)} tokens but the teacher's embedding has "
                       f"{arch.vocab_size} rows; use the teacher's own tokenizer")
    return tcfg, arch, device, tokenizer


def _plan_corpus(entries: list, cfg: DistillConfig):
    """The training corpus over the entries' stores, checked against the calibration size
    and the scored tokens; None while some entry has no store (its data is not this run's
    yet, which only a resume reports)."""
    if not all(e.store is not None for e in entries):
        return None
    weights = [e.spec.weight for e in entries] if entries[0].spec.weight is not None else None
    corpus = corpus_from_stores([e.store for e in entries], cfg.seq_len, weights)
    check_calib_samples(cfg, len(corpus.train))
    check_scored_tokens(entries, cfg)
    return corpus


def _plan_calibration(cfg: DistillConfig, arch: Arch) -> Calibration | None:
    """A given --calibration file, loaded and checked against the teacher; None without one."""
    if not cfg.calibration:
        return None
    cal = Calibration.load(cfg.calibration)
    # width, and the teacher's fingerprint when the file has one (older files: width only)
    check_calibration_teacher(cal, cfg.calibration, cfg.teacher, arch)
    return cal


def _plan_resume(cfg: DistillConfig, run: RunDir, entries: list, corpus, identity: RunIdentity | None,
                 arch: Arch) -> DistillConfig:
    """The config this invocation runs with as far as --resume goes: the run folder's history
    appended when it holds a checkpoint, ``resume`` off when it holds none yet; RedError for
    a resume with other data, or --allow-change without --resume."""
    if run.state() == "run" and cfg.resume:
        if corpus is None:
            from red.config import load_yaml

            # a changed setting is named first; then the data
            resume_changes(load_yaml(run.run_yaml) if run.run_yaml.is_file() else {}, cfg, cfg.allowed_changes())
            changed = ", ".join(str(e.spec.path) for e in entries if e.store is None)
            raise RedError(f"--resume with another corpus: {changed} is not the data this run was tokenized from "
                           f"({cfg.out}/{DATA} holds other files or settings); resume with the run's own --data")
        return _resume_config(cfg, run, identity, arch, len(corpus.train))
    if cfg.resume:
        return dataclasses.replace(cfg, resume=False)  # no checkpoint yet: nothing to resume, start at 0
    if cfg.allow_change:
        raise RedError("--allow-change only applies with --resume")
    return cfg


def _check_output(cfg: DistillConfig, run: RunDir, arch: Arch, ctx: DistContext) -> None:
    """Rank 0 alone checks (and later writes) the output folder and its room; the others
    hear its verdict, so every rank raises the same RedError or none does."""
    err = None
    if ctx.is_main:
        try:
            run.check_usable(cfg.overwrite, cfg.resume, run_writes(cfg))
            # what the folder already holds of the run (its checkpoints on --resume) counts toward the need
            need = disk_need(cfg, arch) - run.reusable_bytes(cfg.resume, cfg.overwrite)
            check_writable(cfg.out, need_bytes=max(need, 1))
        except RedError as e:
            err = str(e)
    err = ctx.broadcast_error(err)
    if err:
        raise RedError(err)


def plan_distill(inputs: DistillInputs, run: RunDir, ctx: DistContext | None = None) -> DistillPlan:
    """Every check that can fail on the user's input, run before anything is written, once.

    ``inputs``: what the checks before torch found (``red.commands.checks.check_distill_inputs``:
    paths, architecture, width, sequence length, the output folder). Then the teacher's
    transformers config, tokenizer and safetensors headers (not its weights), the device
    and precision, the data (``plan_data``), a given calibration file and, to resume, the
    run folder's run.yaml and last checkpoint; the output folder's room. The plan's ``cfg``
    comes back with ``resume`` off when the folder holds no checkpoint yet (nothing to
    resume: the run starts from step 0) and, when resuming, with run.yaml's schedule history
    and this invocation's allowed changes appended. Raises RedError naming the first problem.
    """
    ctx = ctx or DistContext()
    cfg = inputs.cfg
    tcfg, arch, device, tokenizer = _plan_teacher(cfg, ctx)
    entries = plan_data(inputs.data, cfg, tokenizer, run)
    check_store_splits(entries, cfg)
    corpus = _plan_corpus(entries, cfg)
    cal = _plan_calibration(cfg, arch)
    identity = RunIdentity.from_config(cfg, arch, corpus.fingerprint) if corpus is not None else None
    cfg = _plan_resume(cfg, run, entries, corpus, identity, arch)
    _check_output(cfg, run, arch, ctx)
    return DistillPlan(cfg, tcfg, arch, tokenizer, tuple(entries), corpus, cal, identity, device,
                       resolve_precision(cfg.precision, device))  # the teacher's dtype is the compute dtype


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


def distill(cfg: DistillConfig, progress: bool = True, inputs: DistillInputs | None = None) -> RunResult:
    """Run a whole distillation as configured and export the student to ``cfg.out/student``.

    ``inputs``: what ``red.commands.checks.check_distill_inputs(cfg)`` found (`red distill`
    runs it before importing torch); checked here when not given. The output folder is a
    ``red.run.folder.RunDir``: locked for the whole run, written only by `red` (temp +
    rename), never through symbolic links; ``--resume`` continues its last checkpoint
    under the rules of ``red.run.identity`` (a folder without a checkpoint simply starts
    again). Under ``torchrun`` (RANK/WORLD_SIZE in the environment) this is one rank of a
    data-parallel run (``red.distributed``): each micro-batch of ``cfg.batch_size``
    sequences is split across the ranks, and rank 0 alone writes run.yaml, metrics,
    checkpoints, the export and ``result.json``.
    """
    if inputs is None:
        inputs = check_distill_inputs(cfg.validate())
    ctx = init_distributed(cfg.device)
    run = RunDir(cfg.out)
    try:
        plan = plan_distill(inputs, run, ctx)
        cfg = plan.cfg
        created = not run.root.exists()
        if ctx.is_main:
            run.lock()  # one writer; a second red on this folder is refused from here on
            reused = {DATA} if any(e.store is not None and e.target for e in plan.data) else set()
            state = run.prepare(cfg.overwrite, cfg.resume, keep=reused, writes=run_writes(cfg))
            # run.yaml repeats the run; overwrite/resume/allow_change are per-invocation
            run.write_text(RUN_YAML, config_yaml(dataclasses.replace(cfg, overwrite=False, resume=False,
                                                                     allow_change="")))
        ctx.barrier()
        if plan.corpus is None:  # tokenize the --data files into OUT/data, once
            try:
                plan = plan.with_data(make_data_ready(list(plan.data), cfg, plan.tokenizer, run, ctx, progress))
            except RedError:
                if ctx.is_main and state != "run":
                    run.discard(remove_root=created)  # a failed start leaves nothing behind
                raise
        return _distill_locked(plan, run, ctx, progress)
    finally:
        run.unlock()


def _distill_locked(plan: DistillPlan, run: RunDir, ctx, progress) -> RunResult:
    cfg, device, dtype, corpus, cal, tokenizer = plan.cfg, plan.device, plan.dtype, plan.corpus, plan.calibration, \
        plan.tokenizer
    red_kernels.set_backend(cfg.kernels)
    torch.manual_seed(cfg.seed)
    probe = StartupEvents()
    t_mode, w_mode = sharding(cfg, ctx, device, dtype) if ctx.distributed else ("replicate", "replicate")
    shard_teacher = t_mode == "shard"
    if shard_teacher and sharded_startup():
        student, cal = build_sharded_student(cfg, ctx, device, dtype, corpus, cal, progress, probe,
                                             on_calibration=lambda c: _save_calibration(c, run, ctx))
    else:
        # one process, a replicated teacher (or RED_SHARDED_STARTUP=0): the whole teacher on
        # this device, then the student's tensors (and the teacher, when sharded) are sharded
        teacher, _ = load_teacher(cfg.teacher, dtype=dtype, device=device, trust_remote_code=cfg.trust_remote_code,
                                  with_tokenizer=False, checked_config=plan.teacher_config)
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
    probe.done()
    student.shard_step_weights = w_mode == "shard"
    metrics = train(student, corpus, cfg, run, progress=progress, identity=plan.identity, ctx=ctx)
    if ctx.distributed:
        student = unsharded_student(student, cfg, dtype, ctx)  # rank 0: a plain copy; others: None
    if ctx.is_main:
        run.own(STUDENT)
        export_student(student, cfg.teacher, run.student, dtype=cfg.export_dtype, overwrite=True, owned=True,
                       arch=cfg.export_arch)
        last = {k: v for r in metrics.rows for k, v in r.items()}
        run.write_json(RESULT, {"status": "ok", "steps": cfg.steps, "world_size": ctx.world_size, "last": last})
    ctx.barrier()
    return RunResult(out=run.root, student=student, tokenizer=tokenizer, corpus=corpus, calibration=cal,
                     metrics=metrics)


def _save_calibration(cal: Calibration, run: RunDir, ctx: DistContext) -> None:
    if ctx.is_main and not run.calibration.exists():
        run.own(CALIBRATION)
        write_file_atomic(run.calibration, cal.save)  # a full disk: one line, no half-written file


