"""`red demo` and `red eval` plumbing on a tiny random teacher (the real run is in the README)."""
import json
import statistics
from pathlib import Path

import pytest
import torch

from red.cli import main
from red.commands.demo.run import DemoConfig, at_grid_edge, run_demo
from red.commands.demo.task import build_tokenizer, evaluate_reasoning
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
                     seeds="0,1", n_per_k=2, eval_ks="1-3", general_problems=100, lr_grid="1e-3,4e-3",
                     lr_grid_extend=0)
    report = run_demo(cfg, progress=False)
    for f in ("report.json", "table.txt", "accuracy_vs_k.png", "general_vs_reasoning.png", "erank_layers.png",
              "spectra.png", "loss_curves.png"):
        assert (out / f).is_file() and (out / f).stat().st_size > 100, f
    on_disk = json.loads((out / "report.json").read_text())
    assert [(r["name"], r["seed"]) for r in on_disk["runs"]] == [("lrc", 0), ("lrc", 1), ("red", 0), ("red", 1)]
    lrc = [r for r in on_disk["runs"] if r["name"] == "lrc"]
    assert lrc[0]["temperature"] == 40.0 and lrc[0]["init"] == "lrc"
    red_runs = [r for r in on_disk["runs"] if r["name"] == "red"]
    assert red_runs[0]["temperature"] == 1.0 and red_runs[0]["init"] == "red"
    # the Gaussian-init run is tuned on the grid (first seed), the red run keeps --lr
    tuning = on_disk["tuning"]["lrc"]
    assert [g["lr"] for g in tuning["grid"]] == [1e-3, 4e-3] and tuning["seed"] == 0
    assert all(r["lr"] == tuning["chosen_lr"] and r["tuned"] for r in lrc)
    assert all(r["lr"] == cfg.lr and not r["tuned"] for r in red_runs)
    assert "red" not in on_disk["tuning"]
    # summary = mean and spread over seeds
    s = on_disk["summary"]["red"]
    assert s["n"] == 2
    vals = [r["heldout_nll_general"] for r in red_runs]
    assert s["heldout_nll_general"][0] == pytest.approx(statistics.fmean(vals))
    assert s["heldout_nll_general"][1] == pytest.approx(statistics.stdev(vals))
    # per-layer eRank at step 0 (the run's own init, rebuilt) and at the end
    assert red_runs[0]["erank_last_step0"] is not None
    assert len(red_runs[0]["layer_erank"]) == len(red_runs[0]["layer_erank_step0"]) == 3
    assert s["layer_erank_step0"] == pytest.approx([statistics.fmean(v) for v in
                                                    zip(*(r["layer_erank_step0"] for r in red_runs))])
    # the red init of two seeds is the same selection (calibration does not depend on the seed)
    assert red_runs[0]["layer_erank_step0"] == pytest.approx(red_runs[1]["layer_erank_step0"])
    # the scores in the report are those of the exported student, re-measured independently
    from transformers import AutoModelForCausalLM

    student = AutoModelForCausalLM.from_pretrained(out / "runs" / "red-s1" / "student")
    again = evaluate_reasoning(student, build_tokenizer(), ks=[1, 2, 3], n_per_k=2, seed=0)
    assert all(again[f"k{k}"] == red_runs[1]["accuracy"][f"k{k}"] for k in (1, 2, 3))
    table = (out / "table.txt").read_text()
    assert all(name in table for name in ("teacher", "lrc", "red"))
    assert "(*) lrc: lr" in table and "reasoning accuracy played no part" in table
    assert "only (no long chain)" in table  # --long-share 0 is the default
    # the grid's pick at an edge of the grid is flagged (a wider grid might do better)
    assert tuning["at_edge"] is True  # a two-point grid: whatever wins is an edge
    assert "at the edge of the grid" in table
    # every run reads the one token store of general.txt (tokenized once, not per run)
    import yaml

    for r in on_disk["runs"]:
        run_yaml = yaml.safe_load((Path(r["out"]) / "run.yaml").read_text())
        assert Path(run_yaml["data"]).resolve() == (out / "general-store").resolve()
        assert not (Path(r["out"]) / "data").exists()
    # a second run never clobbers the first; with --overwrite it replaces it (its runs too)
    with pytest.raises(RedError, match="not empty"):
        run_demo(cfg, progress=False)
    # files the user added beside the demo's, and inside its runs/ folder, are never deleted (issue 19)
    (out / "runs" / "my-old-run").mkdir()
    (out / "runs" / "my-old-run" / "notes.txt").write_text("mine")
    (out / "mine.txt").write_text("mine too")
    cfg.overwrite, cfg.seeds = True, "0"
    report = run_demo(cfg, progress=False)
    assert [(r["name"], r["seed"]) for r in report["runs"]] == [("lrc", 0), ("red", 0)]
    assert (out / "runs" / "my-old-run" / "notes.txt").read_text() == "mine"
    assert (out / "mine.txt").read_text() == "mine too"
    assert not (out / "runs" / "red-s1").exists()  # the earlier run's own folders are replaced


