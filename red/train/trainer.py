"""The distillation loop: one obvious loop over optimizer steps.

AdamW (betas, epsilon and decoupled weight decay on the projections from the config;
fused on CUDA), linear warmup then a linear, cosine, constant or warmup-stable-decay
learning rate (``lr_schedule``), global-norm clipping, gradient accumulation, JSONL
metrics, tqdm progress, periodic validation (loss + last-layer eRank) and atomic
checkpoints that ``resume`` continues from bit for bit.

Precision policy (README, "Precision policy"): the teacher is held in the compute dtype
(bf16 under ``--precision bf16``, the default on CUDA; fp32 under ``fp32``, the default on
CPU); projections, gains, their gradients and AdamW state are fp32 masters; every matmul
of the step, forward and backward (W_t·P included), runs in the compute dtype with fp32
accumulation, and softmax/KL/CE/MSE reductions are fp32. The student makes these casts
itself (no autocast), so ``--precision bf16`` runs the same arithmetic on CPU as on a GPU.

One optimizer step (:func:`train_step`) synchronizes with the host once: every loss term
and the gradient norm are read back together, after the backward and before AdamW.
"""
from __future__ import annotations

import math
import time
from pathlib import Path

import torch
from tqdm.auto import tqdm

from red.run.checkpoint import load_checkpoint, save_checkpoint
from red.config import DistillConfig, parse_betas
from red.data.corpus import PackedCorpus
from red.data.store import BlockSampler
from red.distributed import DistContext, full_tensor
from red.errors import RedError
from red.dtypes import PRECISIONS
from red.run.log import MetricsLog
from red.model.metrics import erank
from red.run.log import open_sinks, sink_folders
from red.config import parse_report_to
from red.run.folder import CHECKPOINTS, METRICS, RunDir, emit
from red.run.identity import RunIdentity
from red.model.student import TERMS, LossSettings, ProjectedStudent, StepShare, scored_targets


def loss_settings(cfg: DistillConfig) -> LossSettings:
    return LossSettings(temperature=cfg.temperature, kl_weight=cfg.kl_weight, kl_t2_scale=cfg.kl_t2_scale,
                        lm_weight=cfg.lm_weight, clone_weight=cfg.clone_weight, clone_norm=cfg.clone_norm,
                        kl_reduction=cfg.kl_reduction, divergence=cfg.divergence, jsd_beta=cfg.jsd_beta,
                        teacher_top_k=cfg.teacher_top_k)


def _warmup_steps(steps: int, warmup: float) -> int:
    return max(1, int(round(warmup * steps)) if warmup < 1 else int(warmup))


#: the settings that shape the learning rate; a history entry changing none of them leaves it as it was
LR_KEYS = ("steps", "warmup", "lr", "lr_scheduler", "min_lr", "wsd_decay")


def decay_factor(step: int, start: int, end: int, shape: str, wsd_steps: int = 1) -> float:
    """How much of the peak is left at ``step`` of a decay that runs from ``start`` (1) to
    ``end`` (0), where it reaches the floor: linear ``1 - p``, cosine ``(1 + cos(pi p)) / 2``
    (p = (step - start) / (end - start), as transformers' schedulers take it), constant 1,
    wsd 1 until its last ``wsd_steps`` steps and a cosine over them."""
    if shape == "constant":
        return 1.0
    if shape == "wsd":
        start = max(start, end - wsd_steps)
        if step < start:
            return 1.0
        shape = "cosine"
    if shape == "linear":
        return min(1.0, max(0.0, (end - step) / max(1, end - start)))
    p = min(1.0, max(0.0, (step - start) / max(1, end - start)))
    return 0.5 * (1.0 + math.cos(math.pi * p))


