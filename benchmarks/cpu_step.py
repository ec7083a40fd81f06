"""RED's training step against ordinary training and the teacher forward, on the CPU, in one run.

    python benchmarks/cpu_step.py            # both cases, grad-accum 1 and 4 (9 min on a loaded 2-core CPU)

Two cases of issue 20, random teachers made from a config (no download), fp32, torch
backend, a random channel selection as the student:

- ``llama-d512``: Llama D=512, 8 layers, 8 heads x 64, MLP 1376, V=8192 tied -> d=256,
  micro-batches of 4 x 256 tokens;
- ``smollm2-135m``: SmolLM2-135M's shape (30 layers, D=576, 9 heads / 3 KV heads of 64,
  MLP 1536, V=49152 tied) -> d=288, micro-batches of 4 x 128 tokens.

For each case and each grad-accum (micro-batches a step) the product is measured, not a
copy of it: ``red.commands.bench.bench_teacher`` times ``red.train.trainer.train_step`` of the
``ProjectedStudent`` (make_weights, every micro-batch, weight_backward, norm, clipping,
AdamW), ordinary training of the exported student as a plain ``transformers`` model on the
same micro-batches (``red.commands.bench.ordinary_step``), and the teacher's forward over them.
Printed and written: RED/ordinary tokens/s, the floor ordinary/(ordinary + teacher
forward) that a distillation step cannot beat, RED as a fraction of that floor, and (at
the first grad-accum) the kernels one micro-batch launches, RED against ordinary
(``red.commands.bench.op_counts``). Times are medians of ``--steps`` steps after one warm-up; with
``--rounds`` > 1 the cases are measured again in turn and "best" is the fastest step seen.
Other load on the machine slows single runs several-fold: the load average is recorded
before and after each case, and the JSON (``--out``) keeps every step's time.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

CASES = {
    "llama-d512": dict(
        config=dict(vocab_size=8192, hidden_size=512, intermediate_size=1376, num_hidden_layers=8,
                    num_attention_heads=8, num_key_value_heads=8, head_dim=64, tie_word_embeddings=True,
                    rms_norm_eps=1e-5, max_position_embeddings=2048),
        hidden_size=256, batch_size=4, seq_len=256, goal_of_floor=0.9),
    "smollm2-135m": dict(
        config=dict(vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
                    num_attention_heads=9, num_key_value_heads=3, head_dim=64, tie_word_embeddings=True,
                    rms_norm_eps=1e-5, rope_theta=100000.0, max_position_embeddings=8192),
        hidden_size=288, batch_size=4, seq_len=128, goal_of_floor=0.8),
}
KEYS = ("red_step", "ordinary_step", "teacher_forward")


def measure_case(name: str, grad_accums, steps: int, ops: bool, memory: bool, log) -> list[dict]:
    """Every grad-accum of one case through red.commands.bench.bench_teacher; one result per grad-accum."""
    import torch
    from transformers import LlamaConfig

    from random_teacher import random_teacher  # benchmarks/random_teacher.py
    from red.commands import bench

    case = CASES[name]
    teacher = random_teacher(LlamaConfig(**case["config"]), "cpu", torch.float32, seed=0)
    out = []
    for k, ga in enumerate(grad_accums):
        load = os.getloadavg()[0]
        t0 = time.perf_counter()
        res = bench.bench_teacher(
            teacher, case["hidden_size"], case["seq_len"], case["batch_size"], backends=("torch",),
            include_kernels=False, include_op_counts=ops and k == 0, grad_accum=ga, steps=steps, warmup=1,
            init="random-select", seed=0, memory=memory,
            on_row=lambda r: log(f"  {name} grad-accum {ga}: {r['name']} "
                                 + (f"{r['ms']:.0f} ms" if r.get("ms") else f"{r.get('status')} {r.get('error', '')}")))
        bad = [r for r in res["steps"] if r["status"] != "ok"]
        if bad:
            raise SystemExit(f"{name}: measurement failed: {bad}")
        rows = {r["name"]: r for r in res["steps"]}
        out.append(dict(case=name, grad_accum=ga, tokens_per_step=res["tokens_per_step"],
                        ms_all={k2: rows[k2]["ms_all"] for k2 in KEYS},
                        step_mem_bytes={k2: rows[k2]["step_mem_bytes"] for k2 in KEYS},
                        loss=rows["red_step"]["loss"], op_counts=res["op_counts"].get("torch"),
                        load_before=load, load_after=os.getloadavg()[0],
                        seconds=round(time.perf_counter() - t0, 1)))
    return out


def summarize(ms_all: dict, tokens: int, stat: str) -> dict:
    """ms of each part (median or best of its steps), tokens/s and the ratios."""
    pick = (lambda v: statistics.median(v)) if stat == "median" else min
    ms = {k: pick(v) for k, v in ms_all.items()}
    r, o, t = ms["red_step"], ms["ordinary_step"], ms["teacher_forward"]
    ratio, floor = o / r, o / (o + t)
    return dict(ms=ms, red_tokens_per_s=tokens / (r * 1e-3), ordinary_tokens_per_s=tokens / (o * 1e-3),
                red_over_ordinary=ratio, floor=floor, of_floor=ratio / floor)


def table(results: list[dict], stat: str) -> str:
    head = ["case", "grad-accum", "tokens/step", "RED ms", "ordinary ms", "teacher fwd ms", "RED tok/s",
            "ordinary tok/s", "RED/ordinary", "floor", "RED of floor", "goal", "ops RED/ord"]
    rows = []
    for res in results:
        s = summarize(res["ms_all"], res["tokens_per_step"], stat)
        oc = res.get("op_counts")
        ops = (f"{oc['red']['micro_batch']['total']}/{oc['ordinary']['micro_batch']['total']} = "
               f"{oc['ratio_micro_batch']:.2f}x") if oc and oc.get("status") == "ok" else ""
        goal = f">= {CASES[res['case']]['goal_of_floor']}" if res["grad_accum"] == 4 else ""
        rows.append([res["case"], str(res["grad_accum"]), str(res["tokens_per_step"]), f"{s['ms']['red_step']:.0f}",
                     f"{s['ms']['ordinary_step']:.0f}", f"{s['ms']['teacher_forward']:.0f}",
                     f"{s['red_tokens_per_s']:.0f}", f"{s['ordinary_tokens_per_s']:.0f}",
                     f"{s['red_over_ordinary']:.2f}x", f"{s['floor']:.2f}x", f"{s['of_floor']:.2f}", goal, ops])
    widths = [max(len(h), *(len(r[i]) for r in rows)) for i, h in enumerate(head)]
    lines = ["  ".join(h.rjust(w) if i > 0 else h.ljust(w) for i, (h, w) in enumerate(zip(head, widths)))]
    lines += ["  ".join(c.rjust(w) if i > 0 else c.ljust(w) for i, (c, w) in enumerate(zip(r, widths))) for r in rows]
    return "\n".join(lines)


def machine(threads: int) -> dict:
    import torch

    from red.commands import bench

    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True,
                                timeout=10).stdout.strip()
    except Exception:  # noqa: BLE001
        commit = "unknown"
    return dict(date=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"), commit=commit,
                host=platform.node(), cpu=bench.device_name(torch.device("cpu")), cpus=os.cpu_count(),
                torch_threads=threads, versions=bench.versions())


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cases", default=",".join(CASES), help=f"comma-separated, of {', '.join(CASES)}")
    ap.add_argument("--grad-accum", default="1,4", help="comma-separated micro-batches a step")
    ap.add_argument("--steps", type=int, default=3, help="timed steps per measurement (after one warm-up)")
    ap.add_argument("--rounds", type=int, default=1, help="measure every case this many times, in turn")
    ap.add_argument("--threads", type=int, default=2, help="torch threads")
    ap.add_argument("--memory", action="store_true", help="also read each step's peak CPU memory (one more step each)")
    ap.add_argument("--no-ops", action="store_true", help="skip the op counts (two more steps of each kind)")
    ap.add_argument("--label", default="", help="a note stored with the results, e.g. 'idle machine'")
    ap.add_argument("--out", default=os.path.join(ROOT, "benchmarks", "results",
                                                  f"cpu-step-{datetime.date.today().isoformat()}.json"))
    args = ap.parse_args(argv)
    names = [c.strip() for c in args.cases.split(",") if c.strip()]
    unknown = [c for c in names if c not in CASES]
    if unknown:
        ap.error(f"unknown case(s) {unknown}; known: {', '.join(CASES)}")
    grad_accums = [int(g) for g in args.grad_accum.split(",")]

    import torch

    torch.set_num_threads(args.threads)

    def log(msg):
        print(msg, file=sys.stderr, flush=True)

    info = dict(machine(args.threads), label=args.label, argv=sys.argv[1:], steps=args.steps, rounds=args.rounds,
                cases={c: CASES[c] for c in names})
    t0 = time.perf_counter()
    results = []
    for rnd in range(args.rounds):
        for name in names:
            log(f"round {rnd}: {name} (load {os.getloadavg()[0]:.1f})")
            for res in measure_case(name, grad_accums, args.steps, ops=not args.no_ops and rnd == 0,
                                    memory=args.memory, log=log):
                results.append(dict(res, round=rnd))
    # one row per case and grad-accum: every round's steps together
    merged = {}
    for res in results:
        key = (res["case"], res["grad_accum"])
        if key not in merged:
            merged[key] = dict(res, ms_all={k: list(v) for k, v in res["ms_all"].items()}, loads=[])
        else:
            for k, v in res["ms_all"].items():
                merged[key]["ms_all"][k] += v
            merged[key]["op_counts"] = merged[key]["op_counts"] or res["op_counts"]
        merged[key]["loads"] += [res["load_before"], res["load_after"]]
    rows = list(merged.values())
    for r in rows:
        r["median"] = summarize(r["ms_all"], r["tokens_per_step"], "median")
        r["best"] = summarize(r["ms_all"], r["tokens_per_step"], "best")
    info["elapsed_s"] = round(time.perf_counter() - t0, 1)
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(dict(info, results=rows), f, indent=1)
    loads = [x for r in rows for x in r["loads"]]
    print(f"RED step vs ordinary training vs teacher forward, CPU ({info['cpu']}), fp32, torch backend; "
          f"{args.rounds} round(s) x {args.steps} steps; load average {min(loads):.1f}-{max(loads):.1f}"
          + (f"; {args.label}" if args.label else ""))
    print("RED/ordinary = tokens/s ratio; floor = ordinary/(ordinary + teacher fwd); RED of floor = their ratio "
          "(issue 20 goal at grad-accum 4 on an idle machine); ops = kernels of one micro-batch")
    for stat in ("median", "best") if args.rounds * args.steps > 1 else ("median",):
        print(f"\n{stat} step:")
        print(table(rows, stat))
    print(f"\n{info['elapsed_s']:.0f} s; every step's time in {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
