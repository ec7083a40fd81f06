"""`red bench` and red.commands.bench: kernels against their eager compositions, the training step
against ordinary training and the teacher forward, and the op counts of a micro-batch."""
import json

import pytest
import torch

import red.train.trainer
import red_kernels as K
from red.commands import bench
from random_teacher import random_teacher  # benchmarks/random_teacher.py
from red.train.startup import build_student
from red.model.teacher import load_teacher
from helpers import make_teacher

OPS = {"rmsnorm_with_stats", "clone_mse", "fused_linear_kl"}


def test_bench_json(teacher_dirs, run_cli):
    rc, out, err = run_cli("bench", "--teacher", teacher_dirs["llama"], "--hidden-size", 32, "--seq-len", 16,
                           "--batch-size", 2, "--grad-accum", 2, "--steps", 1, "--json")
    assert rc == 0, err
    res = json.loads(out)
    assert res["device"] == "cpu" and res["backends"] == ["torch"]
    assert res["grad_accum"] == 2 and res["tokens_per_step"] == 2 * 2 * 16
    assert any(n.startswith("CPU numbers") for n in res["notes"])
    assert any("triton backend not timed" in n for n in res["notes"])
    assert res["ceilings"]["matmul_tflops"] > 0 and res["ceilings"]["copy_tbps"] > 0
    # every existing op, under the torch backend and as its eager composition
    assert {(r["name"], r["impl"]) for r in res["kernels"]} == {(n, i) for n in OPS for i in ("torch", "eager")}
    for r in res["kernels"]:
        assert r["status"] == "ok", r
        assert r["ms"] > 0 and r["rate"] > 0 and r["rate_unit"] in ("TB/s", "TFLOP/s") and 0 < r["frac_of_ceiling"]
        assert r["speedup_vs_eager"] > 0
        if r["impl"] == "eager":
            assert r["speedup_vs_eager"] == 1.0
    steps = {r["variant"]: r for r in res["steps"]}
    assert set(steps) == {"teacher_forward", "torch", "ordinary"}
    for v in ("torch", "ordinary", "teacher_forward"):
        r = steps[v]
        assert r["status"] == "ok" and r["tokens_per_s"] > 0 and r["ms"] > 0, r
        assert r["tokens"] == 64 and r["micro_batches"] == 2  # all variants see the same micro-batches
        assert r["resident_bytes"] > 0
        # the process's CPU time of every timed step beside its wall time (all threads: it may exceed the wall)
        assert len(r["cpu_ms_all"]) == len(r["ms_all"]) and r["cpu_ms"] > 0
        if bench.CPU_MEMORY_AVAILABLE:
            assert r["peak_mem_bytes"] == r["resident_bytes"] + r["step_mem_bytes"]
    assert steps["torch"]["name"] == "red_step" and steps["ordinary"]["name"] == "ordinary_step"
    ratios = res["ratios"]
    assert 0 < ratios["floor_ratio"] < 1
    assert ratios["torch_of_floor"] == pytest.approx(ratios["torch_over_ordinary_tokens_per_s"] / ratios["floor_ratio"])
    oc = res["op_counts"]["torch"]
    assert oc["status"] == "ok" and oc["micro_batches"] == 2 and oc["layers"] == 2
    assert oc["ratio_micro_batch"] == oc["red"]["micro_batch"]["total"] / oc["ordinary"]["micro_batch"]["total"]
    assert "red bench: red_step[torch]" in err and "red bench: op_counts[torch] RED/ordinary" in err
    assert "red bench: clone_mse[eager]" in err  # progress on stderr, the JSON alone on stdout


