"""`red demo` and `red eval` plumbing on a tiny random teacher (the real run is in the README)."""
import json
import statistics

import pytest
import torch

from red.cli import main
from red.demo.run import DemoConfig, run_demo
from red.demo.task import build_tokenizer, evaluate_reasoning
from red.errors import RedError


@pytest.fixture(scope="module")
def task_teacher(tmp_path_factory):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    tok = build_tokenizer()
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True,
                      max_position_embeddings=256, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                      pad_token_id=tok.pad_token_id)
    folder = tmp_path_factory.mktemp("task-teacher")
    LlamaForCausalLM(cfg).save_pretrained(folder)
    tok.save_pretrained(folder)
    return folder


def test_demo_report_plots_and_summary(task_teacher, tmp_path):
    out = tmp_path / "demo"
    cfg = DemoConfig(out=str(out), teacher=str(task_teacher), hidden_size=16, steps=3, batch_size=4, seq_len=64,
                     seeds="0,1", n_per_k=2, eval_ks="1-3", general_problems=100)
    report = run_demo(cfg, progress=False)
    for f in ("report.json", "table.txt", "accuracy_vs_k.png", "erank_layers.png", "spectra.png", "loss_curves.png"):
        assert (out / f).is_file() and (out / f).stat().st_size > 100, f
    on_disk = json.loads((out / "report.json").read_text())
    assert [(r["name"], r["seed"]) for r in on_disk["runs"]] == [("lrc", 0), ("lrc", 1), ("red", 0), ("red", 1)]
    lrc = [r for r in on_disk["runs"] if r["name"] == "lrc"]
    assert lrc[0]["temperature"] == 40.0 and lrc[0]["init"] == "lrc"
    red_runs = [r for r in on_disk["runs"] if r["name"] == "red"]
    assert red_runs[0]["temperature"] == 1.0 and red_runs[0]["init"] == "red"
    # summary = mean and spread over seeds
    s = on_disk["summary"]["red"]
    assert s["n"] == 2
    vals = [r["heldout_nll_general"] for r in red_runs]
    assert s["heldout_nll_general"][0] == pytest.approx(statistics.fmean(vals))
    assert s["heldout_nll_general"][1] == pytest.approx(statistics.stdev(vals))
    # the red init is an exact selection: all singular values 1 before training, step-0 eRank logged
    assert red_runs[0]["erank_last_step0"] is not None
    assert len(red_runs[0]["layer_erank"]) == 3
    # the scores in the report are those of the exported student, re-measured independently
    from transformers import AutoModelForCausalLM

    student = AutoModelForCausalLM.from_pretrained(out / "runs" / "red-s1" / "student")
    again = evaluate_reasoning(student, build_tokenizer(), ks=[1, 2, 3], n_per_k=2, seed=0)
    assert all(again[f"k{k}"] == red_runs[1]["accuracy"][f"k{k}"] for k in (1, 2, 3))
    table = (out / "table.txt").read_text()
    assert all(name in table for name in ("teacher", "lrc", "red"))
    # a second run never clobbers the first; with --overwrite it replaces it (its runs too)
    with pytest.raises(RedError, match="not empty"):
        run_demo(cfg, progress=False)
    cfg.overwrite, cfg.seeds = True, "0"
    report = run_demo(cfg, progress=False)
    assert [(r["name"], r["seed"]) for r in report["runs"]] == [("lrc", 0), ("red", 0)]


def test_ablation_run_names():
    from red.demo.run import _runs

    cfg = DemoConfig(presets="red", inits="orthogonal,random-select")
    assert _runs(cfg) == [("red", "red", None), ("red-loss+orthogonal", "red", "orthogonal"),
                          ("red-loss+random-select", "red", "random-select")]
    with pytest.raises(RedError, match="unknown init"):
        _runs(DemoConfig(inits="magic"))
    with pytest.raises(RedError, match="unknown preset"):
        _runs(DemoConfig(presets="fast"))


def test_eval_command(task_teacher, tmp_path, capsys):
    rc = main(["eval", "--model", str(task_teacher), "--ks", "1,2", "--n-per-k", "4", "--out",
               str(tmp_path / "r.json")])
    assert rc == 0
    rep = json.loads((tmp_path / "r.json").read_text())
    assert set(rep["synthetic"]) >= {"k1", "k2", "general", "reasoning"} and rep["synthetic"]["n_per_k"] == 4
    assert "k1=" in capsys.readouterr().out
    try:
        import lm_eval  # noqa: F401
    except ImportError:
        rc = main(["eval", "--model", str(task_teacher), "--n-per-k", "0", "--lm-eval-tasks", "gsm8k"])
        assert rc == 2 and "pip install 'red[lm-eval]'" in capsys.readouterr().err
    assert main(["eval", "--model", str(tmp_path / "none")]) == 2


def test_eval_refuses_models_without_the_task_alphabet(teacher_dirs, capsys):
    # the engine's tiny test tokenizer lacks '#' and the task's other symbols
    assert main(["eval", "--model", str(teacher_dirs["llama"]), "--n-per-k", "2"]) == 2
    assert "lacks the task's characters" in capsys.readouterr().err


def test_general_corpus_mix(tmp_path):
    from red.demo.run import write_general_corpus
    from red.demo.task import is_heldout

    path = tmp_path / "g.txt"
    write_general_corpus(path, 400, [1, 2], [3, 4, 5, 6], 0.1)
    lines = path.read_text().splitlines()
    assert len(lines) == 400
    steps = [line.split("?")[0].count("=") for line in lines]  # one '=' per defined step
    assert sum(s >= 3 for s in steps) == 40 and all(1 <= s <= 6 for s in steps)
    assert not any(is_heldout(line.split(":")[0]) for line in lines)
    with pytest.raises(RedError, match="long-share"):
        write_general_corpus(path, 10, [1], [3], 1.0)