def lr_schedule(steps: int, warmup: float, history: list | None = None, lr: float | None = None, *,
                scheduler: str = "linear", min_lr: float = 0.0, wsd_decay: float = 0.1):
    """Multiplier of the first peak lr at each step (0-based): linear warmup to the peak
    (``lr * (step + 1) / w``, so that step 0 trains), then the shape of ``scheduler``
    (``decay_factor``) from the peak down to ``min_lr`` at ``steps``:
    ``min_lr + (lr - min_lr) * decay_factor(step, w, steps)``. ``wsd`` decays over its last
    ``round(wsd_decay * steps)`` steps (at least 1). After the warmup every shape equals
    transformers' (linear, cosine_with_min_lr, constant_with_warmup, warmup_stable_decay
    with decay_type cosine), whose warmup is one step behind (``step / w``).

    ``history`` (run.yaml's record of schedule changes made on ``--resume``, each
    ``{"step": s, "changed": {key: [old, new]}}``) continues the curve in a defined way when
    an entry changes a setting of ``LR_KEYS``: from step s the lr starts from ``at``, the
    value the old curve had at s, scaled by new lr / old lr. If s is still inside the new
    warmup it rises linearly to the new peak at the warmup's end and follows the new curve
    from there; else it follows the new curve's shape through ``at``:
    ``min_lr + (at - min_lr) * g(step) / g(s)``, g the new ``decay_factor`` over the whole
    run, which is the old curve itself when nothing but lr changed, and for linear the
    straight line from ``at`` to the floor at the new ``steps``. A run resumed at or after
    the end of its old schedule (extending a finished run) gets a fresh warmup and decay
    over the added steps (warmup as a fraction of, or a count within, them; ``wsd_decay`` as
    a fraction of them). The arguments are the current (last) values.
    """
    history = [e for e in (history or []) if set(e["changed"]) & set(LR_KEYS)]
    segments = _schedule_segments({"steps": steps, "warmup": warmup, "lr": 1.0 if lr is None else lr,
                                   "lr_scheduler": scheduler, "min_lr": min_lr, "wsd_decay": wsd_decay}, history)
    lr0 = segments[0][1]["lr"] or 1.0

    def factor(step: int) -> float:
        k = max(i for i, (start, _) in enumerate(segments) if start <= step)
        return _segment_lr(segments, step, k) / lr0
    return factor


def _schedule_segments(current: dict, history: list) -> list[tuple[int, dict]]:
    """The schedule's settings by the step each took effect: the values the run started
    with at step 0, then one segment per ``history`` entry; ``current`` holds the last
    values, from which the history is walked back."""
    first = dict(current)
    for entry in reversed(history):  # walk back to the values the run started with
        for k, (old, _new) in entry["changed"].items():
            if k in first:
                first[k] = old
    segments = [(0, dict(first))]
    vals = dict(first)
    for entry in history:
        vals = dict(vals, **{k: new for k, (_old, new) in entry["changed"].items() if k in vals})
        segments.append((int(entry["step"]), dict(vals)))
    return segments


def _decay_of(step: int, v: dict, origin: int, w: int) -> float:
    """g of the schedule ``v`` started at ``origin`` with warmup ``w`` steps."""
    n = int(v["steps"])
    return decay_factor(step, origin + w, n, v["lr_scheduler"], max(1, round(v["wsd_decay"] * (n - origin))))


def _segment_lr(segments: list[tuple[int, dict]], step: int, k: int) -> float:
    """The absolute lr at ``step`` under segment ``k`` (the rules of ``lr_schedule``): a
    later segment starts from the lr the one before had at its start."""
    start, v = segments[k]
    n, w, low = int(v["steps"]), _warmup_steps(int(v["steps"]), v["warmup"]), v["min_lr"]
    if k == 0:
        if step < w:
            return v["lr"] * (step + 1) / w
        return low + (v["lr"] - low) * _decay_of(step, v, 0, w)
    prev = segments[k - 1][1]
    if step >= n:
        return low
    if start >= int(prev["steps"]):  # the old schedule had ended: a new one over the added steps
        wa = _warmup_steps(n - start, v["warmup"])
        if step - start < wa:
            return v["lr"] * (step - start + 1) / wa
        return low + (v["lr"] - low) * _decay_of(step, v, start, wa)
    at = _segment_lr(segments, start, k - 1) * (v["lr"] / prev["lr"] if prev["lr"] else 1.0)
    if start < w:
        if step < w:
            return at + (v["lr"] - at) * (step - start + 1) / (w - start)
        return low + (v["lr"] - low) * _decay_of(step, v, 0, w)
    return low + (at - low) * _decay_of(step, v, 0, w) / _decay_of(start, v, 0, w)


def schedule_of(cfg: DistillConfig):
    """``lr_schedule`` of a run's configuration (its current values and history)."""
    return lr_schedule(cfg.steps, cfg.warmup, cfg.history, cfg.lr, scheduler=cfg.lr_scheduler, min_lr=cfg.min_lr,
                       wsd_decay=cfg.wsd_decay)


