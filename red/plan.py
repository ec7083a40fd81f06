"""`red plan`: what each GPU holds during a distillation, from the teacher's config.json alone.

``plan_memory(...)`` returns bytes per GPU for each category; no weights are loaded.

Model (N = number of GPUs, FSDP2 shards every tensor along its first dimension, so a
rank holds ceil(rows / N) rows of each; single GPU: N = 1):

- ``teacher``: every teacher parameter in the teacher dtype (bf16 by default), sharded.
- ``projections``: the trainable tensors (7 projections D x d per layer, embedding and an
  untied head projection, 2 gains per layer + the final gain), fp32, sharded.
- ``gradients``: one fp32 gradient per trainable tensor, sharded (FSDP2 reduce-scatters).
- ``optimizer``: AdamW's exp_avg and exp_avg_sq (fp32, sharded) and its step counter (one
  fp32 scalar per tensor).
- ``gathered`` (N > 1 only): FSDP2's unsharded working copies, in the compute dtype: the
  root unit (embedding, head, final norms) plus two layer units (the one running and the
  one prefetched).
- ``activations``: what autograd keeps for backward until the backward pass reaches it,
  per micro-batch of B sequences of T tokens on this GPU (B = global micro-batch / N):
  under lockstep distillation each layer keeps the student's activations, the teacher
  activations its clone terms compare against, and the fp32 gradient of P_down that
  the student-space FFN clone term computes in its forward; the student weights W_t P
  are re-made in backward, so only one layer's are live at a time. With activation
  checkpointing only each layer's two inputs (student h_s [d] and teacher h_t [D] per
  token) are kept, plus one layer's activations while it is recomputed. The per-token
  coefficients count the tensors ``red_kernels`` (its PyTorch path, which the Triton
  path mirrors) saves; the test checks the formula is an upper bound within 30% of the
  real saved tensors of tiny models in fp32.
- ``logits``: the fused linear-KL kernel never materializes all logits: it walks the
  B*T rows in chunks (``logits_chunk``, default the kernel's own rule: about as many
  logits as h_s has elements, at least 1024 rows on a GPU) and keeps, for backward, the gradient
  of h_s [B*T, d] and of the head [V, d] (fp32); while a chunk is processed about four
  [chunk, V] fp32 tensors are live (student and teacher logits and their softmaxes).

Start-up (``startup``): what a GPU holds before training, while the student is made. On
N > 1 GPUs the start-up is sharded (``red.pipeline.build_sharded_student``): no rank holds
the whole teacher. Categories:

- ``teacher``: this rank's shard of the teacher (read from the safetensors, rows only).
- ``projections``: this rank's shard of the fp32 trainable tensors (made before they are
  initialized; they stay for training).
- ``gathered``: one teacher decoder layer all-gathered whole, in the teacher dtype, while
  calibration runs it (N > 1; one process holds the whole teacher anyway).
- ``calibration``: the activations of one calibration batch (4 sequences of seq_len
  tokens, no autograd) through one decoder layer: residual, norm outputs, q/k/v and their
  rotary copies, GQA-expanded k/v, attention output, gate/up/activation/product, down
  output, in the teacher dtype; plus the per-sequence statistics (fp32, points x
  calib_samples x 4 x D, all-reduced on the GPU) and, N > 1, the embedding rows of one
  round's distinct tokens (fp32, at most min(V, N x 4 x seq_len) rows). Attention scores
  are not counted (SDPA's flash / memory-efficient kernels on a GPU do not make them).
- ``init_matrices``: one layer's seven full D x d fp32 projections while they are made
  and their rows kept (red makes them one at a time, in host memory: an upper bound).

Checkpoint write (``checkpoint``): each rank writes its own shard of the trainable tensors
and of AdamW's two moments (fp32), so a rank writes about 1/N of a checkpoint; the time is
the whole checkpoint at ``disk_gb_per_s`` (GB/s, 10^9 bytes, the write bandwidth of the
--out file system shared by every rank; default 1.0, a conservative figure for one NVMe or
a network file system).

Not counted: the CUDA context and allocator fragmentation (typically 1-3 GiB per GPU),
NCCL buffers, and the data loader. Leave headroom.
"""
from __future__ import annotations

