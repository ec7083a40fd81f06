"""The ahead-of-time GPU compile check (benchmarks/aot_compile.py), without a GPU.

(a) its spec list is what the trainer really launches: a few bf16 training steps (both KL
    presets, lm_weight 0, the divergence options, two micro-batches a step), validation and
    calibration of a tiny Llama, run with the Triton backend while
    ``red_kernels._common.RECORD`` collects every launch, must be covered by
    ``aot_compile.specs()`` (kernel, pointer dtypes, scalar kinds, constexprs other than
    tiles and interpreter-only flags), and every bf16 trainer spec must have been launched
    (no stale entries);
(b) the script compiles every spec for sm_90 and sm_80 and exits 0;
(c) it exits 1 and says why on a mixed bf16 x fp32 ``tl.dot`` and on a shared-memory overflow.
(b) and (c) run in a subprocess without TRITON_INTERPRET (the kernels must be decorated
for the GPU); triton's on-disk cache makes reruns of (b) fast.
"""
from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("triton")

import red_kernels as K  # noqa: E402
from red_kernels import _common  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "benchmarks" / "aot_compile.py"


def _load_aot():
    spec = importlib.util.spec_from_file_location("aot_compile", SCRIPT)
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod  # dataclasses look their module up there
    spec.loader.exec_module(mod)
    return mod


aot = _load_aot()

#: every Triton kernel of red_kernels: the LM head's two, the clone taps' and calibration's
TRAINER_KERNELS = {"_acc_tn_kernel", "_mse_kernel", "_kl_ce_kernel", "_rmsnorm_stats_kernel"}


def _run_script(*args, timeout=600):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    return subprocess.run([sys.executable, str(SCRIPT), *args], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=timeout)


@pytest.fixture(scope="module")
def recorded(teacher_dirs, corpus_file, device):
    """Every Triton launch of bf16 calibration, training and validation."""
    from red.train.calibration import calibrate
    from red.config import DistillConfig
    from red.data.corpus import load_corpus
    from red.train.startup import build_student
    from red.model.student import LossSettings
    from red.model.teacher import load_teacher
    from red.train.trainer import evaluate, make_optimizer, train_step

    teacher, tok = load_teacher(teacher_dirs["llama"], dtype=torch.bfloat16, device=device)
    corpus = load_corpus(corpus_file, tok, 16)
    batch = [corpus.train[:2].to(device), corpus.train[2:4].to(device)]  # two micro-batches a step
    old = _common.RECORD
    _common.RECORD = []
    try:
        with K.use_backend("triton"):
            cal = calibrate(teacher, corpus.train[:2], progress=False)
            student = build_student(teacher, 32, "red", cal)
            opt = make_optimizer(student.parameters(), 1e-3, device)
            for settings in (LossSettings(temperature=1.0), LossSettings(temperature=40.0),
                             LossSettings(temperature=1.0, lm_weight=0.0),
                             LossSettings(divergence="reverse-kl"), LossSettings(divergence="jsd", jsd_beta=0.3),
                             LossSettings(teacher_top_k=64), LossSettings(temperature=40.0, kl_reduction="sum")):
                train_step(student, opt, batch, settings)
            for temp in (1.0, 40.0):
                evaluate(student, corpus, DistillConfig(temperature=temp, batch_size=2, val_batches=1))
        return list(_common.RECORD)
    finally:
        _common.RECORD = old


def test_specs_cover_every_trainer_launch(recorded):
    specs = aot.specs()
    keys = {s.key() for s in specs}
    assert {r["kernel"] for r in recorded} == TRAINER_KERNELS
    missing = {}
    for r in recorded:
        k = aot.coverage_key(r)
        if k not in keys:
            missing[k] = r
    assert not missing, "launches not compiled by benchmarks/aot_compile.py:\n" + "\n".join(
        json.dumps(r, default=str) for r in missing.values())
    seen = {aot.coverage_key(r) for r in recorded}
    stale = [(s.name, s.variant) for s in specs
             if s.trainer and s.variant.startswith("bf16") and s.key() not in seen]
    assert not stale, f"bf16 trainer specs that the bf16 run never launched: {stale}"


def test_specs_cover_every_kernel_of_red_kernels():
    """No Triton kernel of the package is left out of the check (nor is a deleted one kept)."""
    found = set()
    for mod in ("_common", "clone_mse", "fused_linear_kl", "norm_stats"):
        m = importlib.import_module(f"red_kernels.{mod}")
        # launched kernels (jit, or interpreter functions on the CPU); @triton.jit helpers are not launched
        found |= {n for n, v in vars(m).items() if type(v).__module__.startswith("triton.") and n.endswith("_kernel")}
    pkg = Path(K.__file__).parent
    assert sorted(p.stem for p in pkg.glob("*.py")) == ["__init__", "_backend", "_common", "clone_mse",
                                                        "fused_linear_kl", "norm_stats"]
    assert found == TRAINER_KERNELS == {s.name for s in aot.specs()}


def test_specs_are_well_formed():
    specs = aot.specs()
    assert {s.name for s in specs} == TRAINER_KERNELS
    assert len({(s.name, s.variant) for s in specs}) == len(specs)
    for s in specs:
        sig, ce, attrs = aot.compile_signature(s)
        assert set(sig) == set(s.kernel.arg_names)
        assert all(v == "constexpr" for k, v in sig.items() if k in ce)
        assert s.constexprs.get("FIX_BF16", False) is False  # interpreter-only
        if "IEEE" in s.constexprs:
            low = "bf16" in s.variant
            assert s.constexprs["IEEE"] is (not low) and s.constexprs["UPCAST"] is (not low), s.variant


def _nvidia_backend():
    try:
        import triton.backends.nvidia.compiler  # noqa: F401
        return True
    except Exception:
        return False


needs_nvidia = pytest.mark.skipif(not _nvidia_backend(), reason="triton's NVIDIA backend is not installed")


@needs_nvidia
def test_script_compiles_every_kernel_for_sm90_and_sm80(tmp_path):
    out = tmp_path / "aot.json"
    r = _run_script("--arch", "sm_90", "--arch", "sm_80", "--json", str(out))
    assert r.returncode == 0, r.stdout[-4000:] + r.stderr[-4000:]
    for name in TRAINER_KERNELS:
        assert name in r.stdout
    rows = json.loads(out.read_text())["rows"]
    n = len(aot.specs())
    assert len(rows) == 2 * n
    assert {r["target"] for r in rows} == {"sm_90", "sm_80"}
    for row in rows:
        assert row["status"].startswith("ok"), row
        assert row["registers"] and 0 < row["registers"] <= 255, row
        assert 0 <= row["shared"] <= row["smem_limit"], row
    # bf16 GEMMs use the tensor cores: wgmma on Hopper, mma.sync on Ampere
    for row in rows:
        if row["kernel"] == "_acc_tn_kernel" and row["variant"].startswith("bf16"):
            assert row["mma"] == ("wgmma" if row["target"] == "sm_90" else "mma"), row


@needs_nvidia
def test_script_fails_on_mixed_dot_dtypes_and_shared_memory_overflow():
    r = _run_script("--arch", "sm_90", "--broken-only")
    assert r.returncode == 1, r.stdout + r.stderr
    assert "COMPILE ERROR" in r.stdout and "Both operands must be same dtype" in r.stdout
    assert "SMEM OVER LIMIT" in r.stdout and "allows 232448 B per block" in r.stdout


def test_compile_refuses_interpreter_kernels():
    if not _common.INTERPRET:
        pytest.skip("kernels were not decorated under the interpreter")
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET"):
        aot.compile_spec(aot.specs()[0], "sm_90")
