"""`red bench` and red.bench: kernel and step throughput on the user's teacher."""
import json

import pytest
import torch

import red.trainer
from red import bench
from red.pipeline import build_student
from red.teacher import load_teacher
from tiny import make_teacher


def test_bench_json(teacher_dirs, run_cli):
    rc, out, err = run_cli("bench", "--teacher", teacher_dirs["llama"], "--hidden-size", 32, "--seq-len", 16,
                           "--batch-size", 2, "--steps", 1, "--json")
    assert rc == 0, err
    res = json.loads(out)
    assert res["device"] == "cpu" and res["backends"] == ["torch"] and res["tokens_per_step"] == 32
    assert any(n.startswith("CPU numbers") for n in res["notes"])
    assert any("triton backend not timed" in n for n in res["notes"])
    assert res["ceilings"]["matmul_tflops"] > 0 and res["ceilings"]["copy_tbps"] > 0
    names = {r["name"] for r in res["kernels"]}
    assert {"rmsnorm_with_stats", "mse", "projected_mse_student_space", "projected_linear_group_qkv",
            "fused_linear_kl", "selected_mse"} <= names
    for r in res["kernels"]:
        assert r["status"] == "ok", r
        assert r["ms"] > 0 and r["rate"] > 0 and r["rate_unit"] in ("TB/s", "TFLOP/s")
        assert 0 < r["frac_of_ceiling"]
    steps = {r["variant"]: r for r in res["steps"]}
    assert set(steps) == {"teacher_forward", "torch", "ordinary"}
    for v in ("torch", "ordinary", "teacher_forward"):
        r = steps[v]
        assert r["status"] == "ok" and r["tokens_per_s"] > 0 and r["ms"] > 0, r
        assert r["resident_bytes"] > 0
        if bench.CPU_MEMORY_AVAILABLE:
            assert r["peak_mem_bytes"] == r["resident_bytes"] + r["step_mem_bytes"]
    assert steps["torch"]["name"] == "red_step" and steps["ordinary"]["name"] == "ordinary_step"
    assert res["ratios"]["torch_over_ordinary_tokens_per_s"] > 0
    assert 0 < res["ratios"]["floor_ratio"] < 1
    assert "red bench: red_step[torch]" in err  # progress on stderr, the JSON alone on stdout


def test_bench_table_shrinks_layers_on_cpu(tmp_path, run_cli):
    teacher = make_teacher(tmp_path / "deep", "qwen3", hidden_size=48, layers=3)
    rc, out, err = run_cli("bench", "--teacher", teacher, "--hidden-size", 16, "--seq-len", 12, "--steps", 1,
                           "--no-ordinary", "--quiet")
    assert rc == 0, err
    assert err == ""
    assert "layers=2/3" in out and "layers shrunk to the first 2 of 3" in out
    assert "note: CPU numbers" in out
    assert "fused_linear_kl" in out and "TFLOP/s" in out and "TB/s" in out
    assert "red_step" in out and "teacher_forward" in out and "ordinary_step" not in out


@pytest.mark.parametrize("case", ["width", "missing", "layers", "kernels"])
def test_bench_bad_input(case, teacher_dirs, tmp_path, run_cli):
    t = teacher_dirs["llama"]
    args = {"width": ["--teacher", t, "--hidden-size", 64, "--seq-len", 8],
            "missing": ["--teacher", tmp_path / "nope", "--hidden-size", 32, "--seq-len", 8],
            "layers": ["--teacher", t, "--hidden-size", 32, "--seq-len", 8, "--layers", 9],
            "kernels": ["--teacher", t, "--hidden-size", 32, "--seq-len", 8, "--kernels", "cuda"]}[case]
    rc, out, err = run_cli("bench", *args)
    assert rc == 2 and out == ""
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("red bench: error: "), err
    assert {"width": "--hidden-size 64", "missing": "does not exist", "layers": "--layers 9",
            "kernels": "--kernels"}[case] in lines[0]


