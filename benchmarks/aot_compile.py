"""Ahead-of-time GPU compile check of every Triton kernel the trainer launches (no GPU needed).

``python benchmarks/aot_compile.py --arch sm_90 --arch sm_80`` compiles each kernel of
``red_kernels`` for the given targets with the dtypes, constexprs, tiles, warps and stages
that the trainer passes at Llama-3.2-3B shapes (teacher D=3072, student d=1536, V=128256),
runs the wheel's ``ptxas -v`` on the PTX for registers and spills, and prints a table
(kernel, variant, target, registers, spills, shared memory, MMA instructions, status).
It exits 1 when a kernel fails to compile (e.g. mixed bf16 x fp32 ``tl.dot`` operands,
which the CPU interpreter accepts) or needs more shared memory than the device has per
block (227 KiB on sm_90, 163 KiB on sm_80), and says which.

What is compiled is what ``triton.jit`` would compile on the GPU: the specs list every
launch of the trainer (bf16 regime and ``--precision fp32``: the LM head's ``_kl_ce_kernel``
and ``_acc_tn_kernel``, the clone taps' ``_mse_kernel``) and of calibration
(``_rmsnorm_stats_kernel``), built from each op's own ``*_meta(on_gpu=True, ...)``; scalar
arguments are given real-shape values and specialized by triton's rules (an int equal to 1
becomes a constexpr, ints and pointers divisible by 16 get ``tt.divisibility=16``, ints past
2**31 are i64). ``tests/test_aot_compile.py`` checks, under the interpreter, that every launch
of a few bf16 training steps, validation and calibration is covered by :func:`specs`, and
that every bf16 spec was launched.

The kernels must be decorated without the interpreter: run as a script, this file drops
``TRITON_INTERPRET`` from its environment before anything imports triton. Imported from
a process that set it (the CPU tests), :func:`specs` works but :func:`compile_spec` refuses.
"""
from __future__ import annotations

import os
import sys

if __name__ == "__main__" and "TRITON_INTERPRET" in os.environ:
    # triton reads the variable when @triton.jit decorates the kernels (at import):
    # interpreter functions cannot be compiled for a GPU.
    print("aot_compile: ignoring TRITON_INTERPRET (kernels are compiled for the GPU, not interpreted)",
          file=sys.stderr)
    del os.environ["TRITON_INTERPRET"]

import argparse  # noqa: E402
import functools  # noqa: E402
import json  # noqa: E402
import re  # noqa: E402
import subprocess  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
import warnings  # noqa: E402
from concurrent.futures import ProcessPoolExecutor  # noqa: E402
from dataclasses import dataclass  # noqa: E402

import torch  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from importlib import import_module  # noqa: E402

from red_kernels._backend import HAS_TRITON  # noqa: E402

# the package re-exports functions named like its modules (clone_mse, fused_linear_kl)
_common = import_module("red_kernels._common")
_cm = import_module("red_kernels.clone_mse")
_kl = import_module("red_kernels.fused_linear_kl")
_ns = import_module("red_kernels.norm_stats")
default_chunk_rows = _kl.default_chunk_rows

#: Llama-3.2-3B teacher distilled to a width-1536 student; a micro-batch of 4 x 4096 tokens.
LLAMA_3B = dict(D=3072, d=1536, I=8192, heads=24, kv_heads=8, head_dim=128, V=128256, seq=4096, batch=4)

#: --arch name -> (compute capability, max dynamic shared memory per block in bytes, GPUs)
TARGETS = {
    "sm_90": (90, 232448, "H100/H200"),
    "sm_80": (80, 166912, "A100"),
}

#: Constexprs left out when comparing recorded launches with the specs: tile sizes differ
#: between the interpreter and the GPU on purpose, and UPCAST / FIX_BF16 are interpreter
#: workarounds (always False for bf16 on the GPU). Everything else must match.
IGNORED_CONSTEXPR = re.compile(r"^(BLOCK_\w+|GROUP_\w+|UPCAST|FIX_BF16)$")

BF16, FP32, I64, I32 = torch.bfloat16, torch.float32, torch.int64, torch.int32
_DIV16 = [["tt.divisibility", 16]]


