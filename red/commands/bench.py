"""Throughput, memory and op counts of red's kernels and of its training step on a given teacher.

``red bench`` runs :func:`run_bench`; the pieces are public so that scripts (the GPU suite,
``benchmarks/cpu_step.py``) measure the product itself, not a copy of it:

- :func:`measure_ceilings`: the device's matmul TFLOP/s (in the compute dtype) and copy
  bandwidth (read + write), measured in the same run as everything else.
- :func:`bench_kernels`: every ``red_kernels`` op (``fused_linear_kl`` and ``clone_mse``,
  which every training step runs, and calibration's ``rmsnorm_with_stats``) at the
  teacher's shapes (:func:`kernel_shapes`), forward (+ backward where the step
  differentiates it), per backend and as its eager composition (the ``naive_*``
  reference): time, peak memory, work (bytes or flops, counted as documented in
  :func:`kernel_specs`), achieved TB/s or TFLOP/s, fraction of the ceiling, speed-up and
  memory ratio against eager.
- :func:`bench_step`: ``red.train.trainer.train_step`` (make_weights, every micro-batch's
  forward and backward, weight_backward, gradient norm, clipping, AdamW from
  ``red.train.trainer.make_optimizer``) of a ``ProjectedStudent`` built by
  ``red.commands.distill.build_student``, over ``grad_accum`` micro-batches, under one
  ``red_kernels`` backend, optionally with every ``StudentLayer`` wrapped in
  ``torch.compile``.
- :func:`ordinary_model` + :func:`bench_ordinary`: the yardstick, ordinary training of the
  exported student as a plain ``transformers`` model (``red.model.export.student_config`` +
  ``merged_state_dict``) on the same micro-batches (:func:`ordinary_step`: forward with
  labels and backward per micro-batch, then clipping and AdamW, fused on CUDA), in the
  same dtype on the same device.
- :func:`bench_teacher_forward`: the teacher's forward alone (no grad) on the same
  micro-batches. An ordinary step plus one teacher forward is the floor of a distillation
  step, so ``floor_ratio = ordinary_ms / (ordinary_ms + teacher_forward_ms)`` is the best
  fraction of ordinary-training throughput a distillation step can reach;
  ``of_floor`` is RED's measured fraction divided by it.
- :func:`op_counts`: the kernels one optimizer step launches (:class:`OpCounter`), split
  into one RED micro-batch (per layer, forward and backward) and the per-step extras
  (make_weights, weight_backward, optimizer), beside one ordinary micro-batch of the same
  student; the issue-20 goal is a RED micro-batch of at most 1.5x the ordinary one's.
- :func:`bench_teacher`: all of the above on one teacher, one dict; every measurement is
  guarded (a failure becomes a row with ``status="error"``, later ones still run) and rows
  past ``deadline`` are ``"skipped"``.

Timing: CUDA steps are synchronized wall time (median of ``steps`` after ``warmup``),
CUDA kernels ``triton.testing.do_bench`` (median; it flushes L2 before every call); on the
CPU ``time.perf_counter`` medians after one warm-up call.

Memory: ``step_mem_bytes`` is the peak allocated *above* what was resident when the step
started (activations, gradients, temporaries; on CUDA ``max_memory_allocated`` after
``reset_peak_memory_stats``, on CPU glibc's in-use bytes sampled after every aten op, see
:func:`cpu_peak_extra_bytes`); ``resident_bytes`` counts the tensors that live across steps
(teacher weights, trainable tensors, optimizer state); ``peak_mem_bytes`` is their sum.
"""
from __future__ import annotations

import collections
import contextlib
import ctypes
import gc
import math
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import torch
from torch.utils._python_dispatch import TorchDispatchMode

import red_kernels

from red.config import PRECISION_CHOICES
from red.errors import RedError

MB = 2 ** 20
STEP_VARIANTS = ("torch", "triton", "compile")  # red_step rows; "compile" = torch.compile of the torch path
CPU_DEFAULT_LAYERS = 2


# ------------------------------------------------------------------ CPU peak memory
class _MallInfo2(ctypes.Structure):
    _fields_ = [(n, ctypes.c_size_t) for n in (
        "arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks",
        "fordblks", "keepcost")]


try:
    _libc = ctypes.CDLL("libc.so.6")
    _libc.mallinfo2.restype = _MallInfo2
    CPU_MEMORY_AVAILABLE = True
except (OSError, AttributeError):  # pragma: no cover - non-glibc
    CPU_MEMORY_AVAILABLE = False


def in_use_bytes() -> int:
    """glibc's bytes in use (small blocks + mmapped blocks); torch's CPU allocator uses malloc."""
    m = _libc.mallinfo2()
    return int(m.uordblks + m.hblkhd)