def test_bench_table_shrinks_layers_on_cpu(tmp_path, run_cli):
    teacher = make_teacher(tmp_path / "deep", "qwen3", hidden_size=48, layers=3)
    rc, out, err = run_cli("bench", "--teacher", teacher, "--hidden-size", 16, "--seq-len", 12, "--steps", 1,
                           "--no-ordinary", "--quiet")
    assert rc == 0, err
    assert err == ""
    assert "layers=2/3" in out and "layers shrunk to the first 2 of 3" in out
    assert "note: CPU numbers" in out
    assert "fused_linear_kl" in out and "clone_mse" in out and "TFLOP/s" in out and "TB/s" in out
    assert "red_step" in out and "teacher_forward" in out and "ordinary_step" not in out
    assert "ops a micro-batch, torch backend" in out and "layer, each of 2" in out and "goal (issue 20)" in out
    rc, out, err = run_cli("bench", "--teacher", teacher, "--hidden-size", 16, "--seq-len", 12, "--steps", 1,
                           "--no-ordinary", "--no-op-counts", "--layers", 1, "--quiet")
    assert rc == 0, err
    assert "layers=1/3" in out and "ops a micro-batch" not in out


@pytest.mark.parametrize("case", ["width", "missing", "layers", "kernels", "grad-accum"])
def test_bench_bad_input(case, teacher_dirs, tmp_path, run_cli):
    t = teacher_dirs["llama"]
    args = {"width": ["--teacher", t, "--hidden-size", 64, "--seq-len", 8],
            "missing": ["--teacher", tmp_path / "nope", "--hidden-size", 32, "--seq-len", 8],
            "layers": ["--teacher", t, "--hidden-size", 32, "--seq-len", 8, "--layers", 9],
            "kernels": ["--teacher", t, "--hidden-size", 32, "--seq-len", 8, "--kernels", "cuda"],
            "grad-accum": ["--teacher", t, "--hidden-size", 32, "--seq-len", 8, "--grad-accum", 0]}[case]
    rc, out, err = run_cli("bench", *args)
    assert rc == 2 and out == ""
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("red bench: error: "), err
    assert {"width": "--hidden-size 64", "missing": "does not exist", "layers": "--layers 9",
            "kernels": "--kernels", "grad-accum": "--grad-accum"}[case] in lines[0]


def test_bench_step_drives_the_trainer(teacher_dirs, monkeypatch):
    """The step benchmark is red.train.trainer.train_step on a ProjectedStudent over all the
    micro-batches of a step: every timed step goes through it, and it trains P."""
    teacher, _ = load_teacher(teacher_dirs["llama"], with_tokenizer=False)
    student = build_student(teacher, 32, init="random-select", seed=0)
    before = {k: v.detach().clone() for k, v in student.projections().items()}
    calls = []
    real = red.train.trainer.train_step

    def counting(st, opt, batches, loss, *a, **k):
        calls.append((st, len(batches), type(opt).__name__))
        return real(st, opt, batches, loss, *a, **k)

    monkeypatch.setattr(red.train.trainer, "train_step", counting)
    g = torch.Generator().manual_seed(0)
    batches = [torch.randint(0, teacher.config.vocab_size, (2, 12), generator=g) for _ in range(3)]
    row = bench.bench_step(student, batches, "torch", steps=2, warmup=1, lr=1e-2)
    extra = 1 if bench.CPU_MEMORY_AVAILABLE else 0  # the CPU peak is read in one more step
    assert len(calls) == 1 + 2 + extra and all(c == (student, 3, "AdamW") for c in calls)
    assert row["name"] == "red_step" and row["variant"] == "torch" and row["tokens"] == 72 and row["micro_batches"] == 3
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
    row = bench.bench_ordinary(model, [ids, ids.flip(0)], steps=1)
    assert row["name"] == "ordinary_step" and row["tokens_per_s"] > 0 and row["tokens"] == 40


def test_ordinary_step_accumulates_like_one_batch(loaded_teachers):
    """Ordinary gradient accumulation: two micro-batches give the gradient of their union."""
    student = build_student(loaded_teachers["llama"][0], 32, init="orthogonal", seed=2)
    model = bench.ordinary_model(student)
    ids = torch.randint(0, student.arch.vocab_size, (4, 9), generator=torch.Generator().manual_seed(2))
    bench.ordinary_micro_batch(model, ids)
    whole = [p.grad.clone() for p in model.parameters()]
    model.zero_grad(set_to_none=True)
    for half in ids.split(2):
        bench.ordinary_micro_batch(model, half, n_micro_batches=2)
    for p, g in zip(model.parameters(), whole):
        torch.testing.assert_close(p.grad, g, rtol=1e-5, atol=1e-7)
    opt = bench.ordinary_optimizer(model, lr=1e-2)
    w0 = model.model.embed_tokens.weight.detach().clone()
    bench.ordinary_update(opt, max_norm=1.0)
    assert all(p.grad is None for p in model.parameters())
    assert not torch.equal(model.model.embed_tokens.weight, w0)