def setting_at(cfg: DistillConfig, key: str, step: int):
    """The value of schedule setting ``key`` in force at ``step`` (run.yaml's history)."""
    value = getattr(cfg, key)
    for entry in reversed(cfg.history):
        if key in entry["changed"]:
            if step >= int(entry["step"]):
                return value
            value = entry["changed"][key][0]
    return value




def resolve_precision(name: str, device: torch.device) -> torch.dtype:
    """The compute dtype of ``--precision``: auto is bf16 on CUDA and fp32 elsewhere."""
    if name == "auto":
        return torch.bfloat16 if torch.device(device).type == "cuda" else torch.float32
    return PRECISIONS[name]


def decays(p: torch.Tensor) -> bool:
    """Whether weight decay applies to ``p``: the projections (matrices), not the norm gains
    (vectors), the rule transformers' Trainer follows (no decay on biases and norm weights)."""
    return p.dim() >= 2


def make_optimizer(params, lr: float, device: torch.device, eps: float = 1e-8, betas=(0.9, 0.999),
                   weight_decay: float = 0.0) -> torch.optim.Optimizer:
    """AdamW over the fp32 masters; the fused (single-kernel) implementation on CUDA.

    Two parameter groups, the decayed tensors first (``decays``), then the rest with no
    weight decay; a checkpoint records each index's name, so older one-group checkpoints
    load too (``red.run.checkpoint.load_checkpoint``)."""
    params = list(params)
    groups = [{"params": [p for p in params if decays(p)], "weight_decay": float(weight_decay)},
              {"params": [p for p in params if not decays(p)], "weight_decay": 0.0}]
    fused = torch.device(device).type == "cuda"
    return torch.optim.AdamW([g for g in groups if g["params"]], lr=lr, betas=tuple(betas), eps=eps,
                             weight_decay=0.0, fused=fused)


def set_adamw_settings(optimizer: torch.optim.Optimizer, cfg: DistillConfig, step: int) -> None:
    """The AdamW settings of schedule keys in force at ``step`` (run.yaml's history) into every
    group: after a checkpoint is loaded its saved values are replaced by this run's (the same
    unless ``--allow-change`` changed one at this step)."""
    betas = parse_betas(setting_at(cfg, "adam_betas", step))
    for g in optimizer.param_groups:
        g["eps"] = setting_at(cfg, "adam_eps", step)
        g["betas"] = betas
        g["weight_decay"] = setting_at(cfg, "weight_decay", step) if all(decays(p) for p in g["params"]) else 0.0


def read_batch(blocks, idx, cfg: DistillConfig, device) -> dict:
    """The blocks ``idx`` of ``blocks`` (a LongTensor [n, T] or a store view) on ``device``,
    with the loss mask (``--loss-on assistant`` on chat data) and the document ids
    (``--no-cross-doc-attention``) the settings ask for."""
    out = {"input_ids": blocks[idx].to(device)}
    if cfg.loss_on == "assistant" and getattr(blocks, "has_mask", False):
        out["loss_mask"] = blocks.loss_mask(idx).to(device)
    if not cfg.cross_doc_attention:
        if not hasattr(blocks, "doc_ids"):
            raise RedError("--no-cross-doc-attention needs to know where documents start: give the corpus as "
                           "red.data.corpus.load_corpus or a token store returns it, not as a plain tensor")
        out["doc_ids"] = blocks.doc_ids(idx).to(device)
    return out


def step_gradients(student: ProjectedStudent, batches, loss: LossSettings, ctx: DistContext | None = None):
    """The gradients of one optimizer step, added to every trainable tensor's ``.grad``;
    returns the step's loss terms (``TERMS`` order, a device vector, summed over ranks).

    The dense student weights are made once (``ProjectedStudent.make_weights``); each
    micro-batch of ``batches`` (token id tensors on the student's device, or
    ``read_batch`` dicts) is a forward and backward on them, its weight gradients added up
    in fp32; one ``weight_backward`` turns the sums into the gradients of P and the gains.
    The step's loss is the mean over its whole global batch: KL and LM divide by the
    scored targets of every micro-batch on every rank, the clone terms by the step's
    tokens (``StepShare``).
    """
    ctx = ctx or DistContext()
    batches = [b if isinstance(b, dict) else {"input_ids": b} for b in batches]
    scored = sum(scored_targets(b["input_ids"], b.get("doc_ids"), b.get("loss_mask")) for b in batches)
    n = len(batches)
    share = StepShare(scored=ctx.all_reduce_sum(scored), sequences=batches[0]["input_ids"].shape[0] * ctx.world_size * n,
                      share=1.0 / (n * ctx.world_size), mean_over_ranks=ctx.all_reduce_mean if ctx.distributed else None)
    root = student.teacher_root()  # gathered once a step when sharded
    weights = student.make_weights(root=root)
    terms = None
    for b in batches:
        total, vec = student.distill_terms(b["input_ids"], loss, doc_ids=b.get("doc_ids"),
                                           loss_mask=b.get("loss_mask"), weights=weights, share=share, root=root)
        total.backward()
        weights.accumulate()
        terms = vec if terms is None else terms + vec
    if ctx.distributed:
        weights.reduce(ctx.all_reduce_sum)
        terms = ctx.all_reduce_sum(terms)
    student.weight_backward(weights, root)
    return terms


