"""`red plan`: what each GPU holds and moves during a distillation, and how long a step
takes, from the teacher's config.json alone (no weights are loaded).

``plan_memory(...)`` returns bytes per GPU by category, the start-up peak, the checkpoint
write and the communication of one optimizer step; ``plan_speed(...)`` the FLOPs, bytes
and modelled time of one optimizer step by part, beside ordinary training of a model of
the student's size; ``choose_sharding(...)`` is ``--teacher-sharding auto`` and
``--step-weights auto``.

Memory model (per GPU; N = number of GPUs; FSDP2 stores every sharded tensor as
ceil(rows / N) rows of its first dimension; one GPU: N = 1). The step it describes
(``red.train.trainer.step_gradients``): the student's dense weights W_s are made once per
optimizer step, every micro-batch runs teacher and student layer by layer in lockstep and
adds its weight gradients to fp32 sums, and one GEMM per matrix turns the sums into the
gradients of the projections P at the end (``ProjectedStudent.weight_backward``).

- ``teacher``: every teacher parameter in the teacher dtype; 1/N of it with
  ``--teacher-sharding shard``, the whole teacher on every GPU with ``replicate``.
- ``projections``: the trainable tensors (7 projections D x d per layer, the embedding and
  an untied head projection, 2 gains per layer + the final gain), fp32, sharded.
- ``gradients``: their fp32 gradients, sharded (``weight_backward`` keeps a rank's rows).
- ``optimizer``: AdamW's exp_avg and exp_avg_sq (fp32, sharded) and its step counter (one
  fp32 scalar per tensor).
- ``weights``: the step's W_s, in the compute dtype, whole on every GPU: per layer q, k, v,
  o, gate, up, down (W_t·P or Pᵀ·W_t), P_down (the FFN clone target's projection) and the
  two gains, then the final gain, the head W_lm·P_lm [V, d] (also the embedding table of a
  tied teacher) and, untied, P_e. With an fp32 compute dtype on one GPU the casts of
  P_down, the gains and P_e are the masters themselves and cost nothing.
- ``weight_grads``: the fp32 sums of W_s's gradients over the micro-batches (with an fp32
  compute dtype autograd adds into ``.grad`` itself), plus, below fp32, one micro-batch's
  gradients in the compute dtype while its backward runs, before they are folded in.
- ``gathered``: while a micro-batch runs (N > 1, ``shard``): the teacher's embedding,
  final norm and head, gathered once per step and held through it, and one decoder layer
  gathered at a time. Nothing with ``replicate`` or on one GPU.
- ``activations``: what autograd keeps for backward, per micro-batch of B sequences of T
  tokens on this GPU (B = global micro-batch / N), counted tensor by tensor in the compute
  dtype unless said: per student layer its own activations as autograd keeps them for
  ``F.linear`` (the normalized input of q/k/v and gate/up, the attention output for o, the
  SiLU·up product for down), RMSNorm (an fp32 copy of the input, the fp32 rsqrt and the
  normalized values), SDPA (rotated q and k, v, the output, the fp32 log-sum-exp), SiLU
  (its input) and the product (both factors); each clone tap's g = 2(s − t)/n (q, k, v,
  attention, gate, up and the FFN output); the FFN target's matmul saves the teacher's FFN
  output [T, D]; Qwen3's per-head Q/K norms an fp32 copy and the rsqrt. On a GPU with an
  fp32 compute dtype SDPA keeps k and v repeated to every query head (the fused kernels
  take no GQA there). Outside the layers: the token ids (tied) or the teacher's embedding
  rows (untied, for P_e's gradient), the rotary cos/sin, the final norm. With activation
  checkpointing each layer keeps only its two inputs (student [d] and teacher [D] per
  token) and one layer's activations are live again while it is recomputed. Live but not
  saved: one layer's teacher record (q, k, v, attention, gate, up) and residual. The
  saved part is tested to be an upper bound within 30% of what autograd really keeps.
- ``logits``: the fused linear-KL kernel walks the B*T rows in chunks (``logits_chunk``,
  default the kernel's own rule) and keeps, for backward, the gradient of h_s [B*T, d]
  and of the head [V, d] (fp32); while a chunk runs its student and teacher logits
  [chunk, V] are live (the Triton kernel writes the logits' gradient in place), and in
  backward the head gradient is scaled in an fp32 copy.
- ``step_buffers``: the working buffers of the step's weight phases, which never coincide
  with the activations: making W_s (one P cast whole, one teacher layer gathered), the
  all-reduce of the weight-gradient sums (N > 1: ``StudentWeights.reduce`` concatenates
  the sums into one flat fp32 buffer and the collective works on a copy of it: 2 x 4
  bytes per element, less the compute-dtype gradients ``weight_grads`` counts, folded in
  by then) and ``weight_backward`` (one matrix's gradient in the compute dtype
  and fp32, one teacher layer gathered). The sharded teacher's root is held here too.

``total`` = teacher + projections + gradients + optimizer + weights + weight_grads +
max(gathered + activations + logits, step_buffers): the peak of the step.

Communication (``communication``, bytes each GPU receives per optimizer step; ring
collectives: an all-gather moves (N−1)/N of the tensor to each rank, an all-reduce
2(N−1)/N): with ``shard`` every teacher layer is gathered once per micro-batch (twice with
activation checkpointing: the recompute gathers it again), once more to make W_s and once
in ``weight_backward``, and the root once per step; P (cast to the compute dtype first)
is gathered once per step; the fp32 weight-gradient sums are all-reduced once per step.
Scalars (loss terms, the gradient norm, the clone normalizers) are not counted.

Start-up (``startup``): what a GPU holds before training, while the student is made. On
N > 1 GPUs with ``shard`` the start-up is sharded (``red.commands.distill.build_sharded_student``):
no rank holds the whole teacher; with ``replicate`` every rank starts as one process does
(the whole teacher and projections, then the projections are sharded). Categories:

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

Speed model: see ``plan_speed``.
"""
from __future__ import annotations

import math
from pathlib import Path


from red.errors import RedError
from red.dtypes import BYTES, NAME_OF
from red.files import format_bytes
from red.model.arch import (Arch, has_attention_bias, step_layer_shapes,
                            student_weight_elements, teacher_shapes, trainable_shapes)

