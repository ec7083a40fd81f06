"""The distillation loop: one obvious loop over optimizer steps.

AdamW (0.9, 0.999, no weight decay), linear warmup then linear decay, global-norm
clipping, gradient accumulation, bf16 autocast on CUDA (fp32 on CPU), JSONL metrics,
tqdm progress, periodic validation (loss + last-layer eRank) and atomic checkpoints that
``resume`` continues from bit for bit.
"""
from __future__ import annotations

import contextlib
import json
import math
import time
from pathlib import Path

import torch
from tqdm.auto import tqdm

from .checkpoint import list_checkpoints, load_checkpoint, save_checkpoint
from .config import DistillConfig
from .data import BlockSampler, PackedCorpus
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


def autocast(device: torch.device):
    if device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


class MetricsLog:
    """Append-only JSONL log; one JSON object per line."""

    def __init__(self, path: Path):
        self.path = path
        self.rows: list[dict] = []

    def write(self, row: dict) -> None:
        row = {k: (float(v) if torch.is_tensor(v) else v) for k, v in row.items()}
        self.rows.append(row)
        with open(self.path, "a") as f:
            f.write(json.dumps(row) + "\n")


@torch.no_grad()
def evaluate(student: ProjectedStudent, corpus: PackedCorpus, cfg: DistillConfig) -> dict:
    """Mean loss terms over validation batches and the eRank of the student's last hidden state."""
    device = student.embed.device
    loss = loss_settings(cfg)
    sums: dict[str, float] = {}
    n = 0
    for i in range(0, min(len(corpus.val), cfg.val_batches * cfg.batch_size), cfg.batch_size):
        batch = corpus.val[i: i + cfg.batch_size].to(device)
        with autocast(device):
            parts = student.distill_losses(batch, loss)
        for k, v in parts.items():
            sums[k] = sums.get(k, 0.0) + float(v)
        n += 1
    out = {f"val_{k}": v / n for k, v in sums.items()}
    first = corpus.val[: cfg.batch_size].to(device)
    with autocast(device):
        out["erank_last"] = erank(student.hidden_states(first)[-1].float())
    return out


def train(student: ProjectedStudent, corpus: PackedCorpus, cfg: DistillConfig, out_dir: str | Path,
          progress: bool = True, meta: dict | None = None, stop_at: int | None = None) -> MetricsLog:
    """Train ``student`` in place for ``cfg.steps`` optimizer steps; returns the metrics log.

    Checkpoints go to ``out_dir/checkpoints``; with ``cfg.resume`` the last complete one is
    restored first. ``stop_at`` ends the run early at that step (with a checkpoint), as if
    it had been interrupted there; the schedule still follows ``cfg.steps``. Stops with RedError on a non-finite loss or gradient (the last good
    checkpoint stays on disk).
    """
    out_dir = Path(out_dir)
    device = student.embed.device
    params = list(student.parameters())
    optimizer = torch.optim.AdamW(params, lr=cfg.lr, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_schedule(cfg.steps, cfg.warmup))
    sampler = BlockSampler(len(corpus.train), cfg.batch_size, cfg.seed)
    meta = dict(meta or {}, hidden_size=student.hidden_size, teacher_hidden_size=student.arch.hidden_size,
                model_type=student.arch.model_type, num_layers=student.arch.num_layers)
    ckpt_root = out_dir / "checkpoints"
    log = MetricsLog(out_dir / "metrics.jsonl")
    step = 0
    if cfg.resume:
        found = list_checkpoints(ckpt_root)
        if not found:
            raise RedError(f"--resume: no complete checkpoint in {ckpt_root}; start without --resume")
        step = load_checkpoint(found[-1], student, optimizer, scheduler, sampler, expect_meta=meta)
    elif cfg.eval_every:
        log.write({"step": 0, **evaluate(student, corpus, cfg)})  # the init itself, for comparison
    loss = loss_settings(cfg)
    tokens_per_step = cfg.batch_size * cfg.grad_accum * corpus.seq_len
    bar = tqdm(total=cfg.steps, initial=step, desc="distill", disable=not progress, dynamic_ncols=True)
    end = cfg.steps if stop_at is None else min(stop_at, cfg.steps)
    while step < end:
        t0 = time.perf_counter()
        sums: dict[str, float] = {}
        for _ in range(cfg.grad_accum):
            batch = corpus.train[sampler.next()].to(device)
            with autocast(device):
                parts = student.distill_losses(batch, loss)
            (parts["loss"] / cfg.grad_accum).backward()
            for k, v in parts.items():
                sums[k] = sums.get(k, 0.0) + float(v.detach()) / cfg.grad_accum
        bad = [k for k, v in sums.items() if not math.isfinite(v)]
        if bad:
            raise RedError(f"non-finite loss at step {step + 1} in term(s) {', '.join(bad)}; the last good "
                           f"checkpoint is kept in {ckpt_root}; lower --lr or check the data")
        max_norm = cfg.grad_clip if cfg.grad_clip > 0 else float("inf")
        grad_norm = float(torch.nn.utils.clip_grad_norm_(params, max_norm))
        if not math.isfinite(grad_norm):
            raise RedError(f"non-finite gradient norm at step {step + 1}; the last good checkpoint is kept in "
                           f"{ckpt_root}; lower --lr or check the data")
        lr = scheduler.get_last_lr()[0]
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        step += 1
        tok_s = tokens_per_step / (time.perf_counter() - t0)
        bar.update(1)
        bar.set_postfix(loss=f"{sums['loss']:.4f}", tok_s=f"{tok_s:.0f}")
        if step % cfg.log_every == 0 or step == cfg.steps:
            log.write({"step": step, **sums, "lr": lr, "grad_norm": grad_norm, "tokens_per_s": tok_s})
        if (cfg.eval_every and step % cfg.eval_every == 0) or step == cfg.steps:
            log.write({"step": step, **evaluate(student, corpus, cfg)})
        if (cfg.save_every and step % cfg.save_every == 0) or step == end:
            save_checkpoint(ckpt_root, step, student, optimizer, scheduler, sampler, meta, keep=cfg.keep_checkpoints)
    bar.close()
    return log