import json
import math
from pathlib import Path

import torch

from .errors import RedError
from .student import trainable_shapes
from .teacher import Arch

DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}
#: torch dtype -> the name plan_memory takes
DTYPE_NAMES = {torch.float32: "float32", torch.bfloat16: "bfloat16", torch.float16: "float16"}
CATEGORIES = ("teacher", "projections", "gradients", "optimizer", "gathered", "activations", "logits")
STARTUP_CATEGORIES = ("teacher", "projections", "gathered", "calibration", "init_matrices")
CALIBRATION_BATCH = 4  # sequences per calibration forward (red.calibration.calibrate's batch_size)
DEFAULT_GPU_MEMORY_GIB = 80.0
DEFAULT_DISK_GB_PER_S = 1.0


def teacher_shapes(arch: Arch, attention_bias: bool) -> dict[str, tuple[int, ...]]:
    """Name -> shape of every teacher parameter (transformers' names; a tied head is
    counted once, as the embedding)."""
    D, I, V, h = arch.hidden_size, arch.intermediate_size, arch.vocab_size, arch.head_dim
    q, kv = arch.num_heads * h, arch.num_kv_heads * h
    out: dict[str, tuple[int, ...]] = {"model.embed_tokens.weight": (V, D)}
    for i in range(arch.num_layers):
        p = f"model.layers.{i}."
        out.update({p + "self_attn.q_proj.weight": (q, D), p + "self_attn.k_proj.weight": (kv, D),
                    p + "self_attn.v_proj.weight": (kv, D), p + "self_attn.o_proj.weight": (D, q)})
        if attention_bias:
            out.update({p + "self_attn.q_proj.bias": (q,), p + "self_attn.k_proj.bias": (kv,),
                        p + "self_attn.v_proj.bias": (kv,)})
        if arch.qk_norm:
            out.update({p + "self_attn.q_norm.weight": (h,), p + "self_attn.k_norm.weight": (h,)})
        out.update({p + "mlp.gate_proj.weight": (I, D), p + "mlp.up_proj.weight": (I, D),
                    p + "mlp.down_proj.weight": (D, I), p + "input_layernorm.weight": (D,),
                    p + "post_attention_layernorm.weight": (D,)})
    out["model.norm.weight"] = (D,)
    if not arch.tied:
        out["lm_head.weight"] = (V, D)
    return out


def has_attention_bias(config) -> bool:
    """Whether the teacher's q/k/v projections carry biases: Qwen2 always (transformers
    hard-codes them), the others when ``attention_bias`` is set."""
    get = config.get if isinstance(config, dict) else (lambda k, d=None: getattr(config, k, d))
    return get("model_type") == "qwen2" or bool(get("attention_bias", False))


def expected_teacher_shapes(config) -> dict[str, tuple[int, ...]]:
    """``teacher_shapes`` for a teacher's (transformers) config: what its safetensors must hold."""
    return teacher_shapes(Arch.from_config(config), has_attention_bias(config))


def _numel(shape) -> int:
    return math.prod(shape)


def _sharded_numel(shape, n: int) -> int:
    """Elements one rank holds of a tensor FSDP2 shards on dim 0 over ``n`` ranks (the
    largest shard, which is also FSDP2's padded shard size)."""
    if not shape:
        return 1
    return math.ceil(shape[0] / n) * _numel(shape[1:])