def test_lr_is_tuned_on_general_validation_loss_only(task_teacher, tmp_path, monkeypatch):
    """The rule: the grid's runs are compared by their general validation loss (val_lm, as
    the run logged it) alone; reasoning is scored only for the chosen run, after the choice."""
    import yaml

    import red.commands.demo.run as demo_run

    scored = []
    real = demo_run.evaluate_reasoning

    def watch(model, *a, **kw):
        scored.append(model)
        return real(model, *a, **kw)

    monkeypatch.setattr(demo_run, "evaluate_reasoning", watch)
    out = tmp_path / "demo"
    cfg = DemoConfig(out=str(out), teacher=str(task_teacher), hidden_size=16, steps=4, batch_size=4, seq_len=64,
                     seeds="0", n_per_k=2, eval_ks="1-3", general_problems=100, presets="lrc",
                     lr_grid="3e-2,1e-4,3e-3", lr_grid_extend=1, kl_reductions="sum")
    report = run_demo(cfg, progress=False)
    assert len(scored) == 2  # the teacher and the chosen run: the other grid runs are never scored
    tuning = report["tuning"]["lrc/sum"]
    on_disk = {}
    for g in tuning["grid"]:
        rows = [json.loads(l) for l in (out / "runs" / f"lrc-sum-lr{g['lr']:g}-s0" / "metrics.jsonl").read_text().splitlines()]
        on_disk[g["lr"]] = [r["val_lm"] for r in rows if "val_lm" in r][-1]
        assert g["val_lm"] == pytest.approx(on_disk[g["lr"]])
        run_yaml = yaml.safe_load((out / "runs" / f"lrc-sum-lr{g['lr']:g}-s0" / "run.yaml").read_text())
        assert run_yaml["kl_reduction"] == "sum" and run_yaml["steps"] == cfg.steps and run_yaml["lr"] == g["lr"]
    assert tuning["chosen_lr"] == min(on_disk, key=on_disk.get)
    # the grid's own pick at an edge is stepped past once (--lr-grid-extend 1), by the grid's
    # outer ratio (10x or 30x here); an interior pick is final
    first = min((1e-4, 3e-3, 3e-2), key=on_disk.get)
    assert tuning["extended"] == ({1e-4: [3.33333e-06], 3e-3: [], 3e-2: [0.3]}[first])
    assert sorted(on_disk) == sorted([1e-4, 3e-3, 3e-2] + tuning["extended"])
    assert tuning["at_edge"] == at_grid_edge(tuning["chosen_lr"], list(on_disk))
    (row,) = report["runs"]
    assert row["lr"] == tuning["chosen_lr"] and row["kl_reduction"] == "sum" and row["name"] == "lrc/sum"


def test_pick_lr():
    from red.commands.demo.run import pick_lr

    assert pick_lr({1e-3: 2.0, 2e-3: 1.5, 4e-3: 1.7}) == 2e-3
    from red.commands.demo.run import at_grid_edge

    assert not at_grid_edge(8e-3, [4e-3, 8e-3, 1.6e-2])
    assert at_grid_edge(4e-3, [4e-3, 8e-3, 1.6e-2]) and at_grid_edge(1.6e-2, [1.6e-2, 4e-3, 8e-3])
    assert not at_grid_edge(4e-3, [4e-3])  # one learning rate: nothing was searched
    from red.commands.demo.run import next_lr

    assert next_lr(1.6e-2, [4e-3, 8e-3, 1.6e-2]) == 0.032 and next_lr(4e-3, [1.6e-2, 8e-3, 4e-3]) == 0.002
    assert next_lr(4e-3, [1e-3, 4e-3]) == 0.016 and next_lr(1e-4, [1e-4, 3e-3, 3e-2]) == float("3.33333e-06")
    from red.commands.demo.run import lr_grid

    assert lr_grid(DemoConfig(lr_grid="8e-3,4e-3,8e-3")) == [4e-3, 8e-3]  # sorted, once each
    with pytest.raises(RedError, match="lr-grid-extend"):
        lr_grid(DemoConfig(lr_grid_extend=-1))
    assert pick_lr({4e-3: 1.0, 1e-3: 1.0}) == 1e-3  # a tie goes to the smaller lr
    assert pick_lr({1e-3: 2.0, 1e-2: float("nan"), 1e-1: float("inf")}) == 1e-3
    with pytest.raises(RedError, match="diverged"):
        pick_lr({1e-2: float("nan")})
    import inspect

    assert list(inspect.signature(pick_lr).parameters) == ["grid_losses"]


