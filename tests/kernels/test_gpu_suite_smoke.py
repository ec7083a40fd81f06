"""The GPU suite's --smoke mode runs every code path on CPU (the op checks against float64,
the step section through red.commands.bench on a tiny random Llama teacher at grad-accum 1 and 4,
the op counts) and writes a well-formed CSV, row by row, plus the run's metadata."""
import csv
import json
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
OPS = {"rmsnorm_with_stats", "clone_mse", "fused_linear_kl"}


def test_gpu_suite_smoke(tmp_path):
    out = tmp_path / "res.csv"
    env = dict(os.environ, PYTHONPATH=ROOT)
    env.pop("TRITON_INTERPRET", None)
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "benchmarks", "gpu_suite.py"),
                           "--smoke", "--out", str(out)], capture_output=True, text=True,
                          env=env, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    lines = proc.stdout.splitlines()
    assert "CPU smoke run" in lines[-1]  # the table is printed last
    with open(out, newline="") as f:
        reader = csv.DictReader(f)
        rows = list(reader)
        assert reader.fieldnames[:5] == ["section", "name", "T", "grad_accum", "impl"]
    assert {r["section"] for r in rows} == {"ceiling", "op", "step", "ratio", "ops", "goal"}
    # (b), (c): every op of red_kernels, at both T, against eager; checked once against float64
    ops = [r for r in rows if r["section"] == "op"]
    assert {r["name"] for r in ops} == OPS
    assert {r["T"] for r in ops} == {"48", "80"}
    for name in OPS:
        for T in ("48", "80"):
            impls = {r["impl"] for r in ops if r["name"] == name and r["T"] == T}
            assert impls == {"red_kernels", "eager"}, (name, T, impls)
    steps = [r for r in rows if r["section"] == "step"]
    for r in ops + steps:
        assert r["status"] == "ok", r
        assert float(r["ms"]) > 0 and float(r["tokens_per_s"]) > 0
    checked = [r for r in ops if r["impl"] == "red_kernels" and r["rel_err"] != ""]
    assert len(checked) == len(OPS) and all(float(r["rel_err"]) < 1e-5 for r in checked)  # fp32 vs float64
    # (d) the product's own step: torch path, ordinary training and the teacher forward, on
    # the tiny Llama teacher at grad-accum 1 and 4; triton appears only where it ran (never here)
    assert {r["name"] for r in steps} == {"tiny-llama"}
    for ga, tokens in (("1", "64"), ("4", "256")):
        mine = {r["impl"]: r for r in steps if r["grad_accum"] == ga}
        assert set(mine) == {"torch", "ordinary", "teacher_forward"}, (ga, set(mine))
        assert {r["T"] for r in mine.values()} == {tokens}
        torch_row = mine["torch"]
        assert float(torch_row["resident_MB"]) > 0 and float(torch_row["peak_total_MB"]) >= float(torch_row["peak_MB"])
        assert "loss" in torch_row["note"]
        ratios = {r["impl"]: float(r["value"]) for r in rows if r["section"] == "ratio" and r["grad_accum"] == ga}
        assert ratios["torch_over_ordinary_tokens_per_s"] > 0 and 0 < ratios["floor_ratio"] < 1
        assert abs(ratios["torch_of_floor"] - ratios["torch_over_ordinary_tokens_per_s"] / ratios["floor_ratio"]) < 1e-3
    # op counts of a micro-batch at grad-accum 1, RED against ordinary
    (op_row,) = [r for r in rows if r["section"] == "ops"]
    assert op_row["impl"] == "torch" and op_row["grad_accum"] == "1" and float(op_row["value"]) > 1
    assert "a layer: RED" in op_row["note"] and "ordinary" in op_row["note"]
    # a PASS/FAIL line per goal, in the CSV and printed
    goals = [r for r in rows if r["section"] == "goal"]
    printed = [ln for ln in lines if ln.startswith("goal ")]
    assert len(goals) == len(printed) == 7
    assert all(r["status"].split()[0] in ("PASS", "FAIL") for r in goals)
    assert sum("fused_linear_kl" in r["name"] for r in goals) == 2 and any("rmsnorm" in r["name"] for r in goals)
    assert sum("issue 20" in r["name"] for r in goals) == 2
    assert all(r["status"] != "FAIL (not measured)" for r in goals), goals
    # metadata beside the CSV
    meta = json.loads((tmp_path / "res.meta.json").read_text())
    for key in ("torch", "triton", "transformers", "gpu", "commit", "date"):
        assert meta[key], key
    assert meta["finished"] is True and len(meta["goals"]) == 7
    assert meta["step_ratios"]["tiny-llama"]["grad_accum=4"]["floor_ratio"] is not None
    oc = meta["op_counts"]["tiny-llama"]["torch"]
    assert oc["status"] == "ok" and oc["red"]["unattributed"] == 0 and oc["layers"] == 2
