"""One-shot GPU suite for red_kernels and red's training step on one H100 (under 8 minutes).

(a) ceilings measured in the same run (``red.bench.measure_ceilings``): bf16 8192^3 matmul
    TFLOP/s, device copy TB/s;
(b) every red_kernels op (``red.bench.kernel_specs``: fused_linear_kl and clone_mse, which
    every training step runs, calibration's rmsnorm_with_stats) checked against a float64
    reference at Llama-3.2-3B shapes (D=3072 -> d=1536, I=8192, V=128256; the first
    ``CHECK_ROWS`` tokens, so that the float64 logits fit beside everything else), outputs
    and gradients;
(c) every op timed (``red.bench.time_kernel_ms``: do_bench median; input sets rotated past
    L2) against its eager composition and torch.compile of it, forward + backward where
    the step differentiates it: speed-up, peak-memory ratio, fraction of the ceiling;
(d) the product, not a copy: ``red.bench.bench_teacher`` builds a ``ProjectedStudent``
    (red.pipeline.build_student) over random Llama-3.2-1B- and 3B-shaped teachers (all
    layers, 1 x 4096 tokens a micro-batch, bf16, student width D/2) and times
    ``red.trainer.train_step`` with ``--kernels torch`` and ``--kernels triton`` at
    grad-accum 1 and 4, against ordinary training (forward + backward per micro-batch,
    AdamW) of the exported student as a plain ``transformers`` model on the same
    micro-batches, and the teacher's forward alone; ratios, the floor
    ordinary/(ordinary + teacher forward) and RED as a fraction of it; at grad-accum 1 also
    ``red.bench.op_counts``, the kernels a RED micro-batch launches against an ordinary one.

Every CSV row (--out) is written and flushed as soon as it is measured; a failing
measurement or section becomes an "error" row and the suite goes on; past --budget-s the
remaining measurements are "skipped" rows. ``<out>.meta.json`` records torch / triton /
transformers versions, the GPU, the git commit and the date (at the start), then the op
counts, goals and elapsed time (at the end). Goals are printed as PASS/FAIL computed from
the rows, never asserted; the exit code is 1 only when a correctness check (b) fails. A
compact table is printed last. ``--smoke`` runs the same code paths on CPU with tiny
shapes (one torch thread, the torch backend, perf_counter timing, no torch.compile): a
unit test runs it; its numbers mean nothing.
"""
from __future__ import annotations

import argparse
import csv
import datetime
import gc
import json
import math
import os
import platform
import subprocess
import sys
import time

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import red_kernels as rk  # noqa: E402
from red.commands import bench  # noqa: E402
from random_teacher import random_teacher  # noqa: E402 (benchmarks/random_teacher.py)

# (b)/(c): op shapes as red.bench.kernel_shapes gives them; T = tokens of a micro-batch
REAL = dict(D=3072, d=1536, I=8192, V=128256, eps=1e-5, Ts=(4096, 8192))
SMOKE = dict(D=64, d=32, I=96, V=300, eps=1e-5, Ts=(48, 80))
CHECK_ROWS = 2048  # float64 check on this many tokens (two 1024-row logit chunks of the KL)
# (d): teacher shapes (transformers LlamaConfig fields), micro-batches, timed steps
_LLAMA = dict(vocab_size=128256, num_key_value_heads=8, intermediate_size=8192, tie_word_embeddings=True,
              rms_norm_eps=1e-5, max_position_embeddings=131072)
STEP_TEACHERS = {
    "llama-3.2-1b-shape": dict(_LLAMA, hidden_size=2048, num_hidden_layers=16, num_attention_heads=32, head_dim=64),
    "llama-3.2-3b-shape": dict(_LLAMA, hidden_size=3072, num_hidden_layers=28, num_attention_heads=24, head_dim=128),
}
SMOKE_STEP_TEACHERS = {
    "tiny-llama": dict(vocab_size=300, num_key_value_heads=2, intermediate_size=96, tie_word_embeddings=True,
                       rms_norm_eps=1e-5, hidden_size=64, num_hidden_layers=2, num_attention_heads=4, head_dim=16),
}
STEP = dict(seq_len=4096, batch_size=1, steps=3, warmup=1, grad_accums=(1, 4))
SMOKE_STEP = dict(seq_len=32, batch_size=2, steps=1, warmup=1, grad_accums=(1, 4))
OPS_SHARE = 0.4  # (b)/(c) take no new op past this share of the budget: (d) is the product
OPS_COMPILE_SHARE = 0.2  # torch.compile of an op's eager composition only before this share
L2_BYTES = 60 * 2 ** 20
FIELDS = ["section", "name", "T", "grad_accum", "impl", "ms", "tokens_per_s", "speedup_vs_eager",
          "speedup_vs_compile", "peak_MB", "mem_ratio_eager_over_this", "work", "ceiling", "frac_of_ceiling",
          "rel_err", "value", "status", "goal", "note", "resident_MB", "peak_total_MB"]


