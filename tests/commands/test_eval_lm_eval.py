"""`red eval --lm-eval-tasks` with the real lm-evaluation-harness (skipped without it): a
local task YAML over a local JSON lines file, on a tiny model, nothing downloaded. The
report keeps what reproduces a score (task configs, versions, sample counts, samples), the
scores agree with transformers' own forward, and bad task names are one line before any
model loads."""
from __future__ import annotations

import json

import pytest
import torch

from helpers import one_line
from red.cli import main

lm_eval = pytest.importorskip("lm_eval")

ROWS = [(1, 2), (3, 4), (2, 2), (5, 1), (0, 3)]


@pytest.fixture(scope="module")
def tasks(tmp_path_factory):
    """A folder of two task YAMLs (multiple choice, generation) over one local data file."""
    root = tmp_path_factory.mktemp("lm-eval")
    data = root / "data.jsonl"
    data.write_text("".join(json.dumps({"q": f"{a} + {b} =", "choices": [str(a + b), str(a + b + 1), str(a * b + 7)],
                                        "label": 0, "answer": str(a + b)}) + "\n" for a, b in ROWS))
    folder = root / "tasks"
    folder.mkdir()
    common = f"dataset_path: json\ndataset_kwargs:\n  data_files:\n    test: {data}\ntest_split: test\n"
    (folder / "mc.yaml").write_text(
        "task: red_tiny_mc\n" + common + "output_type: multiple_choice\ndoc_to_text: \"{{q}}\"\n"
        "doc_to_choice: \"{{choices}}\"\ndoc_to_target: label\nmetric_list:\n  - metric: acc\n"
        "metadata:\n  version: 1.0\n")
    (folder / "gen.yaml").write_text(
        "task: red_tiny_gen\n" + common + "output_type: generate_until\ndoc_to_text: \"{{q}}\"\n"
        "doc_to_target: \"{{answer}}\"\ngeneration_kwargs:\n  until: [\"\\n\"]\nmetric_list:\n"
        "  - metric: exact_match\nmetadata:\n  version: 2.0\n")
    return folder


def run_eval(model, tasks_dir, out, *extra):
    return main(["eval", "--model", str(model), "--n-per-k", "0", "--include-path", str(tasks_dir), "--device", "cpu",
                 "--batch-size", "2", "--max-gen-toks", "4", "--out", str(out), *map(str, extra)])


def continuation_logprob(model, tok, context: str, continuation: str) -> float:
    """log p(continuation | context) from transformers' forward, as lm-eval defines it."""
    ctx = tok(context, add_special_tokens=False)["input_ids"]
    cont = tok(continuation, add_special_tokens=False)["input_ids"]
    ids = torch.tensor([ctx + cont])
    with torch.no_grad():
        logp = torch.log_softmax(model(input_ids=ids).logits[0].double(), -1)
    return sum(logp[len(ctx) - 1 + i, t].item() for i, t in enumerate(cont))


def test_report_keeps_what_reproduces_the_score(teacher_dirs, tasks, tmp_path):
    from importlib.metadata import version

    from transformers import AutoModelForCausalLM, AutoTokenizer

    model_dir = teacher_dirs["llama"]
    out = tmp_path / "eval.json"
    assert run_eval(model_dir, tasks, out, "--lm-eval-tasks", "red_tiny_mc,red_tiny_gen", "--log-samples") == 0
    rep = json.loads(out.read_text())["lm_eval"]
    names = {"red_tiny_mc", "red_tiny_gen"}
    assert rep["settings"]["tasks"] == ["red_tiny_mc", "red_tiny_gen"] and rep["settings"]["log_samples"] is True
    assert rep["settings"]["include_paths"] == [str(tasks)]
    assert set(rep["results"]) == names
    assert rep["versions"] == {"red_tiny_mc": 1.0, "red_tiny_gen": 2.0}
    assert rep["n-samples"] == {t: {"original": 5, "effective": 5} for t in names}
    assert rep["n-shot"] == {t: 0 for t in names}
    assert rep["configs"]["red_tiny_mc"]["doc_to_text"] == "{{q}}"
    assert rep["configs"]["red_tiny_mc"]["dataset_kwargs"]["data_files"]["test"].endswith("data.jsonl")
    assert rep["config"]["model_args"]["pretrained"] == str(model_dir)
    assert rep["packages"]["lm_eval"] == version("lm_eval") == rep["lm_eval_version"]
    assert rep["packages"]["transformers"] == version("transformers")
    # the samples, checked against transformers' own forward: each choice's log-likelihood
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    tok = AutoTokenizer.from_pretrained(model_dir)
    samples = rep["samples"]["red_tiny_mc"]
    assert sorted(s["doc_id"] for s in samples) == list(range(len(ROWS)))
    correct = []
    for s in samples:
        a, b = ROWS[s["doc_id"]]
        assert s["doc"]["q"] == f"{a} + {b} ="
        ours = [continuation_logprob(model, tok, s["doc"]["q"], " " + c) for c in s["doc"]["choices"]]
        theirs = [float(r[0][0]) for r in s["resps"]]
        assert theirs == pytest.approx(ours, abs=1e-4), (ours, theirs)
        correct.append(float(max(range(3), key=lambda i: ours[i]) == 0))
    assert rep["results"]["red_tiny_mc"]["acc,none"] == pytest.approx(sum(correct) / len(correct))
    gen = rep["samples"]["red_tiny_gen"]
    hits = [float(s["filtered_resps"][0].strip() == s["target"]) for s in gen]
    assert len(gen) == len(ROWS) and rep["results"]["red_tiny_gen"]["exact_match,none"] == sum(hits) / len(hits)