def gpu_flags(dtype: torch.dtype, dot: bool = True) -> dict:
    """The interpreter-dependent constexprs as the GPU sets them for operands of ``dtype``.

    ``_common.dot_flags`` on the GPU: bf16/fp16 operands keep tensor cores (UPCAST=False,
    IEEE=False), fp32 operands get exact products (UPCAST=True, IEEE=True).
    ``_common.fix_bf16`` is False off the interpreter.
    """
    out = {"FIX_BF16": False}
    if dot:
        low = dtype in (torch.bfloat16, torch.float16)
        out.update(UPCAST=not low, IEEE=not low)
    return out


@dataclass
class Spec:
    """One GPU launch specialization: a kernel, its runtime arguments at real shapes
    (``torch.dtype`` for a pointer, an int or float for a scalar), constexprs and options."""

    kernel: object
    variant: str
    uses: str
    args: tuple
    constexprs: dict
    num_warps: int | None = None   # None: triton's default, as when the launch passes none
    num_stages: int | None = None
    trainer: bool = True  # False: a combination `red` can launch that the recorded run does not cover

    @property
    def name(self) -> str:
        return kernel_name(self.kernel)

    def record(self) -> dict:
        """The spec in the format of ``_common.launch_signature`` (what ``RECORD`` collects)."""
        fake = tuple(torch.empty(0, dtype=a, device="meta") if isinstance(a, torch.dtype) else a for a in self.args)
        meta = dict(self.constexprs)
        for k in ("num_warps", "num_stages"):
            if getattr(self, k) is not None:
                meta[k] = getattr(self, k)
        return _common.launch_signature(self.kernel, fake, meta)

    def key(self) -> tuple:
        return coverage_key(self.record())


def kernel_name(kernel) -> str:
    fn = getattr(kernel, "fn", kernel)
    return getattr(fn, "__name__", str(fn))


def coverage_key(rec: dict) -> tuple:
    """What must agree between a recorded launch and a spec: kernel, pointer dtypes, scalar
    kinds (ints as "int": i32 vs i64 depends on the shape), constexprs except tiles and the
    interpreter-only flags."""
    sig = tuple((k, "int" if v in ("i32", "i64", "u64") else v) for k, v in rec["signature"].items())
    ce = tuple(sorted((k, v) for k, v in rec["constexprs"].items() if not IGNORED_CONSTEXPR.match(k)))
    return rec["kernel"], sig, ce


def _meta_split(meta: dict) -> tuple[dict, int, int | None]:
    meta = dict(meta)
    return meta, meta.pop("num_warps", None), meta.pop("num_stages", None)


def _spec(kernel, variant, uses, args, meta, extra, **kw) -> Spec:
    ce, warps, stages = _meta_split(meta)
    ce.update(extra)
    return Spec(kernel, variant, uses, tuple(args), ce, warps, stages, **kw)


