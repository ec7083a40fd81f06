"""FSDP2 on CPU: 2 gloo processes under torchrun against a single process.

The runs differ only in the order of float32 reductions (gradient all-reduce, loss
all-reduce, the clone-norm scales averaged over ranks); they train with AdamW's eps
raised to ``helpers.ADAM_EPS`` so that this rounding cannot move a weight by more than
``helpers.ATOL`` on any machine (the reason is in tests/helpers.py). A run is judged by
the result.json rank 0 writes at its very end, not only by the exit code.
"""
import json
import shutil
from pathlib import Path

import pytest
from safetensors.torch import load_file

from red.run.checkpoint import list_checkpoints, load_tensors
from red.config import make_config
from red.commands.distill import distill

from helpers import ADAM_EPS, ATOL, assert_close_tensors, assert_same_metrics, free_port, metrics, ok_result, torchrun  # noqa: F401

ROOT = Path(__file__).resolve().parents[2]


def distill_args(teacher, corpus, out, *extra):
    return ["distill", "--teacher", teacher, "--data", corpus, "--hidden-size", 32, "--out", out, "--steps", 4,
            "--seq-len", 24, "--batch-size", 4, "--grad-accum", 2, "--save-every", 2, "--eval-every", 2,
            "--val-batches", 2, "--log-every", 1, "--lr", 3e-3, "--adam-eps", ADAM_EPS, "--warmup", 1, "--quiet", *extra]


def single_process(teacher, corpus, out, **kw):
    cfg = make_config(teacher=str(teacher), data=str(corpus), hidden_size=32, out=str(out), steps=4, seq_len=24,
                      batch_size=4, grad_accum=2, save_every=2, eval_every=2, val_batches=2, log_every=1, lr=3e-3,
                      adam_eps=ADAM_EPS, warmup=1, **kw)
    distill(cfg, progress=False)


def trained(out: Path, step: int = 4) -> dict:
    return load_tensors(out / f"checkpoints/step-{step:07d}")  # either layout, rows joined, no RNG


def assert_close_runs(a: Path, b: Path):
    worst = assert_close_tensors(trained(a), trained(b))
    assert_same_metrics(a, b)
    return worst


@pytest.mark.parametrize("arch,extra", [("llama", ("--activation-checkpointing",)), ("qwen2", ())])
def test_two_processes_match_one_and_resume_in_one(arch, extra, teacher_dirs, corpus_file, tmp_path):
    t = teacher_dirs[arch]
    single_process(t, corpus_file, tmp_path / "one")
    p = torchrun(2, *distill_args(t, corpus_file, tmp_path / "two", *extra))
    assert p.returncode == 0, p.stderr[-3000:]
    ok_result(tmp_path / "two", 2)
    assert p.stdout.count("student written to") == 1  # rank 0 alone reports
    assert_close_runs(tmp_path / "one", tmp_path / "two")
    # the export of the sharded run is the same ordinary checkpoint
    e1 = load_file(str(tmp_path / "one/student/model.safetensors"))
    e2 = load_file(str(tmp_path / "two/student/model.safetensors"))
    assert set(e1) == set(e2) and all((e1[k] - e2[k]).abs().max() <= ATOL for k in e1)
    c1 = json.loads((tmp_path / "one/student/config.json").read_text())
    c2 = json.loads((tmp_path / "two/student/config.json").read_text())
    assert c1 == c2
    if arch != "llama":
        return
    # a checkpoint saved by 2 processes resumes in 1: drop the last one, continue from step 2
    shutil.copytree(tmp_path / "two", tmp_path / "resumed")
    shutil.rmtree(tmp_path / "resumed/checkpoints/step-0000004")
    (tmp_path / "resumed/result.json").unlink()
    cfg = make_config(tmp_path / "resumed/run.yaml", resume=True)
    assert cfg.out == str(tmp_path / "two")
    cfg.out = str(tmp_path / "resumed")
    distill(cfg, progress=False)
    ok_result(tmp_path / "resumed", 1)
    assert_close_tensors(trained(tmp_path / "one"), trained(tmp_path / "resumed"))


@pytest.mark.parametrize("teacher,weights,extra", [("replicate", "replicate", ()), ("replicate", "shard", ()),
                                                   ("shard", "shard", ("--activation-checkpointing",))])
