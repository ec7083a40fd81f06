"""One RED training step vs ordinary training vs the teacher forward, on the CPU, before/after.

The setting of the issue: a random Llama teacher (D=512, 8 layers, 8 heads of 64, MLP 1376,
V=8192, tied embeddings, fp32, seed 0), student d=256 (random channel selection), 4 x 256
tokens a step, torch backend, 2 torch threads. Three numbers (ms of one step, after one warm-up
step; every step's time is kept, and the summary gives the fastest step and the median):

- RED step: forward + backward + gradient norm + clipping + AdamW of the ProjectedStudent;
- ordinary step: the same for the exported student as a plain transformers model on the
  same tokens (forward with labels, backward, clipping, AdamW);
- teacher forward: the teacher alone, no grad.

RED's throughput relative to ordinary training is ordinary_ms / red_ms; the floor that a
distillation step cannot beat is ordinary_ms / (ordinary_ms + teacher_ms). On a shared
machine other processes' load slows single runs several-fold: compare the "best" rows.

    python benchmarks/cpu_step.py                                   # this checkout
    git worktree add /tmp/red-before 3ae2ae7
    python benchmarks/cpu_step.py --before /tmp/red-before --rounds 3  # alternate old / this

Each measurement runs in its own process with PYTHONPATH set to the checkout it measures.
This checkout is measured through ``red.bench`` (red.trainer.train_step, red.bench's
ordinary and teacher-forward timers); a checkout without ``red.bench`` (before) is measured
by :func:`old_loop`, which repeats what its trainer loop did for one step (distill_losses,
backward, every loss term read back, gradient norm, clipping, AdamW, zero_grad), and the
same ordinary / teacher-forward timers as red.bench, written out here. Rounds alternate
between the checkouts so that both see the same machine load; the load average is printed.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SHAPE = dict(vocab_size=8192, hidden_size=512, intermediate_size=1376, num_hidden_layers=8, num_attention_heads=8,
             num_key_value_heads=8, head_dim=64, tie_word_embeddings=True, rms_norm_eps=1e-5,
             max_position_embeddings=2048)
D_STUDENT, BATCH, SEQ = 256, 4, 256
KEYS = ("red_step", "ordinary_step", "teacher_forward")


def _times_ms(fn, steps: int, warmup: int = 1) -> list[float]:
    for _ in range(warmup):
        fn()
    ts = []
    for _ in range(steps):
        t0 = time.perf_counter()
        fn()
        ts.append((time.perf_counter() - t0) * 1e3)
    return ts


def old_loop(teacher, ids, steps: int) -> dict:
    """An older checkout: its build_student, plain AdamW and its trainer's per-step work."""
    import torch

    from red.export import merged_state_dict, student_config
    from red.pipeline import build_student
    from red.student import LossSettings

    student = build_student(teacher, D_STUDENT, init="random-select", seed=0)
    params = student.trainable_parameters()
    opt = torch.optim.AdamW(params, lr=1e-5, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0)
    loss = LossSettings()

    def red_step():
        parts = student.distill_losses(ids, loss)
        parts["loss"].backward()
        {k: float(v.detach()) for k, v in parts.items()}  # the old loop read every term back
        total = torch.nn.utils.get_total_norm([p.grad for p in params if p.grad is not None])
        float(total)
        torch.nn.utils.clip_grads_with_norm_(params, 1.0, total)
        opt.step()
        opt.zero_grad(set_to_none=True)

    out = {"red_step": _times_ms(red_step, steps)}
    # ordinary training of the exported student, as red.bench.ordinary_model / bench_ordinary do it
    from transformers import AutoModelForCausalLM

    cfg = student_config(teacher, D_STUDENT, student.norm_eps, torch.float32)
    model = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32)
    model.load_state_dict(merged_state_dict(student), strict=False)
    model.train().requires_grad_(True)
    mp = list(model.parameters())
    mopt = torch.optim.AdamW(mp, lr=1e-5, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0)

    def ordinary():
        model(input_ids=ids, labels=ids, use_cache=False).loss.backward()
        torch.nn.utils.clip_grad_norm_(mp, 1.0)
        mopt.step()
        mopt.zero_grad(set_to_none=True)

    out["ordinary_step"] = _times_ms(ordinary, steps)

    def fwd():
        with torch.no_grad():
            teacher(input_ids=ids, use_cache=False)

    out["teacher_forward"] = _times_ms(fwd, steps)
    return out