def specs(shapes: dict = LLAMA_3B) -> list[Spec]:
    """Every launch specialization the trainer (bf16 and --precision fp32) and calibration
    make on the GPU at ``shapes``. Arguments mirror the launch sites in ``red_kernels``."""
    D, d, V = shapes["D"], shapes["d"], shapes["V"]
    T = shapes["seq"] * shapes["batch"]  # tokens of a micro-batch
    S = shapes["seq"]                    # calibration: one sequence per launch
    out: list[Spec] = []
    for dt in (BF16, FP32):
        dn = _common.dtype_name(dt)
        # fp32 accumulation of the student head's dW over logit chunks (fused_linear_kl):
        # acc [V, d] += a^T b with a = the logit gradient chunk [C, V], b = h_s [C, d]
        C = default_chunk_rows(T, V, d)
        out.append(_spec(_common._acc_tn_kernel, dn, "fused_linear_kl dW_head",
                         (FP32, dt, dt, V, d, C, 1, V, d, 1, d, 1.0),
                         _common.acc_tn_meta(True), gpu_flags(dt)))
        # the clone taps (clone_mse): q, k, v, attn, gate, up compare [T, width] activations
        # of widths 3072, 1024, 1024, 3072, 8192, 8192 and the FFN term [T, d = 1536]; all get
        # BLOCK_W = 1024 and strides that are multiples of 16, so W = D stands for them.
        # Training stores g (STORE_G=True); validation runs under no_grad, where nothing
        # needs a gradient and only the sums are made (g is then the partials buffer).
        for train in (True, False):
            out.append(_spec(_cm._mse_kernel, f"{dn} {'train' if train else 'eval'}",
                             "clone_mse (clone q,k,v,attn,gate,up,ffn)",
                             (dt, dt, dt if train else FP32, FP32, FP32, I32, T, D, D, D, D if train else 0,
                              2.0 / (T * D)),
                             _cm.rowwise_meta(True, D), dict(gpu_flags(dt, dot=False), STORE_G=train)))
        # LM head KL + CE: bf16 logit chunks [C, V], int64 labels, fp32 per-row kl/ce
        kl_variants = [(1.0, True, True, "train T=1 (red)"), (40.0, True, True, "train T=40 (lrc)"),
                       (1.0, False, True, "eval T=1"), (40.0, False, True, "eval T=40")]
        if dt == BF16:
            kl_variants.append((1.0, True, False, "train T=1 lm_weight=0"))
        # (the unused top-k / CE-weight pointers are the fp32 kl buffer, K = 0)
        for temp, grad, ce, what in kl_variants:
            out.append(_spec(_kl._kl_ce_kernel, f"{dn} {what}", "fused_linear_kl (LM head)",
                             (dt, dt, I64, FP32, FP32, FP32, FP32, FP32, FP32, C, V, 0, V, V, 1.0 / temp, 1.0,
                              1.0 if ce else 0.0, 0.5, -100),
                             _kl.kl_ce_meta(True, V),
                             dict(HAS_LABELS=True, HAS_CE=ce, SAME_T=temp == 1.0, WRITE_GRAD=grad,
                                  FIX_BF16=False, DIV=0, TOPK=False, CE_W_PTR=False,
                                  BLOCK_K=_kl.topk_block(True, 0))))
        # the divergence options (reverse KL, JSD, teacher top-k, kl_reduction="sum"); the
        # bf16 training launches of --divergence reverse-kl / jsd, --teacher-top-k alone and
        # --kl-reduction sum are recorded by tests/test_aot_compile.py (trainer=True), the
        # combinations and eval variants are compiled too; K = 64 top tokens
        K = 64
        div_variants = [(div, topk, grad) for div in (0, 1, 2) for topk in (False, True) for grad in (True, False)
                        if (div, topk) != (0, False) and (grad or dt == BF16)]
        for div, topk, grad in div_variants:
            name = ("forward-kl", "reverse-kl", "jsd")[div] + (f" top-{K}" if topk else "")
            out.append(_spec(_kl._kl_ce_kernel, f"{dn} {'train' if grad else 'eval'} T=1 {name}",
                             "fused_linear_kl (divergence options)",
                             (dt, dt, I64, FP32, FP32, I64 if topk else FP32, dt if topk else FP32,
                              dt if topk else FP32, FP32, C, V, K if topk else 0, V, V, 1.0, 1.0, 1.0, 0.5, -100),
                             _kl.kl_ce_meta(True, V),
                             dict(HAS_LABELS=True, HAS_CE=True, SAME_T=True, WRITE_GRAD=grad, FIX_BF16=False,
                                  DIV=div, TOPK=topk, CE_W_PTR=False, BLOCK_K=_kl.topk_block(True, K if topk else 0)),
                             trainer=dt == BF16 and grad and (div, topk) in ((1, False), (2, False), (0, True))))
        # kl_reduction="sum" (LRC's scale, T=40): the CE weight comes from a device scalar
        out.append(_spec(_kl._kl_ce_kernel, f"{dn} train T=40 kl_reduction=sum", "fused_linear_kl (divergence options)",
                         (dt, dt, I64, FP32, FP32, FP32, FP32, FP32, FP32, C, V, 0, V, V, 1.0 / 40.0, 1.0, 1.0,
                          0.5, -100),
                         _kl.kl_ce_meta(True, V),
                         dict(HAS_LABELS=True, HAS_CE=True, SAME_T=False, WRITE_GRAD=True, FIX_BF16=False,
                              DIV=0, TOPK=False, CE_W_PTR=True, BLOCK_K=_kl.topk_block(True, 0)),
                         trainer=dt == BF16))
        # calibration: one sequence [S, D] per launch, the teacher's norm weight in its dtype
        out.append(_spec(_ns._rmsnorm_stats_kernel, dn, "rmsnorm_with_stats (calibrate)",
                         (dt, dt, dt, FP32, S, D, D, D, 1e-5),
                         _ns.norm_stats_meta(True, D), gpu_flags(dt, dot=False)))
    return out