def train_step(student: ProjectedStudent, optimizer: torch.optim.Optimizer, batches, loss: LossSettings,
               max_norm: float = float("inf"), ctx: DistContext | None = None) -> dict:
    """One optimizer step over the micro-batches ``batches``: ``step_gradients``, the
    gradient norm, clipping and AdamW.

    Returns the loss terms of the step and ``grad_norm``, read back to the host in one
    transfer. Raises RedError without stepping when a loss term or the gradient is not
    finite, naming the terms (or parameters).
    """
    ctx = ctx or DistContext()
    # the tensors AdamW steps, in the student's order: the gradient norm sums them in this order,
    # so the norm (and every clipped step) does not depend on how AdamW groups them
    rank = {id(p): i for i, p in enumerate(student.parameters())}
    params = sorted((p for g in optimizer.param_groups for p in g["params"]), key=lambda p: rank.get(id(p), len(rank)))
    terms = step_gradients(student, batches, loss, ctx)
    # the norm first and the clipping after (what clip_grad_norm_ does), so that a
    # non-finite gradient is found before clipping spreads the NaN to every tensor
    total_norm = torch.nn.utils.get_total_norm([p.grad for p in params if p.grad is not None])
    norm = full_tensor(total_norm).detach().reshape(1).to(terms.device, terms.dtype)
    values = torch.cat([terms, norm]).tolist()  # the step's one host sync
    out = dict(zip(TERMS, values[:-1]))
    out["grad_norm"] = values[-1]
    bad = [k for k, v in out.items() if k != "grad_norm" and not math.isfinite(v)]
    if bad:
        optimizer.zero_grad(set_to_none=True)
        raise StepError("loss", f"in term(s) {', '.join(bad)}")
    if not math.isfinite(out["grad_norm"]):
        names = _nonfinite_grads(student.named_trainable_parameters(), ctx)
        optimizer.zero_grad(set_to_none=True)
        raise StepError("gradient", f"(loss {out['loss']:.4g} is finite) in "
                        f"{', '.join(names[:6]) or 'the gradient norm'}{' ...' if len(names) > 6 else ''}")
    torch.nn.utils.clip_grads_with_norm_(params, max_norm, total_norm)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return out


class StepError(RedError):
    """A training step met a non-finite loss or gradient (nothing was stepped)."""

    def __init__(self, what: str, detail: str):
        super().__init__(f"non-finite {what} {detail}")
        self.what, self.detail = what, detail


