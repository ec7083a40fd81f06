"""The GPU precision regime, tested on CPU (README, "Precision policy").

``--precision bf16`` holds the teacher in bf16, keeps fp32 master projections and gains,
and runs every matmul of the step in bf16, forward and backward. These tests run that
regime on CPU through both kernel backends (Triton under the interpreter) for every
supported architecture, and check what a GPU run depends on:

- the step runs and its losses are finite, within a stated tolerance of the fp32 run;
- every projection and gain receives a finite, non-zero fp32 gradient;
- no fp32 matmul of any size that matters runs (ops recorded with a TorchDispatchMode);
- ``red distill --precision bf16`` works end to end from the command line.

Tolerance: one bf16 step against the same step in fp32. bf16 keeps 8 significant bits
(relative rounding 2^-9 = 0.2 %). Measured on these tiny teachers (both backends): total
loss within 0.02 %, KL within 0.35 %, every gradient at cosine >= 0.9998 with fp32's.
We allow 1 % on the total loss, 5 % on the KL and cosine >= 0.999 per gradient.
"""
import json
import math

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import red_kernels as K
from red.train.calibration import calibrate
from red.cli import main
from red.data.corpus import load_corpus
from red.train.startup import build_student
from red.model.student import LossSettings
from red.model.teacher import load_teacher

ARCHS = ("llama", "qwen2", "qwen3")
BACKENDS = ("torch", "triton")
MATMULS = {"mm", "addmm", "bmm", "baddbmm", "addbmm", "matmul", "dot", "mv", "addmv", "linear",
           "_scaled_dot_product_flash_attention_for_cpu", "_scaled_dot_product_attention_math",
           "_scaled_dot_product_flash_attention", "_scaled_dot_product_efficient_attention"}
LOSS_RTOL = 1e-2
KL_RTOL = 5e-2
GRAD_COS = 0.999


class MatmulRecorder(TorchDispatchMode):
    """Records (op name, operand dtypes, flops) of every matmul-like aten op."""

    def __init__(self):
        super().__init__()
        self.ops = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func.overloadpacket.__name__
        if name in MATMULS:
            ts = [a for a in args if isinstance(a, torch.Tensor)]
            self.ops.append((name, tuple(t.dtype for t in ts), _flops(name, ts)))
        return func(*args, **(kwargs or {}))


def _flops(name, ts):
    if name.startswith("_scaled_dot_product"):
        q, k = ts[0], ts[1]
        return 4 * q.numel() * k.shape[-2]
    a, b = (ts[-2], ts[-1]) if len(ts) >= 2 else (ts[0], ts[0])
    if a.dim() == 0 or b.dim() == 0:
        return 0
    inner = a.shape[-1]
    rows = a.numel() // max(inner, 1)
    cols = b.shape[-1] if b.dim() > 1 else 1
    return 2 * rows * inner * cols


@pytest.fixture(scope="module")
def corpora(loaded_teachers, corpus_file):
    return {a: load_corpus(corpus_file, tok, 16) for a, (_, tok) in loaded_teachers.items()}