def checkpoint_bytes(arch: Arch, d: int) -> int:
    """Bytes of one training checkpoint (state.safetensors + trainer.json): the fp32
    trainable tensors, AdamW's two moments and step per tensor, RNG state and headers."""
    shapes = trainable_shapes(arch, d)
    tensors = sum(_numel(s) for s in shapes.values())
    return 4 * 3 * tensors + 4 * len(shapes) + 16 * 1024 + 200 * 4 * len(shapes)


def export_bytes(arch: Arch, d: int, dtype_bytes: int = 4, files_bytes: int = 1 << 20) -> int:
    """Bytes of the exported student: model.safetensors plus ``files_bytes`` for the config
    and tokenizer files (default 1 MiB; pass the teacher's own when they are known)."""
    q, kv = arch.num_heads * arch.head_dim, arch.num_kv_heads * arch.head_dim
    per_layer = student_weight_elements(arch, d) + 2 * d + (q + 2 * kv) + 2 * arch.head_dim
    n = arch.vocab_size * d * (1 if arch.tied else 2) + arch.num_layers * per_layer + d
    return dtype_bytes * n + files_bytes


def run_disk_bytes(arch: Arch, d: int, steps: int, save_every: int, keep: int, export_dtype_bytes: int = 4,
                   files_bytes: int = 1 << 20) -> int:
    """Disk a run needs at its peak: the checkpoints it keeps, one more being written
    before the oldest is pruned, and the export."""
    written = steps // save_every + 1 if save_every else 1
    kept = min(keep, written) if keep > 0 else written
    return (kept + 1) * checkpoint_bytes(arch, d) + export_bytes(arch, d, export_dtype_bytes, files_bytes)


def activation_elements(arch: Arch, d: int, compute_bytes: int = 2) -> tuple[int, int, int]:
    """Per-layer activation model of ``red_kernels``: (elements per token kept in the
    compute dtype, elements per token kept in fp32, fp32 weight-shaped elements kept per
    layer)."""
    D, I, h = arch.hidden_size, arch.intermediate_size, arch.head_dim
    q, kv = arch.num_heads * h, arch.num_kv_heads * h
    # student: two norms (input + normalized), q/k/v and their rotary copies (GQA runs inside
    # the attention kernel: no repeated k/v), the attention output (+ its reshaped copy),
    # gate, up, silu(gate), silu(gate)*up, the gradient of the FFN clone term; the six
    # same-space clone MSEs keep only their gradient (q, k, v, attention, gate, up), in
    # the compute dtype: no teacher tensor and no fp32 copy is kept for backward
    student = 4 * d + 3 * (q + 2 * kv) + 2 * q + 4 * I + d
    clone_grads = 2 * q + 2 * kv + 2 * I
    fp32 = arch.num_heads  # attention log-sum-exp
    return student + clone_grads, fp32, D * d  # dP_down of the FFN clone term


def student_weight_elements(arch: Arch, d: int) -> int:
    """Elements of one layer's student weights W_t P (q, k, v, o, gate, up, down)."""
    q, kv = arch.num_heads * arch.head_dim, arch.num_kv_heads * arch.head_dim
    return (2 * q + 2 * kv + 3 * arch.intermediate_size) * d


def default_logits_chunk(rows: int, V: int, d: int) -> int:
    """The fused KL kernel's own chunk rule on a GPU (imported, so the plan cannot drift)."""
    from red_kernels.fused_linear_kl import default_chunk_rows

    return default_chunk_rows(rows, V, d, on_gpu=True)


def calibration_elements(arch: Arch) -> int:
    """Elements per token live in one decoder layer of a calibration forward (no autograd;
    see the module docstring), an upper bound."""
    D, I = arch.hidden_size, arch.intermediate_size
    q, kv = arch.num_heads * arch.head_dim, arch.num_kv_heads * arch.head_dim
    return 5 * D + 2 * (q + 2 * kv) + 3 * q + 4 * I


