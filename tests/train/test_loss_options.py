"""The logit-loss options of a run (--divergence, --jsd-beta, --teacher-top-k,
--kl-reduction) reach the student's losses: checked against the materialized logits of the
student and the teacher in float64, and end to end through `red distill`."""
import json

import pytest
import torch
import yaml

from red.data.corpus import load_corpus
from red.train.startup import build_student
from red.model.student import LossSettings


@pytest.fixture(scope="module")
def setup(loaded_teachers, corpus_file):
    teacher, tok = loaded_teachers["qwen2"]
    corpus = load_corpus(corpus_file, tok, 16)
    torch.manual_seed(0)
    st = build_student(teacher, 32, "orthogonal")
    ids = corpus.train[:3]
    with torch.no_grad():
        s = st(ids).double()[:, :-1]
        t = teacher(input_ids=ids).logits.double()[:, :-1]
    return st, ids, s, t


def _reference(s, t, T, divergence, beta=0.5, k=0):
    p, q = torch.softmax(t / T, -1), torch.softmax(s / T, -1)
    if k:
        top = t.topk(k, -1).indices
        p = torch.cat([p.gather(-1, top), (1 - p.gather(-1, top).sum(-1, keepdim=True))], -1)
        q = torch.cat([q.gather(-1, top), (1 - q.gather(-1, top).sum(-1, keepdim=True))], -1)
    kl = lambda a, b: (a * (a.log() - b.log())).sum(-1)
    if divergence == "forward-kl":
        return kl(p, q)
    if divergence == "reverse-kl":
        return kl(q, p)
    m = beta * p + (1 - beta) * q
    return beta * kl(p, m) + (1 - beta) * kl(q, m)


@pytest.mark.parametrize("divergence,beta,k", [("forward-kl", 0.5, 0), ("reverse-kl", 0.5, 0), ("jsd", 0.3, 0),
                                               ("forward-kl", 0.5, 8), ("jsd", 0.7, 8)])
@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_kl_term_equals_the_formula_on_materialized_logits(setup, divergence, beta, k, reduction):
    st, ids, s, t = setup
    loss = LossSettings(temperature=2.0, divergence=divergence, jsd_beta=beta, teacher_top_k=k,
                        kl_reduction=reduction, clone_weight=0.0)
    with torch.no_grad():
        got = st.distill_losses(ids, loss)["kl"].double()
    rows = _reference(s, t, 2.0, divergence, beta, k)  # [B, T-1]
    want = rows.sum() / ids.shape[0] if reduction == "sum" else rows.mean()
    assert torch.allclose(got, want, rtol=1e-4), (got, want)


def test_sum_reduction_is_lrc_scale(setup):
    """sum = the per-token mean times the scored tokens per sequence (T - 1 here)."""
    st, ids, _, _ = setup
    with torch.no_grad():
        mean = st.distill_losses(ids, LossSettings(temperature=40.0))["kl"]
        total = st.distill_losses(ids, LossSettings(temperature=40.0, kl_reduction="sum"))["kl"]
    assert torch.allclose(total, mean * (ids.shape[1] - 1), rtol=1e-5)


def test_options_run_end_to_end_and_define_the_run(teacher_dirs, corpus_file, tmp_path, run_cli):
    out = tmp_path / "r"
    common = ["distill", "--teacher", str(teacher_dirs["llama"]), "--data", str(corpus_file), "--hidden-size", "32",
              "--out", str(out), "--steps", "2", "--seq-len", "24", "--batch-size", "2", "--quiet",
              "--eval-every", "0", "--val-batches", "1", "--save-every", "1"]
    rc, _, err = run_cli(*common, "--divergence", "jsd", "--jsd-beta", "0.3", "--teacher-top-k", "16",
                         "--kl-reduction", "sum")
    assert rc == 0, err
    saved = yaml.safe_load((out / "run.yaml").read_text())
    assert (saved["divergence"], saved["jsd_beta"], saved["teacher_top_k"], saved["kl_reduction"]) == \
        ("jsd", 0.3, 16, "sum")
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert all(torch.isfinite(torch.tensor(r["kl"])) for r in rows if "kl" in r)
    rc, _, err = run_cli(*common, "--divergence", "reverse-kl", "--jsd-beta", "0.3", "--teacher-top-k", "16",
                         "--kl-reduction", "sum", "--resume", "--steps", "3", "--allow-change", "steps")
    assert rc == 2 and "divergence 'jsd' -> 'reverse-kl'" in err
    rc, _, err = run_cli(*common, "--jsd-beta", "1.0")
    assert rc == 2 and "jsd_beta must be between 0 and 1" in err