def reference(name: str, eps: float):
    """The float64 reference of op ``name`` (same arguments and outputs as its
    ``red.bench.kernel_specs`` function): the eager composition where it computes in the
    inputs' dtype, else written out here."""
    if name == "clone_mse":  # naive_clone_mse makes fp32 copies; in float64 the MSE is this
        return lambda s, t: (s, (s - t).square().mean())
    if name == "rmsnorm_with_stats":
        return lambda x, w: rk.naive_rmsnorm_with_stats(x, w, eps)
    if name == "fused_linear_kl":
        return lambda *a: rk.naive_fused_linear_kl(*a)[0]
    raise KeyError(name)


class Suite:
    def __init__(self, smoke: bool, out: str, budget_s: float):
        self.smoke = smoke
        self.out = out
        self.meta_path = os.path.splitext(out)[0] + ".meta.json"
        self.t0 = time.perf_counter()
        self.budget_s = budget_s
        self.rows: list[dict] = []  # raw values, for the goals and the table
        self.dev = torch.device("cpu" if smoke else "cuda")
        self.dtype = torch.float32 if smoke else torch.bfloat16  # CPU bf16 GEMMs are slow
        self.failed = False
        self.ceil = {}
        self.goals: list[dict] = []
        os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
        self.meta = metadata(smoke, budget_s)
        self.write_meta()
        self._f = open(out, "w", newline="")
        self._w = csv.DictWriter(self._f, fieldnames=FIELDS)
        self._w.writeheader()
        self._f.flush()

    # ---------------------------------------------------------------- bookkeeping
    def elapsed(self):
        return time.perf_counter() - self.t0

    def free(self):
        gc.collect()
        if not self.smoke:
            torch.cuda.empty_cache()

    def add(self, **kw):
        """Record a row and write it to the CSV at once (flushed: a crash keeps every row so far)."""
        row = {k: kw.get(k, "") for k in FIELDS}
        self.rows.append(row)
        out = {}
        for k, v in row.items():
            if isinstance(v, float):
                v = "" if math.isnan(v) else f"{v:.4g}"
            out[k] = "" if v is None else v
        self._w.writerow(out)
        self._f.flush()

    def write_meta(self):
        tmp = self.meta_path + ".tmp"
        with open(tmp, "w") as f:
            json.dump(self.meta, f, indent=1, default=str)
        os.replace(tmp, self.meta_path)

    # ---------------------------------------------------------------- (a) ceilings
    def ceilings(self):
        c = bench.measure_ceilings(self.dev, self.dtype)
        self.ceil = {"tflops": c["matmul_tflops"], "copy_tbps": c["copy_tbps"]}
        self.add(section="ceiling", name=f"{c['dtype']}_matmul_{c['matmul_n']}^3", impl="torch", ms=c["matmul_ms"],
                 work="flop", ceiling=c["matmul_tflops"], note="TFLOP/s", status="ok")
        self.add(section="ceiling", name="d2d_copy", impl="torch", ms=c["copy_ms"], work="bytes",
                 ceiling=c["copy_tbps"], note="TB/s (read+write)", status="ok")

    # ---------------------------------------------------------------- (b), (c) ops
    def ops(self, cfg, T):
        shapes = dict(N=T, D=cfg["D"], d=cfg["d"], I=cfg["I"], V=cfg["V"], eps=cfg["eps"])
        specs = bench.kernel_specs(shapes, self.dev, self.dtype, seed=T)
        for spec in specs:
            if not self.smoke and self.elapsed() > self.budget_s * OPS_SHARE:
                self.add(section="op", name=spec["name"], T=T, status="skipped", note="time budget of the op section")
                continue
            try:
                self.one_op(spec, T, cfg["eps"], first=T == cfg["Ts"][0])
            except Exception as e:  # noqa: BLE001 - record, keep going: one failure must not sink the run
                self.add(section="op", name=spec["name"], T=T, status="error", note=_err(e))
            self.free()

    def one_op(self, spec, T, eps, first):
        name = spec["name"]
        # (b) correctness at real shapes (first T only, to fit the time budget)
        err, ok = "", True
        if first:
            err = self.check(spec, eps)
            ok = err <= 3e-2
            self.failed |= not ok
        # input sets rotated so that one call does not find the previous one's in L2
        args, leaves = spec["make"]()
        set_bytes = sum(t.numel() * t.element_size() for t in args if isinstance(t, torch.Tensor))
        n_sets = 1 if self.smoke else max(1, min(4, math.ceil(2 * L2_BYTES / max(set_bytes, 1))))
        sets = [(args, leaves)] + [spec["make"]() for _ in range(n_sets - 1)]
        impls = [("red_kernels", spec["fn"]), ("eager", spec["eager"])]
        if not self.smoke and first and self.elapsed() < self.budget_s * OPS_COMPILE_SHARE:
            impls.append(("compile", torch.compile(spec["eager"], dynamic=False)))  # first T only
        res = {}
        for impl, fn in impls:
            try:
                with rk.use_backend("torch" if impl != "red_kernels" or self.smoke else "auto"):
                    runs = [bench.kernel_runner(fn, spec, a, lv) for a, lv in sets]
                    state = {"i": 0}

                    def run():
                        state["i"] = (state["i"] + 1) % len(runs)
                        runs[state["i"]]()
                    ms = bench.time_kernel_ms(run, self.dev)
                    peak = bench.peak_extra_bytes(runs[0], self.dev)
                res[impl] = (ms, float("nan") if peak is None else float(peak))
            except Exception as e:  # noqa: BLE001 - record, keep going
                self.add(section="op", name=name, T=T, impl=impl, status="error", note=_err(e))
        e_ms, e_peak = res.get("eager", (float("nan"), float("nan")))
        c_ms = res.get("compile", (float("nan"),))[0]
        for impl, (ms, peak) in res.items():
            rate = spec["work"] / (ms * 1e-3) / 1e12
            ceiling = self.ceil.get("tflops" if spec["kind"] == "flop" else "copy_tbps", math.nan)
            self.add(section="op", name=name, T=T, impl=impl, ms=ms, tokens_per_s=T / (ms * 1e-3),
                     speedup_vs_eager=e_ms / ms, speedup_vs_compile=c_ms / ms, peak_MB=peak / 2 ** 20,
                     mem_ratio_eager_over_this=e_peak / peak if peak else float("nan"),
                     work=spec["kind"], ceiling=ceiling, frac_of_ceiling=rate / ceiling,
                     rel_err=err if impl == "red_kernels" else "", status="ok" if ok else "CHECK_FAILED",
                     note=spec["shape"] if impl == "red_kernels" else "")

    def check(self, spec, eps) -> float:
        """Largest relative error (‖got − ref‖ / ‖ref‖) of the op's outputs and input
        gradients against the float64 reference, on the first ``CHECK_ROWS`` tokens."""
        args, leaves = spec["make"]()
        N = next(a for a in args if isinstance(a, torch.Tensor)).shape[0]
        rows = min(N, CHECK_ROWS)
        args = [a[:rows] if isinstance(a, torch.Tensor) and a.dim() and a.shape[0] == N else a for a in args]

        def copy(dtype):
            return [a.detach().to(dtype).requires_grad_(i in leaves) if isinstance(a, torch.Tensor)
                    and a.is_floating_point() else a for i, a in enumerate(args)]
        got_in, ref_in = copy(args[0].dtype), copy(torch.float64)
        with rk.use_backend("torch" if self.smoke else "auto"):
            got = _as_tuple(spec["fn"](*got_in))
        ref = _as_tuple(reference(spec["name"], eps)(*ref_in))
        errs = [_rel(a, b) for a, b in zip(got, ref)]
        if spec["backward"]:
            pairs = [(a, b) for a, b in zip(got, ref) if a.requires_grad]
            ups = [torch.randn_like(b) if b.dim() else torch.ones_like(b) for _, b in pairs]
            torch.autograd.backward([a for a, _ in pairs], [u.to(a.dtype) for (a, _), u in zip(pairs, ups)])
            torch.autograd.backward([b for _, b in pairs], ups)
            errs += [_rel(got_in[i].grad, ref_in[i].grad) for i in leaves]
        return max(errs)

    # ---------------------------------------------------------------- (d) steps, through red.bench
    def steps(self, name: str, shape: dict, cfg: dict):
        """One teacher at each grad-accum: teacher forward, red_step per backend, ordinary
        step; op counts at grad-accum 1."""
        from transformers import LlamaConfig

        if self.elapsed() > self.budget_s:
            self.add(section="step", name=name, impl="all", status="skipped", note="time budget")
            return
        teacher = None
        try:
            teacher = random_teacher(LlamaConfig(**shape), self.dev, self.dtype, seed=0)
        except Exception as e:  # noqa: BLE001 - recorded; the next teacher still runs
            self.add(section="step", name=name, impl="build_teacher", status="error", note=_err(e))
        if teacher is None:
            self.free()
            return
        backends = ("torch",) if self.smoke else ("torch", "triton")
        for ga in cfg["grad_accums"]:
            tokens = ga * cfg["seq_len"] * cfg["batch_size"]
            measured = {}

            def on_row(r, ga=ga, tokens=tokens, measured=measured):
                if r.get("kind_of_row") != "step":
                    return
                variant = r.get("variant") or r.get("name")
                if r.get("status") != "ok":
                    self.add(section="step", name=name, T=tokens, grad_accum=ga, impl=variant, status=r.get("status"),
                             note=r.get("error", ""))
                    return
                measured[variant] = r
                ref = measured.get("torch") if variant == "triton" else None
                mem, ref_mem = r.get("step_mem_bytes"), ref.get("step_mem_bytes") if ref else None
                self.add(section="step", name=name, T=tokens, grad_accum=ga, impl=variant, ms=r["ms"],
                         tokens_per_s=r["tokens_per_s"],
                         speedup_vs_eager=r["tokens_per_s"] / ref["tokens_per_s"] if ref else "",
                         peak_MB=mem / 2 ** 20 if mem is not None else "",
                         mem_ratio_eager_over_this=ref_mem / mem if ref_mem is not None and mem else "",
                         resident_MB=r["resident_bytes"] / 2 ** 20,
                         peak_total_MB=r["peak_mem_bytes"] / 2 ** 20 if r.get("peak_mem_bytes") is not None else "",
                         status="ok", note=f"loss {r['loss']:.4g}" if r.get("loss") is not None else "")

            try:
                res = bench.bench_teacher(teacher, shape["hidden_size"] // 2, cfg["seq_len"], cfg["batch_size"],
                                          backends, include_compile=False, include_ordinary=True,
                                          include_kernels=False, include_op_counts=ga == 1, grad_accum=ga,
                                          steps=cfg["steps"], warmup=cfg["warmup"], deadline=self.t0 + self.budget_s,
                                          on_row=on_row)
            except Exception as e:  # noqa: BLE001
                self.add(section="step", name=name, T=tokens, grad_accum=ga, impl="bench_teacher", status="error",
                         note=_err(e))
                continue
            self.meta.setdefault("step_ratios", {}).setdefault(name, {})[f"grad_accum={ga}"] = res["ratios"]
            for key, value in res["ratios"].items():
                if value is not None:
                    self.add(section="ratio", name=name, T=tokens, grad_accum=ga, impl=key, value=value, status="ok")
            for b, oc in res["op_counts"].items():
                self.meta.setdefault("op_counts", {}).setdefault(name, {})[b] = oc
                if oc.get("status") != "ok":
                    self.add(section="ops", name=name, T=tokens, grad_accum=ga, impl=b, status=oc.get("status"),
                             note=oc.get("error", ""))
                    continue
                rl, ol = oc["red"]["micro_batch"]["layer"], oc["ordinary"]["micro_batch"]["layer"]
                self.add(section="ops", name=name, T=tokens, grad_accum=ga, impl=b, value=oc["ratio_micro_batch"],
                         status="ok", note=f"a micro-batch: RED {oc['red']['micro_batch']['total']}, ordinary "
                                           f"{oc['ordinary']['micro_batch']['total']}; a layer: RED {rl['total']} "
                                           f"(teacher fwd {rl['teacher_fwd']}, fwd {rl['fwd']}, bwd {rl['bwd']}), "
                                           f"ordinary {ol['total']} (fwd {ol['fwd']}, bwd {ol['bwd']})")
            self.free()
        del teacher
        self.free()

    # ---------------------------------------------------------------- goals
    def evaluate_goals(self, step_name, V):
        """PASS/FAIL of each goal, from the rows measured in this run."""
        goals = []

        def goal(name, target, value, ok, detail=""):
            status = "FAIL (not measured)" if value is None else ("PASS" if ok else "FAIL")
            goals.append(dict(goal=name, target=target, value=value, status=status, detail=detail))

        ga = max(STEP["grad_accums"] if not self.smoke else SMOKE_STEP["grad_accums"])
        best = "torch" if self.smoke else "triton"
        ratio = {(r["grad_accum"], r["impl"]): r["value"] for r in self.rows
                 if r["section"] == "ratio" and r["name"] == step_name}
        v = ratio.get((ga, f"{best}_over_ordinary_tokens_per_s"))
        goal(f"{step_name} grad-accum {ga}: red step [{best}] / ordinary tokens/s (issue 20)", ">= 0.62", v,
             v is not None and v >= 0.62, f"floor {ratio.get((ga, 'floor_ratio'), float('nan')):.3g}")
        ops = next((r["value"] for r in self.rows if r["section"] == "ops" and r["name"] == step_name
                    and r["impl"] == best and r["status"] == "ok"), None)
        goal(f"{step_name}: ops of a RED micro-batch / an ordinary one [{best}] (issue 20)", "<= 1.5", ops,
             ops is not None and ops <= 1.5)
        kops = {}
        for r in self.rows:
            if r["section"] == "op" and r["impl"] == "red_kernels" and r["status"] == "ok":
                kops.setdefault(r["name"], []).append(r)

        def worst(name, key):
            vals = [r[key] for r in kops.get(name, [])]
            return min(vals) if vals and not any(math.isnan(x) for x in vals) else None

        for name, mem in (("fused_linear_kl", 4.0), ("clone_mse", 2.0)):
            m, s = worst(name, "mem_ratio_eager_over_this"), worst(name, "speedup_vs_eager")
            goal(f"{name}{f' at V={V}' if name == 'fused_linear_kl' else ''}: eager/fused memory (min over T)",
                 f">= {mem:g}", m, m is not None and m >= mem)
            goal(f"{name}: speed vs eager (min over T)", ">= 1.0", s, s is not None and s >= 1.0)
        f = worst("rmsnorm_with_stats", "frac_of_ceiling")
        goal("rmsnorm_with_stats: fraction of copy bandwidth (min over T)", ">= 0.80", f, f is not None and f >= 0.8)
        self.goals = goals
        for g in goals:
            self.add(section="goal", name=g["goal"], status=g["status"], goal=g["target"],
                     value="" if g["value"] is None else g["value"], note=g["detail"])
        return goals

    # ---------------------------------------------------------------- output
    def close(self):
        self._f.close()
        self.meta.update(elapsed_s=round(self.elapsed(), 1), finished=True, goals=self.goals)
        self.write_meta()

    def table(self):
        cols = ["section", "name", "T", "grad_accum", "impl", "ms", "tokens_per_s", "speedup_vs_eager",
                "speedup_vs_compile", "peak_MB", "mem_ratio_eager_over_this", "frac_of_ceiling", "rel_err", "status"]
        short = ["sec", "name", "T", "ga", "impl", "ms", "tok/s", "x_eager", "x_compile", "peak_MB", "mem_eager/x",
                 "frac_ceil", "rel_err", "status"]

        def fmt(v):
            if isinstance(v, float):
                return "" if math.isnan(v) else f"{v:.4g}"
            return "" if v is None else str(v)
        rows = [[fmt(r[c]) for c in cols] for r in self.rows if r["section"] in ("ceiling", "op", "step")]
        widths = [max(len(h), *(len(r[i]) for r in rows)) if rows else len(h) for i, h in enumerate(short)]
        print(" ".join(h.ljust(w) for h, w in zip(short, widths)))
        for r in rows:
            print(" ".join(v.ljust(w)[:60] for v, w in zip(r, widths)))
        print("(op rows: forward + backward where the step differentiates the op; step rows: x_eager = tokens/s over "
              "the torch path's, peak_MB = step memory above the resident weights and optimizer state)")
        for r in self.rows:
            if r["section"] == "ratio":
                print(f"ratio {r['name']} grad-accum {r['grad_accum']}: {r['impl']} = {fmt(r['value'])}")
        for r in self.rows:
            if r["section"] == "ops":
                print(f"ops {r['name']} [{r['impl']}]: RED/ordinary micro-batch {fmt(r['value'])}x; {r['note']}")
        for g in self.goals:
            v = "-" if g["value"] is None else f"{g['value']:.3g}"
            print(f"goal {g['status']:<4}  {g['goal']}: {v} (target {g['target']})")
        print(f"device: {'CPU smoke run (numbers meaningless)' if self.smoke else torch.cuda.get_device_name()}"
              f"; elapsed {self.elapsed():.0f} s; csv: {self.out}; meta: {self.meta_path}")