@torch.no_grad()
def evaluate(student: ProjectedStudent, corpus: PackedCorpus, cfg: DistillConfig, ctx: DistContext | None = None) -> dict:
    """Mean loss terms over validation batches and the eRank of the student's last hidden state.

    Each validation micro-batch is scored as a whole (its KL and LM divide by its scored
    targets on every rank), and the batches are averaged. In a data-parallel run every
    rank takes its slice of each batch and the eRank is taken of the gathered rows, so the
    numbers mean the same for any number of processes (rows of a validation micro-batch
    that do not divide evenly over the ranks are left out).
    """
    ctx = ctx or DistContext()
    device = student.device
    loss = loss_settings(cfg)
    root = student.teacher_root()
    weights = student.make_weights(requires_grad=False, root=root)
    sums, n = None, 0
    for i in range(0, min(len(corpus.val), cfg.val_batches * cfg.batch_size), cfg.batch_size):
        idx = torch.arange(i, min(i + cfg.batch_size, len(corpus.val)))
        if ctx.distributed:
            idx = idx[: len(idx) - len(idx) % ctx.world_size]
            if not len(idx):
                continue
        b = read_batch(corpus.val, ctx.local_rows(idx), cfg, device)
        share = StepShare(scored=ctx.all_reduce_sum(scored_targets(b["input_ids"], b.get("doc_ids"),
                                                                   b.get("loss_mask"))),
                          sequences=len(idx), share=1.0 / ctx.world_size,
                          mean_over_ranks=ctx.all_reduce_mean if ctx.distributed else None)
        _, terms = student.distill_terms(b["input_ids"], loss, doc_ids=b.get("doc_ids"),
                                         loss_mask=b.get("loss_mask"), weights=weights, share=share, root=root)
        sums = terms if sums is None else sums + terms
        n += 1
    out = {}
    if sums is not None:
        sums = ctx.all_reduce_sum(sums) / n
        out = {f"val_{k}": v for k, v in zip(TERMS, sums.tolist())}
    first = torch.arange(min(cfg.batch_size, len(corpus.val)))
    split = ctx.distributed and len(first) >= ctx.world_size
    if split:
        first = first[: len(first) - len(first) % ctx.world_size]
    b = read_batch(corpus.val, ctx.local_rows(first) if split else first, cfg, device)
    h = student.hidden_states(b["input_ids"], doc_ids=b.get("doc_ids"), weights=weights)[-1].float()
    out["erank_last"] = erank(ctx.all_gather_rows(h) if split else h)
    return out


def _comm_device(ctx: DistContext) -> torch.device:
    return torch.device("cuda", torch.cuda.current_device()) if ctx.mesh is not None and ctx.mesh.device_type == "cuda" \
        else torch.device("cpu")


def _nonfinite_grads(named_params, ctx: DistContext) -> list[str]:
    """Names of the parameters whose gradient holds a NaN or inf (on any rank)."""
    from red.distributed import local_tensor

    flags = torch.tensor([0.0 if p.grad is None else float(not torch.isfinite(local_tensor(p.grad)).all())
                          for _, p in named_params], device=_comm_device(ctx))
    flags = ctx.all_reduce_mean(flags)
    return [n for (n, _), f in zip(named_params, flags.tolist()) if f > 0]


def train(student: ProjectedStudent, corpus: PackedCorpus, cfg: DistillConfig, run: RunDir | str | Path,
          progress: bool = True, identity: RunIdentity | None = None, ctx: DistContext | None = None,
          on_step=None) -> MetricsLog:
    """Train ``student`` in place for ``cfg.steps`` optimizer steps; returns the metrics log.

    ``run`` (a ``red.run.folder.RunDir`` or a folder) receives metrics and checkpoints; with
    ``cfg.resume`` its last complete checkpoint is restored first (and metrics rows past it,
    left by a killed run, are dropped). ``identity`` (``red.run.folder.RunIdentity``) is what each
    checkpoint records and a resume must match; without it only the student's shape is.
    ``on_step(step)`` is called after every optimizer step; when it returns True the run
    stops there, with a checkpoint, as if interrupted (the schedule still follows
    ``cfg.steps``). Stops with RedError on a non-finite loss or gradient, naming the step
    and the loss terms (or the parameters) affected; the last good checkpoint stays.

    ``ctx`` (from ``red.distributed.init_distributed``) makes this one rank of a sharded
    run: each micro-batch of ``cfg.batch_size`` sequences is split across ranks, loss terms
    are averaged over ranks, and rank 0 alone writes metrics and checkpoints.
    """
    ctx = ctx or DistContext()
    run = run if isinstance(run, RunDir) else RunDir(run)
    device = student.device
    if cfg.batch_size % ctx.world_size:
        raise RedError(f"batch_size {cfg.batch_size} is the global micro-batch and must be divisible by the "
                       f"{ctx.world_size} processes; pick a multiple of {ctx.world_size}")
    student.activation_checkpointing = cfg.activation_checkpointing
    # the scheduler's base is the lr the run started with; lr_schedule scales from it
    optimizer = make_optimizer(student.trainable_parameters(), setting_at(cfg, "lr", 0), device,
                               setting_at(cfg, "adam_eps", 0), parse_betas(setting_at(cfg, "adam_betas", 0)),
                               setting_at(cfg, "weight_decay", 0))
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, schedule_of(cfg))
    sampler = corpus.sampler(cfg.batch_size, cfg.seed) if hasattr(corpus, "sampler") else \
        BlockSampler(len(corpus.train), cfg.batch_size, cfg.seed)
    meta = identity.checkpoint_meta() if identity is not None else {
        "hidden_size": student.hidden_size, "teacher_hidden_size": student.arch.hidden_size,
        "model_type": student.arch.model_type, "num_layers": student.arch.num_layers}
    ckpt_root = run.checkpoints
    report_to = parse_report_to(cfg.report_to)
    if ctx.is_main:
        run.own(METRICS, CHECKPOINTS, *sink_folders(report_to))
    found = run.complete_checkpoints() if cfg.resume else []
    sinks = open_sinks(report_to, run.root, cfg.to_dict(), start_step=None) if ctx.is_main and not found else []
    log = MetricsLog(run.metrics, enabled=ctx.is_main, sinks=sinks)
    try:
        return _train_loop(student, corpus, cfg, run, progress, ctx, on_step, optimizer, scheduler, sampler,
                           meta, ckpt_root, log, found, report_to)
    finally:
        log.close()