DTYPE_BYTES = BYTES  # by config.json name
#: torch dtype -> the name plan_memory takes
DTYPE_NAMES = NAME_OF
CATEGORIES = ("teacher", "projections", "gradients", "optimizer", "weights", "weight_grads", "gathered",
              "activations", "logits", "step_buffers")
#: the categories held through the whole step; the others are the two phases ``total`` takes the larger of
PERSISTENT = ("teacher", "projections", "gradients", "optimizer", "weights", "weight_grads")
MICRO_BATCH_PHASE = ("gathered", "activations", "logits")
STARTUP_CATEGORIES = ("teacher", "projections", "gathered", "calibration", "init_matrices")
COMM_CATEGORIES = ("teacher_gathers", "projection_gather", "step_weight_gathers", "step_weight_reduce_scatter",
                   "weight_grad_gather", "weight_grad_all_reduce")
TEACHER_SHARDINGS = ("shard", "replicate")
STEP_WEIGHTS = ("shard", "replicate")
CALIBRATION_BATCH = 4  # sequences per calibration forward (red.train.calibration.calibrate's batch_size)
DEFAULT_GPU_MEMORY_GIB = 80.0
DEFAULT_DISK_GB_PER_S = 1.0
#: ``--teacher-sharding auto`` replicates when the replicated plan's peak stays under this
#: fraction of the GPU's memory: the plan does not count the CUDA context, NCCL's buffers
#: or the allocator's fragmentation (together a few GiB on an 80 GB GPU)
REPLICATE_MEMORY_FRACTION = 0.85


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


def step_weight_elements(arch: Arch, d: int) -> tuple[int, int]:
    """Elements of the step's dense weights (``StudentWeights``): ``(products, casts)``.

    ``products`` are made by a GEMM (every layer's seven matrices and the head W_lm·P_lm);
    ``casts`` are masters cast to the compute dtype (P_down of every layer, the gains, and
    an untied teacher's P_e), which an fp32 step on one GPU uses in place."""
    D, V, L = arch.hidden_size, arch.vocab_size, arch.num_layers
    products = L * student_weight_elements(arch, d) + V * d
    casts = L * (D * d + 2 * d) + d + (0 if arch.tied else D * d)
    return products, casts


def step_layer_elements(arch: Arch, d: int) -> int:
    """Elements of one layer's step weights (``red.model.student.step_layer_shapes``): what a
    multi-process run shards over its GPUs."""
    return sum(math.prod(s) for s in step_layer_shapes(arch, d).values())


def step_root_elements(arch: Arch, d: int) -> int:
    """Elements of the step weights outside the layers (the head, the final gain and an
    untied P_e): whole on every GPU."""
    return arch.vocab_size * d + d + (0 if arch.tied else arch.hidden_size * d)


def _attention_dims(arch: Arch) -> tuple[int, int]:
    return arch.num_heads * arch.head_dim, arch.num_kv_heads * arch.head_dim


def layer_saved_bytes(arch: Arch, d: int, cb: int, gpu: bool = True) -> int:
    """Bytes per token autograd keeps for one student layer of the lockstep forward
    (``red.model.student.decoder_layer`` with clone targets); see the module docstring.

    ``gpu``: SDPA on a GPU with an fp32 compute dtype keeps k and v repeated to every
    query head (``causal_attention`` repeats them so a fused kernel runs)."""
    D, I, H = arch.hidden_size, arch.intermediate_size, arch.num_heads
    q, kv = _attention_dims(arch)
    norms = 2 * ((4 + 2 * cb) * d + 4)  # fp32 copy of the input, rsqrt, normalized, gain x normalized
    taps = cb * (2 * q + 2 * kv + 2 * I + d)  # g of q, k, v, attention, gate, up, FFN
    kv_kept = q if gpu and cb == 4 and arch.num_heads != arch.num_kv_heads else kv
    sdpa = cb * (q + 2 * kv_kept) + cb * q + 4 * H  # rotated q, k, v, output (= o's input), log-sum-exp
    ffn = 4 * cb * I  # SiLU's input, SiLU(gate) and up for the product, the product for down
    target = cb * D  # the teacher's FFN output, for the gradient of P_down
    qk_norm = 4 * (q + kv) + 4 * (H + arch.num_kv_heads) if arch.qk_norm else 0
    return norms + taps + sdpa + ffn + target + qk_norm


def activation_bytes(arch: Arch, d: int, batch: int, seq_len: int, cb: int,
                     activation_checkpointing: bool = False, gpu: bool = True) -> tuple[int, int]:
    """``(saved, live)``: bytes autograd keeps for backward over one micro-batch of
    ``batch`` sequences of ``seq_len`` tokens, and the bytes live beside them but not
    saved (one layer's teacher record and residual). See the module docstring."""
    D, I, L = arch.hidden_size, arch.intermediate_size, arch.num_layers
    q, kv = _attention_dims(arch)
    n = batch * seq_len
    embed = 8 if arch.tied else cb * D  # token ids for the embedding's backward, or the rows times P_e
    outside = n * (embed + 2 * cb * arch.head_dim + (4 + cb) * d + 4)  # + rotary cos/sin, final norm
    # the clone terms' normalizers [L, 7], the per-term constant they are scaled by [7] and
    # the KL's denominator (fp32)
    outside += 4 * (7 * L + 7 + 1)
    layer = n * layer_saved_bytes(arch, d, cb, gpu)
    if activation_checkpointing:
        saved = outside + L * n * cb * (d + D) + layer
    else:
        saved = outside + L * layer
    live = n * cb * (2 * q + 2 * kv + 2 * I + D)
    return saved, live


def logits_bytes(arch: Arch, d: int, tokens: int, cb: int, chunk: int) -> int:
    """The fused linear-KL's memory: the gradients it keeps (h_s's in the compute dtype,
    the head's in fp32) plus the larger of a chunk's two logit blocks and the backward's
    fp32 copy of the head gradient (with the scaled h_s gradient)."""
    V = arch.vocab_size
    acc = max(cb, 4)
    kept = tokens * d * cb + V * d * acc
    return kept + max(2 * chunk * V * cb, V * d * acc + tokens * d * cb)


