"""The GPU suite's --smoke mode runs every code path on CPU (the step section through
red.bench on a tiny random Llama teacher) and writes a well-formed CSV, row by row, plus
the run's metadata."""
import csv
import json
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
OPS = {"rmsnorm_with_stats", "projected_mse", "projected_mse_student_space", "selected_mse",
       "selected_mse_student_space", "gather_columns", "projected_linear_group_qkv",
       "fused_linear_kl"}


def test_gpu_suite_smoke(tmp_path):
    out = tmp_path / "res.csv"
    env = dict(os.environ, PYTHONPATH=ROOT)
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "benchmarks", "gpu_suite.py"),
                           "--smoke", "--out", str(out)], capture_output=True, text=True,
                          env=env, timeout=180)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    lines = proc.stdout.splitlines()
    assert "CPU smoke run" in lines[-1]  # the table is printed last
    with open(out, newline="") as f:
        reader = csv.DictReader(f)
        rows = list(reader)
        assert reader.fieldnames[:5] == ["section", "name", "T", "impl", "ms"]
    assert {r["section"] for r in rows} == {"ceiling", "op", "step", "ratio", "goal"}
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
    assert len(checked) == len(OPS) and all(float(r["rel_err"]) < 3e-2 for r in checked)
    # (d) the product's own step: torch path, ordinary training and the teacher forward, on
    # the tiny Llama teacher; triton appears only where it ran (never in the CPU smoke run)
    assert {r["name"] for r in steps} == {"tiny-llama"}
    impls = {r["impl"] for r in steps}
    assert {"torch", "ordinary", "teacher_forward"} <= impls <= {"torch", "triton", "compile", "ordinary",
                                                                 "teacher_forward"}
    assert "triton" not in impls and "compile" not in impls
    torch_row = next(r for r in steps if r["impl"] == "torch")
    assert float(torch_row["resident_MB"]) > 0 and float(torch_row["peak_total_MB"]) >= float(torch_row["peak_MB"])
    assert "loss" in torch_row["note"]
    ratios = {r["impl"]: float(r["note"]) for r in rows if r["section"] == "ratio"}
    assert ratios["torch_over_ordinary_tokens_per_s"] > 0 and 0 < ratios["floor_ratio"] < 1
    # a PASS/FAIL line per goal, in the CSV and printed
    goals = [r for r in rows if r["section"] == "goal"]
    printed = [ln for ln in lines if ln.startswith("goal ")]
    assert len(goals) == len(printed) == 6
    assert all(r["status"].split()[0] in ("PASS", "FAIL") for r in goals)
    assert any("fused_linear_kl" in r["name"] for r in goals) and any("rmsnorm" in r["name"] for r in goals)
    assert sum("red step" in r["name"] for r in goals) == 3
    # metadata beside the CSV
    meta = json.loads((tmp_path / "res.meta.json").read_text())
    for key in ("torch", "triton", "transformers", "gpu", "commit", "date"):
        assert meta[key], key
    assert meta["finished"] is True and len(meta["goals"]) == 6
    assert meta["step_ratios"]["tiny-llama"]["floor_ratio"] is not None