def test_teacher_forward_covers_every_micro_batch(loaded_teachers):
    teacher = loaded_teachers["llama"][0]
    seen = []
    handle = teacher.register_forward_hook(lambda m, a, kw, out: seen.append(kw["input_ids"].shape), with_kwargs=True)
    try:
        ids = torch.randint(0, teacher.config.vocab_size, (2, 8), generator=torch.Generator().manual_seed(3))
        row = bench.bench_teacher_forward(teacher, [ids, ids, ids], steps=2, warmup=1, memory=False)
    finally:
        handle.remove()
    assert len(seen) == 3 * 3 and row["tokens"] == 48 and row["micro_batches"] == 3


def test_kernel_specs_time_the_same_computation_as_eager():
    """Each op's red_kernels call and its eager row compute the same thing, at the sizes
    ``kernel_shapes`` gives, so 'x eager' compares like with like."""
    from red.model.arch import Arch
    from transformers import LlamaConfig

    cfg = LlamaConfig(vocab_size=70, hidden_size=48, intermediate_size=80, num_hidden_layers=1, num_attention_heads=4,
                      num_key_value_heads=2, head_dim=12, tie_word_embeddings=True)
    shapes = bench.kernel_shapes(Arch.from_config(cfg), 24, 20)
    assert shapes == dict(N=20, D=48, d=24, I=80, V=70, eps=cfg.rms_norm_eps)
    specs = bench.kernel_specs(shapes, "cpu", torch.float64)
    assert {s["name"] for s in specs} == OPS
    for s in specs:
        args, leaves = s["make"]()
        with K.use_backend("torch"):
            got, ref = s["fn"](*args), s["eager"](*args)
        got, ref = (got if isinstance(got, tuple) else (got,)), (ref if isinstance(ref, tuple) else (ref,))
        for a, b in zip(got, ref):  # (the eager clone MSE makes fp32 copies even of fp64 inputs)
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7, check_dtype=False)
        if s["backward"]:
            grads = []
            for fn in (s["fn"], s["eager"]):
                outs = [o for o in (lambda r: r if isinstance(r, tuple) else (r,))(fn(*args)) if o.requires_grad]
                grads.append(torch.autograd.grad([o.sum() * (i + 1) for i, o in enumerate(outs)],
                                                 [args[i] for i in leaves]))
            for a, b in zip(*grads):
                torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7, check_dtype=False)
    rows = bench.bench_kernels(shapes, "cpu", torch.float32, ("torch",), ceilings={"matmul_tflops": 1.0,
                                                                                 "copy_tbps": 1.0}, memory=False)
    assert [(r["name"], r["impl"]) for r in rows] == [(n, i) for n in ("rmsnorm_with_stats", "clone_mse",
                                                                       "fused_linear_kl") for i in ("torch", "eager")]
    for r in rows:
        assert r["status"] == "ok" and r["rate"] == pytest.approx(r["work"] / (r["ms"] * 1e-3) / 1e12)


def test_step_ratios_and_the_floor():
    rows = [dict(variant="torch", status="ok", tokens_per_s=1000 / 0.3, ms=300.0),
            dict(variant="ordinary", status="ok", tokens_per_s=1000 / 0.1, ms=100.0),
            dict(variant="teacher_forward", status="ok", tokens_per_s=1000 / 0.05, ms=50.0),
            dict(variant="triton", status="error")]
    r = bench.step_ratios(rows)
    assert r["floor_ratio"] == pytest.approx(100 / 150)
    assert r["torch_over_ordinary_tokens_per_s"] == pytest.approx(1 / 3)
    assert r["torch_of_floor"] == pytest.approx(0.5)
    assert r["triton_over_ordinary_tokens_per_s"] is None and r["triton_of_floor"] is None