def metadata(smoke: bool, budget_s: float) -> dict:
    """Versions, device, commit and date of this run."""
    v = bench.versions()
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True,
                                timeout=10).stdout.strip() or "unknown"
        dirty = bool(subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=ROOT,
                                    capture_output=True, text=True, timeout=10).stdout.strip())
    except Exception:  # noqa: BLE001 - no git, or not a checkout
        commit, dirty = "unknown", None
    gpu = "cpu (smoke)" if smoke else (torch.cuda.get_device_name() if torch.cuda.is_available() else "none")
    return dict(date=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
                torch=v["torch"], triton=v["triton"], transformers=v["transformers"], python=v["python"],
                cuda=torch.version.cuda, gpu=gpu, commit=commit, commit_dirty=dirty, host=platform.node(),
                smoke=smoke, budget_s=budget_s, argv=sys.argv[1:], finished=False)


def _err(e: BaseException) -> str:
    return bench._err(e)[:200]


def _as_tuple(out):
    return tuple(out) if isinstance(out, (tuple, list)) else (out,)


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.detach().double(), b.detach().double()
    nb = b.norm().item()
    return (a - b).norm().item() / nb if nb else a.norm().item()


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="gpu_suite_results.csv")
    ap.add_argument("--smoke", action="store_true", help="tiny CPU run of every code path")
    ap.add_argument("--budget-s", type=float, default=400.0,
                    help="past this many seconds the remaining measurements are skipped rows")
    args = ap.parse_args(argv)
    if not args.smoke and not torch.cuda.is_available():
        ap.error("no CUDA device: use --smoke on CPU")
    if args.smoke:
        torch.set_num_threads(1)  # a smoke run checks code paths; one thread is not slowed by a busy machine
    cfg = SMOKE if args.smoke else REAL
    suite = Suite(args.smoke, args.out, args.budget_s)
    print(f"gpu suite: torch {suite.meta['torch']}, triton {suite.meta['triton']}, {suite.meta['gpu']}, "
          f"commit {suite.meta['commit'][:12]}, {suite.meta['date']}", flush=True)
    teachers = SMOKE_STEP_TEACHERS if args.smoke else STEP_TEACHERS
    try:
        try:
            suite.ceilings()
        except Exception as e:  # noqa: BLE001 - later sections report nan fractions
            suite.add(section="ceiling", name="ceilings", status="error", note=_err(e))
        for T in cfg["Ts"]:
            suite.ops(cfg, T)
        for name, shape in teachers.items():  # (d) chooses its backends itself, through red.bench
            suite.steps(name, shape, SMOKE_STEP if args.smoke else STEP)
        suite.evaluate_goals(list(teachers)[-1], cfg["V"])
    finally:
        suite.close()
    suite.table()
    return 1 if suite.failed else 0


if __name__ == "__main__":
    sys.exit(main())
