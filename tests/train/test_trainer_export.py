"""Training (resume is bitwise), checkpoints and export to an ordinary HF checkpoint."""
import json

import pytest
import torch

from red.train.calibration import calibrate
from red.run.checkpoint import list_checkpoints
from red.config import make_config
from red.data.corpus import load_corpus
from red.errors import RedError
from red.model.export import export_student
from red.commands.distill import distill
from red.train.startup import build_student
from red.train.trainer import train


def _cfg(teacher_dirs, corpus_file, out, arch="llama", **kw):
    base = dict(teacher=str(teacher_dirs[arch]), data=str(corpus_file), hidden_size=32, out=str(out), steps=6,
                seq_len=24, batch_size=3, eval_every=0, save_every=2, log_every=1, val_batches=1, lr=3e-3,
                warmup=1)
    base.update(kw)
    return make_config(**base)


def _student(loaded_teachers, corpus, arch="llama", init="red"):
    teacher, _ = loaded_teachers[arch]
    cal = calibrate(teacher, corpus.train[:4], progress=False)
    return build_student(teacher, 32, init, cal, seed=0)


def test_resume_is_bitwise_identical(loaded_teachers, teacher_dirs, corpus_file, tmp_path):
    tok = loaded_teachers["llama"][1]
    corpus = load_corpus(corpus_file, tok, 24)
    cfg = _cfg(teacher_dirs, corpus_file, tmp_path / "a", grad_accum=2)
    straight = _student(loaded_teachers, corpus)
    (tmp_path / "a").mkdir()
    train(straight, corpus, cfg, tmp_path / "a", progress=False)

    (tmp_path / "b").mkdir()
    first = _student(loaded_teachers, corpus)
    cfg_b = _cfg(teacher_dirs, corpus_file, tmp_path / "b", grad_accum=2)
    train(first, corpus, cfg_b, tmp_path / "b", progress=False, on_step=lambda step: step >= 3)
    assert [p.name for p in list_checkpoints(tmp_path / "b" / "checkpoints")] == ["step-0000002", "step-0000003"]
    torch.manual_seed(12345)  # the checkpoint's RNG state must win over whatever came before
    resumed = _student(loaded_teachers, corpus)
    cfg_b.resume = True
    train(resumed, corpus, cfg_b, tmp_path / "b", progress=False)
    sd_a, sd_b = straight.state_dict(), resumed.state_dict()
    assert all(torch.equal(sd_a[k], sd_b[k]) for k in sd_a)
    # training did move the tensors
    fresh = _student(loaded_teachers, corpus)
    assert not torch.equal(fresh.layers[0].q, straight.layers[0].q)


def test_training_lowers_validation_loss_and_logs_every_term(teacher_dirs, corpus_file, tmp_path):
    cfg = _cfg(teacher_dirs, corpus_file, tmp_path / "run", steps=30, eval_every=10, init="lrc", init_std=None,
               preset="lrc")
    res = distill(cfg, progress=False)
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in rows if "loss" in r]
    evals = [r for r in rows if "val_loss" in r]
    for key in ("kl", "lm", "clone", "clone/q", "clone/k", "clone/v", "clone/attn", "clone/gate", "clone/up",
                "clone/ffn", "lr", "grad_norm", "tokens_per_s"):
        assert key in steps[0], key
    assert [r["step"] for r in evals] == [0, 10, 20, 30]
    assert evals[-1]["val_loss"] < evals[0]["val_loss"]
    assert all(r["erank_last"] > 1 for r in evals)
    assert steps[-1]["loss"] < steps[0]["loss"]
    out = tmp_path / "run"
    for f in ("run.yaml", "metrics.jsonl", "calibration.safetensors", "student/config.json",
              "student/model.safetensors", "student/tokenizer.json"):
        assert (out / f).is_file(), f
    assert len(list_checkpoints(out / "checkpoints")) == 2  # keep_checkpoints
    assert not list((out / "checkpoints").glob(".step-*"))
    assert res.student.hidden_size == 32


def test_nonfinite_loss_stops_with_step_and_term(loaded_teachers, teacher_dirs, corpus_file, tmp_path):
    tok = loaded_teachers["llama"][1]
    corpus = load_corpus(corpus_file, tok, 24)
    st = _student(loaded_teachers, corpus)
    with torch.no_grad():
        st.layers[1].gate[0, 0] = float("nan")
    (tmp_path / "r").mkdir()
    with pytest.raises(RedError, match=r"step 1 .*term\(s\) loss, kl, lm"):
        train(st, corpus, _cfg(teacher_dirs, corpus_file, tmp_path / "r"), tmp_path / "r", progress=False)


@pytest.mark.parametrize("arch", ["llama", "qwen2", "qwen3"])
def test_export_loads_with_plain_transformers_and_matches(arch, loaded_teachers, teacher_dirs, corpus_file, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    teacher, tok = loaded_teachers[arch]
    corpus = load_corpus(corpus_file, tok, 24)
    st = _student(loaded_teachers, corpus, arch, init="orthogonal")
    (tmp_path / "r").mkdir()
    cfg = _cfg(teacher_dirs, corpus_file, tmp_path / "r", arch, steps=3, norm_eps=1e-5)
    st.norm_eps = 1e-5
    train(st, corpus, cfg, tmp_path / "r", progress=False)
    out = export_student(st, tok, tmp_path / "student", dtype="float32")
    model = AutoModelForCausalLM.from_pretrained(out)
    tok2 = AutoTokenizer.from_pretrained(out)
    assert type(model) is type(teacher)
    c = model.config
    assert c.hidden_size == 32 and c.head_dim == teacher.config.head_dim != 32 // c.num_attention_heads
    assert c.tie_word_embeddings == teacher.config.tie_word_embeddings
    assert c.rms_norm_eps == 1e-5
    if c.tie_word_embeddings:
        assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()
    ids = corpus.val[:2]
    with torch.no_grad():
        diff = (model(input_ids=ids).logits - st(ids)).abs().max()
    assert diff <= 2e-4, diff  # fp32, two summation orders
    enc = tok2("alpha beta", return_tensors="pt")
    gen = model.generate(**enc, max_new_tokens=5, min_new_tokens=5, do_sample=False)
    assert gen.shape[1] == enc["input_ids"].shape[1] + 5
    assert not list(out.glob("*.bin")) and not list(out.glob("*.pt"))

