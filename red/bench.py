"""Throughput and memory of red's kernels and of its training step on a given teacher.

``red bench`` runs :func:`run_bench`; the pieces are public so that scripts (the GPU suite,
``benchmarks/cpu_step.py``) measure the product itself, not a copy of it:

- :func:`measure_ceilings`: the device's matmul TFLOP/s (in the compute dtype) and copy
  bandwidth (read + write), measured in the same run as everything else.
- :func:`bench_kernels`: every ``red_kernels`` op the step uses, at the teacher's shapes
  (:func:`kernel_shapes`), forward (+ backward where the step differentiates it), per
  backend: time, work (bytes or flops, counted as documented in :func:`kernel_specs`),
  achieved TB/s or TFLOP/s and the fraction of the ceiling.
- :func:`bench_step`: ``red.trainer.train_step`` (forward, backward, gradient norm,
  clipping, AdamW from ``red.trainer.make_optimizer``) of a ``ProjectedStudent`` built by
  ``red.pipeline.build_student``, under one ``red_kernels`` backend, optionally with every
  ``StudentLayer`` wrapped in ``torch.compile``.
- :func:`ordinary_model` + :func:`bench_ordinary`: the yardstick, ordinary training of the
  exported student as a plain ``transformers`` model (``red.export.student_config`` +
  ``merged_state_dict``) on the same tokens: forward with labels, backward, clipping,
  AdamW (fused on CUDA), in the same dtype on the same device.
- :func:`bench_teacher_forward`: the teacher's forward alone (no grad). An ordinary step
  plus one teacher forward is the floor of a distillation step, so
  ``floor_ratio = ordinary_ms / (ordinary_ms + teacher_forward_ms)`` is the best fraction
  of ordinary-training throughput a distillation step can reach.
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

import contextlib
import ctypes
import gc
import math
import os
import platform
import statistics
import time
from pathlib import Path

import torch

import red_kernels

from .errors import RedError

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
    from torch.utils._python_dispatch import TorchDispatchMode

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
    any compilation) and ``step_mem_bytes`` (peak above the level at the start of the timed
    calls; None when not measurable). On CUDA the peak is read over the timed calls
    themselves; on the CPU it needs an extra, untimed call under a dispatch mode.
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
    ts = []
    for _ in range(max(reps, 1)):
        t0 = time.perf_counter()
        fn()
        _sync(device)
        ts.append((time.perf_counter() - t0) * 1e3)
    if device.type == "cuda":
        mem = max(0, torch.cuda.max_memory_allocated(device) - base) if memory else None
    elif memory and CPU_MEMORY_AVAILABLE:
        mem = cpu_peak_extra_bytes(fn)
    return {"ms": statistics.median(ts), "ms_all": ts, "first_ms": first, "step_mem_bytes": mem}


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
    """The shapes the step hands to red_kernels for a teacher ``arch`` (red.teacher.Arch),
    student width ``hidden_size`` and ``tokens`` = batch x sequence length."""
    return dict(N=int(tokens), D=arch.hidden_size, d=int(hidden_size), q_out=arch.num_heads * arch.head_dim,
                kv_out=arch.num_kv_heads * arch.head_dim, I=arch.intermediate_size, V=arch.vocab_size,
                eps=float(arch.rms_norm_eps))


def kernel_specs(shapes: dict, device, dtype: torch.dtype, seed: int = 0) -> list[dict]:
    """One spec per red_kernels op, with inputs made as the step makes them (activations in
    the compute dtype ``dtype``, projections fp32 masters). Work is what the op must do at
    least: flops of its GEMMs (forward and backward), or bytes it must move for the
    memory-bound ones. Each spec: name, shape (text), make() -> (args, leaves, grads),
    fn(*args) -> output(s), kind ("flop" | "bytes"), work, backward (bool)."""
    N, D, d, qo, kvo, I, V = (shapes[k] for k in ("N", "D", "d", "q_out", "kv_out", "I", "V"))
    eps = shapes.get("eps", 1e-5)
    dev = torch.device(device)
    es = torch.empty((), dtype=dtype).element_size()
    g = torch.Generator(device=dev).manual_seed(seed)

    def act(*s, scale=1.0, grad=False):
        t = (torch.randn(*s, device=dev, generator=g) * scale).to(dtype)
        return t.requires_grad_(grad)

    def master(*s, scale=0.02):
        return (torch.randn(*s, device=dev, generator=g) * scale).requires_grad_(True)

    idx = torch.randperm(D, device=dev, generator=g)[:d].sort().values
    specs = []

    def spec(name, shape, make, fn, kind, work, backward=True):
        specs.append(dict(name=name, shape=shape, make=make, fn=fn, kind=kind, work=float(work), backward=backward))

    spec("rmsnorm_with_stats", f"x[{N},{D}]", lambda: ((act(N, D), act(D)), []),
         lambda x, w: red_kernels.rmsnorm_with_stats(x, w, eps), "bytes", 2 * N * D * es, backward=False)
    # clone MSE of the widest same-space term (gate/up, [N, I]); fwd reads s, t and writes
    # ds, bwd reads ds and writes the scaled gradient
    spec("mse", f"s,t[{N},{I}]", lambda: ((act(N, I, grad=True), act(N, I)), [0]),
         lambda s, t: red_kernels.mse_with_target_ms(s, t)[0], "bytes", 5 * N * I * es)
    spec("projected_mse_student_space", f"y_s[{N},{d}] y_t[{N},{D}] P[{D},{d}]",
         lambda: ((act(N, d, grad=True), act(N, D), master(D, d)), [0, 2]),
         red_kernels.projected_mse_student_space, "flop", 2 * 2 * N * D * d)
    spec("projected_mse", f"h_s[{N},{d}] P[{D},{d}] h_t[{N},{D}]",
         lambda: ((act(N, d, grad=True), master(D, d), act(N, D)), [0, 1]),
         red_kernels.projected_mse, "flop", 3 * 2 * N * D * d)
    spec("selected_mse", f"h_s[{N},{d}] h_t[{N},{D}]", lambda: ((act(N, d, grad=True), idx, act(N, D)), [0]),
         red_kernels.selected_mse, "bytes", es * N * (D + 2 * d))
    outs = (qo, kvo, kvo)
    wq, wk, wv = (act(o, D, scale=0.02) for o in outs)
    spec("projected_linear_group_qkv", f"x[{N},{d}] W_t[{qo}|{kvo}|{kvo},{D}] P[{D},{d}]x3",
         lambda: ((act(N, d, grad=True), [wq, wk, wv], [master(D, d) for _ in range(3)]), [0, (2, 0), (2, 1), (2, 2)]),
         lambda x, ws, ps: red_kernels.projected_linear_group(x, ws, ps, side="in"), "flop",
         6 * N * d * sum(outs) + 4 * D * d * sum(outs))
    w_down = act(D, I, scale=0.02)
    spec("projected_linear_down", f"x[{N},{I}] W_t[{D},{I}] P[{D},{d}]",
         lambda: ((act(N, I, grad=True), w_down, master(D, d)), [0, 2]),
         lambda x, w, p: red_kernels.projected_linear(x, w, p, side="out"), "flop", 6 * N * I * d + 4 * D * I * d)
    w_lm = act(V, D, scale=0.02)
    labels = torch.randint(0, V, (N,), device=dev, generator=g)
    spec("fused_linear_kl", f"h_s[{N},{d}] w_s[{V},{d}] h_t[{N},{D}] w_t[{V},{D}]",
         lambda: ((act(N, d, grad=True), act(V, d, scale=0.02, grad=True), act(N, D), w_lm, labels), [0, 1]),
         lambda *a: red_kernels.fused_linear_kl(*a)[0], "flop", 2 * N * V * (d + D) + 2 * 2 * N * V * d)
    w_up = act(I, D, scale=0.02)
    spec("gather_columns", f"W[{I},{D}] -> [{I},{d}]", lambda: ((w_up, idx), []),
         red_kernels.gather_columns, "bytes", 2 * I * d * es, backward=False)
    return specs


def _leaf(args, path):
    if isinstance(path, int):
        return args[path]
    return args[path[0]][path[1]]


def _kernel_runner(spec: dict, args, leaves):
    grads = {}

    def run():
        out = spec["fn"](*args)
        if not spec["backward"]:
            return
        outs = [o for o in (out if isinstance(out, (tuple, list)) else (out,)) if o.requires_grad]
        if not grads:  # fixed upstream gradients, made once (random: no shortcut for ones)
            for i, o in enumerate(outs):
                grads[i] = torch.randn_like(o) if o.dim() else torch.ones_like(o)
        torch.autograd.backward(outs, [grads[i] for i in range(len(outs))])
        for p in leaves:
            _leaf(args, p).grad = None
    return run


def bench_kernels(shapes: dict, device, dtype: torch.dtype, backends=("torch",), ceilings: dict | None = None,
                  seed: int = 0, deadline: float | None = None, on_row=None) -> list[dict]:
    """Time every red_kernels op (:func:`kernel_specs`) at ``shapes`` on ``device`` under each
    backend. Rows: name, backend, shape, ms, kind, work, rate (TB/s or TFLOP/s), rate_unit,
    ceiling, frac_of_ceiling, status ("ok" | "error" | "skipped"), error."""
    device = torch.device(device)
    rows = []
    try:
        specs = kernel_specs(shapes, device, dtype, seed)
    except Exception as e:  # noqa: BLE001 - e.g. out of memory making the inputs
        row = dict(kind_of_row="kernel", name="inputs", backend="", status="error", error=_err(e))
        _emit(rows, row, on_row)
        return rows
    for backend in backends:
        for spec in specs:
            row = dict(kind_of_row="kernel", name=spec["name"], backend=backend, shape=spec["shape"],
                       kind=spec["kind"], work=spec["work"])
            if deadline is not None and time.perf_counter() > deadline:
                _emit(rows, dict(row, status="skipped", error="time budget"), on_row)
                continue
            try:
                with red_kernels.use_backend(backend):
                    args, leaves = spec["make"]()
                    ms = time_kernel_ms(_kernel_runner(spec, args, leaves), device)
                del args
                per_s = spec["work"] / (ms * 1e-3)
                if spec["kind"] == "flop":
                    rate, unit, ceil = per_s / 1e12, "TFLOP/s", (ceilings or {}).get("matmul_tflops")
                else:
                    rate, unit, ceil = per_s / 1e12, "TB/s", (ceilings or {}).get("copy_tbps")
                row.update(ms=ms, rate=rate, rate_unit=unit, ceiling=ceil,
                           frac_of_ceiling=rate / ceil if ceil else None, status="ok")
            except Exception as e:  # noqa: BLE001 - recorded, the next op still runs
                row.update(status="error", error=_err(e))
            if row["status"] == "error":
                _free(device)  # after the except block, whose traceback holds the inputs
            _emit(rows, row, on_row)
    del specs
    _free(device)
    return rows


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


def random_teacher(config, device="cpu", dtype: torch.dtype = torch.float32, seed: int = 0):
    """A frozen teacher with random weights made from a transformers ``config`` directly on
    ``device`` (no download, no host copy of the weights): for benchmarks only."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    return model.to(device).eval().requires_grad_(False)


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