def test_every_placement_trains_the_same_model(teacher, weights, extra, teacher_dirs, corpus_file, tmp_path):
    """--teacher-sharding (the frozen teacher whole on every rank, or 1/N gathered layer by
    layer) and --step-weights (the step's dense weights whole on every rank and all-reduced
    once, or FSDP2 rows gathered per layer and reduce-scattered every micro-batch): every
    placement trains the single-process model (the CPU default, teacher sharded and step
    weights whole, is the test above)."""
    t = teacher_dirs["qwen3"]
    single_process(t, corpus_file, tmp_path / "one")
    p = torchrun(2, *distill_args(t, corpus_file, tmp_path / "two", "--teacher-sharding", teacher,
                                  "--step-weights", weights, *extra))
    assert p.returncode == 0, p.stderr[-3000:]
    ok_result(tmp_path / "two", 2)
    assert_close_runs(tmp_path / "one", tmp_path / "two")


def test_one_process_checkpoint_resumes_in_two(teacher_dirs, corpus_file, tmp_path):
    t = teacher_dirs["qwen3"]
    single_process(t, corpus_file, tmp_path / "one")
    shutil.copytree(tmp_path / "one", tmp_path / "two")
    shutil.rmtree(tmp_path / "two/checkpoints/step-0000004")
    (tmp_path / "two/result.json").unlink()
    p = torchrun(2, *distill_args(t, corpus_file, tmp_path / "two", "--resume"))
    assert p.returncode == 0, p.stderr[-3000:]
    ok_result(tmp_path / "two", 2)
    assert [c.name for c in list_checkpoints(tmp_path / "two/checkpoints")] == ["step-0000002", "step-0000004"]
    assert_close_tensors(trained(tmp_path / "one"), trained(tmp_path / "two"))


def test_batch_not_divisible_by_processes_is_refused(teacher_dirs, corpus_file, tmp_path):
    p = torchrun(2, *distill_args(teacher_dirs["llama"], corpus_file, tmp_path / "odd", "--batch-size", 3))
    assert p.returncode != 0 and "exitcode  : 2" in p.stderr  # torchrun reports the workers' code 2
    lines = [l for l in p.stderr.splitlines() if l.startswith("red distill: error:")]
    assert len(lines) == 1 and "divisible by the 2 processes" in lines[0]
    assert not (tmp_path / "odd").exists()


def test_masked_packed_mixed_data_trains_the_same_model_on_1_2_and_3_processes(tmp_path, corpus_file):
    """The step's KL and LM divide by the scored targets of the whole global batch (issue
    19, case 9: they used to divide by each rank's own count): chat data scored on the
    assistant turns only (a different number of targets in every row), mixed with plain
    text, packed with attention kept inside documents, on 1, 2 and 3 processes."""
    import random

    from helpers import build_tokenizer, make_teacher

    t = make_teacher(tmp_path / "teacher", "qwen3")
    tok = build_tokenizer()
    tok.chat_template = ("{% for m in messages %}[{{ m['role'] }}]: {{ m['content'] }}\n{% endfor %}"
                         "{% if add_generation_prompt %}[assistant]: {% endif %}")
    tok.save_pretrained(t)
    rng = random.Random(0)
    words = ["alpha", "beta", "sum", "of", "is", "x", "y", "1", "2"]
    say = lambda k: " ".join(rng.choice(words) for _ in range(k))  # noqa: E731
    rows = [{"messages": [{"role": "user", "content": say(rng.randint(2, 9))},
                          {"role": "assistant", "content": say(rng.randint(1, 12))}]} for _ in range(120)]
    (tmp_path / "chat.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    data = ["--data", f"{tmp_path / 'chat.jsonl'}:0.6", "--data", f"{corpus_file}:0.4", "--no-cross-doc-attention",
            "--loss-on", "assistant", "--batch-size", 6]
    from red.cli import main

    runs = {}
    for n in (1, 2, 3):
        out = tmp_path / f"run{n}"
        args = distill_args(t, corpus_file, out, *data)
        args = args[:3] + args[5:]  # the mixture's --data instead of the plain corpus
        if n == 1:
            assert main([str(a) for a in args]) == 0
        else:
            p = torchrun(n, *args, timeout=240)
            assert p.returncode == 0, p.stderr[-3000:]
            ok_result(out, n)
        runs[n] = out
    for n in (2, 3):
        assert_close_runs(runs[1], runs[n])