def step_buffer_bytes(arch: Arch, d: int, t_shapes: dict, N: int, cb: int, tb: int, sharded_teacher: bool,
                      sharded_weights: bool = True) -> int:
    """The largest working set of the step's weight phases (make, reduce, weight_backward);
    see the module docstring."""
    D, V, I = arch.hidden_size, arch.vocab_size, arch.intermediate_size
    layer_t = tb * sum(_numel(s) for k, s in t_shapes.items() if k.startswith("model.layers.0."))
    root_t = tb * sum(_numel(s) for k, s in t_shapes.items() if not k.startswith("model.layers."))
    gather = layer_t if sharded_teacher else 0
    low = cb < 4  # a cast is a copy (else the fp32 tensor itself)
    cast_p = cb * D * d * (1 if low or N > 1 else 0) + (cb * math.ceil(D / N) * d if N > 1 else 0)
    sharded_weights = sharded_weights and N > 1
    make = gather + cast_p + (cb * step_layer_elements(arch, d) if sharded_weights else 0)  # + one layer whole
    # the flat copy and the collective's copy of the fp32 sums (only the root's when FSDP2
    # holds the layers'); the compute-dtype gradients ``weight_grads`` also holds are folded in by then
    reduced = step_root_elements(arch, d) if sharded_weights else sum(step_weight_elements(arch, d))
    reduce = (2 * 4 - (cb if low else 0)) * reduced if N > 1 else 0
    widest = max(V, I, _attention_dims(arch)[0])
    # one matrix: its gradient sum cast down, the GEMM's result, that in fp32, + P_down's own term
    backward = gather + (cb * widest * d if low else 0) + cb * D * d + (4 * D * d if low else 0) + 2 * 4 * D * d
    return (root_t if sharded_teacher else 0) + max(make, reduce, backward)


def communication(arch: Arch, d: int, t_shapes: dict, s_shapes: dict, N: int, cb: int, tb: int, grad_accum: int,
                  sharded_teacher: bool, activation_checkpointing: bool = False, sharded_weights: bool = True) -> dict:
    """Bytes each GPU receives in one optimizer step, by ``COMM_CATEGORIES`` (+ "total");
    see the module docstring. All zero on one GPU."""
    out = dict.fromkeys(COMM_CATEGORIES, 0)
    if N > 1:
        gather = lambda shapes, b: b * (N - 1) * sum(_sharded_numel(s, N) for s in shapes.values())
        if sharded_teacher:
            layer = {k: s for k, s in t_shapes.items() if k.startswith("model.layers.0.")}
            extras = {k: s for k, s in layer.items() if k.endswith(".bias") or "_norm." in k and "self_attn" in k}
            root = {k: s for k, s in t_shapes.items() if not k.startswith("model.layers.")}
            per_micro = (2 if activation_checkpointing else 1) * grad_accum
            L = arch.num_layers
            # each micro-batch gathers a layer for the teacher and its frozen extras for the student
            out["teacher_gathers"] = (L * (per_micro + 2) * gather(layer, tb) + L * per_micro * gather(extras, tb)
                                      + gather(root, tb))
        out["projection_gather"] = gather(s_shapes, cb)
        L, layer = arch.num_layers, step_layer_shapes(arch, d)
        if sharded_weights:
            # FSDP2 gathers each layer's step weights for its forward and again for its backward
            # (a recompute reuses the backward's), and reduce-scatters their fp32 gradients
            out["step_weight_gathers"] = 2 * grad_accum * L * gather(layer, cb)
            out["step_weight_reduce_scatter"] = grad_accum * L * gather(layer, 4)
            out["weight_grad_gather"] = L * gather(layer, 4)  # weight_backward reads each sum whole
            reduced = step_root_elements(arch, d)
        else:  # whole on every GPU, summed locally over the micro-batches, all-reduced once
            reduced = sum(step_weight_elements(arch, d))
        out["weight_grad_all_reduce"] = 2 * (N - 1) * 4 * reduced // N
    out["total"] = sum(out[c] for c in COMM_CATEGORIES)
    return out


def check_fits(plan: dict, gpu_memory_gib: float = DEFAULT_GPU_MEMORY_GIB) -> None:
    """RedError (one line, with the numbers) when the training or the start-up peak per GPU
    exceeds ``gpu_memory_gib`` GiB."""
    if not fits(plan, gpu_memory_gib * 2 ** 30):
        train, start = plan["per_gpu"]["total"], plan["startup"]["total"]
        i = plan["inputs"]
        raise RedError(f"this run needs {max(train, start) / 2 ** 30:.1f} GiB per GPU at its peak (training "
                       f"{train / 2 ** 30:.1f} GiB, start-up {start / 2 ** 30:.1f} GiB) on {i['gpus']} GPU(s), more "
                       f"than --gpu-memory {gpu_memory_gib:g} GiB; use more --gpus, a smaller --micro-batch or "
                       "--seq-len, or --activation-checkpointing")


def fits(plan: dict, limit_bytes: float) -> bool:
    """Whether the plan's training and start-up peaks per GPU are both within ``limit_bytes``."""
    return max(plan["per_gpu"]["total"], plan["startup"]["total"]) <= limit_bytes


def _teacher_arch(teacher) -> tuple[dict, object, Arch]:
    """(config.json as a dict, its transformers config, Arch) with distill's own checks."""
    raw = _read_config(teacher)
    from transformers import AutoConfig

    model_type = raw.get("model_type")
    try:
        config = AutoConfig.for_model(model_type, **{k: v for k, v in raw.items() if k != "model_type"})
    except Exception as e:
        raise RedError(f"teacher config could not be parsed ({type(e).__name__}: {e}); fix config.json") from None
    from red.model.arch import check_supported_features

    check_supported_features(config)  # plan exactly the teachers distill accepts
    return raw, config, Arch.from_config(config)


def _check_shapes(config, arch: Arch, d: int, micro_batch: int, N: int, dtypes: dict) -> None:
    from red.model.export import check_student_width

    check_student_width(config, d)
    if micro_batch % N:
        raise RedError(f"--micro-batch {micro_batch} (global) must be divisible by --gpus {N}")
    for name, dt in dtypes.items():
        if dt not in DTYPE_BYTES:
            raise RedError(f"{name} {dt!r} is not one of {', '.join(DTYPE_BYTES)}")


