"""Comparing two training runs that reach the same model by different code paths
(1 vs N processes, sharded vs whole start-up, a checkpoint resharded on resume).

Such runs do the same arithmetic up to the order of float32 reductions, so every
gradient agrees to about 1e-6 relative. What that means for the trained tensors depends
on the optimizer. AdamW's step is lr * m / (sqrt(v) + eps): for an entry whose gradient
is near zero the ratio is a sign, so with the default eps = 1e-8 a rounding-level
difference in a gradient of ~1e-8 can move that entry by up to lr, on whichever machine
(the BLAS and vector units decide which entries). Its derivative in the gradient is at
most a few / eps, so with eps above the size of the gradients (here ~1e-3) the step is
Lipschitz: a difference d in a gradient moves a weight by at most ~4 lr d / eps. The runs
compared here therefore train with ``ADAM_EPS``: at lr 3e-3, 4 steps and gradient
differences below 1e-8, the bound is ~1e-9 per entry, far under ``ATOL``, on any machine.
Measured on a 4-step run (qwen3, d = 32) with Gaussian noise of 1e-6 of each tensor's
largest gradient added to every gradient entry (ten times rounding): the trained tensors
moved by at most 2.1e-3 at eps = 1e-8 and 3.0e-6 at eps = 1e-3. A raised eps also makes
the comparison see the gradient's scale (a wrong factor in an average over ranks), which
AdamW's default eps hides, since its step ignores scale.

Runs compared bit for bit (a resumed run against an uninterrupted one in the same kind
of process) run the same ops in the same order and stay ``torch.equal``.
"""
from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]

ADAM_EPS = 1e-3
ATOL = 1e-5   # trained tensors (projections, gains, AdamW moments), absolute
RTOL = 1e-5   # every loss term of every metrics row, relative (absolute floor 1e-7)


def metrics(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def max_abs_diff(a: dict, b: dict) -> float:
    """Largest |a - b| over tensors with the same names (asserts the names agree)."""
    assert set(a) == set(b), sorted(set(a) ^ set(b))
    return max((a[k].double() - b[k].double()).abs().max().item() for k in a)


def assert_close_tensors(a: dict, b: dict) -> float:
    worst = max_abs_diff(a, b)
    assert worst <= ATOL, worst
    return worst


def assert_same_metrics(a: Path, b: Path) -> None:
    """Both runs logged the same steps with the same values (throughput aside)."""
    ma, mb = metrics(a), metrics(b)
    assert [r["step"] for r in ma] == [r["step"] for r in mb]
    for ra, rb in zip(ma, mb):
        for k in ra:
            if k != "tokens_per_s":
                assert rb[k] == pytest.approx(ra[k], rel=RTOL, abs=1e-7), (ra["step"], k)


def same_threads_env(**extra) -> dict:
    """Environment of a child process whose results are compared bit for bit with this
    one's: the same number of torch threads (a BLAS may split a product's reduction
    differently with another count, so "same ops in the same order" needs it), and the
    checkout and tests/ importable."""
    path = [str(ROOT), str(ROOT / "tests"), os.environ.get("PYTHONPATH", "")]
    return dict(os.environ, PYTHONWARNINGS="ignore", OMP_NUM_THREADS=str(torch.get_num_threads()),
                PYTHONPATH=os.pathsep.join(p for p in path if p), **extra)