def test_ablation_run_names():
    from red.commands.demo.run import RunSpec, _runs

    cfg = DemoConfig(presets="red", inits="orthogonal,random-select,lrc")
    assert _runs(cfg) == [RunSpec("red", "red", None, None, False),
                          RunSpec("red-loss+orthogonal", "red", "orthogonal", None, False),
                          RunSpec("red-loss+random-select", "red", "random-select", None, False),
                          RunSpec("red-loss+lrc", "red", "lrc", None, True)]  # the Gaussian init at T=1: tuned
    runs = _runs(DemoConfig(kl_reductions="sum,mean", tune_lr="all"))
    assert [(r.name, r.kl_reduction, r.tuned) for r in runs] == [
        ("lrc/sum", "sum", True), ("lrc/mean", "mean", True), ("red/sum", "sum", True), ("red/mean", "mean", True)]
    assert runs[0].folder == "lrc-sum"
    assert not any(r.tuned for r in _runs(DemoConfig(tune_lr="none")))
    with pytest.raises(RedError, match="unknown init"):
        _runs(DemoConfig(inits="magic"))
    with pytest.raises(RedError, match="unknown preset"):
        _runs(DemoConfig(presets="fast"))
    with pytest.raises(RedError, match="unknown KL reduction"):
        _runs(DemoConfig(kl_reductions="max"))
    with pytest.raises(RedError, match="tune-lr"):
        _runs(DemoConfig(tune_lr="best"))


def test_bundled_teacher_names(tmp_path):
    from red.commands.demo.run import TEACHERS, resolve_teacher

    for name in ("llama", "qwen3"):
        if (TEACHERS[name] / "config.json").is_file():
            assert resolve_teacher(name) == TEACHERS[name]
            assert json.loads((TEACHERS[name] / "config.json").read_text())["model_type"] == name
    with pytest.raises(RedError, match="has no config.json; pass llama, qwen3"):
        resolve_teacher(str(tmp_path))


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
    from red.commands.demo.run import write_general_corpus
    from red.commands.demo.task import is_heldout

    path = tmp_path / "g.txt"
    assert DemoConfig().long_share == 0  # the default corpus holds no long chain
    write_general_corpus(path, 400, [1, 2], [3, 4, 5, 6], 0.1)
    lines = path.read_text().splitlines()
    assert len(lines) == 400
    steps = [line.split("?")[0].count("=") for line in lines]  # one '=' per defined step
    assert sum(s >= 3 for s in steps) == 40 and all(1 <= s <= 6 for s in steps)
    assert not any(is_heldout(line.split(":")[0]) for line in lines)
    with pytest.raises(RedError, match="long-share"):
        write_general_corpus(path, 10, [1], [3], 1.0)


def test_kl_reduction_sum_is_lrcs_scale(task_teacher, tmp_path):
    """--kl-reduction sum as the demo's lrc runs use it: the same student at step 0 has a KL
    summed over each sequence's scored positions (seq_len - 1 of them here), i.e. LRC's
    batchmean over [batch, positions, V], while the LM term stays a per-token mean."""
    from red.config import make_config
    from red.commands.demo.run import write_general_corpus
    from red.commands.distill import distill

    write_general_corpus(tmp_path / "g.txt", 200, [1, 2], [3], 0.0)
    first = {}
    for red in ("mean", "sum"):
        dc = make_config(teacher=str(task_teacher), data=str(tmp_path / "g.txt"), hidden_size=16,
                         out=str(tmp_path / red), preset="lrc", steps=1, batch_size=4, seq_len=64,
                         eval_every=1, val_batches=1, kl_reduction=red)
        first[red] = distill(dc, progress=False).metrics.rows[0]
    assert first["sum"]["val_kl"] == pytest.approx(63 * first["mean"]["val_kl"], rel=1e-4)
    assert first["sum"]["val_lm"] == pytest.approx(first["mean"]["val_lm"])


def test_readme_demo_tables_are_the_recorded_runs():
    """The README's demo tables are format_table of the reports kept in benchmarks/results
    (the measured runs, trimmed of per-step metrics), and the recorded default runs used
    today's DemoConfig defaults and took under the 5 minutes the demo aims at."""
    from dataclasses import asdict

    from red.commands.demo.run import format_table
    from red.commands.eval import parse_ks

    root = Path(__file__).resolve().parents[2]
    readme = (root / "README.md").read_text()
    results = root / "benchmarks" / "results"
    for name in ("llama", "qwen3", "llama-gaussian-t1", "qwen3-gaussian-t1"):
        report = json.loads((results / f"demo-2026-11-30-{name}.json").read_text())
        assert format_table(report, parse_ks(report["config"]["eval_ks"])) in readme, name
    defaults = asdict(DemoConfig())
    for teacher in ("llama", "qwen3"):
        report = json.loads((results / f"demo-2026-11-30-{teacher}-default.json").read_text())
        cfg = dict(report["config"])
        assert cfg.pop("teacher") == teacher
        want = {k: v for k, v in defaults.items() if k not in ("teacher", "out")}
        assert {k: cfg[k] for k in want} == want, teacher
        assert report["wall_s"] < 300, teacher
    # what the README concludes from the 3-seed tables
    for name in ("llama", "qwen3"):
        s = json.loads((results / f"demo-2026-11-30-{name}.json").read_text())["summary"]
        assert s["red"]["reasoning"][0] > s["lrc"]["reasoning"][0] + 0.05
        assert s["red"]["general"][0] >= s["teacher"]["general"][0] - 0.05
        t1 = json.loads((results / f"demo-2026-11-30-{name}-gaussian-t1.json").read_text())["summary"]
        assert t1["red-loss+lrc"]["reasoning"][0] < s["red"]["reasoning"][0]