def _check_memory_inputs(hidden_size: int, seq_len: int, micro_batch: int, gpus: int, logits_chunk: int,
                         teacher_sharding: str, step_weights: str, grad_accum: int, disk_gb_per_s: float) -> None:
    """``plan_memory``'s own argument checks (RedError), before any config is read, in the
    order a user meets them."""
    from red.config import validate_plan_inputs

    validate_plan_inputs(hidden_size, seq_len, micro_batch, gpus, logits_chunk)  # red plan's own rules
    if step_weights not in STEP_WEIGHTS:
        raise RedError(f"--step-weights {step_weights!r} is not one of {', '.join(STEP_WEIGHTS)}")
    if teacher_sharding not in TEACHER_SHARDINGS:
        raise RedError(f"--teacher-sharding {teacher_sharding!r} is not one of {', '.join(TEACHER_SHARDINGS)}")
    if int(grad_accum) < 1:
        raise RedError(f"--grad-accum {grad_accum} must be at least 1")
    if not disk_gb_per_s > 0:
        raise RedError(f"--disk-gb-per-s {disk_gb_per_s} must be above 0")


def _persistent_memory(arch: Arch, d: int, t_shapes: dict, s_shapes: dict, N: int, tb: int, cb: int,
                       sharded_teacher: bool, sharded_weights: bool) -> dict:
    """Bytes per GPU of the ``PERSISTENT`` categories, held through the whole step: the
    teacher, the fp32 trainables with their gradients and AdamW state, and the step's
    weights with their gradient sums (fp32 rows per GPU for the layers when sharded)."""
    shard = lambda shapes, n=N: sum(_sharded_numel(s, n) for s in shapes.values())
    products, casts = step_weight_elements(arch, d)
    in_place = cb == 4 and N == 1  # an fp32 step on one GPU uses the fp32 masters of the casts themselves
    out = {
        "teacher": tb * shard(t_shapes, N if sharded_teacher else 1),
        "projections": 4 * shard(s_shapes),
        "gradients": 4 * shard(s_shapes),
        "optimizer": 4 * 2 * shard(s_shapes) + 4 * len(s_shapes),
        "weights": cb * (products + (0 if in_place else casts)),
        "weight_grads": (4 + (cb if cb < 4 else 0)) * (products + casts),
    }
    if sharded_weights:  # the layers' step weights and their sums: fp32 rows on each GPU (FSDP2); the root whole
        layer_rows = arch.num_layers * shard(step_layer_shapes(arch, d))
        root = step_root_elements(arch, d)
        out["weights"] = 4 * layer_rows + cb * root
        out["weight_grads"] = 4 * layer_rows + (4 + (cb if cb < 4 else 0)) * root
    return out


def _gathered_bytes(arch: Arch, d: int, t_shapes: dict, tb: int, cb: int, sharded_teacher: bool,
                    sharded_weights: bool) -> int:
    """Bytes gathered while a micro-batch runs: a layer's step weights and the prefetched
    next (sharded step weights), the sharded teacher's root and one of its layers."""
    out = 2 * cb * step_layer_elements(arch, d) if sharded_weights else 0  # a layer + the prefetched
    if sharded_teacher:
        layer_t = sum(_numel(s) for k, s in t_shapes.items() if k.startswith("model.layers.0."))
        root_t = sum(_numel(s) for k, s in t_shapes.items() if not k.startswith("model.layers."))
        out += tb * (root_t + layer_t)
    return out


def plan_memory(teacher: str | Path | dict, hidden_size: int, seq_len: int, micro_batch: int, gpus: int = 1,
                activation_checkpointing: bool = False, teacher_dtype: str = "bfloat16",
                compute_dtype: str | None = None, logits_chunk: int = 0, calib_samples: int = 16,
                disk_gb_per_s: float = DEFAULT_DISK_GB_PER_S, teacher_sharding: str = "shard", step_weights: str = "shard",
                grad_accum: int = 1) -> dict:
    """Bytes each GPU holds, by category, and moves per optimizer step (see the module
    docstring for the model).

    ``teacher``: a teacher folder (its config.json is read; no weights) or a config dict.
    ``micro_batch`` is the global micro-batch (``--batch-size``), split over ``gpus``.
    ``compute_dtype`` defaults to ``teacher_dtype``. ``logits_chunk`` 0 means the fused
    KL kernel's default chunk. ``teacher_sharding``: "shard" or "replicate" (what
    ``--teacher-sharding`` does under torchrun; the same on one GPU). ``grad_accum``:
    micro-batches per optimizer step (only the communication depends on it). Returns
    ``{"per_gpu": {category: bytes, ..., "total": bytes}, "startup": {...},
    "checkpoint": {...}, "communication": {...}, "inputs": {...}}``.
    """
    _check_memory_inputs(hidden_size, seq_len, micro_batch, gpus, logits_chunk, teacher_sharding, step_weights,
                         grad_accum, disk_gb_per_s)
    raw, config, arch = _teacher_arch(teacher)
    d, N = int(hidden_size), int(gpus)
    compute_dtype = compute_dtype or teacher_dtype
    _check_shapes(config, arch, d, micro_batch, N, {"teacher dtype": teacher_dtype, "compute dtype": compute_dtype})
    tb, cb = DTYPE_BYTES[teacher_dtype], DTYPE_BYTES[compute_dtype]
    t_shapes, s_shapes = teacher_shapes(arch, has_attention_bias(config)), trainable_shapes(arch, d)
    sharded_teacher = N > 1 and teacher_sharding == "shard"
    sharded_weights = N > 1 and step_weights == "shard"
    out = _persistent_memory(arch, d, t_shapes, s_shapes, N, tb, cb, sharded_teacher, sharded_weights)
    out["gathered"] = _gathered_bytes(arch, d, t_shapes, tb, cb, sharded_teacher, sharded_weights)
    batch = micro_batch // N
    tokens = batch * seq_len
    saved, live = activation_bytes(arch, d, batch, seq_len, cb, activation_checkpointing)
    out["activations"] = saved + live
    V = arch.vocab_size
    chunk = min(tokens, int(logits_chunk)) if logits_chunk else default_logits_chunk(tokens, V, d)
    out["logits"] = logits_bytes(arch, d, tokens, cb, chunk)
    out["step_buffers"] = step_buffer_bytes(arch, d, t_shapes, N, cb, tb, sharded_teacher, sharded_weights)
    out["total"] = sum(out[c] for c in PERSISTENT) + max(sum(out[c] for c in MICRO_BATCH_PHASE), out["step_buffers"])
    startup = startup_memory(arch, d, t_shapes, s_shapes, N if sharded_teacher else 1, tb, seq_len, calib_samples)
    comm = communication(arch, d, t_shapes, s_shapes, N, cb, tb, int(grad_accum), sharded_teacher,
                         activation_checkpointing, sharded_weights)
    return {"per_gpu": out, "startup": startup, "checkpoint": checkpoint_write(arch, d, N, disk_gb_per_s),
            "communication": comm, "inputs": {
                "model_type": raw.get("model_type"), "num_layers": arch.num_layers,
                "teacher_hidden_size": arch.hidden_size, "hidden_size": d, "vocab_size": V, "seq_len": seq_len,
                "micro_batch": micro_batch, "micro_batch_per_gpu": batch, "gpus": N, "grad_accum": int(grad_accum),
                "activation_checkpointing": activation_checkpointing, "teacher_sharding": teacher_sharding,
                "step_weights": step_weights,
                "teacher_dtype": teacher_dtype, "compute_dtype": compute_dtype, "logits_chunk": logits_chunk,
                "checkpoint_bytes": checkpoint_bytes(arch, d)}}


