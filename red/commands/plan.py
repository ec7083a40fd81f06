"""`red plan`: what a run holds per GPU and moves per step, and how fast it can be."""
from __future__ import annotations

import json

from red.train.plan import (CATEGORIES, COMM_CATEGORIES, STARTUP_CATEGORIES, TEACHER_SHARDINGS, _gib, check_fits,
                            choose_sharding, fits, format_speed, plan_memory, plan_speed)

def plan_command(args) -> str:
    """What `red plan` prints for its parsed arguments (``red.cli``): the memory plan of each
    ``--teacher-sharding`` choice (one column on one GPU, where there is nothing to shard),
    and with ``--speed`` the speed model. RedError when no choice fits ``--gpu-memory``."""
    common = dict(activation_checkpointing=args.activation_checkpointing, teacher_dtype=args.teacher_dtype,
                  logits_chunk=args.logits_chunk, calib_samples=args.calib_samples,
                  disk_gb_per_s=args.disk_gb_per_s, grad_accum=args.grad_accum)
    plan_only = dict(common, step_weights=getattr(args, "step_weights", "shard"))
    shape = (args.teacher, args.hidden_size, args.seq_len, args.micro_batch, args.gpus)
    choices = TEACHER_SHARDINGS if args.teacher_sharding == "both" and args.gpus > 1 else \
        (args.teacher_sharding if args.teacher_sharding != "both" else "shard",)
    plans = [plan_memory(*shape, teacher_sharding=c, **plan_only) for c in choices]
    peak = lambda p: max(p["per_gpu"]["total"], p["startup"]["total"])
    check_fits(min(plans, key=peak), args.gpu_memory)  # refused only when no choice fits
    auto = None
    if args.gpus > 1:
        auto = choose_sharding(*shape, args.gpu_memory * 2 ** 30, **common)
    speed = None
    if args.speed:
        speed = plan_speed(*shape, grad_accum=args.grad_accum, compute_dtype=args.teacher_dtype,
                           activation_checkpointing=args.activation_checkpointing, logits_chunk=args.logits_chunk)
    if args.json:
        out = dict(plans[0]) if len(plans) == 1 else {p["inputs"]["teacher_sharding"]: p for p in plans}
        if auto is not None:
            out["auto"] = {"teacher_sharding": auto[0], "step_weights": auto[1]}
        if speed is not None:
            out["speed"] = speed
        return json.dumps(out, indent=1)
    text = format_plan(*plans, gpu_memory_gib=args.gpu_memory, auto=auto)
    return text + ("\n" + format_speed(speed) if speed is not None else "")


def _row(label: str, values, note: str = "") -> str:
    """One line of the plan table: a label, one aligned byte cell per plan, a note."""
    return f"  {label:<22}" + "".join(f"{_gib(v):>14}" for v in values) + (f"   {note}" if note else "")


def _header_lines(i: dict, names: list, multi: bool) -> list[str]:
    """The plan's inputs in one line, then the per-GPU table's head (one column per plan)."""
    return [f"red plan: {i['model_type']} teacher D={i['teacher_hidden_size']} L={i['num_layers']} V={i['vocab_size']} "
            f"-> student d={i['hidden_size']}; {i['gpus']} GPU(s), micro-batch {i['micro_batch']} "
            f"({i['micro_batch_per_gpu']} per GPU) x {i['seq_len']} tokens, grad-accum {i['grad_accum']}, "
            f"activation checkpointing {'on' if i['activation_checkpointing'] else 'off'}, logits "
            f"chunked by {i['logits_chunk'] or 'the kernel default'}",
            f"{'per GPU:':<24}" + "".join(f"{n:>14}" for n in names) + ("   (--teacher-sharding)" if multi else "")]


def _per_gpu_lines(plans: tuple, i: dict, multi: bool) -> list[str]:
    """The training peak's rows, one per ``CATEGORIES`` entry, and their total."""
    notes = {"teacher": f"frozen weights, {i['teacher_dtype']}" + (" (shard: 1/N; replicate: whole)" if multi else ""),
             "projections": "trainable, fp32" + (", sharded" if multi else ""),
             "gradients": "fp32" + (", sharded" if multi else ""),
             "optimizer": "AdamW moments, fp32" + (", sharded" if multi else ""),
             "weights": f"the step's W_s, {i['compute_dtype']}" + (": layers as fp32 rows, root whole" if multi else ""),
             "weight_grads": "their fp32 sums over the micro-batches",
             "gathered": "sharded teacher: root + one layer at a time", "activations": "kept for backward",
             "logits": "fused KL + cross-entropy over the vocabulary",
             "step_buffers": "make / reduce / weight_backward (not with the three above)"}
    lines = [_row(c, [p["per_gpu"][c] for p in plans], notes[c]) for c in CATEGORIES]
    lines.append(_row("total", [p["per_gpu"]["total"] for p in plans], "+ CUDA context and allocator slack (~1-3 GiB)"))
    return lines


