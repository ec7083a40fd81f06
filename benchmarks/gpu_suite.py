"""One-shot GPU suite for red_kernels and red's training step on a single H200 (~7 min from cold start).

(a) ceilings measured in the same run: bf16 8192^3 matmul TFLOP/s, device copy GB/s;
(b) every kernel checked against its reference at real shapes (Llama-3.2-3B -> 1.5B);
(c) every kernel timed (do_bench median, inputs rotated past L2) against the eager
    composition and torch.compile of it: speedup, peak-memory ratio, fraction of ceiling;
(d) the product, not a copy: ``red.bench`` builds a ``ProjectedStudent`` (red.pipeline.build_student)
    over random Llama-3.2-1B- and 3B-shaped teachers (all layers, seq 4096, batch 1, bf16,
    student width D/2) and times ``red.trainer.train_step`` (forward, backward, clipping, AdamW)
    with ``--kernels torch``, ``--kernels triton`` and torch.compile of the torch path, against
    ordinary training (forward + backward + AdamW) of the exported student as a plain
    ``transformers`` model on the same tokens, and the teacher's forward alone.

Every CSV row (--out) is written and flushed as soon as it is measured; a failing
measurement or section becomes an "error" row and the suite goes on; past --budget-s the
remaining measurements are "skipped" rows. ``<out>.meta.json`` records torch / triton /
transformers versions, the GPU, the git commit and the date (at the start), then the goals
and the elapsed time (at the end). Goals are printed as PASS/FAIL computed from the rows,
never asserted; the exit code is 1 only when a correctness check (b) fails. A compact table
is printed last. ``--smoke`` runs the same code paths on CPU with tiny shapes (for (d) a tiny
random Llama teacher through the same red.bench calls), the torch backend, perf_counter
timing and no torch.compile (used by a unit test, well under a minute).
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
import statistics
import subprocess
import sys
import time

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import red_kernels as rk  # noqa: E402
from red import bench  # noqa: E402

REAL = dict(D=3072, d=1536, I=8192, H=24, H_kv=8, hd=128, V=128256, Ts=(8192, 16384), layers=2)
SMOKE = dict(D=64, d=32, I=96, H=4, H_kv=2, hd=16, V=300, Ts=(48, 80), layers=2)
# (d): teacher shapes (transformers LlamaConfig fields), tokens per step, timed steps
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
STEP = dict(seq_len=4096, batch_size=1, steps=3, warmup=1)
SMOKE_STEP = dict(seq_len=32, batch_size=2, steps=2, warmup=1)
# the compile variant of a teacher runs only with this much of the budget left (the 3B
# still has to fit after the 1B's compile); measured numbers would refine these guesses
COMPILE_RESERVE_S = {"llama-3.2-1b-shape": 200.0, "llama-3.2-3b-shape": 90.0}
OPS_SHARE = 0.45  # (b)/(c) take no new op past this share of the budget: (d) is the product
OPS_COMPILE_SHARE = 0.2  # torch.compile of an op's eager composition only before this share
L2_BYTES = 60 * 2 ** 20
GOALS = {
    "rmsnorm_with_stats": "frac of copy BW >= 0.80",
    "projected_mse": ">=1.5x eager speed, >=3x less memory",
    "projected_mse_student_space": ">=1.5x eager speed, >=3x less memory",
    "fused_linear_kl": ">=1x eager speed, >=4x less memory",
    "red_step": "triton >=1.3x torch tokens/s at <=0.6x its step memory; >=0.6x ordinary tokens/s",
}
FIELDS = ["section", "name", "T", "impl", "ms", "tokens_per_s", "speedup_vs_eager",
          "speedup_vs_compile", "peak_MB", "mem_ratio_eager_over_this", "work", "ceiling",
          "frac_of_ceiling", "rel_err", "status", "goal", "note", "resident_MB", "peak_total_MB"]


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
        if not smoke:
            import triton.testing  # noqa: F401
        os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
        self.meta = metadata(smoke, budget_s)
        self.write_meta()
        self._f = open(out, "w", newline="")
        self._w = csv.DictWriter(self._f, fieldnames=FIELDS)
        self._w.writeheader()
        self._f.flush()

    # ---------------------------------------------------------------- measurement
    def elapsed(self):
        return time.perf_counter() - self.t0

    def sync(self):
        if not self.smoke:
            torch.cuda.synchronize()

    def free(self):
        gc.collect()
        if not self.smoke:
            torch.cuda.empty_cache()

    def time_ms(self, fn) -> float:
        if self.smoke:
            fn()
            ts = []
            for _ in range(2):
                t = time.perf_counter()
                fn()
                ts.append((time.perf_counter() - t) * 1e3)
            return statistics.median(ts)
        import triton.testing
        return float(triton.testing.do_bench(fn, warmup=10, rep=60, return_mode="median"))

    def peak_bytes(self, fn) -> float:
        if self.smoke:
            return float(bench.cpu_peak_extra_bytes(fn)) if bench.CPU_MEMORY_AVAILABLE else float("nan")
        self.sync()
        torch.cuda.empty_cache()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        fn()
        self.sync()
        return float(torch.cuda.max_memory_allocated() - base)

    def rotated(self, make_inputs, set_bytes: int):
        """Several input sets when one is smaller than 2x L2, cycled by each call."""
        n = 1 if self.smoke else max(1, min(4, math.ceil(2 * L2_BYTES / max(set_bytes, 1))))
        sets = [make_inputs() for _ in range(n)]
        state = {"i": 0}

        def nxt():
            state["i"] = (state["i"] + 1) % n
            return sets[state["i"]]
        return nxt

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
            json.dump(self.meta, f, indent=1)
        os.replace(tmp, self.meta_path)

    # ---------------------------------------------------------------- (a) ceilings
    def ceilings(self):
        n = 256 if self.smoke else 8192
        a = torch.randn(n, n, device=self.dev, dtype=self.dtype)
        b = torch.randn(n, n, device=self.dev, dtype=self.dtype)
        mm_ms = self.time_ms(lambda: a @ b)
        self.ceil["tflops"] = 2 * n ** 3 / (mm_ms * 1e-3) / 1e12
        numel = (1 << 20) if self.smoke else (1 << 29)  # 1 GiB of bf16
        x = torch.empty(numel, device=self.dev, dtype=self.dtype).normal_()
        y = torch.empty_like(x)
        ms = self.time_ms(lambda: y.copy_(x))
        self.ceil["copy_GBps"] = 2 * x.numel() * x.element_size() / (ms * 1e-3) / 1e9
        self.add(section="ceiling", name=f"{str(self.dtype).split('.')[-1]}_matmul_{n}^3", impl="torch", ms=mm_ms,
                 work="flop", ceiling=self.ceil["tflops"], note="TFLOP/s", status="ok")
        self.add(section="ceiling", name="d2d_copy", impl="torch", ms=ms, work="bytes",
                 ceiling=self.ceil["copy_GBps"], note="GB/s (read+write)", status="ok")
        del a, b, x, y

    # ---------------------------------------------------------------- ops
    def ops(self, cfg, T):
        D, d, V = cfg["D"], cfg["d"], cfg["V"]
        dev, dt = self.dev, self.dtype
        g = torch.Generator(device=dev).manual_seed(T)

        def rnd(*s, scale=1.0, grad=False):
            t = (torch.randn(*s, device=dev, dtype=torch.float32, generator=g) * scale).to(dt)
            return t.requires_grad_(grad)
        idx = torch.randperm(D, device=dev, generator=g)[:d].sort().values
        specs = []
        # name, make inputs, fused fn, eager fn, work (kind, amount), backward?
        specs.append(("rmsnorm_with_stats", lambda: (rnd(T, D), rnd(D)),
                      lambda x, w: rk.rmsnorm_with_stats(x, w, 1e-5),
                      lambda x, w: rk.naive_rmsnorm_with_stats(x, w, 1e-5),
                      ("bytes", 2 * T * D * 2), False))
        specs.append(("projected_mse", lambda: (rnd(T, d, grad=True), rnd(D, d, scale=0.02, grad=True), rnd(T, D)),
                      rk.projected_mse, rk.naive_projected_mse, ("flop", 3 * 2 * T * D * d), True))
        specs.append(("projected_mse_student_space",
                      lambda: (rnd(T, d, grad=True), rnd(T, D), rnd(D, d, scale=0.02, grad=True)),
                      rk.projected_mse_student_space, rk.naive_projected_mse_student_space,
                      ("flop", 2 * 2 * T * D * d), True))
        specs.append(("selected_mse", lambda: (rnd(T, d, grad=True), idx, rnd(T, D)),
                      rk.selected_mse, rk.naive_selected_mse, ("bytes", 2 * T * (D + 2 * d)), True))
        specs.append(("selected_mse_student_space", lambda: (rnd(T, d, grad=True), rnd(T, D), idx),
                      rk.selected_mse_student_space, rk.naive_selected_mse_student_space,
                      ("bytes", 2 * T * 4 * d), True))
        specs.append(("gather_columns", lambda: (rnd(cfg["I"], D), idx),
                      rk.gather_columns, rk.naive_gather_columns, ("bytes", 2 * 2 * cfg["I"] * d), False))
        wq = rnd(cfg["H"] * cfg["hd"], D, scale=0.02)
        wk = rnd(cfg["H_kv"] * cfg["hd"], D, scale=0.02)
        qkv_flop = 3 * 2 * T * d * (wq.shape[0] + 2 * wk.shape[0])
        specs.append(("projected_linear_group_qkv",
                      lambda: (rnd(T, d, grad=True), [wq, wk, wk],
                               [rnd(D, d, scale=0.02, grad=True) for _ in range(3)]),
                      lambda x, ws, ps: sum(y.float().square().mean() for y in rk.projected_linear_group(x, ws, ps, "in")),
                      lambda x, ws, ps: sum(y.float().square().mean() for y in rk.naive_projected_linear_group(x, ws, ps, "in")),
                      ("flop", qkv_flop), True))
        labels = torch.randint(0, V, (T,), device=dev, generator=g)
        w_lm = rnd(V, D, scale=0.02)
        specs.append(("fused_linear_kl",
                      lambda: (rnd(T, d, grad=True), rnd(V, d, scale=0.02, grad=True), rnd(T, D), w_lm, labels),
                      lambda *a: rk.fused_linear_kl(*a)[0], lambda *a: rk.naive_fused_linear_kl(*a)[0],
                      ("flop", 2 * T * V * (d + D) + 2 * 2 * T * V * d), True))
        for name, make, fused, eager, (kind, work), bwd in specs:
            if not self.smoke and self.elapsed() > self.budget_s * OPS_SHARE:
                self.add(section="op", name=name, T=T, status="skipped", note="time budget of the op section")
                continue
            try:
                self.one_op(name, T, make, fused, eager, kind, work, bwd, first=T == cfg["Ts"][0])
            except Exception as e:  # record, keep going: one failure must not sink the run
                self.add(section="op", name=name, T=T, status="error", note=_err(e))
            self.free()

    def one_op(self, name, T, make, fused, eager, kind, work, bwd, first):
        inp = make()
        set_bytes = sum(t.numel() * t.element_size() for t in _flat(inp) if isinstance(t, torch.Tensor))
        # (b) correctness at real shapes (first T only, to fit the time budget): red_kernels
        # on the bf16 inputs vs the eager composition on fp32 copies of them
        err, ok = "", True
        if first:
            err = self.check(name, inp, fused, eager, bwd)
            ok = err <= (3e-2 if name != "gather_columns" else 0.0)
            self.failed |= not ok
        nxt = self.rotated(make, set_bytes)

        def runner(fn):
            def run():
                args = nxt()
                out = fn(*args)
                if bwd:
                    out = out if isinstance(out, torch.Tensor) else out[0]
                    out.backward()
                    for t in _flat(args):
                        if isinstance(t, torch.Tensor):
                            t.grad = None
            return run
        res = {}
        impls = [("red_kernels", fused), ("eager", eager)]
        if not self.smoke and first and self.elapsed() < self.budget_s * OPS_COMPILE_SHARE:
            impls.append(("compile", torch.compile(eager, dynamic=False)))  # first T only
        for impl, fn in impls:
            try:
                run = runner(fn)
                ms = self.time_ms(run)
                peak = self.peak_bytes(run)
                res[impl] = (ms, peak)
            except Exception as e:  # record, keep going: one failure must not sink the run
                self.add(section="op", name=name, T=T, impl=impl, status="error", note=_err(e))
        e_ms, e_peak = res.get("eager", (float("nan"), float("nan")))
        c_ms = res.get("compile", (float("nan"),))[0]
        for impl, (ms, peak) in res.items():
            rate = work / (ms * 1e-3)
            ceiling = (self.ceil.get("tflops", math.nan) * 1e12 if kind == "flop"
                       else self.ceil.get("copy_GBps", math.nan) * 1e9)
            self.add(section="op", name=name, T=T, impl=impl, ms=ms, tokens_per_s=T / (ms * 1e-3),
                     speedup_vs_eager=e_ms / ms, speedup_vs_compile=c_ms / ms,
                     peak_MB=peak / 2 ** 20, mem_ratio_eager_over_this=e_peak / peak if peak else float("nan"),
                     work=kind, ceiling=ceiling, frac_of_ceiling=rate / ceiling,
                     rel_err=err if impl == "red_kernels" else "", status="ok" if ok else "CHECK_FAILED",
                     goal=GOALS.get(name, "") if impl == "red_kernels" else "")
        del inp

    def check(self, name, inp, fused, eager, bwd):
        def run(fn, args):
            args = [_detach_f32(a) for a in args]
            out = fn(*args)
            outs = list(out) if isinstance(out, tuple) else [out]
            grads = []
            if bwd:
                outs[0].backward()
                grads = [a.grad for a in _flat(args) if isinstance(a, torch.Tensor) and a.grad is not None]
            return [o.detach().float() for o in outs if isinstance(o, torch.Tensor)] + grads
        f = run(fused, inp)
        r = run(eager, _upcast(inp))
        errs = []
        for a, b in zip(f, r):
            a, b = a.double(), b.double()
            nb = b.norm().item()
            errs.append((a - b).norm().item() / nb if nb else a.norm().item())
        return max(errs) if errs else float("nan")

    # ---------------------------------------------------------------- (d) steps, through red.bench
    def steps(self, name: str, shape: dict, cfg: dict):
        """One teacher: teacher forward, red_step per backend (+ torch.compile), ordinary step."""
        from transformers import LlamaConfig

        tokens = cfg["seq_len"] * cfg["batch_size"]
        if self.elapsed() > self.budget_s:
            self.add(section="step", name=name, T=tokens, impl="all", status="skipped", note="time budget")
            return
        teacher = None
        try:
            teacher = bench.random_teacher(LlamaConfig(**shape), self.dev, self.dtype, seed=0)
        except Exception as e:  # noqa: BLE001 - recorded; the next teacher still runs
            self.add(section="step", name=name, T=tokens, impl="build_teacher", status="error", note=_err(e))
        if teacher is None:
            self.free()
            return
        backends = ("torch",) if self.smoke else ("torch", "triton")
        measured = {}

        def on_row(r):
            variant = r.get("variant") or r.get("name")
            if r.get("status") != "ok":
                self.add(section="step", name=name, T=tokens, impl=variant, status=r.get("status"),
                         note=r.get("error", ""))
                return
            measured[variant] = r
            ref = measured.get("torch") if variant in ("triton", "compile") else None
            mem = r.get("step_mem_bytes")
            ref_mem = ref.get("step_mem_bytes") if ref else None
            note = f"loss {r['loss']:.4g}" if r.get("loss") is not None else ""
            if r.get("compile_s") is not None:
                note += f"; first step (compiling) {r['compile_s']:.1f} s"
            self.add(section="step", name=name, T=tokens, impl=variant, ms=r["ms"], tokens_per_s=r["tokens_per_s"],
                     speedup_vs_eager=r["tokens_per_s"] / ref["tokens_per_s"] if ref else "",
                     peak_MB=mem / 2 ** 20 if mem is not None else "",
                     mem_ratio_eager_over_this=ref_mem / mem if ref_mem is not None and mem else "",
                     resident_MB=r["resident_bytes"] / 2 ** 20,
                     peak_total_MB=r["peak_mem_bytes"] / 2 ** 20 if r.get("peak_mem_bytes") is not None else "",
                     status="ok", goal=GOALS["red_step"] if variant == "triton" else "", note=note.strip("; "))

        try:
            res = bench.bench_teacher(teacher, shape["hidden_size"] // 2, cfg["seq_len"], cfg["batch_size"], backends,
                                      include_compile=not self.smoke, include_ordinary=True, include_kernels=False,
                                      steps=cfg["steps"], warmup=cfg["warmup"], deadline=self.t0 + self.budget_s,
                                      compile_reserve_s=COMPILE_RESERVE_S.get(name, 0.0), on_row=on_row)
            self.meta.setdefault("step_ratios", {})[name] = res["ratios"]
            for key, value in res["ratios"].items():  # the ratios of this teacher's step rows
                if value is not None:
                    self.add(section="ratio", name=name, T=tokens, impl=key, status="ok", note=f"{value:.4g}")
        except Exception as e:  # noqa: BLE001
            self.add(section="step", name=name, T=tokens, impl="bench_teacher", status="error", note=_err(e))
        del teacher
        self.free()

    # ---------------------------------------------------------------- goals
    def evaluate_goals(self, step_names, V):
        """PASS/FAIL of each goal, from the rows measured in this run."""
        goals = []

        def goal(name, target, value, ok, detail=""):
            status = "FAIL (not measured)" if value is None else ("PASS" if ok else "FAIL")
            goals.append(dict(goal=name, target=target, value=value, status=status, detail=detail))

        for name in step_names:
            st = {r["impl"]: r for r in self.rows if r["section"] == "step" and r["name"] == name
                  and r["status"] == "ok"}
            tr, to, od = st.get("triton"), st.get("torch"), st.get("ordinary")
            v = tr["tokens_per_s"] / to["tokens_per_s"] if tr and to else None
            goal(f"{name}: red step triton/torch tokens/s", ">= 1.3", v, v is not None and v >= 1.3)
            m = (tr["peak_MB"] / to["peak_MB"] if tr and to and isinstance(tr["peak_MB"], float)
                 and isinstance(to["peak_MB"], float) and to["peak_MB"] > 0 else None)
            goal(f"{name}: red step triton/torch step memory", "<= 0.6", m, m is not None and m <= 0.6,
                 "peak above resident weights + optimizer state")
            o = tr["tokens_per_s"] / od["tokens_per_s"] if tr and od else None
            goal(f"{name}: red step triton/ordinary tokens/s", ">= 0.6", o, o is not None and o >= 0.6)
        ops = {}
        for r in self.rows:
            if r["section"] == "op" and r["impl"] == "red_kernels" and r["status"] == "ok":
                ops.setdefault(r["name"], []).append(r)
        kl = ops.get("fused_linear_kl", [])
        mem = [r["mem_ratio_eager_over_this"] for r in kl]
        spd = [r["speedup_vs_eager"] for r in kl]
        goal(f"fused_linear_kl at V={V}: eager/fused memory (min over T)", ">= 4",
             min(mem) if mem and not any(math.isnan(x) for x in mem) else None, bool(mem) and min(mem) >= 4)
        goal(f"fused_linear_kl at V={V}: speed vs eager (min over T)", ">= 1.0",
             min(spd) if spd and not any(math.isnan(x) for x in spd) else None, bool(spd) and min(spd) >= 1.0)
        fr = [r["frac_of_ceiling"] for r in ops.get("rmsnorm_with_stats", [])]
        goal("rmsnorm_with_stats: fraction of copy bandwidth (min over T)", ">= 0.80",
             min(fr) if fr and not any(math.isnan(x) for x in fr) else None, bool(fr) and min(fr) >= 0.8)
        self.goals = goals
        for g in goals:
            parts = ["" if g["value"] is None else f"{g['value']:.3g}", g["detail"]]
            self.add(section="goal", name=g["goal"], status=g["status"], goal=g["target"],
                     note="; ".join(p for p in parts if p))
        return goals

    # ---------------------------------------------------------------- output
    def close(self):
        self._f.close()
        self.meta.update(elapsed_s=round(self.elapsed(), 1), finished=True, goals=self.goals)
        self.write_meta()

    def table(self):
        cols = ["section", "name", "T", "impl", "ms", "speedup_vs_eager", "speedup_vs_compile",
                "peak_MB", "mem_ratio_eager_over_this", "frac_of_ceiling", "rel_err", "status"]
        short = ["sec", "name", "T", "impl", "ms", "x_eager", "x_compile", "peak_MB",
                 "mem_eager/x", "frac_ceil", "rel_err", "status"]

        def fmt(v):
            if isinstance(v, float):
                return "" if math.isnan(v) else f"{v:.4g}"
            return "" if v is None else str(v)
        rows = [[fmt(r[c]) for c in cols] for r in self.rows if r["section"] not in ("goal", "ratio")]
        widths = [max(len(h), *(len(r[i]) for r in rows)) if rows else len(h) for i, h in enumerate(short)]
        print(" ".join(h.ljust(w) for h, w in zip(short, widths)))
        for r in rows:
            print(" ".join(v.ljust(w)[:60] for v, w in zip(r, widths)))
        print("(step rows: x_eager = tokens/s over the torch path's; peak_MB = step memory above the resident "
              "weights and optimizer state)")
        for r in self.rows:
            if r["section"] == "ratio":
                print(f"ratio {r['name']}: {r['impl']} = {r['note']}")
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


def _flat(args):
    for a in args:
        if isinstance(a, (list, tuple)):
            yield from a
        else:
            yield a


def _detach_f32(a):
    if isinstance(a, (list, tuple)):
        return [_detach_f32(x) for x in a]
    if isinstance(a, torch.Tensor) and a.is_floating_point():
        return a.detach().clone().requires_grad_(a.requires_grad)
    return a


def _upcast(a):
    """fp32 copies of the floating inputs (the reference runs in fp32)."""
    if isinstance(a, (list, tuple)):
        return type(a)(_upcast(x) for x in a)
    if isinstance(a, torch.Tensor) and a.is_floating_point():
        return a.detach().float().requires_grad_(a.requires_grad)
    return a


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="gpu_suite_results.csv")
    ap.add_argument("--smoke", action="store_true", help="tiny CPU run of every code path")
    ap.add_argument("--budget-s", type=float, default=390.0,
                    help="past this many seconds the remaining measurements are skipped rows")
    args = ap.parse_args(argv)
    if not args.smoke and not torch.cuda.is_available():
        ap.error("no CUDA device: use --smoke on CPU")
    cfg = SMOKE if args.smoke else REAL
    suite = Suite(args.smoke, args.out, args.budget_s)
    print(f"gpu suite: torch {suite.meta['torch']}, triton {suite.meta['triton']}, {suite.meta['gpu']}, "
          f"commit {suite.meta['commit'][:12]}, {suite.meta['date']}", flush=True)
    teachers = SMOKE_STEP_TEACHERS if args.smoke else STEP_TEACHERS
    try:
        with rk.use_backend("torch") if args.smoke else rk.use_backend("auto"):
            try:
                suite.ceilings()
            except Exception as e:  # noqa: BLE001 - later sections report nan fractions
                suite.add(section="ceiling", name="ceilings", status="error", note=_err(e))
            for T in cfg["Ts"]:
                suite.ops(cfg, T)
        # (d) chooses its backends itself, through red.bench
        for name, shape in teachers.items():
            suite.steps(name, shape, SMOKE_STEP if args.smoke else STEP)
        suite.evaluate_goals(list(teachers), cfg["V"])
    finally:
        suite.close()
    suite.table()
    return 1 if suite.failed else 0


if __name__ == "__main__":
    sys.exit(main())