def choose_sharding(teacher: str | Path | dict, hidden_size: int, seq_len: int, micro_batch: int, gpus: int,
                    gpu_memory_bytes: float, **plan_kwargs) -> tuple[str, str]:
    """``--teacher-sharding auto`` and ``--step-weights auto``: ``(teacher, step weights)``,
    each "replicate" or "shard".

    Why: replicating costs memory only, while sharding costs communication in every
    micro-batch (a sharded teacher's layers are gathered for its forward; sharded step
    weights are gathered for the student's forward and backward and their gradients
    reduce-scattered; see ``plan_memory``'s "communication"), which a GPU cannot hide when
    the step is as lean as red's. So of the four choices whose training and start-up peaks
    per GPU both stay within ``REPLICATE_MEMORY_FRACTION`` of ``gpu_memory_bytes`` (the rest
    is headroom for what the plan does not count) the one that moves the fewest bytes
    wins; when none fits, both are sharded. One GPU has nothing to shard.
    ``plan_kwargs`` go to ``plan_memory``."""
    if int(gpus) == 1:
        return "replicate", "replicate"
    best = None
    for t in ("replicate", "shard"):
        for w in ("replicate", "shard"):
            plan = plan_memory(teacher, hidden_size, seq_len, micro_batch, gpus, teacher_sharding=t, step_weights=w,
                               **plan_kwargs)
            if fits(plan, REPLICATE_MEMORY_FRACTION * gpu_memory_bytes):
                moved = plan["communication"]["total"]
                if best is None or moved < best[0]:
                    best = (moved, t, w)
    return ("shard", "shard") if best is None else best[1:]


def choose_teacher_sharding(teacher: str | Path | dict, hidden_size: int, seq_len: int, micro_batch: int, gpus: int,
                            gpu_memory_bytes: float, **plan_kwargs) -> str:
    """The teacher's part of ``choose_sharding``."""
    return choose_sharding(teacher, hidden_size, seq_len, micro_batch, gpus, gpu_memory_bytes, **plan_kwargs)[0]


def _read_config(teacher) -> dict:
    """config.json of a teacher folder (or the file itself, or a dict), with red's checks."""
    from red.model.arch import read_teacher_json

    if isinstance(teacher, dict):
        return dict(teacher)
    p = Path(teacher)
    return read_teacher_json(p.parent if p.name == "config.json" and p.is_file() else p)


def _gib(b: float) -> str:
    """A plan table's cell: two decimals, aligned."""
    text = format_bytes(b, digits=2, width=10)
    return text if not text.endswith(" B") else text + "  "


# -- speed ----------------------------------------------------------------------------------
#: Peak dense tensor-core FLOP/s by compute dtype (no 2:4 sparsity) and HBM bandwidth, from
#: NVIDIA's data sheets: H100 SXM5 80 GB: bf16/fp16 989.4 TFLOP/s dense (1979 with
#: sparsity), fp32 67 TFLOP/s (PyTorch's default fp32 matmul does not use TF32), HBM3
#: 3.35 TB/s; H200 SXM 141 GB: the same compute, HBM3e 4.8 TB/s.
DEVICES = {
    "H100": {"flops": {"bfloat16": 989e12, "float16": 989e12, "float32": 67e12}, "bandwidth": 3.35e12},
    "H200": {"flops": {"bfloat16": 989e12, "float16": 989e12, "float32": 67e12}, "bandwidth": 4.8e12},
}
#: causal attention: the flash kernels skip the masked half of the score tiles, so half of
#: the FLOPs FlopCounterMode counts for SDPA (it counts the full T x T square) are executed
CAUSAL_FRACTION = 0.5
#: the parts of a RED step and of ordinary training, in print order
RED_PARTS = ("teacher_forward", "student_gemms", "attention", "student_elementwise", "weight_products",
             "clone_terms", "lm_head", "optimizer")
ORDINARY_PARTS = ("student_gemms", "attention", "student_elementwise", "lm_head", "optimizer")


def _norm_bytes(cb: int) -> int:
    """Bytes per element of red's (and transformers') eager RMSNorm forward: x.float(),
    pow(2), mean, x·rsqrt, .to(dtype), gain·x (the casts are no-ops in fp32)."""
    return (cb + 4 if cb < 4 else 0) + 8 + 4 + 8 + (4 + cb if cb < 4 else 0) + 2 * cb


#: bytes per element (in units of the compute dtype) of the eager rotary embedding of q or k:
#: x·cos, rotate_half (negated half, cat), ·sin, the sum
ROPE_PASSES = 10


class _Work:
    """FLOPs and bytes of one part of a step, kept op group by op group so that the time is
    the sum of each group's roofline (GEMMs and the elementwise passes between them run one
    after the other in eager PyTorch; neither hides the other)."""

    def __init__(self):
        self.ops: list[tuple[int, int, float]] = []  # (flops, bytes, fraction of the flops executed)

    def gemm(self, M: int, K: int, N: int, cb: int, count: int = 1, out_bytes: int | None = None,
             b_reads: int = 1, c_rw: int = 1) -> None:
        """``count`` products [M, K] x [K, N]: 2MKN FLOPs; A and B read (B ``b_reads``
        times), C written in ``out_bytes`` (default the compute dtype; ``c_rw`` 2: read
        and written, an accumulation)."""
        ob = cb if out_bytes is None else out_bytes
        self.ops.append((count * 2 * M * K * N, count * (M * K * cb + b_reads * K * N * cb + c_rw * M * N * ob), 1.0))

    def move(self, nbytes: int, count: int = 1) -> None:
        self.ops.append((0, count * nbytes, 1.0))

    def attention(self, flops: int, nbytes: int, count: int = 1) -> None:
        self.ops.append((count * flops, count * nbytes, CAUSAL_FRACTION))

    @property
    def flops(self) -> int:
        return sum(f for f, _, _ in self.ops)

    @property
    def bytes(self) -> int:
        return sum(b for _, b, _ in self.ops)

    def seconds(self, peak: float, bandwidth: float) -> float:
        return sum(max(f * frac / peak, b / bandwidth) for f, b, frac in self.ops)