def _train_loop(student, corpus, cfg, run, progress, ctx, on_step, optimizer, scheduler, sampler, meta,
                ckpt_root, log, found, report_to) -> MetricsLog:
    device = student.device
    step = 0
    if found:
        step = load_checkpoint(found[-1], student, optimizer, scheduler, sampler, expect_meta=meta, ctx=ctx)
        # the restored lr is the old schedule's; take this run's (the same value unless
        # run.yaml's history changed the schedule at this step)
        for g, base, fn in zip(optimizer.param_groups, scheduler.base_lrs, scheduler.lr_lambdas):
            g["lr"] = base * fn(scheduler.last_epoch)
        scheduler._last_lr = [g["lr"] for g in optimizer.param_groups]
        set_adamw_settings(optimizer, cfg, step)  # an --allow-change adam_eps, betas or weight decay takes effect here
        if ctx.is_main:
            run.truncate_metrics(step)
            # a resumed TensorBoard hides the killed run's events past this step
            log.sinks = open_sinks(report_to, run.root, cfg.to_dict(), start_step=step)
    elif cfg.eval_every:
        row = {"step": 0, **evaluate(student, corpus, cfg, ctx)}  # the init itself, for comparison
        log.write(row)
    loss = loss_settings(cfg)
    tokens_per_step = cfg.batch_size * cfg.grad_accum * corpus.seq_len
    bar = tqdm(total=cfg.steps, initial=step, desc="distill", disable=not (progress and ctx.is_main), dynamic_ncols=True)
    while step < cfg.steps:
        t0 = time.perf_counter()
        # every rank draws the global micro-batch and reads only its own rows of it
        batches = [read_batch(corpus.train, ctx.local_rows(sampler.next()), cfg, device)
                   for _ in range(cfg.grad_accum)]
        lr = scheduler.get_last_lr()[0]
        clip = setting_at(cfg, "grad_clip", step)
        try:
            sums = train_step(student, optimizer, batches, loss, clip if clip > 0 else float("inf"), ctx)
        except StepError as e:
            raise RedError(f"non-finite {e.what} at step {step + 1} {e.detail}; {_last_kept(run)}; "
                           "lower --lr or check the data") from None
        grad_norm = sums.pop("grad_norm")
        scheduler.step()
        step += 1
        tok_s = tokens_per_step / (time.perf_counter() - t0)
        bar.update(1)
        bar.set_postfix(loss=f"{sums['loss']:.4f}", tok_s=f"{tok_s:.0f}")
        stop = bool(on_step(step)) if on_step is not None else False
        if step % cfg.log_every == 0 or step == cfg.steps:
            log.write({"step": step, **sums, "lr": lr, "grad_norm": grad_norm, "tokens_per_s": tok_s})
        if (cfg.eval_every and step % cfg.eval_every == 0) or step == cfg.steps:
            log.write({"step": step, **evaluate(student, corpus, cfg, ctx)})
        if (cfg.save_every and step % cfg.save_every == 0) or step == cfg.steps or stop:
            save_checkpoint(ckpt_root, step, student, optimizer, scheduler, sampler, meta,
                            keep=cfg.keep_checkpoints, ctx=ctx)
        if ctx.is_main:
            emit("step-done", step, ckpt_root)
        if stop:
            break
    bar.close()
    return log


def _last_kept(run: RunDir) -> str:
    found = run.complete_checkpoints()
    return f"the last good checkpoint is kept ({found[-1]})" if found else "no checkpoint had been written yet"