def worker(steps: int, threads: int) -> dict:
    import torch
    from transformers import AutoModelForCausalLM, LlamaConfig

    import red

    torch.set_num_threads(threads)
    torch.manual_seed(0)
    teacher = AutoModelForCausalLM.from_config(LlamaConfig(**SHAPE), dtype=torch.float32).eval().requires_grad_(False)
    ids = torch.randint(0, SHAPE["vocab_size"], (BATCH, SEQ), generator=torch.Generator().manual_seed(0))
    load = os.getloadavg()[0]
    # an older checkout has no red/bench.py (the editable install's finder could still hand
    # out this checkout's module, so look at the files of the red that was imported)
    if not os.path.exists(os.path.join(os.path.dirname(red.__file__), "bench.py")):
        ms, how = old_loop(teacher, ids, steps), "old loop (distill_losses, backward, reads, clip, AdamW)"
    else:
        from red import bench

        res = bench.bench_teacher(teacher, D_STUDENT, SEQ, BATCH, backends=("torch",), include_kernels=False,
                                  steps=steps, warmup=1, init="random-select", seed=0, memory=False)
        rows = {r["name"]: r for r in res["steps"]}
        bad = [r for r in res["steps"] if r["status"] != "ok"]
        if bad:
            raise SystemExit(f"measurement failed: {bad}")
        ms, how = {k: rows[k]["ms_all"] for k in ("red_step", "ordinary_step", "teacher_forward")}, \
            "red.bench (red.trainer.train_step)"
    return dict(ms, red=os.path.dirname(red.__file__), how=how, threads=threads, load_before=load,
                load_after=os.getloadavg()[0], torch=torch.__version__)


def ratios(ms: dict) -> dict:
    r, o, t = ms["red_step"], ms["ordinary_step"], ms["teacher_forward"]
    return {"red_over_ordinary": o / r, "floor": o / (o + t)}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--before", default=None, help="an older checkout to measure too (e.g. a git worktree)")
    ap.add_argument("--rounds", type=int, default=1, help="alternating rounds (each checkout once a round)")
    ap.add_argument("--steps", type=int, default=5, help="timed steps per measurement (after one warm-up)")
    ap.add_argument("--threads", type=int, default=2, help="torch threads")
    ap.add_argument("--json", default=None, help="write every measurement here")
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.worker:
        print(json.dumps(worker(args.steps, args.threads)))
        return 0
    trees = ([("before", os.path.abspath(args.before))] if args.before else []) + [("after", ROOT)]
    runs = []
    for rnd in range(args.rounds):
        for label, tree in trees:
            env = dict(os.environ, PYTHONPATH=tree, PYTHONWARNINGS="ignore")
            env.pop("TRITON_INTERPRET", None)
            p = subprocess.run([sys.executable, os.path.abspath(__file__), "--worker", "--steps", str(args.steps),
                                "--threads", str(args.threads)], capture_output=True, text=True, env=env, cwd="/")
            if p.returncode:
                print(p.stdout[-2000:], p.stderr[-4000:], file=sys.stderr)
                return 1
            m = json.loads(p.stdout.strip().splitlines()[-1])
            m.update(label=label, round=rnd, tree=tree)
            runs.append(m)
            med = {k: statistics.median(m[k]) for k in KEYS}
            r = ratios(med)
            print(f"round {rnd} {label:<6} red step {med['red_step']:7.0f} ms  ordinary {med['ordinary_step']:6.0f} ms  "
                  f"teacher fwd {med['teacher_forward']:5.0f} ms  red/ordinary {r['red_over_ordinary']:.2f}x  "
                  f"floor {r['floor']:.2f}x  load {m['load_before']:.1f}->{m['load_after']:.1f}  ({m['red']})",
                  flush=True)
    print(f"\nrandom Llama teacher D={SHAPE['hidden_size']}, {SHAPE['num_hidden_layers']} layers, "
          f"V={SHAPE['vocab_size']}, student d={D_STUDENT}, {BATCH}x{SEQ} tokens, fp32, {args.threads} threads; "
          f"{args.rounds} round(s) x {args.steps} steps per checkout")
    print("best = fastest single step over all rounds (the least disturbed by other load); "
          "median = median of the per-round medians")
    print(f"{'code':<8}{'stat':<8}{'RED step ms':>12}{'ordinary ms':>13}{'teacher fwd ms':>16}{'RED/ordinary':>14}"
          f"{'floor':>8}")
    for label, _ in trees:
        mine = [m for m in runs if m["label"] == label]
        for stat in ("best", "median"):
            if stat == "best":
                ms = {k: min(min(m[k]) for m in mine) for k in KEYS}
            else:
                ms = {k: statistics.median(statistics.median(m[k]) for m in mine) for k in KEYS}
            r = ratios(ms)
            print(f"{label:<8}{stat:<8}{ms['red_step']:>12.0f}{ms['ordinary_step']:>13.0f}{ms['teacher_forward']:>16.0f}"
                  f"{r['red_over_ordinary']:>13.2f}x{r['floor']:>7.2f}x")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(runs, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