def _layer_ops(arch: Arch, h: int, B: int, T: int, cb: int, gemm: _Work, attn: _Work, ew: _Work, count: int,
               forward: bool = True, backward: bool = False) -> None:
    """One decoder layer of residual width ``h`` (``red.model.student.decoder_layer``, or a
    transformers layer: the same ops), ``count`` times: forward and/or backward."""
    n, I, H, hd = B * T, arch.intermediate_size, arch.num_heads, arch.head_dim
    q, kv = _attention_dims(arch)
    linears = ((h, q), (h, kv), (h, kv), (q, h), (h, I), (h, I), (I, h))  # (in, out): q k v o gate up down
    ew_fwd = (2 * n * h * _norm_bytes(cb) + n * (q + kv) * ROPE_PASSES * cb + 2 * 3 * n * h * cb + 5 * n * I * cb
              + (n * (q + kv) * _norm_bytes(cb) if arch.qk_norm else 0))
    square = B * H * T * T * hd
    if forward:
        for k, o in linears:
            gemm.gemm(n, k, o, cb, count)
        attn.attention(4 * square, cb * n * (2 * q + 2 * kv) + 4 * n * H, count)
        ew.move(ew_fwd, count)
    if backward:
        for k, o in linears:
            gemm.gemm(n, o, k, cb, count)  # dX
            gemm.gemm(o, n, k, cb, count)  # dW
        attn.attention(10 * square, cb * n * (4 * q + 4 * kv) + 4 * n * H, count)  # recomputes the scores
        ew.move(2 * ew_fwd, count)


def _optimizer(nparams: int, pb: int, grad_accum: int, accumulate: bool) -> _Work:
    """Gradient norm (read), clipping (read + write) and fused AdamW (read p, g, m, v; write
    p, m, v) over ``nparams`` elements of ``pb`` bytes; ``accumulate``: autograd adds each
    later micro-batch's gradient into ``.grad`` (read both, write one)."""
    w = _Work()
    w.move(10 * pb * nparams)
    if accumulate:
        w.move(3 * pb * nparams, grad_accum - 1)
    return w


def _teacher_forward_work(w: _Work, arch: Arch, B: int, T: int, cb: int, ga: int, ac: int) -> None:
    """The teacher's lockstep forward (no grad): its embedding rows, every layer (again in
    the recompute of activation checkpointing) and the final norm; its logits are counted
    in ``lm_head``, where the fused kernel makes them."""
    n, D = B * T, arch.hidden_size
    w.move(2 * n * D * cb, ga)
    _layer_ops(arch, D, B, T, cb, w, w, w, ga * arch.num_layers * ac)
    w.move(n * D * _norm_bytes(cb), ga)


def _student_work(red: dict, arch: Arch, d: int, B: int, T: int, cb: int, ga: int, ac: int) -> None:
    """The student's layers forward (twice with checkpointing) and backward, its final norm
    and its embedding: rows of W_s's head when tied, the teacher's rows times P_e (and P_e's
    gradient) when untied."""
    D, V, L = arch.hidden_size, arch.vocab_size, arch.num_layers
    n = B * T
    g, a, e = red["student_gemms"], red["attention"], red["student_elementwise"]
    _layer_ops(arch, d, B, T, cb, g, a, e, ga * L * ac)
    _layer_ops(arch, d, B, T, cb, g, a, e, ga * L, forward=False, backward=True)
    e.move(3 * n * d * _norm_bytes(cb), ga)  # final norm, forward and backward
    if arch.tied:  # rows of W_s's head; backward: a dense [V, d] gradient added to the head's
        e.move(2 * n * d * cb + 4 * V * d * cb + 3 * n * d * cb, ga)
    else:  # the teacher's rows times P_e, and P_e's gradient
        e.move(2 * n * D * cb, ga)
        g.gemm(n, D, d, cb, ga)
        g.gemm(D, n, d, cb, ga)


def _clone_terms_work(w: _Work, arch: Arch, d: int, n: int, cb: int, ga: int, ac: int) -> None:
    """The clone terms of ``n`` tokens: the six same-space taps (s, t read, g written;
    backward: one addcmul), the FFN target t·P_down, its tap, its mean square, and P_down's
    gradient."""
    D, I, L = arch.hidden_size, arch.intermediate_size, arch.num_layers
    q, kv = _attention_dims(arch)
    tapped = 2 * q + 2 * kv + 2 * I + d
    w.move(3 * n * tapped * cb + n * D * cb, ga * L * ac)
    w.gemm(n, D, d, cb, ga * L * ac)
    w.move(3 * n * tapped * cb + 2 * n * d * cb, ga * L)
    w.gemm(D, n, d, cb, ga * L)


def _lm_head_work(w: _Work, arch: Arch, d: int, n: int, cb: int, ga: int, chunks: int) -> None:
    """The LM head (fused linear-KL) over ``n`` rows in ``chunks`` chunks: per chunk the
    student and teacher logits (the head weights read again each chunk), the KL/CE kernel
    (two passes over both, the gradient written in place), dh, dW accumulated in fp32;
    backward scales both gradients."""
    D, V = arch.hidden_size, arch.vocab_size
    acc = max(cb, 4)
    w.gemm(n, d, V, cb, ga, b_reads=chunks)
    w.gemm(n, D, V, cb, ga, b_reads=chunks)
    w.move(5 * n * V * cb, ga)
    w.gemm(n, V, d, cb, ga, b_reads=chunks)
    w.gemm(V, n, d, cb, ga, out_bytes=acc, c_rw=2 * chunks)
    w.move(2 * n * d * cb + (3 * V * d * acc + V * d * cb if cb < 4 else 2 * V * d * acc), ga)


