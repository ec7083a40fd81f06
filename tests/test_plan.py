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