def startup_memory(arch: Arch, d: int, t_shapes: dict, s_shapes: dict, N: int, tb: int, seq_len: int,
                   calib_samples: int = 16) -> dict:
    """Bytes one GPU holds at its start-up peak, by ``STARTUP_CATEGORIES`` (+ "total")."""
    shard = lambda shapes: sum(_sharded_numel(s, N) for s in shapes.values())
    layer_t = sum(_numel(s) for k, s in t_shapes.items() if k.startswith("model.layers.0."))
    D, V = arch.hidden_size, arch.vocab_size
    batch = min(CALIBRATION_BATCH, calib_samples)
    points = 2 * arch.num_layers + 1
    calib = batch * seq_len * calibration_elements(arch) * tb + points * calib_samples * 4 * D * 4
    if N > 1:
        calib += min(V, N * batch * seq_len) * D * (4 + tb)
    out = {"teacher": tb * shard(t_shapes), "projections": 4 * shard(s_shapes),
           "gathered": tb * layer_t if N > 1 else 0, "calibration": calib,
           "init_matrices": 4 * 7 * D * d}
    out["total"] = sum(out[c] for c in STARTUP_CATEGORIES)
    return out


def checkpoint_write(arch: Arch, d: int, N: int, disk_gb_per_s: float = DEFAULT_DISK_GB_PER_S) -> dict:
    """Bytes each rank writes for one checkpoint (its rows of every trainable tensor and of
    AdamW's two moments, fp32, + headers and JSON) and the seconds the whole checkpoint
    takes at ``disk_gb_per_s`` (10^9 bytes/s shared by all ranks)."""
    shapes = trainable_shapes(arch, d)
    per_rank = 4 * 3 * sum(_sharded_numel(s, N) for s in shapes.values()) + 200 * 4 * len(shapes) + 16 * 1024
    total = checkpoint_bytes(arch, d)
    return {"bytes_per_rank": per_rank, "bytes_total": total, "disk_gb_per_s": disk_gb_per_s,
            "seconds": total / (disk_gb_per_s * 1e9)}


def check_fits(plan: dict, gpu_memory_gib: float = DEFAULT_GPU_MEMORY_GIB) -> None:
    """RedError (one line, with the numbers) when the training or the start-up peak per GPU
    exceeds ``gpu_memory_gib`` GiB."""
    train, start = plan["per_gpu"]["total"], plan["startup"]["total"]
    limit = gpu_memory_gib * 2 ** 30
    if max(train, start) > limit:
        i = plan["inputs"]
        raise RedError(f"this run needs {max(train, start) / 2 ** 30:.1f} GiB per GPU at its peak (training "
                       f"{train / 2 ** 30:.1f} GiB, start-up {start / 2 ** 30:.1f} GiB) on {i['gpus']} GPU(s), more "
                       f"than --gpu-memory {gpu_memory_gib:g} GiB; use more --gpus, a smaller --micro-batch or "
                       "--seq-len, or --activation-checkpointing")