def _startup_lines(plans: tuple, names: list, multi: bool) -> list[str]:
    """The start-up peak's title (what each sharding loads), its rows and their total."""
    if multi:
        lines = ["start-up, per GPU (sharded: no GPU holds the whole teacher" +
                 ("; replicate loads it whole):" if "replicate" in names else "):")
                 if "shard" in names else "start-up, per GPU (each loads the whole teacher):"]
    else:
        lines = ["start-up, per GPU:"]
    snotes = {"teacher": "shard read from the safetensors" if multi else "whole",
              "projections": "fp32",
              "gathered": "one decoder layer whole, during calibration",
              "calibration": "one batch through one layer + statistics",
              "init_matrices": "one layer's 7 full D x d fp32 projections being made"}
    for c in STARTUP_CATEGORIES:
        lines.append(_row(c, [p["startup"][c] for p in plans], snotes[c]))
    lines.append(_row("total", [p["startup"]["total"] for p in plans]))
    return lines


def _communication_lines(plans: tuple, i: dict, auto: tuple | None) -> list[str]:
    """Several GPUs: the bytes received per optimizer step, by ``COMM_CATEGORIES``, and what
    the ``auto`` choices would pick."""
    lines = ["communication per optimizer step, received per GPU:"]
    cnotes = {"teacher_gathers": "teacher layers: each micro-batch, make, weight_backward; root once",
              "projection_gather": f"P in {i['compute_dtype']}, once",
              "step_weight_gathers": f"each layer's W_s in {i['compute_dtype']}, forward and backward of every micro-batch",
              "step_weight_reduce_scatter": "their fp32 gradients, every micro-batch",
              "weight_grad_gather": "the layers' fp32 sums, once", "weight_grad_all_reduce": "the root's fp32 sums, once"}
    for c in COMM_CATEGORIES:
        lines.append(_row(c, [p["communication"][c] for p in plans], cnotes[c]))
    lines.append(_row("total", [p["communication"]["total"] for p in plans]))
    if auto:
        lines.append(f"red distill's defaults (--teacher-sharding auto, --step-weights auto) pick teacher {auto[0]}, "
                     f"step weights {auto[1]} on this GPU memory")
    return lines


def _checkpoint_lines(plan: dict) -> list[str]:
    """One checkpoint's size on disk and, when planned, what each rank writes and how long."""
    i = plan["inputs"]
    lines = [f"one checkpoint on disk: {_gib(i['checkpoint_bytes']).strip()}"]
    c = plan.get("checkpoint")
    if c is not None:
        lines.append(f"checkpoint write: {_gib(c['bytes_per_rank']).strip()} per rank ({i['gpus']} rank(s) each write "
                     f"their shard), ~{c['seconds']:.1f} s at {c['disk_gb_per_s']:g} GB/s")
    return lines


def format_plan(*plans: dict, gpu_memory_gib: float | None = None, auto: tuple | None = None) -> str:
    """The table `red plan` prints: one column per plan (``--teacher-sharding shard``,
    ``replicate``, or both side by side), each with its per-GPU peak and communication.
    ``gpu_memory_gib`` marks a column whose peak is over it; ``auto`` names what
    ``--teacher-sharding auto`` and ``--step-weights auto`` would pick."""
    i = plans[0]["inputs"]
    multi = i["gpus"] > 1
    names = [p["inputs"]["teacher_sharding"] for p in plans] if multi else ["1 GPU"]
    if not multi:
        plans = plans[:1]
    lines = _header_lines(i, names, multi) + _per_gpu_lines(plans, i, multi)
    if gpu_memory_gib is not None:
        over = [n for n, p in zip(names, plans) if not fits(p, gpu_memory_gib * 2 ** 30)]
        if over and multi:
            lines.append(f"  over --gpu-memory {gpu_memory_gib:g} GiB: {', '.join(over)}")
    lines += _startup_lines(plans, names, multi)
    if multi:
        lines += _communication_lines(plans, i, auto)
    lines += _checkpoint_lines(plans[0])
    return "\n".join(lines)