def broken_specs(shapes: dict = LLAMA_3B) -> list[Spec]:
    """Deliberately wrong specs, to show the check fails on them (``--broken-only``)."""
    V, d = shapes["V"], shapes["d"]
    C = default_chunk_rows(shapes["seq"] * shapes["batch"], V, d)
    args = (FP32, BF16, BF16, V, d, C, 1, V, d, 1, d, 1.0)
    mixed = _spec(_common._acc_tn_kernel, "BROKEN bf16 x fp32 operands", "negative test",
                  (FP32, BF16, FP32, *args[3:]), _common.acc_tn_meta(True), dict(UPCAST=False, IEEE=False),
                  trainer=False)
    big = dict(_common.acc_tn_meta(True), BLOCK_M=256, BLOCK_N=256, BLOCK_K=128, num_stages=4)  # 4 x 128 KiB staged
    oversize = _spec(_common._acc_tn_kernel, "BROKEN 256x256x128 tiles, 4 stages", "negative test", args, big,
                     gpu_flags(BF16), trainer=False)
    return [mixed, oversize]


# ----------------------------------------------------------------------------- compiling

def compile_signature(spec: Spec) -> tuple[dict, dict, dict]:
    """(signature, constexprs, attrs) for ``ASTSource``, specialized as ``triton.jit`` does on
    the spec's argument values."""
    fn = spec.kernel
    names = list(fn.arg_names)
    runtime = [n for n in names if n not in spec.constexprs]
    if len(runtime) != len(spec.args) or names[:len(runtime)] != runtime:
        raise ValueError(f"{spec.name}: {len(spec.args)} runtime args given for parameters {runtime}")
    sig, ce, attrs = {}, {}, {}
    for i, n in enumerate(names):
        if n in spec.constexprs:
            sig[n], ce[n] = "constexpr", spec.constexprs[n]
            continue
        a = spec.args[i]
        if isinstance(a, torch.dtype):
            sig[n] = "*" + _common.dtype_name(a)
            attrs[(i,)] = _DIV16  # torch allocations and the kernels' row-chunk views are 16-byte aligned
        elif isinstance(a, bool):
            sig[n] = "u1"
        elif isinstance(a, int):
            if a == 1:  # triton.jit turns an int argument equal to 1 into a constexpr
                sig[n], ce[n] = "constexpr", 1
                continue
            sig[n] = "i32" if -2 ** 31 <= a < 2 ** 31 else ("u64" if a >= 2 ** 63 else "i64")
            if a % 16 == 0:
                attrs[(i,)] = _DIV16
        elif isinstance(a, float):
            sig[n] = "fp32"
        else:
            raise TypeError(f"{spec.name}.{n}: unsupported argument {a!r}")
    return sig, ce, attrs


@functools.lru_cache(maxsize=None)
def ptxas_path(cc: int) -> str:
    """The ptxas triton itself runs for capability ``cc`` (triton 3.9 uses its newer
    ``ptxas-blackwell`` from sm_90 on: the bundled CUDA 12.9 ``ptxas`` rejects its PTX 9.x)."""
    try:
        from triton.backends.nvidia.compiler import get_ptxas
    except ImportError:
        get_ptxas = None
    if get_ptxas is not None:
        try:
            return get_ptxas(cc).path
        except TypeError:  # older triton: get_ptxas() without an arch
            return get_ptxas().path
    from triton import knobs
    return knobs.nvidia.ptxas.path


def ptxas_usage(ptx: str, cc: int) -> dict:
    """Registers and spill bytes from ``ptxas -v`` on the PTX."""
    gpu = f"sm_{cc}a" if cc >= 90 else f"sm_{cc}"
    with tempfile.TemporaryDirectory() as tmp:
        src = os.path.join(tmp, "k.ptx")
        with open(src, "w") as f:
            f.write(ptx)
        r = subprocess.run([ptxas_path(cc), "-v", f"--gpu-name={gpu}", src, "-o", os.path.join(tmp, "k.cubin")],
                           capture_output=True, text=True)
    log = r.stdout + r.stderr
    if r.returncode != 0:
        raise RuntimeError(f"ptxas failed ({r.returncode}): {log.strip()[-500:]}")
    regs = re.search(r"Used (\d+) registers", log)
    spill = re.search(r"(\d+) bytes spill stores, (\d+) bytes spill loads", log)
    return {"registers": int(regs.group(1)) if regs else None,
            "spill_stores": int(spill.group(1)) if spill else 0,
            "spill_loads": int(spill.group(2)) if spill else 0}


