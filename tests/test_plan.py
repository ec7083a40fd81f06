"""`red plan` against an accounting of the real tensors of tiny models (no torch.cuda).

Teacher, projections, gradients and optimizer state must match exactly, for 1 GPU and,
with the rows FSDP2 gives a rank (torch.chunk on dim 0), for 2 and 3. Activations and
the saved part of the logits are a model of red_kernels: the test checks they are an
upper bound of the tensors autograd really saves, at most 30% above them, with and
without activation checkpointing.
"""
import pytest
import torch

from red.cli import main
from red.plan import plan_memory, student_weight_elements
from red.teacher import Arch
from red.student import LossSettings, ProjectedStudent
from red.initialization import initialize
from red.teacher import load_teacher


def nbytes(tensors, shard: int = 1) -> int:
    """Bytes rank 0 holds when each tensor is split on dim 0 over ``shard`` ranks."""
    total = 0
    for t in tensors:
        part = t.chunk(shard, 0)[0] if t.dim() and shard > 1 else t
        total += part.numel() * t.element_size()
    return total


def saved_tensor_bytes(fn, exclude=()) -> int:
    """Bytes of distinct storages autograd saves for backward while ``fn`` runs."""
    skip = {t.untyped_storage().data_ptr() for t in exclude}
    seen = {}

    def pack(t):
        ptr = t.untyped_storage().data_ptr()
        if ptr not in skip:
            seen[ptr] = max(seen.get(ptr, 0), t.untyped_storage().nbytes())
        return t
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn()
    return sum(seen.values())


@pytest.mark.parametrize("arch", ["llama", "qwen2", "qwen3"])
def test_plan_matches_real_tensors(arch, teacher_dirs, corpus_file):
    teacher, _ = load_teacher(teacher_dirs[arch], dtype=torch.bfloat16)
    st = ProjectedStudent(teacher, 32)
    initialize(st, "orthogonal")
    trainable = st.trainable_parameters()
    teacher_params = list({p.data_ptr(): p for p in teacher.parameters()}.values())  # a tied head once
    for p in trainable:
        p.grad = torch.randn_like(p)
    opt = torch.optim.AdamW(trainable, lr=1e-3)
    opt.step()
    state = [v for s in opt.state.values() for v in s.values()]
    for gpus in (1, 2, 3):
        plan = plan_memory(teacher_dirs[arch], 32, seq_len=16, micro_batch=6, gpus=gpus)["per_gpu"]
        assert plan["teacher"] == nbytes(teacher_params, gpus), gpus
        assert plan["projections"] == nbytes(trainable, gpus)
        assert plan["gradients"] == nbytes([p.grad for p in trainable], gpus)
        assert plan["optimizer"] == nbytes(state, gpus)
        assert plan["total"] == sum(v for k, v in plan.items() if k != "total")
        assert (plan["gathered"] > 0) == (gpus > 1)


@pytest.mark.parametrize("arch", ["llama", "qwen3"])
@pytest.mark.parametrize("B,T", [(2, 16), (4, 32)])
def test_plan_activations_bound_saved_tensors(arch, B, T, teacher_dirs):
    teacher, _ = load_teacher(teacher_dirs[arch])  # fp32: the reference kernels' CPU path
    st = ProjectedStudent(teacher, 32)
    initialize(st, "orthogonal")
    params = list(teacher.parameters()) + st.trainable_parameters()
    ids = torch.randint(0, teacher.config.vocab_size, (B, T))
    full = saved_tensor_bytes(lambda: st.distill_losses(ids, LossSettings()), params)
    st.activation_checkpointing = True
    kept = saved_tensor_bytes(lambda: st.distill_losses(ids, LossSettings()), params)
    st.activation_checkpointing = False
    # while one layer is recomputed in backward, its activations are live as well
    with torch.no_grad():
        h_t, h_s = st._embed(ids)
        cos, sin = st._rope(h_t)
    h_s.requires_grad_(True)
    one_layer = saved_tensor_bytes(lambda: st.layers[0](h_s, cos, sin, st.norm_eps, h_t, "teacher-ms"), params)
    for ac, measured in ((False, full), (True, kept + one_layer)):
        plan = plan_memory(teacher_dirs[arch], 32, seq_len=T, micro_batch=B, teacher_dtype="float32",
                           activation_checkpointing=ac)["per_gpu"]
        # of "logits", the part kept for backward: grad of h_s [B*T, d] and of the head [V, d]
        saved_logits = 4 * B * T * 32 + 4 * teacher.config.vocab_size * 32
        # of "activations", one layer's student weights are live, not saved
        live = student_weight_elements(Arch.from_config(teacher.config), 32) * 4
        estimate = plan["activations"] - live + saved_logits
        assert measured <= estimate <= 1.3 * measured, (ac, measured, estimate)
    assert kept < full