def test_bench_step_drives_the_trainer(teacher_dirs, monkeypatch):
    """The step benchmark is red.trainer.train_step on a ProjectedStudent: every timed step
    goes through it, and it trains the projections."""
    teacher, _ = load_teacher(teacher_dirs["llama"], with_tokenizer=False)
    student = build_student(teacher, 32, init="random-select", seed=0)
    before = {k: v.detach().clone() for k, v in student.projections().items()}
    calls = []
    real = red.trainer.train_step

    def counting(st, opt, batches, loss, *a, **k):
        calls.append((st, len(batches), type(opt).__name__))
        return real(st, opt, batches, loss, *a, **k)

    monkeypatch.setattr(red.trainer, "train_step", counting)
    ids = torch.randint(0, teacher.config.vocab_size, (2, 12), generator=torch.Generator().manual_seed(0))
    row = bench.bench_step(student, ids, "torch", steps=2, warmup=1, lr=1e-2)
    extra = 1 if bench.CPU_MEMORY_AVAILABLE else 0  # the CPU peak is read in one more step
    assert len(calls) == 1 + 2 + extra and all(c == (student, 1, "AdamW") for c in calls)
    assert row["name"] == "red_step" and row["variant"] == "torch" and row["tokens"] == 24
    assert row["tokens_per_s"] > 0 and row["loss"] > 0
    assert any(not torch.equal(before[k], v) for k, v in student.projections().items())


def test_ordinary_model_is_the_exported_student(loaded_teachers):
    """The ordinary-training yardstick trains the model `red export` writes: same logits."""
    teacher = loaded_teachers["qwen2"][0]
    student = build_student(teacher, 32, init="orthogonal", seed=1)
    model = bench.ordinary_model(student)
    ids = torch.randint(0, teacher.config.vocab_size, (2, 10), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ref = student(ids)
        got = model(input_ids=ids).logits
    assert torch.allclose(got, ref, atol=1e-4, rtol=1e-4), (got - ref).abs().max()
    assert all(p.requires_grad for p in model.parameters()) and model.training
    row = bench.bench_ordinary(model, ids, steps=1)
    assert row["name"] == "ordinary_step" and row["tokens_per_s"] > 0


def test_shrink_layers_and_random_teacher():
    from transformers import LlamaConfig

    cfg = LlamaConfig(vocab_size=50, hidden_size=32, intermediate_size=48, num_hidden_layers=3, num_attention_heads=4,
                      num_key_value_heads=2, head_dim=8, tie_word_embeddings=True)
    teacher = bench.random_teacher(cfg, "cpu", torch.float32, seed=0)
    assert not any(p.requires_grad for p in teacher.parameters()) and not teacher.training
    bench.shrink_layers(teacher, 1)
    assert len(teacher.model.layers) == 1 and teacher.config.num_hidden_layers == 1
    res = bench.bench_teacher(teacher, 16, 8, backends=("torch",), include_kernels=False, include_ordinary=False,
                              steps=1, memory=False)
    assert res["teacher"]["num_layers"] == 1
    assert [r["variant"] for r in res["steps"]] == ["teacher_forward", "torch"]
    assert all(r["status"] == "ok" for r in res["steps"])


def test_bench_teacher_records_failures_and_budget(loaded_teachers, monkeypatch):
    """A failing measurement is a row, not the end of the run; past the deadline rows are skipped."""
    teacher = loaded_teachers["llama"][0]

    def boom(*a, **k):
        raise RuntimeError("simulated out of memory")

    monkeypatch.setattr(bench, "bench_teacher_forward", boom)
    res = bench.bench_teacher(teacher, 32, 8, backends=("torch",), include_kernels=False, steps=1, memory=False)
    rows = {r["variant"]: r for r in res["steps"]}
    assert rows["teacher_forward"]["status"] == "error" and "simulated" in rows["teacher_forward"]["error"]
    assert rows["torch"]["status"] == "ok" and rows["ordinary"]["status"] == "ok"
    assert res["ratios"]["floor_ratio"] is None and res["ratios"]["torch_over_ordinary_tokens_per_s"] > 0
    res = bench.bench_teacher(teacher, 32, 8, backends=("torch",), include_kernels=False, steps=1, memory=False,
                              deadline=0.0)
    assert {r["status"] for r in res["steps"]} == {"skipped"}