def _ast_source(fn, sig, ce, attrs):
    from triton.compiler import ASTSource
    try:
        return ASTSource(fn=fn, signature=sig, constexprs=ce, attrs=attrs)
    except TypeError:  # a triton without attrs= (alignment hints are then left out)
        return ASTSource(fn=fn, signature=sig, constexprs=ce)


def _error_summary(e: Exception) -> str:
    lines = [ln.strip() for ln in str(e).strip().splitlines() if ln.strip()]
    # CompilationError: source excerpt, then "at L:C:" and the message last
    msg = lines[-1] if lines else ""
    return f"{type(e).__name__}: {msg}"[:300]


def compile_spec(spec: Spec, arch: str) -> dict:
    """Compile one spec for ``arch``; a result row (never raises for a compile error)."""
    import triton
    from triton.backends.compiler import GPUTarget

    cc, smem_limit, _ = TARGETS[arch]
    row = {"kernel": spec.name, "variant": spec.variant, "uses": spec.uses, "target": arch,
           "num_warps": spec.num_warps, "num_stages": spec.num_stages, "trainer": spec.trainer,
           "registers": None, "spill_stores": None, "spill_loads": None, "shared": None,
           "smem_limit": smem_limit, "mma": None, "status": "ok", "error": None, "seconds": None}
    if type(spec.kernel).__name__ == "InterpretedFunction":
        raise RuntimeError("red_kernels was imported with TRITON_INTERPRET=1: its kernels are interpreter "
                           "functions and cannot be compiled for a GPU; run benchmarks/aot_compile.py in a "
                           "process without TRITON_INTERPRET")
    t0 = time.perf_counter()
    sig, ce, attrs = compile_signature(spec)
    options = {k: getattr(spec, k) for k in ("num_warps", "num_stages") if getattr(spec, k) is not None}
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*TRITON_DEFAULT_FP_FUSION.*")
            k = triton.compile(_ast_source(spec.kernel, sig, ce, attrs), target=GPUTarget("cuda", cc, 32),
                               options=options)
        ptx = k.asm["ptx"]
        for opt in ("num_warps", "num_stages"):  # the values used, defaults included
            row[opt] = getattr(k.metadata, opt, row[opt])
        row["shared"] = int(k.metadata.shared)
        row["mma"] = ("wgmma" if "wgmma.mma_async" in ptx else "mma" if re.search(r"\bmma\.sync", ptx)
                      else "-")
        row.update(ptxas_usage(ptx, cc))
    except Exception as e:  # noqa: BLE001 - every failure is a finding
        row["status"], row["error"] = "COMPILE ERROR", _error_summary(e)
    else:
        threads = row["num_warps"] * 32
        if row["shared"] > smem_limit:
            row["status"] = "SMEM OVER LIMIT"
            row["error"] = f"needs {row['shared']} B of shared memory, {arch} allows {smem_limit} B per block"
        elif row["registers"] is not None and row["registers"] * threads > 65536:
            row["status"] = "REGS OVER LIMIT"
            row["error"] = f"{row['registers']} registers x {threads} threads > 65536 per block"
        elif row["spill_stores"] or row["spill_loads"]:
            row["status"] = "ok (spills)"
    row["seconds"] = round(time.perf_counter() - t0, 2)
    return row


def failed(row: dict) -> bool:
    return not row["status"].startswith("ok")


@functools.lru_cache(maxsize=4)
def _specs_for(shapes_items: tuple, broken: bool) -> list[Spec]:
    shapes = dict(shapes_items)
    return broken_specs(shapes) if broken else specs(shapes)


def _work(job):
    i, arch, shapes_items, broken = job
    return compile_spec(_specs_for(shapes_items, broken)[i], arch)


