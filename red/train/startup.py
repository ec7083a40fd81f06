"""Start-up of a run: the device, the teacher and the initialized student, in one process or
sharded over the processes of a torchrun (each rank reading only its rows of the teacher)."""
from __future__ import annotations

import os

import torch

from red.config import DistillConfig
from red.distributed import DistContext, full_tensor
from red.errors import RedError
from red.model.student import ProjectedStudent
from red.model.teacher import load_teacher, teacher_fingerprint
from red.train.calibration import Calibration, channel_scores
from red.train.initialization import initialize, select_channels

#: Observers of a run's start-up, for measuring what a rank holds (the tests' probe):
#: objects with ``watch(teacher)``, ``sample(stage, extra=0)`` (``extra``: bytes of whole
#: teacher tensors alive beside the parameters), ``hold(nbytes)`` (such bytes held until
#: the next ``hold``) and ``done()``. Empty in production.
STARTUP_OBSERVERS: list = []


class StartupEvents:
    """Passes the start-up's stages to every ``STARTUP_OBSERVERS`` entry (no-ops when
    there is none)."""

    def watch(self, teacher) -> None:
        for o in STARTUP_OBSERVERS:
            o.watch(teacher)

    def sample(self, stage: str, extra: int = 0) -> None:
        for o in STARTUP_OBSERVERS:
            o.sample(stage, extra)

    def hold(self, nbytes: int) -> None:
        for o in STARTUP_OBSERVERS:
            o.hold(nbytes)

    def done(self) -> None:
        for o in STARTUP_OBSERVERS:
            o.done()

def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(name)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise RedError(f"device {name} was asked for but CUDA is not available; use --device cpu or auto")
    return dev


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
                          probe: StartupEvents | None = None, on_calibration=None):
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

    probe = probe or StartupEvents()
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
