"""The distillation loop: one obvious loop over optimizer steps.

AdamW (0.9, 0.999, no weight decay; fused on CUDA), linear warmup then linear decay,
global-norm clipping, gradient accumulation, JSONL metrics, tqdm progress, periodic
validation (loss + last-layer eRank) and atomic checkpoints that ``resume`` continues from
bit for bit.

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

import json
import math
import time
from pathlib import Path

import torch
from tqdm.auto import tqdm

from .checkpoint import list_checkpoints, load_checkpoint, save_checkpoint, test_hold
from .config import DistillConfig
from .data import BlockSampler, PackedCorpus
from .distributed import DistContext, full_tensor
from .errors import RedError
from .metrics import erank
from .student import LossSettings, ProjectedStudent


def loss_settings(cfg: DistillConfig) -> LossSettings:
    return LossSettings(temperature=cfg.temperature, kl_weight=cfg.kl_weight, kl_t2_scale=cfg.kl_t2_scale,
                        lm_weight=cfg.lm_weight, clone_weight=cfg.clone_weight, clone_norm=cfg.clone_norm)


def lr_schedule(steps: int, warmup: float):
    """Multiplier of the peak lr at each step: linear warmup, then linear decay to 0."""
    w = int(round(warmup * steps)) if warmup < 1 else int(warmup)
    w = max(w, 1)

    def factor(step: int) -> float:
        if step < w:
            return (step + 1) / w
        return max(0.0, (steps - step) / max(1, steps - w))
    return factor


PRECISIONS = {"bf16": torch.bfloat16, "fp32": torch.float32}


def resolve_precision(name: str, device: torch.device) -> torch.dtype:
    """The compute dtype of ``--precision``: auto is bf16 on CUDA and fp32 elsewhere."""
    if name == "auto":
        return torch.bfloat16 if torch.device(device).type == "cuda" else torch.float32
    return PRECISIONS[name]


def make_optimizer(params, lr: float, device: torch.device) -> torch.optim.Optimizer:
    """AdamW over the fp32 masters; the fused (single-kernel) implementation on CUDA."""
    fused = torch.device(device).type == "cuda"
    return torch.optim.AdamW(params, lr=lr, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0, fused=fused)


def train_step(student: ProjectedStudent, optimizer: torch.optim.Optimizer, batches, loss: LossSettings,
               max_norm: float = float("inf"), ctx: DistContext | None = None) -> dict:
    """One optimizer step over the micro-batches ``batches`` (token id tensors on the
    student's device): forward and backward of each, gradient norm, clipping, AdamW.

    Returns the loss terms averaged over micro-batches (and ranks) and ``grad_norm``, read
    back to the host in one transfer. Raises RedError without stepping when a loss term or
    the gradient is not finite, naming the terms (or parameters).
    """
    ctx = ctx or DistContext()
    params = [p for g in optimizer.param_groups for p in g["params"]]  # the tensors AdamW steps
    n = len(batches)
    sums: dict[str, torch.Tensor] = {}
    for batch in batches:
        parts = student.distill_losses(batch, loss)
        (parts["loss"] / n).backward()
        for k, v in parts.items():
            v = v.detach().float() / n
            sums[k] = sums[k] + v if k in sums else v
    # the norm first and the clipping after (what clip_grad_norm_ does), so that a
    # non-finite gradient is found before clipping spreads the NaN to every tensor
    total_norm = torch.nn.utils.get_total_norm([p.grad for p in params if p.grad is not None])
    keys = list(sums)
    packed = torch.stack([sums[k] for k in keys])
    if ctx.distributed:
        packed = ctx.all_reduce_mean(packed.to(_comm_device(ctx), torch.float64))
    norm = full_tensor(total_norm).detach().reshape(1).to(packed.device, packed.dtype)
    values = torch.cat([packed, norm]).tolist()  # the step's one host sync
    out = dict(zip(keys, values[:-1]))
    out["grad_norm"] = values[-1]
    bad = [k for k, v in out.items() if k != "grad_norm" and not math.isfinite(v)]
    if bad:
        raise StepError("loss", f"in term(s) {', '.join(bad)}")
    if not math.isfinite(out["grad_norm"]):
        names = _nonfinite_grads(student.named_trainable_parameters(), ctx)
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


class MetricsLog:
    """Append-only JSONL log; one JSON object per line."""

    def __init__(self, path: Path, enabled: bool = True):
        self.path = path
        self.enabled = enabled  # False on ranks other than 0: rows are kept, nothing is written
        self.rows: list[dict] = []

    def write(self, row: dict) -> None:
        row = {k: (float(v) if torch.is_tensor(v) else v) for k, v in row.items()}
        self.rows.append(row)
        if not self.enabled:
            return
        with open(self.path, "a") as f:
            f.write(json.dumps(row) + "\n")


@torch.no_grad()
def evaluate(student: ProjectedStudent, corpus: PackedCorpus, cfg: DistillConfig, ctx: DistContext | None = None) -> dict:
    """Mean loss terms over validation batches and the eRank of the student's last hidden state.

    In a data-parallel run every rank takes its slice of each validation micro-batch and
    the results are averaged over ranks (the eRank is taken of the gathered rows), so the
    numbers mean the same for any number of processes (rows of a validation micro-batch
    that do not divide evenly over the ranks are left out).
    """
    ctx = ctx or DistContext()
    device = student.embed.device
    loss = loss_settings(cfg)
    sums: dict[str, float] = {}
    n = 0
    for i in range(0, min(len(corpus.val), cfg.val_batches * cfg.batch_size), cfg.batch_size):
        batch = corpus.val[i: i + cfg.batch_size]
        if ctx.distributed:
            batch = batch[: len(batch) - len(batch) % ctx.world_size]
            if not len(batch):
                continue
        parts = student.distill_losses(ctx.local_rows(batch).to(device), loss)
        for k, v in parts.items():
            sums[k] = sums.get(k, 0.0) + float(v)
        n += 1
    sums = _mean_over_ranks(sums, ctx)
    out = {f"val_{k}": v / max(n, 1) for k, v in sums.items()}
    first = corpus.val[: cfg.batch_size]
    split = ctx.distributed and len(first) >= ctx.world_size
    if split:
        first = first[: len(first) - len(first) % ctx.world_size]
    h = student.hidden_states((ctx.local_rows(first) if split else first).to(device))[-1].float()
    out["erank_last"] = erank(ctx.all_gather_rows(h) if split else h)
    return out


def _mean_over_ranks(values: dict[str, float], ctx: DistContext) -> dict[str, float]:
    """Average a dict of floats over ranks with one all-reduce (identity in one process)."""
    if not ctx.distributed or not values:
        return values
    keys = list(values)
    t = ctx.all_reduce_mean(torch.tensor([values[k] for k in keys], dtype=torch.float64, device=_comm_device(ctx)))
    return dict(zip(keys, t.cpu().tolist()))


def _comm_device(ctx: DistContext) -> torch.device:
    return torch.device("cuda", torch.cuda.current_device()) if ctx.mesh is not None and ctx.mesh.device_type == "cuda" \
        else torch.device("cpu")


def _nonfinite_grads(named_params, ctx: DistContext) -> list[str]:
    """Names of the parameters whose gradient holds a NaN or inf (on any rank)."""
    from .distributed import local_tensor

    flags = torch.tensor([0.0 if p.grad is None else float(not torch.isfinite(local_tensor(p.grad)).all())
                          for _, p in named_params], device=_comm_device(ctx))
    flags = ctx.all_reduce_mean(flags)
    return [n for (n, _), f in zip(named_params, flags.tolist()) if f > 0]


def train(student: ProjectedStudent, corpus: PackedCorpus, cfg: DistillConfig, out_dir: str | Path,
          progress: bool = True, meta: dict | None = None, stop_at: int | None = None,
          ctx: DistContext | None = None) -> MetricsLog:
    """Train ``student`` in place for ``cfg.steps`` optimizer steps; returns the metrics log.

    Checkpoints go to ``out_dir/checkpoints``; with ``cfg.resume`` the last complete one is
    restored first. ``stop_at`` ends the run early at that step (with a checkpoint), as if
    it had been interrupted there; the schedule still follows ``cfg.steps``. Stops with
    RedError on a non-finite loss or gradient, naming the step and the loss terms (or the
    parameters) affected; the last good checkpoint stays on disk.

    ``ctx`` (from ``red.distributed.init_distributed``) makes this one rank of a sharded
    run: each micro-batch of ``cfg.batch_size`` sequences is split across ranks, loss terms
    are averaged over ranks, and rank 0 alone writes metrics and checkpoints.
    """
    ctx = ctx or DistContext()
    out_dir = Path(out_dir)
    device = student.embed.device
    if cfg.batch_size % ctx.world_size:
        raise RedError(f"batch_size {cfg.batch_size} is the global micro-batch and must be divisible by the "
                       f"{ctx.world_size} processes; pick a multiple of {ctx.world_size}")
    student.activation_checkpointing = cfg.activation_checkpointing
    student.recompute_weights = cfg.recompute_weights
    optimizer = make_optimizer(student.trainable_parameters(), cfg.lr, device)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_schedule(cfg.steps, cfg.warmup))
    sampler = BlockSampler(len(corpus.train), cfg.batch_size, cfg.seed)
    meta = dict(meta or {}, hidden_size=student.hidden_size, teacher_hidden_size=student.arch.hidden_size,
                model_type=student.arch.model_type, num_layers=student.arch.num_layers)
    ckpt_root = out_dir / "checkpoints"
    log = MetricsLog(out_dir / "metrics.jsonl", enabled=ctx.is_main)
    step = 0
    if cfg.resume:
        found = list_checkpoints(ckpt_root)
        if not found:
            raise RedError(f"--resume: no complete checkpoint in {ckpt_root}; start without --resume")
        step = load_checkpoint(found[-1], student, optimizer, scheduler, sampler, expect_meta=meta)
    elif cfg.eval_every:
        row = {"step": 0, **evaluate(student, corpus, cfg, ctx)}  # the init itself, for comparison
        log.write(row)
    loss = loss_settings(cfg)
    tokens_per_step = cfg.batch_size * cfg.grad_accum * corpus.seq_len
    bar = tqdm(total=cfg.steps, initial=step, desc="distill", disable=not (progress and ctx.is_main), dynamic_ncols=True)
    end = cfg.steps if stop_at is None else min(stop_at, cfg.steps)
    max_norm = cfg.grad_clip if cfg.grad_clip > 0 else float("inf")
    while step < end:
        t0 = time.perf_counter()
        batches = [ctx.local_rows(corpus.train[sampler.next()]).to(device) for _ in range(cfg.grad_accum)]
        lr = scheduler.get_last_lr()[0]
        try:
            sums = train_step(student, optimizer, batches, loss, max_norm, ctx)
        except StepError as e:
            raise RedError(f"non-finite {e.what} at step {step + 1} {e.detail}; the last good checkpoint is kept "
                           f"in {ckpt_root}; lower --lr or check the data") from None
        grad_norm = sums.pop("grad_norm")
        scheduler.step()
        step += 1
        tok_s = tokens_per_step / (time.perf_counter() - t0)
        bar.update(1)
        bar.set_postfix(loss=f"{sums['loss']:.4f}", tok_s=f"{tok_s:.0f}")
        if step % cfg.log_every == 0 or step == cfg.steps:
            log.write({"step": step, **sums, "lr": lr, "grad_norm": grad_norm, "tokens_per_s": tok_s})
        if (cfg.eval_every and step % cfg.eval_every == 0) or step == cfg.steps:
            log.write({"step": step, **evaluate(student, corpus, cfg, ctx)})
        if (cfg.save_every and step % cfg.save_every == 0) or step == end:
            save_checkpoint(ckpt_root, step, student, optimizer, scheduler, sampler, meta,
                            keep=cfg.keep_checkpoints, ctx=ctx)
        if ctx.is_main:
            test_hold("train", step, ckpt_root)
    bar.close()
    return log