def _weight_products_work(w: _Work, arch: Arch, d: int, cb: int, ga: int, gpus: int, trainable: int) -> None:
    """The step's weight products, once per optimizer step: make W_s (P cast, one GEMM per
    matrix), fold each micro-batch's gradients into fp32 sums, all-reduce them (N > 1) and
    ``weight_backward``; ``trainable`` elements of P and the gains are cast down."""
    D, V, L, I = arch.hidden_size, arch.vocab_size, arch.num_layers, arch.intermediate_size
    q, kv = _attention_dims(arch)
    products, casts = step_weight_elements(arch, d)
    E = products + casts
    layer_in = ((q, D), (kv, D), (kv, D), (I, D), (I, D))  # W_t [out, D] · P [D, d]
    layer_out = ((D, q), (D, I))  # Pᵀ [d, D] · W_t [D, in]
    for out_rows, _ in layer_in:
        w.gemm(out_rows, D, d, cb, L)
        w.gemm(D, out_rows, d, cb, L)  # dP = W_tᵀ · dW_s
    for _, in_cols in layer_out:
        w.gemm(d, D, in_cols, cb, L)
        w.gemm(D, in_cols, d, cb, L)  # dP = W_t · dW_sᵀ
    w.gemm(V, D, d, cb)
    w.gemm(D, V, d, cb)
    if cb < 4:
        w.move((4 + cb) * trainable)  # P and the gains cast down to make W_s
        # weight_backward: each gradient sum cast down for its GEMM, each dP cast up
        w.move((4 + cb) * products + (cb + 4) * (7 * L + 1) * D * d)
        w.move((cb + 4) * E + (ga - 1) * (cb + 8) * E)  # fold each micro-batch into the fp32 sums
    else:
        w.move(12 * E, ga - 1)  # autograd adds each later micro-batch into .grad
    w.move(12 * L * D * d)  # P_down: the GEMM's dP plus the target's own gradient
    if gpus > 1:
        w.move(16 * E)  # concatenated and copied for the all-reduce


def _ordinary_work(arch: Arch, d: int, B: int, T: int, cb: int, ga: int, ac: int) -> dict:
    """Ordinary training of the same student as a transformers model, in the compute dtype
    (the baseline RED is compared with): its layers, full logits with its own
    cross-entropy, and AdamW over its own weights; ``{part: _Work}`` by ``ORDINARY_PARTS``."""
    V, L = arch.vocab_size, arch.num_layers
    n = B * T
    ordinary = {p: _Work() for p in ORDINARY_PARTS}
    og, oa, oe = ordinary["student_gemms"], ordinary["attention"], ordinary["student_elementwise"]
    _layer_ops(arch, d, B, T, cb, og, oa, oe, ga * L * ac)
    _layer_ops(arch, d, B, T, cb, og, oa, oe, ga * L, forward=False, backward=True)
    oe.move(3 * n * d * _norm_bytes(cb), ga)
    oe.move(2 * n * d * cb + 3 * n * d * cb + (4 if arch.tied else 1) * V * d * cb, ga)
    oh = ordinary["lm_head"]
    oh.gemm(n, d, V, cb, ga)
    ce = (cb + 4 if cb < 4 else 0) + 8 + 4 + 12 + (4 + cb if cb < 4 else 0)  # logits.float(), log_softmax, fwd + bwd
    oh.move(n * V * ce, ga)
    oh.gemm(n, V, d, cb, ga)
    oh.gemm(V, n, d, cb, ga)
    nparams = L * (student_weight_elements(arch, d) + 2 * d) + d + V * d * (1 if arch.tied else 2)
    ordinary["optimizer"] = _optimizer(nparams, cb, ga, True)
    return ordinary


def step_work(arch: Arch, d: int, batch: int, seq_len: int, grad_accum: int = 1, cb: int = 2, gpus: int = 1,
              activation_checkpointing: bool = False, logits_chunk: int = 0) -> dict:
    """The work of one optimizer step on one GPU: ``{"red": {part: _Work}, "ordinary":
    {part: _Work}, "teacher_logits": _Work}`` (see ``plan_speed``)."""
    D, V = arch.hidden_size, arch.vocab_size
    B, T, ga = batch, seq_len, grad_accum
    n = B * T
    ac = 2 if activation_checkpointing else 1  # forwards per micro-batch
    chunk = min(n, int(logits_chunk)) if logits_chunk else default_logits_chunk(n, V, d)
    red = {p: _Work() for p in RED_PARTS}
    _teacher_forward_work(red["teacher_forward"], arch, B, T, cb, ga, ac)
    _student_work(red, arch, d, B, T, cb, ga, ac)
    _clone_terms_work(red["clone_terms"], arch, d, n, cb, ga, ac)
    _lm_head_work(red["lm_head"], arch, d, n, cb, ga, math.ceil(n / chunk))
    trainable = sum(_numel(s) for s in trainable_shapes(arch, d).values())
    _weight_products_work(red["weight_products"], arch, d, cb, ga, gpus, trainable)
    red["optimizer"] = _optimizer(trainable, 4, ga, False)
    tl = _Work()  # the teacher's own logits, which its forward alone would make (the floor)
    tl.gemm(n, D, V, cb, ga)
    return {"red": red, "ordinary": _ordinary_work(arch, d, B, T, cb, ga, ac), "teacher_logits": tl}


def _speed_summary(parts: dict, compute_dtype: str) -> dict:
    """``{part: {"flops", "bytes", "ms": {device: ms}}}`` of ``{part: _Work}`` plus their
    "total": the numbers ``plan_speed`` reports and ``format_speed`` prints."""
    out = {}
    for name, w in parts.items():
        out[name] = {"flops": w.flops, "bytes": w.bytes,
                     "ms": {dev: 1e3 * w.seconds(spec["flops"][compute_dtype], spec["bandwidth"])
                            for dev, spec in DEVICES.items()}}
    out["total"] = {"flops": sum(v["flops"] for v in out.values()), "bytes": sum(v["bytes"] for v in out.values()),
                    "ms": {dev: sum(v["ms"][dev] for v in out.values()) for dev in DEVICES}}
    return out


def _speed_ratios(red: dict, ordinary: dict, teacher_forward: dict) -> tuple[dict, dict]:
    """``(ratio, floor_ratio)`` by device: ordinary training's modelled time over RED's, and
    over ordinary plus the teacher's own forward (the best a distillation step can do)."""
    ratio, floor = {}, {}
    for dev in DEVICES:
        o, r, t = ordinary["total"]["ms"][dev], red["total"]["ms"][dev], teacher_forward["ms"][dev]
        ratio[dev], floor[dev] = o / r, o / (o + t)
    return ratio, floor