def test_without_log_samples_no_samples_and_limit_counted(teacher_dirs, tasks, tmp_path):
    out = tmp_path / "eval.json"
    assert run_eval(teacher_dirs["llama"], tasks, out, "--lm-eval-tasks", "red_tiny_mc", "--limit", "2") == 0
    rep = json.loads(out.read_text())["lm_eval"]
    assert "samples" not in rep
    assert rep["n-samples"] == {"red_tiny_mc": {"original": 5, "effective": 2}}
    assert rep["settings"]["limit"] == 2 and rep["config"]["limit"] == 2


def test_bad_task_names_are_one_line_before_the_model_loads(teacher_dirs, tasks, tmp_path, capfd, monkeypatch):
    import datasets.config
    import huggingface_hub.constants
    import transformers

    def no_model(*a, **k):
        raise AssertionError("a model was loaded before the task names were checked")

    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", no_model)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", str(tmp_path / "datasets"))
    out = tmp_path / "eval.json"
    ev = lambda *a: main(["eval", "--model", str(teacher_dirs["llama"]), "--out", str(out), "--device", "cpu",
                          "--max-gen-toks", "4", *a])
    one_line(capfd, ev("--lm-eval-tasks", "red_tiny_mcc", "--include-path", str(tasks)),
             "no task, group or tag named 'red_tiny_mcc'", "did you mean red_tiny_mc", "--include-path")
    one_line(capfd, ev("--lm-eval-tasks", "gsm8k"), "task 'gsm8k'", "Hugging Face Hub dataset 'openai/gsm8k'",
             "does not download", "--include-path")
    one_line(capfd, ev("--lm-eval-tasks", "ai2_arc"), "task 'arc_", "(of ai2_arc)", "allenai/ai2_arc")  # a tag
    one_line(capfd, ev("--lm-eval-tasks", "red_tiny_mc", "--include-path", str(tmp_path / "nowhere")),
             "--include-path", "is not a folder")
    one_line(capfd, ev("--lm-eval-tasks", "red_tiny_mc", "--include-path", str(tasks), "--log-samples", "--out", ""),
             "--log-samples", "--out FILE")
    assert not out.exists()


def test_task_data_is_local_or_cached(tmp_path, monkeypatch):
    import datasets.config
    import huggingface_hub.constants

    from red.commands.eval import task_data_problem

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", str(tmp_path / "datasets"))
    data = tmp_path / "d.jsonl"
    data.write_text("{}\n")
    local = lambda files: {"dataset_path": "json", "dataset_kwargs": {"data_files": files}}
    assert task_data_problem(local(str(data))) is None
    assert task_data_problem(local({"test": [str(data)]})) is None
    assert task_data_problem(local(str(tmp_path / "*.jsonl"))) is None
    assert "matches no file" in task_data_problem(local(str(tmp_path / "gone.jsonl")))
    assert "not on this machine" in task_data_problem(local("https://example.org/d.jsonl"))
    assert "names no local data_files" in task_data_problem({"dataset_path": "json"})
    assert task_data_problem({"dataset_path": str(tmp_path)}) is None  # a local folder
    assert task_data_problem({"custom_dataset": "!function utils.load"}) is None
    assert task_data_problem(None) is None  # a Python-class task: left to lm-eval
    hub = {"dataset_path": "openai/gsm8k", "dataset_name": "main"}
    assert "load_dataset('openai/gsm8k', 'main')" in task_data_problem(hub)
    (tmp_path / "hub" / "datasets--openai--gsm8k").mkdir(parents=True)
    assert task_data_problem(hub) is None  # in the hub's download cache
    assert "does not hold" in task_data_problem({"dataset_path": "cais/mmlu"})
    (tmp_path / "datasets" / "cais___mmlu").mkdir(parents=True)
    assert task_data_problem({"dataset_path": "cais/mmlu"}) is None  # datasets' prepared copy
