"""The engine through each kernel backend: Triton (under the interpreter on CPU) and torch
must give the same losses, calibration statistics and projection gradients, on the test
device (CUDA when available)."""
import copy

import pytest
import torch

import red_kernels as K
from red.train.calibration import calibrate
from red.data.corpus import load_corpus
from red.train.startup import build_student
from red.model.student import LossSettings

try:
    import triton  # noqa: F401
    HAS_TRITON = True
except ImportError:
    HAS_TRITON = False

pytestmark = pytest.mark.skipif(not HAS_TRITON, reason="triton is not installed")


def _steps(teacher, corpus, cal, backend, n=3):
    """``n`` training steps with plain SGD. The backends agree on each gradient to ~1e-6
    relative; SGD turns that into a parameter difference of lr times it. AdamW would not:
    its step lr * m / (sqrt(v) + eps) is a sign where a gradient is near zero, so a
    rounding-level difference can move such an entry by up to lr, on whichever machine
    (tests/helpers.py has the bound)."""
    torch.manual_seed(0)
    with K.use_backend(backend):
        st = build_student(teacher, 32, "red", cal)
        st.start = {k: p.detach().clone() for k, p in st.projections().items()}
        opt = torch.optim.SGD(st.parameters(), lr=0.5)
        losses, grads = [], []
        for i in range(n):
            ids = corpus.train[2 * i: 2 * i + 2].to(teacher.device)
            out = st.distill_losses(ids, LossSettings(temperature=2.0))
            out["loss"].backward()
            losses.append({k: float(v.detach()) for k, v in out.items()})
            grads.append({k: p.grad.clone() for k, p in st.projections().items()})
            opt.step()
            opt.zero_grad()
    return losses, grads, st


@pytest.mark.parametrize("arch", ["qwen2", "qwen3"])
def test_training_steps_agree_across_backends(arch, loaded_teachers, corpus_file, device):
    teacher, tok = loaded_teachers[arch]
    if teacher.device != device:  # the session's teachers are on CPU: move a copy
        teacher = copy.deepcopy(teacher).to(device)
    corpus = load_corpus(corpus_file, tok, 16)
    with K.use_backend("torch"):
        cal_t = calibrate(teacher, corpus.train[:3], progress=False)
    with K.use_backend("triton"):
        cal_tr = calibrate(teacher, corpus.train[:3], progress=False)
    assert torch.allclose(cal_t.stats, cal_tr.stats, rtol=1e-5, atol=1e-5)
    l_t, g_t, s_t = _steps(teacher, corpus, cal_t, "torch")
    l_tr, g_tr, s_tr = _steps(teacher, corpus, cal_t, "triton")
    for a, b in zip(l_t, l_tr):
        for k in a:
            assert a[k] == pytest.approx(b[k], rel=1e-4, abs=1e-6), k
    for a, b in zip(g_t, g_tr):
        for k in a:
            rel = (a[k] - b[k]).norm() / a[k].norm().clamp_min(1e-12)
            assert rel < 1e-4, (k, float(rel))
    # where training moved the projections: lr times the gradients, summed over the steps,
    # so the backends' moves agree as their gradients do
    for (k, p), q in zip(s_t.projections().items(), s_tr.projections().values()):
        assert torch.equal(s_t.start[k], s_tr.start[k]), k
        move_t, move_tr = p.detach() - s_t.start[k], q.detach() - s_tr.start[k]
        rel = (move_t - move_tr).norm() / move_t.norm()
        assert move_t.norm() > 1e-3 and rel < 1e-4, (k, float(move_t.norm()), float(rel))