def plan_speed(teacher: str | Path | dict, hidden_size: int, seq_len: int, micro_batch: int, gpus: int = 1,
               grad_accum: int = 1, compute_dtype: str = "bfloat16", activation_checkpointing: bool = False,
               logits_chunk: int = 0) -> dict:
    """FLOPs, bytes and modelled time of one optimizer step per GPU, by part, for RED and for
    ordinary training of a model of the student's size.

    RED's parts: ``teacher_forward`` (the teacher's layers in lockstep, no grad; its logits
    are in ``lm_head``), ``student_gemms`` (the student's seven linears per layer, forward
    and backward, and an untied teacher's embedding rows times P_e), ``attention`` (the
    student's SDPA, forward and backward), ``student_elementwise`` (norms, rotary, SiLU and
    product, residual adds, the embedding and its gradient), ``weight_products`` (make W_s
    and ``weight_backward``: one GEMM each per matrix, once per step; the fp32 gradient
    sums), ``clone_terms`` (the taps, the FFN target t·P_down and its gradient), ``lm_head``
    (fused linear-KL: student and teacher logits, dh, dW) and ``optimizer`` (gradient norm,
    clipping, AdamW over the fp32 projections). Ordinary training: the same student as a
    ``transformers`` model in the compute dtype (as ``red bench`` measures it): its layers
    forward and backward, full [T, V] logits with its own cross-entropy, and AdamW over its
    own weights, gradients added over the micro-batches in ``.grad``.

    FLOPs count matrix products the way ``torch.utils.flop_counter.FlopCounterMode`` does
    (2MKN per GEMM; SDPA as its flash formulas: 4BHT²h forward, 10BHT²h backward,
    recomputing the scores); the tests hold every part equal to FlopCounterMode's count of
    the real step. Elementwise work has no FLOPs here. Bytes are a model of HBM traffic:
    every op reads its inputs and writes its output once (eager PyTorch; a Triton kernel
    as written), GEMM weights re-read once per chunk where an op is chunked, and the
    backward of the elementwise ops (norms, rotary, SiLU, residual adds) moves twice their
    forward's bytes.

    Time per part on each of ``DEVICES``: the sum over its op groups of the roofline
    max(FLOPs / peak, bytes / bandwidth), with causal attention at ``CAUSAL_FRACTION`` of its
    FLOPs; launch overheads and communication are not modelled (``plan_memory`` reports
    the bytes moved). ``ratio`` is RED's modelled throughput over ordinary training's
    (same tokens), ``floor_ratio`` ordinary / (ordinary + the teacher's own forward,
    logits included): the best a distillation step can do.
    """
    from red.config import validate_plan_inputs

    validate_plan_inputs(hidden_size, seq_len, micro_batch, gpus, logits_chunk)
    if int(grad_accum) < 1:
        raise RedError(f"--grad-accum {grad_accum} must be at least 1")
    raw, config, arch = _teacher_arch(teacher)
    d, N = int(hidden_size), int(gpus)
    _check_shapes(config, arch, d, micro_batch, N, {"compute dtype": compute_dtype})
    cb = DTYPE_BYTES[compute_dtype]
    work = step_work(arch, d, micro_batch // N, seq_len, int(grad_accum), cb, N, activation_checkpointing, logits_chunk)
    red, ordinary = _speed_summary(work["red"], compute_dtype), _speed_summary(work["ordinary"], compute_dtype)
    teacher_forward = _speed_summary({"teacher_forward": work["red"]["teacher_forward"],
                                      "teacher_logits": work["teacher_logits"]}, compute_dtype)["total"]
    ratio, floor = _speed_ratios(red, ordinary, teacher_forward)
    return {"red": red, "ordinary": ordinary, "teacher_forward": teacher_forward, "ratio": ratio,
            "floor_ratio": floor, "devices": DEVICES, "inputs": {
                "model_type": raw.get("model_type"), "num_layers": arch.num_layers,
                "teacher_hidden_size": arch.hidden_size, "hidden_size": d, "vocab_size": arch.vocab_size,
                "seq_len": seq_len, "micro_batch": micro_batch, "micro_batch_per_gpu": micro_batch // N, "gpus": N,
                "grad_accum": int(grad_accum), "compute_dtype": compute_dtype,
                "activation_checkpointing": activation_checkpointing, "logits_chunk": logits_chunk}}


def format_speed(speed: dict) -> str:
    """The speed section `red plan --speed` prints."""
    i = speed["inputs"]
    devs = list(speed["devices"])
    tokens = i["micro_batch_per_gpu"] * i["seq_len"] * i["grad_accum"]
    lines = [f"speed model, one optimizer step per GPU ({i['micro_batch_per_gpu']} x {i['seq_len']} tokens x "
             f"grad-accum {i['grad_accum']}, {i['compute_dtype']}; roofline per op group at "
             + ", ".join(f"{d} {s['flops'][i['compute_dtype']] / 1e12:g} TFLOP/s, {s['bandwidth'] / 1e12:g} TB/s"
                         for d, s in speed["devices"].items()) + "):",
             f"  {'part':<22}{'TFLOP':>9}{'GB':>9}" + "".join(f"{d + ' ms':>11}" for d in devs)]

    def rows(title, parts):
        lines.append(f" {title}")
        for name, v in parts.items():
            lines.append(f"  {name:<22}{v['flops'] / 1e12:9.2f}{v['bytes'] / 1e9:9.2f}"
                         + "".join(f"{v['ms'][d]:11.2f}" for d in devs))
    rows("RED step", speed["red"])
    rows("ordinary training of a model of the student's size", speed["ordinary"])
    rows("teacher forward alone (layers + logits)", {"teacher_forward": speed["teacher_forward"]})
    for d in devs:
        r, o = speed["red"]["total"]["ms"][d], speed["ordinary"]["total"]["ms"][d]
        lines.append(f"  {d}: RED/ordinary {speed['ratio'][d]:.3f} (RED {tokens / r * 1e3:,.0f} tokens/s, ordinary "
                     f"{tokens / o * 1e3:,.0f}); floor ordinary/(ordinary+teacher forward) {speed['floor_ratio'][d]:.3f}")
    return "\n".join(lines)