def cpu_peak_extra_bytes(fn) -> int:
    """Peak CPU bytes allocated above the level at entry while ``fn()`` runs (fwd + bwd).

    tracemalloc does not see torch's allocator, so glibc's in-use count (``mallinfo2``) is
    read after every aten op through a TorchDispatchMode: the peak is sampled at op
    boundaries, where tensors are born; scratch memory inside one op is not seen.
    Linux/glibc only (``CPU_MEMORY_AVAILABLE``).
    """
    class _PeakMode(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.peak = in_use_bytes()

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            cur = in_use_bytes()
            if cur > self.peak:
                self.peak = cur
            return out

    base = in_use_bytes()  # no gc.collect(): slow, and refcounting frees tensors
    mode = _PeakMode()
    with mode:
        fn()
    return max(0, mode.peak - base)


# ------------------------------------------------------------------ timing and memory
def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _free(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def measure(fn, device, warmup: int = 1, reps: int = 3, memory: bool = True) -> dict:
    """Time ``fn()`` (``warmup`` untimed calls, then ``reps`` timed ones) and its peak memory.

    Returns ``ms`` (median), ``ms_all``, ``first_ms`` (the first warm-up call, which holds
    any compilation), ``cpu_ms_all`` (the process's CPU time of each timed call, all its
    threads: beside the wall time it tells a busy machine, where wall exceeds CPU time over
    the threads, from slow work) and ``step_mem_bytes`` (peak above the level at the start
    of the timed calls; None when not measurable). On CUDA the peak is read over the timed
    calls themselves; on the CPU it needs an extra, untimed call under a dispatch mode.
    """
    device = torch.device(device)
    first = None
    for i in range(max(warmup, 0)):
        t0 = time.perf_counter()
        fn()
        _sync(device)
        if i == 0:
            first = (time.perf_counter() - t0) * 1e3
    mem = None
    if device.type == "cuda":
        base = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
    ts, cpu = [], []
    for _ in range(max(reps, 1)):
        t0, c0 = time.perf_counter(), time.process_time()
        fn()
        _sync(device)
        ts.append((time.perf_counter() - t0) * 1e3)
        cpu.append((time.process_time() - c0) * 1e3)
    if device.type == "cuda":
        mem = max(0, torch.cuda.max_memory_allocated(device) - base) if memory else None
    elif memory:
        mem = peak_extra_bytes(fn, device)
    return {"ms": statistics.median(ts), "ms_all": ts, "cpu_ms_all": cpu, "first_ms": first, "step_mem_bytes": mem}


def time_kernel_ms(fn, device) -> float:
    """Median ms of ``fn()``: ``triton.testing.do_bench`` on CUDA, perf_counter on the CPU."""
    device = torch.device(device)
    if device.type == "cuda":
        try:
            import triton.testing

            return float(triton.testing.do_bench(fn, warmup=10, rep=50, return_mode="median"))
        except ImportError:  # pragma: no cover - CUDA without triton
            return measure(fn, device, warmup=3, reps=10, memory=False)["ms"]
    return measure(fn, device, warmup=1, reps=3, memory=False)["ms"]


def tensor_bytes(*groups) -> int:
    """Bytes of the distinct tensors (by storage) in ``groups``: modules, optimizers,
    iterables of tensors."""
    seen, total = set(), 0

    def add(t):
        nonlocal total
        if not isinstance(t, torch.Tensor) or t.device.type == "meta":
            return
        key = (t.device, t.untyped_storage().data_ptr())
        if key in seen:
            return
        seen.add(key)
        total += t.untyped_storage().nbytes()

    for g in groups:
        if g is None:
            continue
        if isinstance(g, torch.nn.Module):
            for t in list(g.parameters()) + list(g.buffers()):
                add(t)
        elif isinstance(g, torch.optim.Optimizer):
            for state in g.state.values():
                for v in state.values():
                    add(v)
        else:
            for t in g:
                add(t)
    return total


# ------------------------------------------------------------------ ceilings
def measure_ceilings(device, dtype: torch.dtype) -> dict:
    """Matmul TFLOP/s in ``dtype`` (8192³ on CUDA, 1024³ on the CPU) and copy bandwidth in
    TB/s (read + write; 1 GiB on CUDA, 64 MiB on the CPU), measured now on ``device``."""
    device = torch.device(device)
    cuda = device.type == "cuda"
    n = 8192 if cuda else 1024
    a = torch.randn(n, n, device=device).to(dtype)
    b = torch.randn(n, n, device=device).to(dtype)
    mm_ms = time_kernel_ms(lambda: torch.mm(a, b), device)
    del a, b
    numel = (1 << 30) // torch.empty((), dtype=dtype).element_size() if cuda else (1 << 26) // 4
    x = torch.empty(numel, device=device, dtype=dtype).normal_()
    y = torch.empty_like(x)
    cp_ms = time_kernel_ms(lambda: y.copy_(x), device)
    nbytes = 2 * x.numel() * x.element_size()
    del x, y
    _free(device)
    return {"matmul_tflops": 2 * n ** 3 / (mm_ms * 1e-3) / 1e12, "matmul_n": n, "matmul_ms": mm_ms,
            "copy_tbps": nbytes / (cp_ms * 1e-3) / 1e12, "copy_bytes": nbytes, "copy_ms": cp_ms,
            "dtype": _dtype_name(dtype)}


# ------------------------------------------------------------------ kernels
def kernel_shapes(arch, hidden_size: int, tokens: int) -> dict:
    """The shapes the step hands to red_kernels for a teacher ``arch`` (red.model.teacher.Arch),
    student width ``hidden_size`` and ``tokens`` = the tokens of one micro-batch."""
    return dict(N=int(tokens), D=arch.hidden_size, d=int(hidden_size), I=arch.intermediate_size,
                V=arch.vocab_size, eps=float(arch.rms_norm_eps))


def kernel_specs(shapes: dict, device, dtype: torch.dtype, seed: int = 0) -> list[dict]:
    """One spec per red_kernels op, with inputs made as the step makes them (activations
    and the step's dense weights in the compute dtype ``dtype``).

    Work is what the op must do at least: flops of its GEMMs (forward and backward), or
    bytes it must move for the memory-bound ones. Each spec: name, shape (text),
    make() -> (args, leaves), fn(*args) -> output(s) (red_kernels, under the timed
    backend), eager(*args) (the ``naive_*`` composition), kind ("flop" | "bytes"), work,
    backward (bool)."""
    N, D, d, I, V = (shapes[k] for k in ("N", "D", "d", "I", "V"))
    eps = shapes.get("eps", 1e-5)
    dev = torch.device(device)
    es = torch.empty((), dtype=dtype).element_size()
    g = torch.Generator(device=dev).manual_seed(seed)

    def act(*s, scale=1.0, grad=False):
        t = (torch.randn(*s, device=dev, generator=g) * scale).to(dtype)
        return t.requires_grad_(grad)

    specs = []

    def spec(name, shape, make, fn, eager, kind, work, backward=True):
        specs.append(dict(name=name, shape=shape, make=make, fn=fn, eager=eager, kind=kind, work=float(work),
                          backward=backward))

    # calibration: reads x once, writes y (the stats are [4, D], negligible)
    spec("rmsnorm_with_stats", f"x[{N},{D}]", lambda: ((act(N, D), act(D)), []),
         lambda x, w: red_kernels.rmsnorm_with_stats(x, w, eps),
         lambda x, w: red_kernels.naive_rmsnorm_with_stats(x, w, eps), "bytes", 2 * N * D * es, backward=False)
    # the widest clone tap (gate/up, [N, I]) on the activation's path: forward reads s and t
    # and writes g; backward reads the downstream gradient and g and writes ds
    spec("clone_mse", f"s,t[{N},{I}]", lambda: ((act(N, I, grad=True), act(N, I)), [0]),
         lambda s, t: red_kernels.clone_mse(s, t)[:2], lambda s, t: red_kernels.naive_clone_mse(s, t)[:2],
         "bytes", 6 * N * I * es)
    # the LM head: both logit GEMMs, then grad_h and the fp32 dW of the student's head
    w_lm = act(V, D, scale=0.02)
    labels = torch.randint(0, V, (N,), device=dev, generator=g)
    spec("fused_linear_kl", f"h_s[{N},{d}] w_s[{V},{d}] h_t[{N},{D}] w_t[{V},{D}]",
         lambda: ((act(N, d, grad=True), act(V, d, scale=0.02, grad=True), act(N, D), w_lm, labels), [0, 1]),
         lambda *a: red_kernels.fused_linear_kl(*a)[0], lambda *a: red_kernels.naive_fused_linear_kl(*a)[0],
         "flop", 2 * N * V * (d + D) + 2 * 2 * N * V * d)
    return specs


def kernel_runner(fn, spec: dict, args, leaves):
    """A callable running ``fn(*args)`` as the step runs the op of ``spec``: forward, then
    (when the step differentiates it) backward with fixed random upstream gradients into
    every differentiable output, the gradients of ``args[i] for i in leaves`` dropped."""
    grads = {}

    def run():
        out = fn(*args)
        if not spec["backward"]:
            return
        outs = [o for o in (out if isinstance(out, (tuple, list)) else (out,)) if o.requires_grad]
        if not grads:  # fixed upstream gradients, made once (random: no shortcut for ones)
            for i, o in enumerate(outs):
                grads[i] = torch.randn_like(o) if o.dim() else torch.ones_like(o)
        torch.autograd.backward(outs, [grads[i] for i in range(len(outs))])
        for i in leaves:
            args[i].grad = None
    return run


def bench_kernels(shapes: dict, device, dtype: torch.dtype, backends=("torch",), ceilings: dict | None = None,
                  seed: int = 0, deadline: float | None = None, on_row=None, memory: bool = True) -> list[dict]:
    """Time every red_kernels op (:func:`kernel_specs`) at ``shapes`` on ``device`` under each
    backend and as its eager composition (impl "eager").

    Rows: name, impl (a backend or "eager"), shape, ms, step_mem_bytes (peak above the
    inputs, forward + backward), kind, work, rate (TB/s or TFLOP/s), rate_unit, ceiling,
    frac_of_ceiling, speedup_vs_eager, eager_mem_over_this, status ("ok" | "error" |
    "skipped"), error."""
    device = torch.device(device)
    rows = []
    try:
        specs = kernel_specs(shapes, device, dtype, seed)
    except Exception as e:  # noqa: BLE001 - e.g. out of memory making the inputs
        _emit(rows, dict(kind_of_row="kernel", name="inputs", impl="", status="error", error=_err(e)), on_row)
        return rows
    for spec in specs:
        mine = []
        for impl in (*backends, "eager"):
            row = dict(kind_of_row="kernel", name=spec["name"], impl=impl, shape=spec["shape"], kind=spec["kind"],
                       work=spec["work"])
            mine.append(row)
            if deadline is not None and time.perf_counter() > deadline:
                row.update(status="skipped", error="time budget")
                continue
            try:
                with red_kernels.use_backend("torch" if impl == "eager" else impl):
                    args, leaves = spec["make"]()
                    run = kernel_runner(spec["eager" if impl == "eager" else "fn"], spec, args, leaves)
                    ms = time_kernel_ms(run, device)
                    mem = peak_extra_bytes(run, device) if memory else None
                del args, run
                rate = spec["work"] / (ms * 1e-3) / 1e12
                unit, ceil = (("TFLOP/s", (ceilings or {}).get("matmul_tflops")) if spec["kind"] == "flop"
                              else ("TB/s", (ceilings or {}).get("copy_tbps")))
                row.update(ms=ms, step_mem_bytes=mem, rate=rate, rate_unit=unit, ceiling=ceil,
                           frac_of_ceiling=rate / ceil if ceil else None, status="ok")
            except Exception as e:  # noqa: BLE001 - recorded, the next one still runs
                row.update(status="error", error=_err(e))
            if row["status"] == "error":
                _free(device)  # after the except block, whose traceback holds the inputs
        eager = next(r for r in mine if r["impl"] == "eager")
        for row in mine:
            ok = row.get("status") == "ok" and eager.get("status") == "ok"
            row["speedup_vs_eager"] = eager["ms"] / row["ms"] if ok else None
            row["eager_mem_over_this"] = (eager["step_mem_bytes"] / row["step_mem_bytes"]
                                          if ok and eager.get("step_mem_bytes") and row.get("step_mem_bytes")
                                          else None)
            _emit(rows, row, on_row)
    del specs
    _free(device)
    return rows


def peak_extra_bytes(fn, device) -> int | None:
    """Peak bytes above the level at entry during one more call of ``fn`` (CUDA: the
    allocator's peak; CPU: :func:`cpu_peak_extra_bytes`, None without glibc)."""
    device = torch.device(device)
    if device.type == "cuda":
        _sync(device)
        base = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        fn()
        _sync(device)
        return max(0, torch.cuda.max_memory_allocated(device) - base)
    return cpu_peak_extra_bytes(fn) if CPU_MEMORY_AVAILABLE else None


# ------------------------------------------------------------------ teachers
def shrink_layers(teacher, n: int):
    """Keep the first ``n`` decoder layers of ``teacher`` (in place; returns it)."""
    total = teacher.config.num_hidden_layers
    if not 1 <= n <= total:
        raise RedError(f"--layers {n} must be between 1 and the teacher's {total} layers")
    if n < total:
        teacher.model.layers = teacher.model.layers[:n]
        teacher.config.num_hidden_layers = n
        if getattr(teacher.config, "layer_types", None):
            teacher.config.layer_types = list(teacher.config.layer_types)[:n]
    return teacher


# ------------------------------------------------------------------ steps
@contextlib.contextmanager
def compiled_layers(student, **compile_kwargs):
    """Every StudentLayer (teacher layer, student layer and clone terms) wrapped in
    ``torch.compile`` inside the block; the embedding, LM-head KL and AdamW stay eager."""
    layers = list(student.layers)
    cfg = torch._dynamo.config
    name = "recompile_limit" if hasattr(cfg, "recompile_limit") else "cache_size_limit"
    patch = cfg.patch(**{name: max(getattr(cfg, name), 2 * len(layers) + 8)})
    try:
        with patch:
            for layer in layers:
                layer.compile(**compile_kwargs)
            yield student
    finally:
        for layer in layers:
            layer._compiled_call_impl = None
        torch._dynamo.reset()  # drop the compiled graphs (and their guards on this student)


def micro_batches(batches) -> list[torch.Tensor]:
    """``batches`` as a list of [B, T] token-id micro-batches (one tensor is one micro-batch)."""
    if isinstance(batches, torch.Tensor):
        return [batches]
    return list(batches)


def bench_step(student, batches, backend: str = "torch", steps: int = 3, warmup: int = 1,
               compile: bool = False, loss=None, lr: float = 1e-5, max_norm: float = 1.0,
               memory: bool = True) -> dict:
    """Time ``red.train.trainer.train_step`` of ``student`` over the micro-batches ``batches``
    (one optimizer step: ``len(batches)`` is the gradient accumulation) with the
    red_kernels ``backend`` forced (``compile``: each StudentLayer under torch.compile, two
    warm-up steps). A fresh optimizer from ``red.train.trainer.make_optimizer`` is used and
    dropped; ``student`` is trained by these steps (``warmup + steps`` of them, plus one
    on the CPU for memory)."""
    from red.train import trainer
    from red.model.student import LossSettings

    batches = micro_batches(batches)
    device = batches[0].device
    loss = loss or LossSettings()
    optimizer = trainer.make_optimizer(student.trainable_parameters(), lr, device)
    last = {}

    def step():
        last.update(trainer.train_step(student, optimizer, batches, loss, max_norm=max_norm))

    ctx = compiled_layers(student, dynamic=False) if compile else contextlib.nullcontext()
    try:
        with red_kernels.use_backend(backend), ctx:
            m = measure(step, device, warmup=max(warmup, 2 if compile else 1), reps=steps, memory=memory)
        resident = tensor_bytes(student.teacher, student.trainable_parameters(), optimizer)
    finally:
        optimizer.zero_grad(set_to_none=True)
        del optimizer
        _free(device)
    row = _step_row("red_step", "compile" if compile else backend, batches, m, resident)
    row["loss"] = last.get("loss")
    if compile:
        row["compile_s"] = (m["first_ms"] or 0.0) / 1e3
    return row


def ordinary_model(student, dtype: torch.dtype | None = None):
    """The exported student as a plain transformers model, in memory, trainable: the
    model ``red export`` would write (``student_config`` + ``merged_state_dict``), on the
    student's device in ``dtype`` (default the compute dtype)."""
    from transformers import AutoModelForCausalLM

    from red.model.export import merged_state_dict, student_config

    dtype = dtype or student.compute_dtype
    device = student.embed.device
    state = merged_state_dict(student)
    cfg = student_config(student.teacher, student.hidden_size, student.norm_eps, dtype)
    with torch.device(device):  # made where it trains: no host copy of a random init
        model = AutoModelForCausalLM.from_config(cfg, dtype=dtype)
    model.to(device)
    missing, unexpected = model.load_state_dict({k: v.to(device, dtype) for k, v in state.items()}, strict=False)
    tied_ok = {"lm_head.weight"} if cfg.tie_word_embeddings else set()
    if unexpected or set(missing) - tied_ok:
        raise RuntimeError(f"exported state does not fit {type(model).__name__}: missing {missing}, "
                           f"unexpected {unexpected}")
    return model.train().requires_grad_(True)


def ordinary_optimizer(model, lr: float = 1e-5) -> torch.optim.Optimizer:
    """AdamW with red's hyper-parameters (fused on CUDA) over every parameter of ``model``."""
    params = [p for p in model.parameters() if p.requires_grad]
    device = params[0].device
    return torch.optim.AdamW(params, lr=lr, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0,
                             fused=device.type == "cuda")


def ordinary_micro_batch(model, input_ids: torch.Tensor, n_micro_batches: int = 1) -> None:
    """Forward with labels (the model's own shifted cross-entropy) and backward of one
    micro-batch; the loss is divided by the micro-batches of the step when there are several
    (what gradient accumulation in ordinary training does)."""
    out = model(input_ids=input_ids, labels=input_ids, use_cache=False)
    (out.loss / n_micro_batches if n_micro_batches > 1 else out.loss).backward()


def ordinary_update(optimizer: torch.optim.Optimizer, max_norm: float = 1.0) -> None:
    """The end of an ordinary step: gradient clipping, AdamW, zero_grad."""
    params = [p for g in optimizer.param_groups for p in g["params"]]
    torch.nn.utils.clip_grad_norm_(params, max_norm)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)


def ordinary_step(model, optimizer: torch.optim.Optimizer, batches, max_norm: float = 1.0) -> None:
    """One optimizer step of ordinary training over the micro-batches ``batches``."""
    batches = micro_batches(batches)
    for ids in batches:
        ordinary_micro_batch(model, ids, len(batches))
    ordinary_update(optimizer, max_norm)


def bench_ordinary(model, batches, steps: int = 3, warmup: int = 1, lr: float = 1e-5,
                   max_norm: float = 1.0, memory: bool = True) -> dict:
    """Time :func:`ordinary_step` of a transformers causal LM over the micro-batches
    ``batches`` (same hyper-parameters as red's AdamW): the yardstick of :func:`bench_step`."""
    batches = micro_batches(batches)
    device = batches[0].device
    opt = ordinary_optimizer(model, lr)
    try:
        m = measure(lambda: ordinary_step(model, opt, batches, max_norm), device, warmup=warmup, reps=steps,
                    memory=memory)
        resident = tensor_bytes(model, opt)
    finally:
        opt.zero_grad(set_to_none=True)
        del opt
        _free(device)
    return _step_row("ordinary_step", "ordinary", batches, m, resident)


def bench_teacher_forward(teacher, batches, steps: int = 3, warmup: int = 1, memory: bool = True) -> dict:
    """Time the teacher's own forward (no grad, logits included) over the micro-batches
    ``batches``: what a distillation step needs of the teacher."""
    batches = micro_batches(batches)

    def fwd():
        with torch.no_grad():
            for ids in batches:
                teacher(input_ids=ids, use_cache=False)

    m = measure(fwd, batches[0].device, warmup=warmup, reps=steps, memory=memory)
    return _step_row("teacher_forward", "teacher_forward", batches, m, tensor_bytes(teacher))


def _step_row(name, variant, batches, m, resident) -> dict:
    mem = m["step_mem_bytes"]
    tokens = sum(b.numel() for b in batches)
    return dict(kind_of_row="step", name=name, variant=variant, status="ok", tokens=int(tokens),
                micro_batches=len(batches), ms=m["ms"], ms_all=m["ms_all"], cpu_ms=statistics.median(m["cpu_ms_all"]),
                cpu_ms_all=m["cpu_ms_all"], tokens_per_s=tokens / (m["ms"] * 1e-3),
                step_mem_bytes=mem, resident_bytes=resident, peak_mem_bytes=None if mem is None else resident + mem)


# ------------------------------------------------------------------ op counts
#: aten ops that launch no device work though their schema does not say they return an
#: alias: reshapes of a contiguous tensor, allocations, and bookkeeping.
NO_KERNEL_OPS = frozenset({
    "_unsafe_view", "_reshape_alias", "lift_fresh",
    "empty", "empty_like", "empty_strided", "new_empty", "new_empty_strided", "resize_", "set_",
    "promote_types", "result_type", "_record_function_enter", "_record_function_enter_new", "_record_function_exit",
    "sym_size", "sym_stride", "sym_numel", "sym_storage_offset", "is_same_size", "_has_same_storage_numel",
    "_has_compatible_shallow_copy_type",
})

OP_COUNT_RULE = ("counted: every aten op that works on tensor data (one op = one kernel launch; a _foreach op "
                 "counts once, like its multi-tensor launch on CUDA; host reads such as item() included) and every "
                 "Triton launch of red_kernels; not counted: views and aliases (ops whose schema returns an alias of "
                 "an input: view, reshape of a contiguous tensor, t, transpose, permute, expand, detach, squeeze, "
                 "unsqueeze, slice, select, split, unbind, as_strided, alias; and _unsafe_view), allocations (empty*) "
                 "and bookkeeping (record_function markers, promote_types)")


def launches_kernel(func) -> bool:
    """Whether the aten op ``func`` counts as a kernel launch (see ``OP_COUNT_RULE``)."""
    return not func.is_view and func.overloadpacket.__name__ not in NO_KERNEL_OPS


_SOURCE_DIRS = tuple(os.sep + p + os.sep for p in ("red", "red_kernels", "transformers", os.path.join("torch", "optim"),
                                                   os.path.join("torch", "nn", "utils")))


def _py_source() -> str:
    """The innermost function of red, red_kernels, transformers or torch's optimizers and
    clipping on the Python stack (the counter's own frames left out)."""
    f = sys._getframe(2)
    while f is not None:
        name = f.f_code.co_filename
        if name != __file__ and any(d in name for d in _SOURCE_DIRS):
            return getattr(f.f_code, "co_qualname", f.f_code.co_name)  # (co_name before Python 3.11)
        f = f.f_back
    return "?"


class _LaunchTap(list):
    """Stands in for ``red_kernels._common.RECORD``: every Triton launch is counted (and
    still recorded in the list that was there before, if any)."""

    def __init__(self, counter: "OpCounter", previous):
        super().__init__()
        self.counter, self.previous = counter, previous

    def append(self, rec):
        self.counter.add("triton:" + rec["kernel"], source="launch")
        if self.previous is not None:
            self.previous.append(rec)


class OpCounter(TorchDispatchMode):
    """Counts the kernels that code run inside it launches, by where in a step they happen.

    The rule is ``OP_COUNT_RULE``: aten ops that work on data, and red_kernels' Triton
    launches (which the dispatcher never sees), one each; views, allocations and
    bookkeeping are left out, and so are the copies the Triton interpreter makes of a
    launch's arguments on the CPU (they are not kernels on a GPU). ``where`` — (part, layer, phase, micro-batch) — is set by the
    code that drives the step and, during a backward, by gradient hooks
    (:meth:`enter_on_grad`). ``counts[where]`` is a Counter of (source, op name): source is
    the autograd node that runs in a backward ("MmBackward0"), else the innermost
    function of red, red_kernels, transformers or torch's optimizer that made the call."""

    def __init__(self):
        super().__init__()
        self.where = ("other", None, "fwd", -1)
        self.counts: dict[tuple, collections.Counter] = collections.defaultdict(collections.Counter)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if launches_kernel(func):
            self.add(func.overloadpacket.__name__)
        return out

    def add(self, op: str, source: str | None = None) -> None:
        if source is None:
            source = _py_source()
            if source == "launch":  # the Triton interpreter copying a launch's arguments (CPU only)
                return
            node = torch._C._current_autograd_node()
            source = node.name() if node is not None else source
        self.counts[self.where][(source, op)] += 1

    def enter_on_grad(self, where: tuple):
        """A tensor hook that moves ``where`` when autograd reaches that tensor's gradient.

        The engine runs a ready node with the larger sequence number first, so the nodes
        of layer i all run after the gradient of its output is complete and before the
        gradient of its input is: hooks on those two tensors bracket the layer's backward."""
        def hook(_grad):
            self.where = where
        return hook

    def __enter__(self):
        from red_kernels import _common

        self._record = _common.RECORD
        _common.RECORD = _LaunchTap(self, self._record)
        return super().__enter__()

    def __exit__(self, *exc):
        from red_kernels import _common

        _common.RECORD = self._record
        return super().__exit__(*exc)


@contextlib.contextmanager
def _red_step_probe(student, counter: OpCounter):
    """Tell ``counter`` where one ``red.train.trainer.train_step`` of ``student`` is while it runs.

    Observation only: the product's own functions run unchanged. ``red.model.student.decoder_layer``
    (teacher and student layers alike) and the student's ``make_weights``,
    ``distill_terms``, ``weight_backward`` and the step weights' ``accumulate`` are wrapped to
    set the part before they run; gradient hooks on each student layer's input and output
    mark the layers of the backward."""
    from red.model import student as student_module

    real_layer = student_module.decoder_layer
    real = {n: getattr(student, n) for n in ("make_weights", "distill_terms", "weight_backward")}
    state = {"micro": -1, "teacher_layer": 0, "layer": 0}
    counter.where = ("step_setup", None, "step", -1)

    def decoder_layer(*args, **kwargs):
        h = args[0]
        targets = kwargs.get("targets", args[8] if len(args) > 8 else None)
        side = "teacher_layer" if targets is None else "layer"
        i, mb = state[side], state["micro"]
        state[side] += 1
        counter.where = (side, i, "fwd", mb)
        out = real_layer(*args, **kwargs)
        counter.where = ("head", None, "fwd", mb)  # until the next layer: the final norms and losses
        if side == "layer" and out[0].requires_grad:
            out[0].register_hook(counter.enter_on_grad(("layer", i, "bwd", mb)))
            if h.requires_grad:
                h.register_hook(counter.enter_on_grad(("layer", i - 1, "bwd", mb) if i else
                                                      ("prologue", None, "bwd", mb)))
        return out

    def make_weights(*args, **kwargs):
        counter.where = ("make_weights", None, "step", -1)
        weights = real["make_weights"](*args, **kwargs)
        accumulate = weights.accumulate

        def accumulate_probe():
            if counter.where[0] != "weight_backward":  # folding a micro-batch's gradients in
                counter.where = ("accumulate", None, "bwd", state["micro"])
            accumulate()
        weights.accumulate = accumulate_probe
        return weights

    def distill_terms(*args, **kwargs):
        state.update(micro=state["micro"] + 1, teacher_layer=0, layer=0)
        counter.where = ("prologue", None, "fwd", state["micro"])
        out = real["distill_terms"](*args, **kwargs)
        counter.where = ("head", None, "bwd", state["micro"])  # the backward starts at the losses
        return out

    def weight_backward(*args, **kwargs):
        counter.where = ("weight_backward", None, "step", -1)
        out = real["weight_backward"](*args, **kwargs)
        counter.where = ("optimizer", None, "step", -1)  # norm, clipping, AdamW, zero_grad
        return out

    student_module.decoder_layer = decoder_layer
    for name, fn in (("make_weights", make_weights), ("distill_terms", distill_terms),
                     ("weight_backward", weight_backward)):
        setattr(student, name, fn)
    try:
        yield
    finally:
        student_module.decoder_layer = real_layer
        for name in real:
            delattr(student, name)


@contextlib.contextmanager
def _ordinary_probe(model, counter: OpCounter):
    """Tell ``counter`` where an ordinary micro-batch of a transformers model is, from
    forward hooks on its decoder layers and on the model, and gradient hooks on each
    layer's input and output. Yields ``start(k)``, to call before micro-batch k."""
    state = {"micro": -1}
    handles = []

    def start(k: int) -> None:
        state["micro"] = k
        counter.where = ("prologue", None, "fwd", k)

    for i, layer in enumerate(model.model.layers):
        def pre(_mod, args, kwargs, i=i):
            mb = state["micro"]
            counter.where = ("layer", i, "fwd", mb)
            h = args[0] if args else kwargs.get("hidden_states")
            if torch.is_tensor(h) and h.requires_grad:
                h.register_hook(counter.enter_on_grad(("layer", i - 1, "bwd", mb) if i else
                                                      ("prologue", None, "bwd", mb)))

        def post(_mod, _args, _kwargs, out, i=i):
            mb = state["micro"]
            counter.where = ("head", None, "fwd", mb)
            h = out[0] if isinstance(out, tuple) else out
            if h.requires_grad:
                h.register_hook(counter.enter_on_grad(("layer", i, "bwd", mb)))

        handles.append(layer.register_forward_pre_hook(pre, with_kwargs=True))
        handles.append(layer.register_forward_hook(post, with_kwargs=True))
    handles.append(model.register_forward_hook(
        lambda *_: setattr(counter, "where", ("head", None, "bwd", state["micro"]))))
    try:
        yield start
    finally:
        for h in handles:
            h.remove()


MICRO_BATCH_PARTS = ("prologue", "layer", "head", "accumulate")
STEP_PARTS = ("step_setup", "make_weights", "weight_backward", "optimizer")


def _summary(counts: dict, num_layers: int) -> dict:
    """Totals of one step's counts: the last micro-batch by part and phase (a layer's
    own counts, which are the same for every layer), every micro-batch's total, the per-step
    parts, what no part claimed (``unattributed``: 0 when the probes cover the whole step), and the op and
    source Counters behind each."""
    micro = max((k[3] for k in counts if k[3] >= 0), default=-1)

    def pick(part, phase, layer=None):
        c = collections.Counter()
        for (p, i, ph, mb), cnt in counts.items():
            if p == part and ph == phase and (mb == micro or phase == "step") and (layer is None or i == layer):
                c.update(cnt)
        return c

    def ops(c):
        out = collections.Counter()
        for (_src, op), n in c.items():
            out[op] += n
        return dict(out.most_common())

    def sources(c):
        out = collections.Counter()
        for (src, _op), n in c.items():
            out[src] += n
        return dict(out.most_common())

    per_layer = [{(part, ph): pick(part, ph, i) for part, ph in (("teacher_layer", "fwd"), ("layer", "fwd"),
                                                                   ("layer", "bwd"))} for i in range(num_layers)]
    identical = all(p == per_layer[0] for p in per_layer)
    one = per_layer[0] if per_layer else {}
    layer = {"teacher_fwd": sum(one.get(("teacher_layer", "fwd"), {}).values()),
             "fwd": sum(one.get(("layer", "fwd"), {}).values()), "bwd": sum(one.get(("layer", "bwd"), {}).values())}
    layer["total"] = sum(layer.values())
    mb = {"layer": layer}
    names = {("teacher_layer", "fwd"): "layer/teacher_fwd", ("layer", "fwd"): "layer/fwd", ("layer", "bwd"): "layer/bwd"}
    detail = {names[k]: c for k, c in one.items() if c}
    for part in ("prologue", "head", "accumulate"):
        mb[part] = {ph: sum(pick(part, ph).values()) for ph in ("fwd", "bwd") if pick(part, ph)}
        detail.update({f"{part}/{ph}": pick(part, ph) for ph in ("fwd", "bwd") if pick(part, ph)})
    for ph in ("fwd", "bwd"):
        mb[ph] = sum(sum(pick(part, ph).values()) for part in ("prologue", "teacher_layer", "layer", "head", "accumulate"))
    mb["total"] = mb["fwd"] + mb["bwd"]
    step = {part: sum(pick(part, "step").values()) for part in STEP_PARTS if pick(part, "step")}
    detail.update({f"step/{part}": pick(part, "step") for part in step})
    known = {"teacher_layer", *MICRO_BATCH_PARTS, *STEP_PARTS}
    totals = [sum(sum(c.values()) for k, c in counts.items() if k[3] == m and k[0] in known) for m in range(micro + 1)]
    return dict(micro_batch=mb, micro_batch_totals=totals, layers_identical=identical, step=step,
                step_total=sum(sum(c.values()) for c in counts.values()),
                unattributed=sum(sum(c.values()) for k, c in counts.items() if k[0] not in known),
                ops={k: ops(c) for k, c in detail.items()}, sources={k: sources(c) for k, c in detail.items()})


def op_counts(student, batches, loss=None, backend: str | None = None, lr: float = 1e-5,
              max_norm: float = 1.0) -> dict:
    """The kernels one optimizer step launches (:class:`OpCounter`), RED beside ordinary
    training of the same student, on the micro-batches ``batches``.

    RED: one ``red.train.trainer.train_step`` of ``student`` (after an uncounted one, so that
    AdamW's state exists and the counted step is a steady one) under the red_kernels
    ``backend`` (None: the automatic choice). Ordinary: one :func:`ordinary_step` of
    :func:`ordinary_model` (after an uncounted one). ``student`` is trained by these steps.

    Returns ``red`` and ``ordinary`` (each: ``micro_batch`` — the last micro-batch's counts
    by part and phase, a layer's own counts under "layer", with the teacher's layer
    forward as "teacher_fwd" for RED — ``step``, the per-step parts, ``step_total``, and
    ``ops`` / ``sources``: the Counters behind every part), ``ratio_micro_batch`` (RED
    micro-batch / ordinary micro-batch), ``ratio_per_layer``, ``layers``, ``backend`` and
    the counting ``rule``."""
    from red.train import trainer
    from red.model.student import LossSettings

    batches = micro_batches(batches)
    device = batches[0].device
    loss = loss or LossSettings()
    n_layers = student.arch.num_layers
    with red_kernels.use_backend(backend) if backend else contextlib.nullcontext():
        used = red_kernels.get_backend(student.teacher.model.embed_tokens.weight)
        opt = trainer.make_optimizer(student.trainable_parameters(), lr, device)
        try:
            trainer.train_step(student, opt, batches, loss, max_norm=max_norm)
            counter = OpCounter()
            with _red_step_probe(student, counter), counter:
                trainer.train_step(student, opt, batches, loss, max_norm=max_norm)
        finally:
            opt.zero_grad(set_to_none=True)
            del opt
            _free(device)
        red = _summary(counter.counts, n_layers)
        model = ordinary_model(student)
        opt = ordinary_optimizer(model, lr)
        try:
            ordinary_step(model, opt, batches, max_norm)
            counter = OpCounter()
            with _ordinary_probe(model, counter) as start, counter:
                for k, ids in enumerate(batches):  # ordinary_step, with the parts marked
                    start(k)
                    ordinary_micro_batch(model, ids, len(batches))
                counter.where = ("optimizer", None, "step", -1)
                ordinary_update(opt, max_norm)
        finally:
            del model, opt
            _free(device)
        ordinary = _summary(counter.counts, n_layers)
    return dict(backend=used, layers=n_layers, micro_batches=len(batches), rule=OP_COUNT_RULE, red=red,
                ordinary=ordinary,
                ratio_micro_batch=red["micro_batch"]["total"] / max(ordinary["micro_batch"]["total"], 1),
                ratio_per_layer=red["micro_batch"]["layer"]["total"] / max(ordinary["micro_batch"]["layer"]["total"], 1))


def format_op_counts(oc: dict) -> str:
    """The op-count table of :func:`op_counts`: one micro-batch by part, then the step."""
    r, o = oc["red"], oc["ordinary"]
    rm, om = r["micro_batch"], o["micro_batch"]
    rl, ol = rm["layer"], om["layer"]

    def row(label, red_fb, ord_fb):
        rt, ot = sum(red_fb), sum(ord_fb)
        return [label, *red_fb, rt, *ord_fb, ot, _ratio(rt, ot)]

    rows = [row("prologue (embedding, positions)", _fb(rm.get("prologue")), _fb(om.get("prologue"))),
            row(f"layer, each of {oc['layers']}", (rl["teacher_fwd"] + rl["fwd"], rl["bwd"]), (ol["fwd"], ol["bwd"])),
            row("head (final norms, LM head, losses)", _fb(rm.get("head")), _fb(om.get("head")))]
    if rm.get("accumulate"):
        rows.append(row("fp32 sums of weight gradients", _fb(rm["accumulate"]), (0, 0)))
    rows.append(row("micro-batch", (rm["fwd"], rm["bwd"]), (om["fwd"], om["bwd"])))
    lines = [f"ops a micro-batch, {oc['backend']} backend (RED fwd of a layer = teacher {rl['teacher_fwd']} + "
             f"student {rl['fwd']}; ordinary = forward with labels + backward of the exported student)",
             _table(["part", "RED fwd", "RED bwd", "RED", "ordinary fwd", "ordinary bwd", "ordinary", "RED/ordinary"],
                    rows)]
    step = ", ".join(f"{k} {v}" for k, v in r["step"].items())
    lines.append(f"per step: RED {step} (whole step {r['step_total']}); ordinary optimizer "
                 f"{o['step'].get('optimizer', 0)} (whole step {o['step_total']})")
    lines.append("goal (issue 20): a RED micro-batch launches at most 1.5x the ops of an ordinary one; here "
                 f"{oc['ratio_micro_batch']:.2f}x ({oc['ratio_per_layer']:.2f}x per layer)")
    lines.append(f"rule: {oc['rule']}")
    return "\n".join(lines)


def _fb(d: dict | None) -> tuple[int, int]:
    return (d or {}).get("fwd", 0), (d or {}).get("bwd", 0)


def _ratio(a, b) -> str:
    return f"{a / b:.2f}x" if b else "-"


# ------------------------------------------------------------------ one teacher, everything
def bench_teacher(teacher, hidden_size: int, seq_len: int, batch_size: int = 1, backends=("torch", "triton"),
                  layers: int | None = None, include_compile: bool = False, include_ordinary: bool = True,
                  include_teacher_forward: bool = True, include_kernels: bool = True, include_op_counts: bool = True,
                  grad_accum: int = 1, steps: int = 3, warmup: int = 1, init: str = "random-select", seed: int = 0,
                  lr: float = 1e-5, device: str = "auto", precision: str = "auto", memory: bool = True,
                  deadline: float | None = None, compile_reserve_s: float = 0.0, notes=None, on_row=None) -> dict:
    """Benchmark red on one teacher; returns a JSON-ready dict (see the module docstring).

    ``teacher``: a loaded transformers model (used on its own device and dtype, modified in
    place when ``layers`` is given) or a folder (loaded with ``red.model.teacher.load_teacher`` on
    ``device`` in the dtype of ``precision``). The student (width ``hidden_size``, init
    ``init``: "random-select" is a channel selection like the red preset's, without
    calibration) is built by ``red.commands.distill.build_student``; every step variant trains it
    with ``red.train.trainer.train_step``. A step is ``grad_accum`` micro-batches of random token
    ids ([batch_size, seq_len] each, seeded); every variant and the teacher forward run on
    the same ones.

    Keys: device, device_name, dtype, teacher (shape facts), hidden_size, batch_size,
    seq_len, grad_accum, tokens_per_step, backends, notes, versions, ceilings, kernels
    (rows), steps (rows), ratios, op_counts ({backend: :func:`op_counts`} or an error).
    ``on_row(row)`` is called as soon as each row is measured. ``deadline`` (a
    ``time.perf_counter()`` value): later measurements are "skipped" rows; the compile
    variant also needs ``compile_reserve_s`` seconds left.
    """
    from red.train.startup import build_student, resolve_device
    from red.model.teacher import load_teacher
    from red.model.arch import Arch
    from red.train.trainer import resolve_precision

    if isinstance(teacher, (str, Path)):
        dev = resolve_device(device)
        teacher, _ = load_teacher(teacher, dtype=resolve_precision(precision, dev), device=dev, with_tokenizer=False)
    if layers is not None:
        shrink_layers(teacher, int(layers))
    arch = Arch.from_config(teacher.config)
    check_bench_args(arch, hidden_size, seq_len, batch_size, steps, backends, grad_accum)
    dev = teacher.model.embed_tokens.weight.device
    dtype = teacher.model.embed_tokens.weight.dtype
    for b in backends:
        if b == "triton":
            ok, why = red_kernels._backend.triton_runnable(teacher.model.embed_tokens.weight)
            if not ok:
                raise RedError(f"the triton backend cannot run here: {why}; time --kernels torch instead")
    res = dict(device=dev.type, device_name=device_name(dev), dtype=_dtype_name(dtype),
               teacher=dict(model_type=arch.model_type, hidden_size=arch.hidden_size, num_layers=arch.num_layers,
                            vocab_size=arch.vocab_size, num_heads=arch.num_heads, num_kv_heads=arch.num_kv_heads,
                            head_dim=arch.head_dim, intermediate_size=arch.intermediate_size, tied=arch.tied),
               hidden_size=int(hidden_size), batch_size=int(batch_size), seq_len=int(seq_len),
               grad_accum=int(grad_accum), tokens_per_step=int(grad_accum * batch_size * seq_len),
               backends=list(backends), init=init, notes=list(notes or []), versions=versions(), ceilings=None,
               kernels=[], steps=[], ratios={}, op_counts={})
    if dev.type == "cpu":
        res["torch_threads"] = torch.get_num_threads()
    out_of_time = lambda: deadline is not None and time.perf_counter() > deadline  # noqa: E731

    if include_kernels:
        try:
            res["ceilings"] = measure_ceilings(dev, dtype)
        except Exception as e:  # noqa: BLE001
            res["ceilings"] = dict(status="error", error=_err(e))
        res["kernels"] = bench_kernels(kernel_shapes(arch, hidden_size, batch_size * seq_len), dev, dtype, backends,
                                       res["ceilings"], seed, deadline, on_row, memory)

    g = torch.Generator(device="cpu").manual_seed(seed)
    batches = [torch.randint(0, arch.vocab_size, (batch_size, seq_len), generator=g).to(dev)
               for _ in range(grad_accum)]
    tokens = res["tokens_per_step"]
    rows = res["steps"]

    def guarded(name, variant, fn):
        if out_of_time():
            return _emit(rows, dict(kind_of_row="step", name=name, variant=variant, tokens=tokens, status="skipped",
                                    error="time budget"), on_row)
        try:
            row = fn()
        except Exception as e:  # noqa: BLE001 - recorded; the next measurement still runs
            row = dict(kind_of_row="step", name=name, variant=variant, tokens=tokens, status="error", error=_err(e))
        if row["status"] == "error":
            _free(dev)  # outside the except block: the traceback no longer holds the failed step's tensors
        return _emit(rows, row, on_row)

    if include_teacher_forward:
        guarded("teacher_forward", "teacher_forward",
                lambda: bench_teacher_forward(teacher, batches, steps, warmup, memory))
    student = None
    try:
        student = build_student(teacher, hidden_size, init=init, seed=seed)
    except Exception as e:  # noqa: BLE001
        _emit(rows, dict(kind_of_row="step", name="build_student", variant="", tokens=tokens, status="error",
                         error=_err(e)), on_row)
    if student is not None:
        for b in backends:
            guarded("red_step", b, lambda b=b: bench_step(student, batches, b, steps, warmup, lr=lr, memory=memory))
        if include_compile:
            if deadline is not None and deadline - time.perf_counter() < compile_reserve_s:
                _emit(rows, dict(kind_of_row="step", name="red_step", variant="compile", tokens=tokens,
                                 status="skipped", error=f"less than {compile_reserve_s:.0f} s of the time budget left"),
                      on_row)
            else:
                guarded("red_step", "compile", lambda: bench_step(student, batches, "torch", steps, warmup,
                                                                  compile=True, lr=lr, memory=memory))
        if include_op_counts:
            for b in backends:
                if out_of_time():
                    res["op_counts"][b] = dict(status="skipped", error="time budget")
                    continue
                try:
                    res["op_counts"][b] = dict(op_counts(student, batches, backend=b, lr=lr), status="ok")
                except Exception as e:  # noqa: BLE001 - recorded; the measurements go on
                    res["op_counts"][b] = dict(status="error", error=_err(e))
                    _free(dev)
                if on_row is not None:
                    oc = res["op_counts"][b]
                    on_row(dict(kind_of_row="op_counts", name="op_counts", variant=b, status=oc["status"],
                                error=oc.get("error", ""), ratio=oc.get("ratio_micro_batch")))
        if include_ordinary:
            def ordinary():
                nonlocal student
                model = ordinary_model(student, dtype)
                student = None  # the student's optimizer state is gone already; free its tensors too
                _free(dev)
                try:
                    return bench_ordinary(model, batches, steps, warmup, lr=lr, memory=memory)
                finally:
                    del model
                    _free(dev)
            guarded("ordinary_step", "ordinary", ordinary)
    del student
    _free(dev)
    res["ratios"] = step_ratios(rows)
    return res


def step_ratios(rows: list[dict]) -> dict:
    """Ratios between the step rows of one run (None where a row is missing):
    triton/torch tokens/s, step memory and peak memory, compile/torch tokens/s, each red
    variant's tokens/s over ordinary training's and that over the floor, and the floor
    ordinary/(ordinary + teacher forward) that a distillation step cannot beat."""
    ok = {r["variant"]: r for r in rows if r.get("status") == "ok"}

    def ratio(a, b, key):
        x, y = ok.get(a, {}).get(key), ok.get(b, {}).get(key)
        return x / y if x is not None and y else None

    out = {"triton_over_torch_tokens_per_s": ratio("triton", "torch", "tokens_per_s"),
           "triton_over_torch_step_mem": ratio("triton", "torch", "step_mem_bytes"),
           "triton_over_torch_peak_mem": ratio("triton", "torch", "peak_mem_bytes"),
           "compile_over_torch_tokens_per_s": ratio("compile", "torch", "tokens_per_s")}
    o, t = ok.get("ordinary", {}).get("ms"), ok.get("teacher_forward", {}).get("ms")
    floor = o / (o + t) if o is not None and t is not None else None
    for v in STEP_VARIANTS:
        r = out[f"{v}_over_ordinary_tokens_per_s"] = ratio(v, "ordinary", "tokens_per_s")
        out[f"{v}_of_floor"] = r / floor if r is not None and floor else None
    out["floor_ratio"] = floor
    return out


def check_bench_args(arch, hidden_size, seq_len, batch_size, steps, backends, grad_accum: int = 1) -> None:
    """RedError (one line, the fix) for arguments that cannot be benchmarked."""
    from red.model.arch import check_width

    check_width(arch.hidden_size, int(hidden_size))
    if seq_len < 2:
        raise RedError(f"--seq-len {seq_len} must be at least 2 (the LM loss predicts the next token)")
    if batch_size < 1 or steps < 1 or grad_accum < 1:
        raise RedError("--batch-size, --grad-accum and --steps must be at least 1")
    bad = [b for b in backends if b not in ("torch", "triton")]
    if bad or not backends:
        raise RedError(f"--kernels {','.join(backends)}: give a comma-separated list of torch and triton")


# ------------------------------------------------------------------ `red bench`
def run_bench(teacher_dir, hidden_size: int, seq_len: int, batch_size: int = 1, kernels: str | None = None,
              layers: int | None = None, steps: int = 3, device: str = "auto", precision: str = "auto",
              include_compile: bool = False, include_ordinary: bool = True, grad_accum: int = 1,
              include_op_counts: bool = True, on_row=None) -> dict:
    """What ``red bench`` does: load the teacher in ``teacher_dir`` and :func:`bench_teacher` it.

    ``kernels``: comma-separated backends ("torch,triton"); default both on CUDA, only
    torch on the CPU (the Triton interpreter is far too slow to time; "triton" on the CPU is
    timed only when asked for and TRITON_INTERPRET=1 was set before start). On the CPU the
    teacher is cut to its first ``CPU_DEFAULT_LAYERS`` layers unless ``layers`` is given;
    the result's ``notes`` say so, and that the numbers are CPU numbers.
    """
    from red.train.startup import resolve_device
    from red.model.teacher import check_teacher_files, load_teacher, read_teacher_config
    from red.model.arch import Arch
    from red.train.trainer import resolve_precision

    if precision not in PRECISION_CHOICES:
        raise RedError(f"--precision {precision!r} is not one of auto, bf16, fp32")
    from red.commands.checks import check_bench_inputs

    check_bench_inputs(teacher_dir, hidden_size, seq_len)  # a missing teacher, a width or length it cannot take
    tcfg = read_teacher_config(teacher_dir)
    check_teacher_files(teacher_dir)
    arch = Arch.from_config(tcfg)
    dev = resolve_device(device)
    backends, why_not_triton = _parse_kernels(kernels, dev)
    check_bench_args(arch, hidden_size, seq_len, batch_size, steps, backends, grad_accum)
    if layers is not None and not 1 <= layers <= arch.num_layers:
        raise RedError(f"--layers {layers} must be between 1 and the teacher's {arch.num_layers} layers")
    notes = []
    if dev.type == "cpu":
        notes.append(f"CPU numbers: measured on the CPU ({torch.get_num_threads()} torch threads), not a GPU; "
                     "they show the relative cost of the parts of a step, not GPU throughput")
        if layers is None and arch.num_layers > CPU_DEFAULT_LAYERS:
            layers = CPU_DEFAULT_LAYERS
            notes.append(f"layers shrunk to the first {layers} of {arch.num_layers} to keep a CPU run short; "
                         "pass --layers N to time more")
    if why_not_triton:
        notes.append(f"triton backend not timed: {why_not_triton}")
    elif dev.type == "cpu" and "triton" in backends:
        notes.append("triton backend timed in the Triton interpreter: its times say nothing about GPU kernels")
    dtype = resolve_precision(precision, dev)
    teacher, _ = load_teacher(teacher_dir, dtype=dtype, device=dev, with_tokenizer=False)
    res = bench_teacher(teacher, hidden_size, seq_len, batch_size, backends, layers=layers,
                        include_compile=include_compile, include_ordinary=include_ordinary,
                        include_op_counts=include_op_counts, grad_accum=grad_accum, steps=steps, notes=notes,
                        on_row=on_row)
    res["teacher"]["path"] = str(teacher_dir)
    res["teacher"]["num_layers_total"] = arch.num_layers
    return res


def _parse_kernels(kernels: str | None, dev: torch.device) -> tuple[tuple[str, ...], str]:
    """The backends to time and, when the default leaves triton out, why."""
    if kernels is None:
        if dev.type != "cuda":
            return ("torch",), ("on the CPU it runs in the Triton interpreter, orders of magnitude slower than "
                                "compiled kernels; pass --kernels torch,triton with TRITON_INTERPRET=1 set to time "
                                "it anyway")
        ok, why = red_kernels._backend.triton_runnable(torch.empty(0, device=dev))
        return (("torch", "triton"), "") if ok else (("torch",), why)
    names = tuple(k.strip().lower() for k in kernels.split(",") if k.strip())
    bad = [k for k in names if k not in ("torch", "triton")]
    if bad or not names:
        raise RedError(f"--kernels {kernels!r}: give a comma-separated list of torch and triton")
    if "triton" in names:
        probe = torch.empty(0, device=dev)
        ok, why = red_kernels._backend.triton_runnable(probe)
        if not ok:
            raise RedError(f"--kernels triton cannot run on {dev.type}: {why}; use --kernels torch")
    return tuple(dict.fromkeys(names)), ""


def format_report(res: dict) -> str:
    """The human-readable table of a :func:`bench_teacher` result."""
    t = res["teacher"]
    ga = res.get("grad_accum", 1)
    lines = [f"red bench: {t.get('path', t['model_type'])}  {t['model_type']} D={t['hidden_size']} "
             f"layers={t['num_layers']}" + (f"/{t['num_layers_total']}" if t.get("num_layers_total") else "")
             + f" V={t['vocab_size']} -> d={res['hidden_size']}; {ga} micro-batch(es) of {res['batch_size']}x"
             f"{res['seq_len']} tokens a step; {res['dtype']} on {res['device_name']}"]
    lines += [f"note: {n}" for n in res["notes"]]
    c = res.get("ceilings")
    if c and "matmul_tflops" in c:
        lines.append(f"ceilings (measured now): {c['dtype']} matmul {c['matmul_tflops']:.3g} TFLOP/s, "
                     f"copy {c['copy_tbps']:.3g} TB/s (read+write)")
    elif c:
        lines.append(f"ceilings: {c.get('error', 'not measured')}")
    if res["kernels"]:
        lines.append("")
        lines.append(_table(["kernel", "impl", "ms", "x eager", "mem MB", "eager mem/this", "achieved", "of ceiling",
                             "shape"], [
            [r["name"], r.get("impl", ""), _f(r.get("ms")), _f(r.get("speedup_vs_eager"), ".2f"),
             _mb(r.get("step_mem_bytes")), _f(r.get("eager_mem_over_this"), ".2f"),
             f"{r['rate']:.3g} {r['rate_unit']}" if r.get("status") == "ok" else r.get("status", ""),
             f"{100 * r['frac_of_ceiling']:.1f}%" if r.get("frac_of_ceiling") is not None else "-",
             r.get("shape", "") if r.get("status") == "ok" else r.get("error", "")[:80]]
            for r in res["kernels"]]))
        lines.append("kernel rows: one micro-batch's shapes, forward + backward where the step differentiates the op; "
                     "eager = the naive_* composition; mem = peak above the inputs")
    if res["steps"]:
        lines.append("")
        lines.append(_table(["step", "variant", "ms", "tokens/s", "step mem MB", "peak mem MB", "status"], [
            [r["name"], r.get("variant", ""), _f(r.get("ms")), _f(r.get("tokens_per_s"), ".0f"),
             _mb(r.get("step_mem_bytes")), _mb(r.get("peak_mem_bytes")),
             r.get("status", "") if r.get("status") == "ok" else f"{r.get('status')}: {r.get('error', '')[:80]}"]
            for r in res["steps"]]))
        lines.append("step mem = peak above the resident weights and optimizer state; peak mem = resident + step mem"
                     + ("; CPU memory sampled at aten-op boundaries" if res["device"] == "cpu" else ""))
    r = res.get("ratios") or {}
    parts = []
    names = [("triton_over_torch_tokens_per_s", "triton/torch tokens/s"),
             ("triton_over_torch_step_mem", "triton/torch step mem"),
             ("triton_over_torch_peak_mem", "triton/torch peak mem"),
             ("compile_over_torch_tokens_per_s", "compile/torch tokens/s")]
    for v in STEP_VARIANTS:
        names += [(f"{v}_over_ordinary_tokens_per_s", f"red[{v}]/ordinary tokens/s"),
                  (f"{v}_of_floor", f"red[{v}] of the floor")]
    names.append(("floor_ratio", "floor ordinary/(ordinary+teacher fwd)"))
    for key, label in names:
        if r.get(key) is not None:
            parts.append(f"{label} {r[key]:.2f}" + ("x" if "tokens" in key else ""))
    if parts:
        lines.append("")
        lines.append("ratios: " + "; ".join(parts))
    for b, oc in (res.get("op_counts") or {}).items():
        lines.append("")
        lines.append(format_op_counts(oc) if oc.get("status") == "ok" else
                     f"op counts ({b}): {oc.get('status')}: {oc.get('error', '')}")
    return "\n".join(lines)


# ------------------------------------------------------------------ small helpers
def versions() -> dict:
    out = {"torch": torch.__version__, "python": platform.python_version()}
    try:
        import triton

        out["triton"] = triton.__version__
    except Exception:  # noqa: BLE001
        out["triton"] = None
    try:
        import transformers

        out["transformers"] = transformers.__version__
    except Exception:  # noqa: BLE001
        out["transformers"] = None
    return out


def device_name(dev: torch.device) -> str:
    if dev.type == "cuda":
        return torch.cuda.get_device_name(dev)
    return f"CPU ({platform.machine()}, {os.cpu_count()} cores, {torch.get_num_threads()} torch threads)"


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).replace("torch.", "")


def _err(e: BaseException) -> str:
    return f"{type(e).__name__}: {str(e).splitlines()[0][:300] if str(e) else ''}"


def _emit(rows: list, row: dict, on_row):
    rows.append(row)
    if on_row is not None:
        on_row(row)
    return row


def _f(v, fmt=".4g"):
    return "-" if v is None or (isinstance(v, float) and math.isnan(v)) else format(v, fmt)


def _mb(v):
    return "-" if v is None else f"{v / MB:.1f}"


def _table(header, rows) -> str:
    rows = [[str(c) for c in r] for r in rows]
    widths = [max(len(h), *(len(r[i]) for r in rows)) for i, h in enumerate(header)]
    out = ["  ".join(h.ljust(w) for h, w in zip(header, widths)).rstrip()]
    out += ["  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in rows]
    return "\n".join(out)