def bench_step(student, input_ids: torch.Tensor, backend: str = "torch", steps: int = 3, warmup: int = 1,
               compile: bool = False, loss=None, lr: float = 1e-5, max_norm: float = 1.0,
               memory: bool = True) -> dict:
    """Time ``red.trainer.train_step`` of ``student`` on the micro-batch ``input_ids`` with the
    red_kernels ``backend`` forced (``compile``: each StudentLayer under torch.compile, two
    warm-up steps). A fresh optimizer from ``red.trainer.make_optimizer`` is used and
    dropped; ``student`` is trained by these steps (``warmup + steps`` of them, plus one
    on the CPU for memory)."""
    from . import trainer
    from .student import LossSettings

    device = input_ids.device
    loss = loss or LossSettings()
    tokens = input_ids.numel()
    optimizer = trainer.make_optimizer(student.trainable_parameters(), lr, device)
    batches = [input_ids]
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
    row = _step_row("red_step", "compile" if compile else backend, tokens, m, resident)
    row["loss"] = last.get("loss")
    if compile:
        row["compile_s"] = (m["first_ms"] or 0.0) / 1e3
    return row


def ordinary_model(student, dtype: torch.dtype | None = None):
    """The exported student as a plain transformers model, in memory, trainable: the
    model ``red export`` would write (``student_config`` + ``merged_state_dict``), on the
    student's device in ``dtype`` (default the compute dtype)."""
    from transformers import AutoModelForCausalLM

    from .export import merged_state_dict, student_config

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