def test_shrink_layers_and_random_teacher():
    from transformers import LlamaConfig

    cfg = LlamaConfig(vocab_size=50, hidden_size=32, intermediate_size=48, num_hidden_layers=3, num_attention_heads=4,
                      num_key_value_heads=2, head_dim=8, tie_word_embeddings=True)
    teacher = random_teacher(cfg, "cpu", torch.float32, seed=0)
    assert not any(p.requires_grad for p in teacher.parameters()) and not teacher.training
    bench.shrink_layers(teacher, 1)
    assert len(teacher.model.layers) == 1 and teacher.config.num_hidden_layers == 1
    res = bench.bench_teacher(teacher, 16, 8, backends=("torch",), include_kernels=False, include_ordinary=False,
                              include_op_counts=False, steps=1, memory=False)
    assert res["teacher"]["num_layers"] == 1 and res["op_counts"] == {}
    assert [r["variant"] for r in res["steps"]] == ["teacher_forward", "torch"]
    assert all(r["status"] == "ok" for r in res["steps"])


def test_bench_teacher_records_failures_and_budget(loaded_teachers, monkeypatch):
    """A failing measurement is a row, not the end of the run; past the deadline rows are skipped."""
    teacher = loaded_teachers["llama"][0]

    def boom(*a, **k):
        raise RuntimeError("simulated out of memory")

    monkeypatch.setattr(bench, "bench_teacher_forward", boom)
    monkeypatch.setattr(bench, "op_counts", boom)
    res = bench.bench_teacher(teacher, 32, 8, backends=("torch",), include_kernels=False, steps=1, memory=False)
    rows = {r["variant"]: r for r in res["steps"]}
    assert rows["teacher_forward"]["status"] == "error" and "simulated" in rows["teacher_forward"]["error"]
    assert rows["torch"]["status"] == "ok" and rows["ordinary"]["status"] == "ok"
    assert res["op_counts"]["torch"]["status"] == "error" and "simulated" in res["op_counts"]["torch"]["error"]
    assert res["ratios"]["floor_ratio"] is None and res["ratios"]["torch_over_ordinary_tokens_per_s"] > 0
    res = bench.bench_teacher(teacher, 32, 8, backends=("torch",), include_kernels=False, steps=1, memory=False,
                              deadline=0.0)
    assert {r["status"] for r in res["steps"]} == {"skipped"} and res["op_counts"]["torch"]["status"] == "skipped"


# ------------------------------------------------------------------ op counts
def test_op_counter_counts_kernels_not_views():
    x = torch.randn(4, 6)
    with bench.OpCounter() as c:
        x.t().transpose(0, 1).permute(1, 0).split(2)                                # views only
        y = x.view(6, 4).reshape(24)[2:10].unsqueeze(0).expand(3, 8).detach()
        torch.empty(5)
        z = (y + 1).sum()                                                          # two kernels
        x.contiguous()                                                              # already contiguous: nothing
        x.t().contiguous()                                                          # a copy
    ops = {op: n for (_src, op), n in c.counts[c.where].items()}
    assert ops == {"add": 1, "sum": 1, "clone": 1}, ops
    assert z.item() > -1e9


def test_op_counter_counts_a_triton_launch_once():
    """A red_kernels Triton launch counts one kernel; on the CPU the interpreter's copies of
    its arguments are not kernels and are left out (a recording list in place still records it)."""
    from red_kernels import _common

    if not _common.INTERPRET:
        pytest.skip("needs the Triton interpreter (CPU tests) to launch on CPU tensors")
    s, t = torch.randn(40, 24, requires_grad=True), torch.randn(40, 24)
    old, _common.RECORD = _common.RECORD, []
    try:
        with K.use_backend("triton"), bench.OpCounter() as c:
            K.clone_mse(s, t)
        recorded = list(_common.RECORD)
    finally:
        _common.RECORD = old
    counted = c.counts[c.where]
    assert [r["kernel"] for r in recorded] == ["_mse_kernel"]
    assert counted[("launch", "triton:_mse_kernel")] == 1
    assert not [k for k in counted if k[0] == "launch" and not k[1].startswith("triton:")], counted