def run(archs, shapes: dict = LLAMA_3B, jobs: int | None = None, broken: bool = False) -> list[dict]:
    """Compile every spec for every arch (in ``jobs`` processes); rows in spec order."""
    items = tuple(sorted(shapes.items()))
    n = len(_specs_for(items, broken))
    work = [(i, a, items, broken) for a in archs for i in range(n)]
    jobs = max(1, min(jobs or os.cpu_count() or 1, len(work)))
    if jobs == 1:
        return [_work(w) for w in work]
    # longest first (fp32 IEEE GEMMs: ~10x the others, most on sm_80), so no process idles at the end
    ss = _specs_for(items, broken)

    def cost(w):
        ce = ss[w[0]].constexprs
        return (10 if ce.get("IEEE") else 3 if "IEEE" in ce else 1) + (w[1] == "sm_80")

    order = sorted(range(len(work)), key=lambda j: -cost(work[j]))
    with ProcessPoolExecutor(max_workers=jobs) as ex:
        done = list(ex.map(_work, [work[j] for j in order]))
    rows = [None] * len(work)
    for j, r in zip(order, done):
        rows[j] = r
    return rows


def format_table(rows: list[dict]) -> str:
    head = ["kernel", "variant", "target", "warps", "stages", "regs", "spills (B st/ld)", "smem (KB)", "mma", "status"]
    body = []
    for r in rows:
        spills = "" if r["spill_stores"] is None else f"{r['spill_stores']}/{r['spill_loads']}"
        smem = "" if r["shared"] is None else f"{r['shared'] / 1024:.1f}"
        body.append([r["kernel"], r["variant"], r["target"], str(r["num_warps"]),
                     "" if r["num_stages"] is None else str(r["num_stages"]),
                     "" if r["registers"] is None else str(r["registers"]), spills, smem, r["mma"] or "",
                     r["status"]])
    widths = [max(len(h), *(len(b[j]) for b in body)) if body else len(h) for j, h in enumerate(head)]
    line = lambda cells: "  ".join(c.ljust(w) for c, w in zip(cells, widths)).rstrip()  # noqa: E731
    out = [line(head), line(["-" * w for w in widths])] + [line(b) for b in body]
    return "\n".join(out)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--arch", action="append", choices=sorted(TARGETS),
                   help="GPU target (repeatable); default sm_90 and sm_80")
    p.add_argument("--json", metavar="FILE", help="also write the result rows as JSON")
    p.add_argument("--jobs", type=int, default=None, help="compile processes (default: CPU count)")
    p.add_argument("--broken-only", action="store_true", help=argparse.SUPPRESS)  # tests: must fail
    args = p.parse_args(argv)
    if not HAS_TRITON:
        print("aot_compile: triton is not installed", file=sys.stderr)
        return 2
    if "TRITON_INTERPRET" in os.environ:  # imported elsewhere, called as a function
        print("aot_compile: TRITON_INTERPRET is set; run this in a process without it", file=sys.stderr)
        return 2
    archs = args.arch or ["sm_90", "sm_80"]
    import triton
    t0 = time.perf_counter()
    rows = run(archs, jobs=args.jobs, broken=args.broken_only)
    wall = time.perf_counter() - t0
    print(f"Triton {triton.__version__}; ptxas: " + ", ".join(f"{a} {os.path.basename(ptxas_path(TARGETS[a][0]))}"
                                                           for a in archs))
    print(f"shapes: {', '.join(f'{k}={v}' for k, v in LLAMA_3B.items())}\n")
    print(format_table(rows))
    bad = [r for r in rows if failed(r)]
    print(f"\n{len(rows)} compiles ({len(rows) // max(len(archs), 1)} specs x {len(archs)} targets) "
          f"in {wall:.1f} s; {len(bad)} failed")
    for r in bad:
        print(f"FAILED {r['kernel']} [{r['variant']}] on {r['target']}: {r['status']}: {r['error']}")
    spills = [r for r in rows if r["status"] == "ok (spills)"]
    for r in spills:
        print(f"warning: {r['kernel']} [{r['variant']}] on {r['target']} spills "
              f"{r['spill_stores']} B stores / {r['spill_loads']} B loads")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"triton": triton.__version__, "shapes": LLAMA_3B, "seconds": round(wall, 1),
                       "rows": rows}, f, indent=1)
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
