"""`red eval --device/--batch-size`: what reaches lm-evaluation-harness and what the report records.

lm-eval is an optional extra; the tests replace the `lm_eval` module (its
``simple_evaluate`` entry point) and the check of its task names, which needs lm-eval's
task index (tests/commands/test_eval_lm_eval.py runs the real lm-eval)."""
import json
import sys
import types

import pytest
import torch

from red.cli import main


@pytest.fixture()
def fake_lm_eval(monkeypatch):
    """A stand-in `lm_eval` module whose simple_evaluate records its arguments."""
    calls = []

    def simple_evaluate(**kwargs):
        calls.append(kwargs)
        return {"results": {t: {"acc,none": 0.25} for t in kwargs["tasks"]}}

    mod = types.ModuleType("lm_eval")
    mod.simple_evaluate = simple_evaluate
    monkeypatch.setitem(sys.modules, "lm_eval", mod)
    import red.commands.eval

    monkeypatch.setattr(red.commands.eval, "lm_eval_task_manager", lambda tasks, include_paths=(): None)
    return calls


def _eval(model, out, *extra):
    return main(["eval", "--model", str(model), "--n-per-k", "0", "--lm-eval-tasks", "arc_easy",
                 "--out", str(out), *extra])


def test_device_and_batch_size_reach_lm_eval_and_the_report(teacher_dirs, fake_lm_eval, tmp_path):
    out = tmp_path / "eval.json"
    assert _eval(teacher_dirs["llama"], out, "--device", "cpu", "--batch-size", "4") == 0
    (call,) = fake_lm_eval
    assert call["device"] == "cpu" and call["batch_size"] == 4
    assert call["model"] == "hf" and call["model_args"]["pretrained"] == str(teacher_dirs["llama"])
    assert call["tasks"] == ["arc_easy"]
    rep = json.loads(out.read_text())
    assert rep["device"] == "cpu" and rep["batch_size"] == 4
    assert rep["lm_eval"]["settings"]["device"] == "cpu" and rep["lm_eval"]["settings"]["batch_size"] == 4
    assert rep["lm_eval"]["results"] == {"arc_easy": {"acc,none": 0.25}}


@pytest.mark.parametrize("cuda", [True, False])
def test_default_device_is_cuda_when_present(teacher_dirs, fake_lm_eval, tmp_path, monkeypatch, cuda):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: cuda)
    out = tmp_path / "eval.json"
    assert _eval(teacher_dirs["llama"], out) == 0
    want = "cuda" if cuda else "cpu"
    assert fake_lm_eval[0]["device"] == want
    assert fake_lm_eval[0]["batch_size"] == 8  # lm-eval's batch when --batch-size is not given
    rep = json.loads(out.read_text())
    assert rep["device"] == want and rep["batch_size"] is None and rep["lm_eval"]["settings"]["batch_size"] == 8


@pytest.mark.parametrize("extra, says", [
    (["--batch-size", "0"], "--batch-size"),
    (["--device", "tpu"], "--device"),
    (["--device", "cuda:x"], "--device"),
])
def test_bad_device_or_batch_size_is_one_line(teacher_dirs, fake_lm_eval, tmp_path, capsys, extra, says):
    out = tmp_path / "eval.json"
    assert _eval(teacher_dirs["llama"], out, *extra) == 2
    err = capsys.readouterr().err.strip()
    assert says in err and len(err.splitlines()) == 1, err
    assert not fake_lm_eval and not out.exists()


def test_cuda_without_cuda_is_refused(teacher_dirs, fake_lm_eval, tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    out = tmp_path / "eval.json"
    assert _eval(teacher_dirs["llama"], out, "--device", "cuda") == 2
    err = capsys.readouterr().err.strip()
    assert "CUDA is not available" in err and len(err.splitlines()) == 1, err
    assert not fake_lm_eval and not out.exists()


def test_synthetic_benchmark_records_device_and_batch(tmp_path):
    from transformers import LlamaConfig, LlamaForCausalLM

    from red.commands.demo.task import build_tokenizer

    torch.manual_seed(0)
    tok = build_tokenizer()
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                      num_attention_heads=2, num_key_value_heads=1, tie_word_embeddings=True,
                      max_position_embeddings=256, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                      pad_token_id=tok.pad_token_id)
    model = tmp_path / "m"
    LlamaForCausalLM(cfg).save_pretrained(model)
    tok.save_pretrained(model)
    out = tmp_path / "eval.json"
    assert main(["eval", "--model", str(model), "--ks", "1", "--n-per-k", "3", "--device", "cpu",
                 "--batch-size", "2", "--out", str(out)]) == 0
    rep = json.loads(out.read_text())
    assert rep["device"] == "cpu" and rep["batch_size"] == 2 and rep["synthetic"]["batch_size"] == 2
    assert "lm_eval" not in rep