def test_plan_command_prints_every_category(teacher_dirs, capsys):
    assert main(["plan", "--teacher", str(teacher_dirs["qwen2"]), "--hidden-size", "32", "--seq-len", "64",
                 "--micro-batch", "4", "--gpus", "2"]) == 0
    out = capsys.readouterr().out
    for c in ("teacher", "projections", "gradients", "optimizer", "gathered", "activations", "logits", "total"):
        assert f"  {c}" in out, c
    assert "2 GPU(s), micro-batch 4 (2 per GPU)" in out
    assert main(["plan", "--teacher", str(teacher_dirs["qwen2"]), "--hidden-size", "32", "--gpus", "3",
                 "--micro-batch", "4"]) == 2


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_plan_startup_and_checkpoint_write_match_real_tensors(arch, teacher_dirs):
    """The start-up's teacher and projections are the shards a rank holds (as in training),
    the gathered layer is one whole decoder layer of real tensors, and a rank writes its
    rows of the trainable tensors and both AdamW moments."""
    teacher, _ = load_teacher(teacher_dirs[arch], dtype=torch.bfloat16)
    st = ProjectedStudent(teacher, 32)
    trainable = st.trainable_parameters()
    teacher_params = list({p.data_ptr(): p for p in teacher.parameters()}.values())
    layer0 = list(teacher.model.layers[0].parameters())
    for gpus in (1, 2, 3):
        plan = plan_memory(teacher_dirs[arch], 32, seq_len=16, micro_batch=6, gpus=gpus)
        s, c = plan["startup"], plan["checkpoint"]
        assert s["teacher"] == nbytes(teacher_params, gpus) == plan["per_gpu"]["teacher"]
        assert s["projections"] == nbytes(trainable, gpus)
        assert s["gathered"] == (nbytes(layer0) if gpus > 1 else 0)
        assert s["init_matrices"] == 7 * nbytes([st.layers[0].q])
        assert s["calibration"] > 0 and s["total"] == sum(v for k, v in s.items() if k != "total")
        rows = 3 * nbytes(trainable, gpus)  # the tensors, exp_avg, exp_avg_sq
        assert rows <= c["bytes_per_rank"] <= rows + (64 << 10)
        assert c["seconds"] == pytest.approx(c["bytes_total"] / 1e9)


def test_plan_refuses_a_run_over_the_gpu_memory(teacher_dirs, capsys):
    args = ["plan", "--teacher", str(teacher_dirs["llama"]), "--hidden-size", "32", "--seq-len", "64",
            "--micro-batch", "4", "--gpus", "2"]
    plan = plan_memory(teacher_dirs["llama"], 32, seq_len=64, micro_batch=4, gpus=2)
    train, start = plan["per_gpu"]["total"], plan["startup"]["total"]
    assert main(args + ["--disk-gb-per-s", "2"]) == 0
    out = capsys.readouterr().out
    assert "start-up, per GPU (sharded" in out and "  init_matrices" in out
    assert "checkpoint write:" in out and "at 2 GB/s" in out
    # between the two peaks, and below both: refused, one line with the numbers
    for limit in ((train + start) / 2, min(train, start) / 2):
        assert main(args + ["--gpu-memory", str(limit / 2 ** 30)]) == 2
        cap = capsys.readouterr()
        lines = cap.err.strip().splitlines()
        assert cap.out == "" and len(lines) == 1, cap
        assert lines[0].startswith("red plan: error: this run needs") and "--gpu-memory" in lines[0]
        assert f"training {train / 2 ** 30:.1f} GiB, start-up {start / 2 ** 30:.1f} GiB" in lines[0]
    assert main(args + ["--gpu-memory", str(max(train, start) * 1.01 / 2 ** 30)]) == 0
    for bad in (["--gpu-memory", "0"], ["--disk-gb-per-s", "-1"], ["--gpu-memory", "nan"]):
        assert main(args + bad) == 2
        assert bad[0] in capsys.readouterr().err


LLAMA31 = dict(model_type="llama", vocab_size=128256, rms_norm_eps=1e-5, rope_theta=500000.0, head_dim=128,
               max_position_embeddings=131072, tie_word_embeddings=False, num_key_value_heads=8,
               rope_scaling={"factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                             "original_max_position_embeddings": 8192, "rope_type": "llama3"})


@pytest.mark.parametrize("label,shape,d,micro_batch", [
    ("8B -> 2048", dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32), 2048, 16),
    ("70B -> 4096", dict(hidden_size=8192, intermediate_size=28672, num_hidden_layers=80, num_attention_heads=64), 4096, 8),
])
def test_readme_plan_table_is_what_plan_computes(label, shape, d, micro_batch):
    from pathlib import Path

    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    plan = plan_memory(dict(LLAMA31, **shape), d, seq_len=2048, micro_batch=micro_batch, gpus=8,
                       activation_checkpointing=True)
    g = lambda b: f"{b / 2 ** 30:.1f} GiB"
    c = plan["checkpoint"]
    row = (f"| {label} | {micro_batch} | {g(plan['per_gpu']['total'])} | {g(plan['startup']['total'])} | "
           f"{g(c['bytes_per_rank'])} ({g(c['bytes_total'])}, ~{c['seconds']:.0f} s) |")
    assert row in readme, row
