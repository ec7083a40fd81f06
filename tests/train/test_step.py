"""The training step at the floor: student weights made once per optimizer step.

``step_gradients`` makes W_s = f(W_t, P, gains) once, runs every micro-batch as an ordinary
dense forward/backward on it, and turns the summed weight gradients into dP with one GEMM
per matrix. Held in float64 against the per-micro-batch form (the weights made inside
autograd in every micro-batch, as the step used to run, its gradients summed): the same
gradient of every projection and gain, to 1e-10 relative, for 1 and 3 micro-batches,
Llama / Qwen2 / Qwen3 teachers and both kernel backends.
"""
import pytest
import torch

import red_kernels as K
from red.train.calibration import calibrate
from red.data.corpus import load_corpus
from red.train.startup import build_student
from red.model.student import LossSettings, scored_targets
from red.model.teacher import load_teacher
from red.train.trainer import step_gradients

ARCHS = ("llama", "qwen2", "qwen3")


@pytest.fixture(scope="module")
def f64(teacher_dirs, corpus_file):
    """{arch: (float64 teacher, corpus)}."""
    out = {}
    for arch in ARCHS:
        teacher, tok = load_teacher(teacher_dirs[arch], dtype=torch.float64)
        out[arch] = teacher, load_corpus(corpus_file, tok, 16)
    return out


def _student(teacher, corpus, init):
    cal = calibrate(teacher, corpus.train[:3], progress=False)
    st = build_student(teacher, 24, init, cal, init_std=None, seed=1).double()
    with torch.no_grad():  # gains away from their init, so that their gradients are generic
        for g in st.gains().values():
            g.mul_(1.0 + 0.1 * torch.randn(g.shape, dtype=g.dtype))
    return st


def _grads(st):
    out = {n: p.grad.clone() for n, p in st.named_trainable_parameters()}
    st.zero_grad(set_to_none=True)
    return out


@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("arch", ARCHS)
def test_step_gradients_equal_per_micro_batch_gradients_summed(arch, backend, f64):
    teacher, corpus = f64[arch]
    st = _student(teacher, corpus, "lrc" if arch == "qwen2" else "red")
    loss = LossSettings(temperature=2.0, clone_weight=0.5)
    for accum in (1, 3):
        batches = [corpus.train[2 * i: 2 * i + 2] for i in range(accum)]
        with K.use_backend(backend):
            terms = step_gradients(st, batches, loss)
            got = _grads(st)
            want_loss = 0.0
            for b in batches:  # the weights made in every micro-batch, the loss averaged
                out = st.distill_losses(b, loss)
                (out["loss"] / accum).backward()
                want_loss += float(out["loss"].detach()) / accum
            want = _grads(st)
        assert float(terms[0]) == pytest.approx(want_loss, rel=1e-12)
        assert set(got) == set(want)
        for k in want:
            rel = (got[k] - want[k]).norm() / want[k].norm()
            assert want[k].norm() > 0 and rel <= 1e-10, (k, accum, float(rel))


def test_masked_means_divide_by_the_steps_scored_targets(f64):
    """With a loss mask the micro-batches score different numbers of targets; the step's KL
    and LM are the mean over all of them (not the mean of the micro-batches' means)."""
    teacher, corpus = f64["llama"]
    st = _student(teacher, corpus, "red")
    loss = LossSettings(clone_weight=0.0)
    ids = corpus.train[:4]
    mask = torch.ones_like(ids, dtype=torch.bool)
    mask[:2, 3:] = False  # the first micro-batch scores far fewer targets
    batches = [{"input_ids": ids[:2], "loss_mask": mask[:2]}, {"input_ids": ids[2:], "loss_mask": mask[2:]}]
    terms = step_gradients(st, batches, loss)
    got = _grads(st)
    whole = st.distill_losses(ids, loss, loss_mask=mask)  # one batch holding both
    whole["loss"].backward()
    want = _grads(st)
    n = [int(scored_targets(b["input_ids"], loss_mask=b["loss_mask"])) for b in batches]
    assert n[0] < n[1]
    assert float(terms[1]) == pytest.approx(float(whole["kl"]), rel=1e-12)
    assert float(terms[2]) == pytest.approx(float(whole["lm"]), rel=1e-12)
    for k in want:
        assert (got[k] - want[k]).norm() <= 1e-10 * want[k].norm(), k
