"""Start-up time of the `red` command (pytest-benchmark): `red --help` and one-line user
errors must answer in under 0.5 s, i.e. without importing torch or transformers.

Run with ``python -m pytest benchmarks``. Each case times ``python -m red ...`` in a fresh
subprocess (the time a user waits, interpreter start included); the median is recorded in
``extra_info`` and printed.
"""
from __future__ import annotations

import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
LIMIT_S = 0.5
CASES = {
    "help": (["--help"], 0),
    "distill-help": (["distill", "--help"], 0),
    "unknown-option": (["distill", "--no-such-option", "1"], 2),
    "config-error": (["distill", "--teacher", "x", "--data", "y", "--hidden-size", "8", "--out", "o", "--lr", "nan"], 2),
}


@pytest.mark.parametrize("case", list(CASES))
def test_startup(benchmark, tmp_path, case):
    args, want_rc = CASES[case]
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    cmd = [sys.executable, "-m", "red", *args]
    times = []

    def once():
        t = time.perf_counter()
        p = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)
        times.append(time.perf_counter() - t)
        assert p.returncode == want_rc, p.stderr

    once()  # warm-up: byte-code caches, file system
    times.clear()
    benchmark.pedantic(once, rounds=7, iterations=1)
    median = statistics.median(times)
    benchmark.extra_info["median_s"] = round(median, 4)
    benchmark.extra_info["limit_s"] = LIMIT_S
    print(f"\npython -m red {' '.join(args)}: median {median:.3f} s over {len(times)} runs (limit {LIMIT_S} s)")
    assert median < LIMIT_S, f"python -m red {' '.join(args)} took {median:.3f} s (median); limit {LIMIT_S} s"