def _tiny_student(arch="llama", layers=2, dtype=torch.float32):
    from transformers import LlamaConfig, Qwen3Config

    common = dict(vocab_size=96, hidden_size=64, intermediate_size=96, num_hidden_layers=layers, num_attention_heads=4,
                  num_key_value_heads=2, head_dim=16)
    cfg = LlamaConfig(**common, tie_word_embeddings=True) if arch == "llama" else \
        Qwen3Config(**common, tie_word_embeddings=False)
    teacher = random_teacher(cfg, "cpu", dtype, seed=0)
    return build_student(teacher, 32, init="random-select", seed=0)


def _batches(n=2, vocab=96):
    g = torch.Generator().manual_seed(5)
    return [torch.randint(0, vocab, (2, 12), generator=g) for _ in range(n)]


@pytest.mark.parametrize("arch", ["llama", "qwen3"])
def test_op_counts_cover_the_whole_step(arch):
    """Every counted op of a RED step and of an ordinary step belongs to a part; layers count
    alike; the counts are deterministic; a micro-batch is the sum of its parts; and the
    teacher's layer forward inside RED launches no more than an ordinary layer forward
    (decoder_layer is the ordinary model's layer, run from explicit weights)."""
    oc = bench.op_counts(_tiny_student(arch), _batches(), backend="torch")
    again = bench.op_counts(_tiny_student(arch), _batches(), backend="torch")
    for side in ("red", "ordinary"):
        s = oc[side]
        assert s["unattributed"] == 0 and s["layers_identical"], side
        mb = s["micro_batch"]
        assert mb == again[side]["micro_batch"] and s["step"] == again[side]["step"]
        parts = mb["prologue"]["fwd"] + mb["prologue"]["bwd"] + mb["head"]["fwd"] + mb["head"]["bwd"]
        parts += sum(mb.get("accumulate", {}).values()) + oc["layers"] * mb["layer"]["total"]
        assert mb["total"] == parts == mb["fwd"] + mb["bwd"]
        assert mb["layer"]["fwd"] > 0 and mb["layer"]["bwd"] > 0
        # the micro-batches and the per-step parts make up the whole step
        assert len(s["micro_batch_totals"]) == 2 and s["micro_batch_totals"][-1] == mb["total"]
        assert s["step_total"] == sum(s["micro_batch_totals"]) + sum(s["step"].values())
    red_, ordinary = oc["red"], oc["ordinary"]
    assert set(red_["step"]) == {"step_setup", "make_weights", "weight_backward", "optimizer"}
    assert set(ordinary["step"]) == {"optimizer"}
    assert 0 < red_["micro_batch"]["layer"]["teacher_fwd"] <= ordinary["micro_batch"]["layer"]["fwd"]
    # the clone taps: seven clone_mse backward nodes in every student layer
    assert red_["sources"]["layer/bwd"]["_CloneMSEBackward"] >= 7
    assert "triton:_mse_kernel" not in red_["ops"]["layer/fwd"]  # torch backend: no launch


def _goal_ratio(backend):
    if backend == "triton":
        from red_kernels import _common

        if not (_common.INTERPRET or torch.cuda.is_available()):
            pytest.skip("the triton backend needs the interpreter or a GPU")
    return bench.op_counts(_tiny_student(), _batches(), backend=backend)


@pytest.mark.parametrize("backend", [
    pytest.param("torch", marks=pytest.mark.xfail(
        strict=True, reason="the CPU reference path is not what the goal is about (launches on a GPU): a clone tap is "
                            "a difference and two dot products there, and its backward scales the gradient; measured "
                            "1.73x a micro-batch")),
    "triton",
])
def test_red_micro_batch_launches_at_most_1_5x_ordinary(backend):
    """Issue 20's goal: one RED micro-batch (teacher forward, student forward and backward,
    clone and KL terms) launches at most 1.5x the kernels of an ordinary micro-batch of the
    same student (forward with labels + backward), counted by red.commands.bench.op_counts on a tiny
    2-layer Llama (counts are exact and do not depend on the machine)."""
    oc = _goal_ratio(backend)
    assert oc["backend"] == backend
    assert oc["ratio_micro_batch"] <= 1.5, bench.format_op_counts(oc)