def one_step(teacher, corpus, cal, backend, record=None):
    """Loss terms and gradients of one distillation step (forward + backward)."""
    torch.manual_seed(0)
    with K.use_backend(backend):
        st = build_student(teacher, 32, "red", cal)
        ids = corpus.train[:2].to(st.embed.device)
        if record is not None:
            with record:
                out = st.distill_losses(ids, LossSettings(temperature=1.0))
                out["loss"].backward()
        else:
            out = st.distill_losses(ids, LossSettings(temperature=1.0))
            out["loss"].backward()
    grads = {n: p.grad for n, p in st.named_trainable_parameters()}
    return {k: float(v.detach()) for k, v in out.items()}, grads, st


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("arch", ARCHS)
def test_bf16_step_is_bf16_and_close_to_fp32(arch, backend, teacher_dirs, loaded_teachers, corpora, device):
    t32 = loaded_teachers[arch][0].to(device)
    t16, _ = load_teacher(teacher_dirs[arch], dtype=torch.bfloat16, device=device)
    corpus = corpora[arch]
    with K.use_backend("torch"):  # one channel set for both runs
        cal = calibrate(t32, corpus.train[:3].to(device), progress=False)
    rec = MatmulRecorder()
    l16, g16, st16 = one_step(t16, corpus, cal, backend, record=rec)
    rec32 = MatmulRecorder()
    l32, g32, _ = one_step(t32, corpus, cal, backend, record=rec32)

    assert st16.compute_dtype == torch.bfloat16
    # every trainable tensor stays an fp32 master and gets a finite, non-zero fp32 gradient
    for name, p in st16.named_trainable_parameters():
        g = g16[name]
        assert p.dtype == torch.float32 and g is not None and g.dtype == torch.float32, name
        assert torch.isfinite(g).all() and g.abs().sum() > 0, name
        cos = torch.nn.functional.cosine_similarity(g.flatten().double(), g32[name].flatten().double(), dim=0)
        assert cos >= GRAD_COS, (name, float(cos))
    for k, v in l16.items():
        assert math.isfinite(v), k
    assert l16["loss"] == pytest.approx(l32["loss"], rel=LOSS_RTOL)
    assert l16["kl"] == pytest.approx(l32["kl"], rel=KL_RTOL)

    # the GEMMs of the step, forward and backward, ran in bf16 (any fp32 one would have to
    # be below 1 % of the largest GEMM's flops; none was measured at all)
    assert not fp32_matmuls(rec), f"fp32 matmuls in a bf16 step: {fp32_matmuls(rec)[:5]}"
    assert sum(1 for _, d, _ in rec.ops if torch.bfloat16 in d) >= 8
    assert fp32_matmuls(rec32), "the recorder must see the fp32 run's GEMMs (control)"


def fp32_matmuls(rec: MatmulRecorder, share: float = 0.01):
    biggest = max((f for _, _, f in rec.ops), default=0)
    return [(n, d, f) for n, d, f in rec.ops
            if any(x in (torch.float32, torch.float64) for x in d) and f > share * biggest]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("arch", ARCHS)
def test_distill_cli_bf16(arch, backend, teacher_dirs, corpus_file, tmp_path, capsys):
    """`red distill --precision bf16` end to end on CPU, both backends: exit 0, finite
    metrics, the setting recorded in run.yaml, and a loadable export."""
    out = tmp_path / "run"
    rc = main(["distill", "--teacher", str(teacher_dirs[arch]), "--data", str(corpus_file), "--hidden-size", "32",
               "--out", str(out), "--steps", "3", "--seq-len", "16", "--batch-size", "2", "--log-every", "1",
               "--eval-every", "0", "--val-batches", "1", "--lr", "3e-3", "--precision", "bf16",
               "--kernels", backend, "--quiet"])
    assert rc == 0, capsys.readouterr().err
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in rows if "loss" in r]
    assert [r["step"] for r in steps] == [1, 2, 3]
    for r in rows:
        for k, v in r.items():
            if isinstance(v, float):
                assert math.isfinite(v), (r["step"], k)
    assert "precision: bf16" in (out / "run.yaml").read_text()
    cfg = json.loads((out / "student" / "config.json").read_text())
    assert cfg["hidden_size"] == 32


def test_precision_auto_resolves_by_device():
    from red.train.trainer import resolve_precision

    assert resolve_precision("auto", torch.device("cpu")) == torch.float32
    assert resolve_precision("auto", torch.device("cuda")) == torch.bfloat16
    assert resolve_precision("bf16", torch.device("cpu")) == torch.bfloat16
    assert resolve_precision("fp32", torch.device("cuda")) == torch.float32


def test_bad_precision_is_one_line(teacher_dirs, corpus_file, tmp_path, capsys):
    rc = main(["distill", "--teacher", str(teacher_dirs["llama"]), "--data", str(corpus_file), "--hidden-size", "32",
               "--out", str(tmp_path / "r"), "--precision", "fp8"])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1 and "precision" in err[0]
    assert not (tmp_path / "r").exists()