def bench_ordinary(model, input_ids: torch.Tensor, steps: int = 3, warmup: int = 1, lr: float = 1e-5,
                   max_norm: float = 1.0, memory: bool = True) -> dict:
    """Time ordinary training of a transformers causal LM on ``input_ids``: forward with
    labels (the model's own shifted cross-entropy), backward, gradient clipping and AdamW
    (fused on CUDA, same hyper-parameters as red's), the yardstick of :func:`bench_step`."""
    device = input_ids.device
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=lr, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0,
                            fused=device.type == "cuda")

    def step():
        out = model(input_ids=input_ids, labels=input_ids, use_cache=False)
        out.loss.backward()
        torch.nn.utils.clip_grad_norm_(params, max_norm)
        opt.step()
        opt.zero_grad(set_to_none=True)

    try:
        m = measure(step, device, warmup=warmup, reps=steps, memory=memory)
        resident = tensor_bytes(model, opt)
    finally:
        opt.zero_grad(set_to_none=True)
        del opt
        _free(device)
    return _step_row("ordinary_step", "ordinary", input_ids.numel(), m, resident)


def bench_teacher_forward(teacher, input_ids: torch.Tensor, steps: int = 3, warmup: int = 1,
                          memory: bool = True) -> dict:
    """Time the teacher's own forward (no grad, logits included) on ``input_ids``."""
    def fwd():
        with torch.no_grad():
            teacher(input_ids=input_ids, use_cache=False)

    m = measure(fwd, input_ids.device, warmup=warmup, reps=steps, memory=memory)
    return _step_row("teacher_forward", "teacher_forward", input_ids.numel(), m, tensor_bytes(teacher))