def plan_memory(teacher: str | Path | dict, hidden_size: int, seq_len: int, micro_batch: int, gpus: int = 1,
                activation_checkpointing: bool = False, teacher_dtype: str = "bfloat16", recompute_weights: bool = False,
                compute_dtype: str | None = None, logits_chunk: int = 0, calib_samples: int = 16,
                disk_gb_per_s: float = DEFAULT_DISK_GB_PER_S) -> dict:
    """Bytes each GPU holds, by category (see the module docstring for the model).

    ``teacher``: a teacher folder (its config.json is read; no weights) or a config dict.
    ``micro_batch`` is the global micro-batch (``--batch-size``), split over ``gpus``.
    ``compute_dtype`` defaults to ``teacher_dtype``. ``logits_chunk`` 0 means the fused
    KL kernel's default chunk. Returns ``{"per_gpu": {category: bytes, ..., "total": bytes},
    "startup": {category: bytes, ..., "total": bytes}, "checkpoint": {...}, "inputs": {...}}``.
    """
    from .config import validate_plan_inputs

    validate_plan_inputs(hidden_size, seq_len, micro_batch, gpus, logits_chunk)  # red plan's own rules
    raw = _read_config(teacher)
    from transformers import AutoConfig

    model_type = raw.get("model_type")
    try:
        config = AutoConfig.for_model(model_type, **{k: v for k, v in raw.items() if k != "model_type"})
    except Exception as e:
        raise RedError(f"teacher config could not be parsed ({type(e).__name__}: {e}); fix config.json") from None
    from .teacher import check_supported_features

    check_supported_features(config)  # plan exactly the teachers distill accepts
    arch = Arch.from_config(config)
    d, N = int(hidden_size), int(gpus)
    if not 0 < d < arch.hidden_size:
        raise RedError(f"--hidden-size {d} must be between 1 and {arch.hidden_size - 1}")
    from .export import check_student_width

    check_student_width(config, d)
    if micro_batch % N:
        raise RedError(f"--micro-batch {micro_batch} (global) must be divisible by --gpus {N}")
    for name, dt in (("teacher dtype", teacher_dtype), ("compute dtype", compute_dtype or teacher_dtype)):
        if dt not in DTYPE_BYTES:
            raise RedError(f"{name} {dt!r} is not one of {', '.join(DTYPE_BYTES)}")
    tb, cb = DTYPE_BYTES[teacher_dtype], DTYPE_BYTES[compute_dtype or teacher_dtype]
    bias = has_attention_bias(config)
    t_shapes, s_shapes = teacher_shapes(arch, bias), trainable_shapes(arch, d)
    shard = lambda shapes: sum(_sharded_numel(s, N) for s in shapes.values())
    out = {
        "teacher": tb * shard(t_shapes),
        "projections": 4 * shard(s_shapes),
        "gradients": 4 * shard(s_shapes),
        "optimizer": 4 * 2 * shard(s_shapes) + 4 * len(s_shapes),
    }
    if N > 1:
        layer_t = sum(_numel(s) for k, s in t_shapes.items() if k.startswith("model.layers.0."))
        layer_s = sum(_numel(s) for k, s in s_shapes.items() if k.startswith("layers.0."))
        root = sum(_numel(s) for k, s in t_shapes.items() if not k.startswith("model.layers.")) + \
            sum(_numel(s) for k, s in s_shapes.items() if not k.startswith("layers."))
        out["gathered"] = cb * (root + 2 * (layer_t + layer_s))
    else:
        out["gathered"] = 0
    tokens = (micro_batch // N) * seq_len
    per_tok, per_tok32, kept32 = activation_elements(arch, d, cb)
    L, D, V = arch.num_layers, arch.hidden_size, arch.vocab_size
    live_weights = student_weight_elements(arch, d) * cb  # one layer's W_t P at a time
    # without --recompute-weights a layer keeps its W_t P for backward (every layer, or with
    # activation checkpointing the one being recomputed)
    kept_weights = 0 if recompute_weights else live_weights
    layer = tokens * (per_tok * cb + per_tok32 * 4) + kept32 * 4 + kept_weights
    embed = tokens * (D + d) * cb  # teacher and student embeddings
    if activation_checkpointing:
        out["activations"] = embed + L * tokens * (d + D) * cb + layer + live_weights
    else:
        out["activations"] = embed + L * layer + live_weights
    chunk = min(tokens, int(logits_chunk)) if logits_chunk else default_logits_chunk(tokens, V, d)
    out["logits"] = tokens * d * cb + V * d * 4 + 4 * chunk * V * 4
    out["total"] = sum(out[c] for c in CATEGORIES)
    if not disk_gb_per_s > 0:
        raise RedError(f"--disk-gb-per-s {disk_gb_per_s} must be above 0")
    startup = startup_memory(arch, d, t_shapes, s_shapes, N, tb, seq_len, calib_samples)
    return {"per_gpu": out, "startup": startup, "checkpoint": checkpoint_write(arch, d, N, disk_gb_per_s), "inputs": {
        "model_type": model_type, "num_layers": L, "teacher_hidden_size": arch.hidden_size, "hidden_size": d,
        "vocab_size": V, "seq_len": seq_len, "micro_batch": micro_batch, "micro_batch_per_gpu": micro_batch // N,
        "gpus": N, "activation_checkpointing": activation_checkpointing, "recompute_weights": recompute_weights,
        "teacher_dtype": teacher_dtype,
        "compute_dtype": compute_dtype or teacher_dtype, "logits_chunk": logits_chunk,
        "checkpoint_bytes": checkpoint_bytes(arch, d)}}


def _read_config(teacher) -> dict:
    """config.json of a teacher folder (or the file itself, or a dict), with red's checks."""
    from .inputs import read_teacher_json

    if isinstance(teacher, dict):
        return dict(teacher)
    p = Path(teacher)
    return read_teacher_json(p.parent if p.name == "config.json" and p.is_file() else p)


def format_plan(plan: dict) -> str:
    """The table `red plan` prints."""
    g, i = plan["per_gpu"], plan["inputs"]
    def gib(b):
        for unit, k in (("GiB", 30), ("MiB", 20), ("KiB", 10)):
            if b >= 2 ** k:
                return f"{b / 2 ** k:10.2f} {unit}"
        return f"{b:10d} B  "
    lines = [f"red plan: {i['model_type']} teacher D={i['teacher_hidden_size']} L={i['num_layers']} V={i['vocab_size']} "
             f"-> student d={i['hidden_size']}; {i['gpus']} GPU(s), micro-batch {i['micro_batch']} "
             f"({i['micro_batch_per_gpu']} per GPU) x {i['seq_len']} tokens, activation checkpointing "
             f"{'on' if i['activation_checkpointing'] else 'off'}, logits "
             f"chunked by {i['logits_chunk'] or 'the kernel default'}",
             "per GPU:"]
    notes = {"teacher": f"frozen weights, {i['teacher_dtype']}, sharded", "projections": "trainable, fp32, sharded",
             "gradients": "fp32, sharded", "optimizer": "AdamW moments, fp32, sharded",
             "gathered": "FSDP2 unsharded root + 2 layer units", "activations": "kept for backward",
             "logits": "KL + cross-entropy over the vocabulary"}
    for c in CATEGORIES:
        lines.append(f"  {c:<12}{gib(g[c])}   {notes[c]}")
    lines.append(f"  {'total':<12}{gib(g['total'])}   + CUDA context and allocator slack (~1-3 GiB)")
    s = plan.get("startup")
    if s is not None:
        sharded = i["gpus"] > 1
        lines.append("start-up, per GPU" + (" (sharded: no GPU holds the whole teacher):" if sharded else ":"))
        snotes = {"teacher": "shard read from the safetensors" if sharded else "whole",
                  "projections": "fp32, " + ("sharded" if sharded else "whole"),
                  "gathered": "one decoder layer whole, during calibration",
                  "calibration": "one batch through one layer + statistics",
                  "init_matrices": "one layer's 7 full D x d fp32 projections being made"}
        for c in STARTUP_CATEGORIES:
            lines.append(f"  {c:<14}{gib(s[c])}   {snotes[c]}")
        lines.append(f"  {'total':<14}{gib(s['total'])}")
    lines.append(f"one checkpoint on disk: {gib(i['checkpoint_bytes']).strip()}")
    c = plan.get("checkpoint")
    if c is not None:
        lines.append(f"checkpoint write: {gib(c['bytes_per_rank']).strip()} per rank ({i['gpus']} rank(s) each write "
                     f"their shard), ~{c['seconds']:.1f} s at {c['disk_gb_per_s']:g} GB/s")
    return "\n".join(lines)
