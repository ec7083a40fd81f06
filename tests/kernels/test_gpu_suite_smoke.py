"""The GPU suite's --smoke mode runs every code path on CPU and writes a well-formed CSV."""
import csv
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
    assert "CPU smoke run" in proc.stdout.splitlines()[-1]  # the table is printed last
    with open(out, newline="") as f:
        reader = csv.DictReader(f)
        rows = list(reader)
        assert reader.fieldnames[:5] == ["section", "name", "T", "impl", "ms"]
    assert {r["section"] for r in rows} == {"ceiling", "op", "step"}
    ops = [r for r in rows if r["section"] == "op"]
    assert {r["name"] for r in ops} == OPS
    assert {r["T"] for r in ops} == {"48", "80"}
    for name in OPS:
        for T in ("48", "80"):
            impls = {r["impl"] for r in ops if r["name"] == name and r["T"] == T}
            assert impls == {"red_kernels", "eager"}, (name, T, impls)
    for r in ops + [r for r in rows if r["section"] == "step"]:
        assert r["status"] == "ok", r
        assert float(r["ms"]) > 0 and float(r["tokens_per_s"]) > 0
    checked = [r for r in ops if r["impl"] == "red_kernels" and r["rel_err"] != ""]
    assert len(checked) == len(OPS) and all(float(r["rel_err"]) < 3e-2 for r in checked)
    steps = [r for r in rows if r["section"] == "step"]
    assert {r["impl"] for r in steps} == {"red_kernels", "eager"} and len(steps) == 4