def _step_row(name, variant, tokens, m, resident) -> dict:
    mem = m["step_mem_bytes"]
    return dict(kind_of_row="step", name=name, variant=variant, status="ok", tokens=int(tokens), ms=m["ms"],
                ms_all=m["ms_all"], tokens_per_s=tokens / (m["ms"] * 1e-3), step_mem_bytes=mem,
                resident_bytes=resident, peak_mem_bytes=None if mem is None else resident + mem)


# ------------------------------------------------------------------ one teacher, everything
def bench_teacher(teacher, hidden_size: int, seq_len: int, batch_size: int = 1, backends=("torch", "triton"),
                  layers: int | None = None, include_compile: bool = False, include_ordinary: bool = True,
                  include_teacher_forward: bool = True, include_kernels: bool = True, steps: int = 3,
                  warmup: int = 1, init: str = "random-select", seed: int = 0, lr: float = 1e-5,
                  device: str = "auto", precision: str = "auto", memory: bool = True,
                  deadline: float | None = None, compile_reserve_s: float = 0.0, notes=None, on_row=None) -> dict:
    """Benchmark red on one teacher; returns a JSON-ready dict (see the module docstring).

    ``teacher``: a loaded transformers model (used on its own device and dtype, modified in
    place when ``layers`` is given) or a folder (loaded with ``red.teacher.load_teacher`` on
    ``device`` in the dtype of ``precision``). The student (width ``hidden_size``, init
    ``init``: "random-select" is a channel selection like the red preset's, without
    calibration) is built by ``red.pipeline.build_student``; every step variant trains it
    with ``red.trainer.train_step``. Token ids are random ([batch_size, seq_len], seeded).

    Keys: device, device_name, dtype, teacher (shape facts), hidden_size, batch_size,
    seq_len, tokens_per_step, backends, notes, versions, ceilings, kernels (rows), steps
    (rows), ratios. ``on_row(row)`` is called as soon as each row is measured.
    ``deadline`` (a ``time.perf_counter()`` value): later measurements are "skipped" rows;
    the compile variant also needs ``compile_reserve_s`` seconds left.
    """
    from .pipeline import build_student, resolve_device
    from .teacher import Arch, load_teacher
    from .trainer import resolve_precision

    if isinstance(teacher, (str, Path)):
        dev = resolve_device(device)
        teacher, _ = load_teacher(teacher, dtype=resolve_precision(precision, dev), device=dev, with_tokenizer=False)
    if layers is not None:
        shrink_layers(teacher, int(layers))
    arch = Arch.from_config(teacher.config)
    check_bench_args(arch, hidden_size, seq_len, batch_size, steps, backends)
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
               tokens_per_step=int(batch_size * seq_len), backends=list(backends), init=init,
               notes=list(notes or []), versions=versions(), ceilings=None, kernels=[], steps=[], ratios={})
    if dev.type == "cpu":
        res["torch_threads"] = torch.get_num_threads()
    out_of_time = lambda: deadline is not None and time.perf_counter() > deadline  # noqa: E731

    if include_kernels:
        try:
            res["ceilings"] = measure_ceilings(dev, dtype)
        except Exception as e:  # noqa: BLE001
            res["ceilings"] = dict(status="error", error=_err(e))
        res["kernels"] = bench_kernels(kernel_shapes(arch, hidden_size, batch_size * seq_len), dev, dtype, backends,
                                       res["ceilings"], seed, deadline, on_row)

    g = torch.Generator(device="cpu").manual_seed(seed)
    ids = torch.randint(0, arch.vocab_size, (batch_size, seq_len), generator=g).to(dev)
    tokens = ids.numel()
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
        guarded("teacher_forward", "teacher_forward", lambda: bench_teacher_forward(teacher, ids, steps, warmup, memory))
    student = None
    try:
        student = build_student(teacher, hidden_size, init=init, seed=seed)
    except Exception as e:  # noqa: BLE001
        _emit(rows, dict(kind_of_row="step", name="build_student", variant="", tokens=tokens, status="error",
                         error=_err(e)), on_row)
    if student is not None:
        for b in backends:
            guarded("red_step", b, lambda b=b: bench_step(student, ids, b, steps, warmup, lr=lr, memory=memory))
        if include_compile:
            if deadline is not None and deadline - time.perf_counter() < compile_reserve_s:
                _emit(rows, dict(kind_of_row="step", name="red_step", variant="compile", tokens=tokens,
                                 status="skipped", error=f"less than {compile_reserve_s:.0f} s of the time budget left"),
                      on_row)
            else:
                guarded("red_step", "compile", lambda: bench_step(student, ids, "torch", steps, warmup, compile=True,
                                                                  lr=lr, memory=memory))
        if include_ordinary:
            def ordinary():
                nonlocal student
                model = ordinary_model(student, dtype)
                student = None  # the student's optimizer state is gone already; free its tensors too
                _free(dev)
                try:
                    return bench_ordinary(model, ids, steps, warmup, lr=lr, memory=memory)
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
    variant's tokens/s over ordinary training's, and the floor ordinary/(ordinary + teacher
    forward) that a distillation step cannot beat."""
    ok = {r["variant"]: r for r in rows if r.get("status") == "ok"}

    def ratio(a, b, key):
        x, y = ok.get(a, {}).get(key), ok.get(b, {}).get(key)
        return x / y if x is not None and y else None

    out = {"triton_over_torch_tokens_per_s": ratio("triton", "torch", "tokens_per_s"),
           "triton_over_torch_step_mem": ratio("triton", "torch", "step_mem_bytes"),
           "triton_over_torch_peak_mem": ratio("triton", "torch", "peak_mem_bytes"),
           "compile_over_torch_tokens_per_s": ratio("compile", "torch", "tokens_per_s")}
    for v in STEP_VARIANTS:
        out[f"{v}_over_ordinary_tokens_per_s"] = ratio(v, "ordinary", "tokens_per_s")
    o, t = ok.get("ordinary", {}).get("ms"), ok.get("teacher_forward", {}).get("ms")
    out["floor_ratio"] = o / (o + t) if o is not None and t is not None else None
    return out


def check_bench_args(arch, hidden_size, seq_len, batch_size, steps, backends) -> None:
    """RedError (one line, the fix) for arguments that cannot be benchmarked."""
    D = arch.hidden_size
    if not 0 < int(hidden_size) < D:
        raise RedError(f"--hidden-size {hidden_size} must be between 1 and {D - 1} (the teacher's width is {D})")
    if seq_len < 2:
        raise RedError(f"--seq-len {seq_len} must be at least 2 (the LM loss predicts the next token)")
    if batch_size < 1 or steps < 1:
        raise RedError("--batch-size and --steps must be at least 1")
    bad = [b for b in backends if b not in ("torch", "triton")]
    if bad or not backends:
        raise RedError(f"--kernels {','.join(backends)}: give a comma-separated list of torch and triton")


# ------------------------------------------------------------------ `red bench`
def run_bench(teacher_dir, hidden_size: int, seq_len: int, batch_size: int = 1, kernels: str | None = None,
              layers: int | None = None, steps: int = 3, device: str = "auto", precision: str = "auto",
              include_compile: bool = False, include_ordinary: bool = True, on_row=None) -> dict:
    """What ``red bench`` does: load the teacher in ``teacher_dir`` and :func:`bench_teacher` it.

    ``kernels``: comma-separated backends ("torch,triton"); default both on CUDA, only
    torch on the CPU (the Triton interpreter is far too slow to time; "triton" on the CPU is
    timed only when asked for and TRITON_INTERPRET=1 was set before start). On the CPU the
    teacher is cut to its first ``CPU_DEFAULT_LAYERS`` layers unless ``layers`` is given;
    the result's ``notes`` say so, and that the numbers are CPU numbers.
    """
    from .pipeline import resolve_device
    from .teacher import Arch, check_teacher_files, load_teacher, read_teacher_config
    from .trainer import resolve_precision

    if precision not in ("auto", "bf16", "fp32"):
        raise RedError(f"--precision {precision!r} is not one of auto, bf16, fp32")
    from .inputs import check_bench_inputs

    check_bench_inputs(teacher_dir, hidden_size, seq_len)  # a missing teacher, a width or length it cannot take
    tcfg = read_teacher_config(teacher_dir)
    check_teacher_files(teacher_dir)
    arch = Arch.from_config(tcfg)
    dev = resolve_device(device)
    backends, why_not_triton = _parse_kernels(kernels, dev)
    check_bench_args(arch, hidden_size, seq_len, batch_size, steps, backends)
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
                        include_compile=include_compile, include_ordinary=include_ordinary, steps=steps,
                        notes=notes, on_row=on_row)
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
    lines = [f"red bench: {t.get('path', t['model_type'])}  {t['model_type']} D={t['hidden_size']} "
             f"layers={t['num_layers']}" + (f"/{t['num_layers_total']}" if t.get("num_layers_total") else "")
             + f" V={t['vocab_size']} -> d={res['hidden_size']}; {res['batch_size']}x{res['seq_len']} tokens a step; "
             f"{res['dtype']} on {res['device_name']}"]
    lines += [f"note: {n}" for n in res["notes"]]
    c = res.get("ceilings")
    if c and "matmul_tflops" in c:
        lines.append(f"ceilings (measured now): {c['dtype']} matmul {c['matmul_tflops']:.3g} TFLOP/s, "
                     f"copy {c['copy_tbps']:.3g} TB/s (read+write)")
    elif c:
        lines.append(f"ceilings: {c.get('error', 'not measured')}")
    if res["kernels"]:
        lines.append("")
        lines.append(_table(["kernel", "backend", "ms", "achieved", "of ceiling", "shape"], [
            [r["name"], r.get("backend", ""), _f(r.get("ms")),
             f"{r['rate']:.3g} {r['rate_unit']}" if r.get("status") == "ok" else r.get("status", ""),
             f"{100 * r['frac_of_ceiling']:.1f}%" if r.get("frac_of_ceiling") is not None else "-",
             r.get("shape", "") if r.get("status") == "ok" else r.get("error", "")[:80]]
            for r in res["kernels"]]))
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
    names += [(f"{v}_over_ordinary_tokens_per_s", f"red[{v}]/ordinary tokens/s") for v in STEP_VARIANTS]
    names.append(("floor_ratio", "floor ordinary/(ordinary+teacher fwd)"))
    for key, label in names:
        if r.get(key) is not None:
            parts.append(f"{label} {r[key]:.2f}x" if key != "floor_ratio" else f"{label} {r[key]:.2f}")
    if parts:
        lines.append("")
        lines.append("ratios: " + "; ".join(parts))
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
