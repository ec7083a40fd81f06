"""Sharded start-up of a multi-process run (red.commands.distill.build_sharded_student): no rank
ever holds the whole teacher, and the run is the run of one process.

The teacher here is deep and narrow (16 layers, D = 64, a 1024-row embedding, tied head),
stored in bf16 in several safetensors files with model.safetensors.index.json, and run in
fp32 (the CPU's precision): so the loader's index, tie and dtype cast are all exercised,
and one decoder layer is ~6% of the teacher, as in real models (Llama-3-8B: 2.7%).

What is measured (tests/helpers.py's StartupProbe, registered in red.train.startup.STARTUP_OBSERVERS): the bytes of teacher
tensors each rank holds at every start-up stage: the local shard of every teacher
parameter, plus every full-size teacher tensor alive (the layer gathered during
calibration, the safetensors slice being read, the calibration's embedding rows). Tensors,
not RSS. Today's path (RED_SHARDED_STARTUP=0: every rank loads the whole teacher, then
shards) is measured the same way for comparison.

Tolerances: the calibration statistics are asserted equal to one process's to a relative
1e-6 (each sequence's statistics are computed by exactly one rank, in the batch a single
process uses, and summed with zeros: measured bit-identical); trained tensors and losses
as tests/distributed/test_distributed.py (tests/helpers.py says why AdamW's eps is raised): the sharded start-up gives
the same initial student as today's multi-process path, bit for bit (measured), so what
remains is the float32 reduction order of data-parallel training. Sharded initialization
(every init method, 3 ranks) is asserted bit-identical to one process.

Runtime: about 2.5 minutes on 2 shared CPU cores (5 torchrun launches, one single-process run).
"""
import json
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from helpers import ADAM_EPS, assert_close_tensors, assert_same_metrics  # noqa: E402
from helpers import ok_result, torchrun  # noqa: E402
from helpers import build_tokenizer, tiny_config  # noqa: E402

from red.config import make_config  # noqa: E402
from red.commands.distill import distill  # noqa: E402
from red.train.plan import plan_memory  # noqa: E402

LAYERS, VOCAB = 16, 1024
BUDGET = 0.6  # of the whole teacher's bytes, per rank
RUN = dict(hidden_size=32, steps=4, seq_len=24, batch_size=6, grad_accum=2, save_every=2, eval_every=2,
           val_batches=2, log_every=1, lr=3e-3, adam_eps=ADAM_EPS, warmup=1)


def make_deep_teacher(folder: Path) -> Path:
    from transformers import AutoModelForCausalLM

    torch.manual_seed(7)
    tok = build_tokenizer()
    model = AutoModelForCausalLM.from_config(tiny_config("llama", VOCAB, 64, LAYERS))  # tied head
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.copy_(1.0 + 0.5 * torch.randn_like(p))
            else:
                p.copy_(torch.randn_like(p) * (0.3 / p.shape[-1] ** 0.5 if p.dim() == 2 else 1.0))
        model.model.embed_tokens.weight[:, :4] *= 6.0
    model.to(torch.bfloat16).save_pretrained(folder, max_shard_size="300KB")
    tok.save_pretrained(folder)
    assert (folder / "model.safetensors.index.json").is_file() and len(list(folder.glob("*.safetensors"))) > 2
    return folder


@pytest.fixture(scope="module")
def deep_teacher(tmp_path_factory):
    return make_deep_teacher(tmp_path_factory.mktemp("deep") / "teacher")


@pytest.fixture(scope="module")
def one_process(deep_teacher, corpus_file, tmp_path_factory):
    """The single-process run every multi-process run is compared with, probed."""
    out = tmp_path_factory.mktemp("one") / "run"
    import red.train.startup as startup
    from helpers import StartupProbe

    mp = pytest.MonkeyPatch()
    mp.setenv("RED_STARTUP_PROBE", str(out.parent / "probe"))
    mp.setattr(startup, "STARTUP_OBSERVERS", [StartupProbe(0, 1)])
    try:
        distill(make_config(teacher=str(deep_teacher), data=str(corpus_file), out=str(out), **RUN), progress=False)
    finally:
        mp.undo()
    return out, probes(out.parent / "probe", 1)


def cli_args(teacher, corpus, out) -> list:
    args = ["distill", "--teacher", teacher, "--data", corpus, "--out", out, "--quiet"]
    for k, v in RUN.items():
        args += [f"--{k.replace('_', '-')}", v]
    return args


def probes(folder: Path, world: int) -> list[dict]:
    got = [json.loads((folder / f"rank{r}.json").read_text()) for r in range(world)]
    assert all(g["world_size"] == world for g in got)
    return got


def trained(out: Path) -> dict:
    from red.run.checkpoint import load_tensors

    return load_tensors(out / "checkpoints/step-0000004")


def table(rows: dict) -> str:
    """Peak teacher bytes per rank, as a fraction of the whole teacher, per run."""
    lines = ["start-up peak of teacher bytes per rank (fraction of the whole teacher):"]
    for label, got in rows.items():
        lines.append(f"  {label:<28}" + "  ".join(f"rank{r} {g['peak']:>9d} ({g['peak'] / g['teacher_bytes']:.2f})"
                                               for r, g in enumerate(got)))
    return "\n".join(lines)


@pytest.mark.parametrize("world", [2, 3])
def test_sharded_startup_holds_a_share_and_matches_one_process(world, deep_teacher, corpus_file, one_process,
                                                                tmp_path, capsys):
    one, one_probe = one_process
    teacher_bytes = one_probe[0]["teacher_bytes"]
    assert one_probe[0]["peak"] == teacher_bytes  # one process: the whole teacher (today and now)
    budget = int(BUDGET * teacher_bytes)
    out = tmp_path / "run"
    # a per-rank budget below the teacher's size: the run must start (and finish) under it
    p = torchrun(world, "probe", *cli_args(deep_teacher, corpus_file, out), timeout=300, module="helpers",
                 env_extra={"RED_STARTUP_PROBE": str(tmp_path / "probe"), "RED_STARTUP_TEACHER_BUDGET": str(budget)})
    assert p.returncode == 0, p.stderr[-3000:]
    ok_result(out, world)
    got = probes(tmp_path / "probe", world)
    for g in got:
        assert g["teacher_bytes"] == teacher_bytes
        assert g["peak"] < budget and g["over_budget"] is None, g
        assert g["stages"]["build"] == 0  # the meta teacher holds nothing
        # after start-up a rank holds its shard, about 1/world of the teacher
        assert g["stages"]["initialize"] <= teacher_bytes / world * 1.05
    # red plan's start-up model (fp32 here): rank 0 holds the largest rows of every tensor,
    # exactly the plan's shard; the measured peak stays within shard + gathered layer + calibration
    plan = plan_memory(deep_teacher, RUN["hidden_size"], RUN["seq_len"], RUN["batch_size"], gpus=world,
                       teacher_dtype="float32")["startup"]
    assert got[0]["stages"]["initialize"] == plan["teacher"]
    assert max(g["peak"] for g in got) <= plan["teacher"] + plan["gathered"] + plan["calibration"]
    # the calibration of N processes is one process's
    c1 = load_file(str(one / "calibration.safetensors"))["stats"]
    cn = load_file(str(out / "calibration.safetensors"))["stats"]
    assert torch.allclose(cn, c1, rtol=1e-6, atol=0), (cn - c1).abs().max()
    # and so is the training
    worst = assert_close_tensors(trained(one), trained(out))
    assert_same_metrics(one, out)
    with capsys.disabled():
        print("\n" + table({"1 process": one_probe, f"{world} processes, sharded": got}),
              f"\n  calibration max |diff| {(cn - c1).abs().max().item():.3g}, trained max |diff| {worst:.3g}")


def test_todays_path_holds_the_whole_teacher_and_breaks_the_budget(deep_teacher, corpus_file, one_process, tmp_path,
                                                                   capsys):
    """RED_SHARDED_STARTUP=0 (every rank loads the whole teacher first): refused under the
    budget the sharded start-up keeps, having loaded the whole teacher on every rank."""
    teacher_bytes = one_process[1][0]["teacher_bytes"]
    p = torchrun(2, "probe", *cli_args(deep_teacher, corpus_file, tmp_path / "today"), timeout=300, module="helpers",
                 env_extra={"RED_SHARDED_STARTUP": "0", "RED_STARTUP_PROBE": str(tmp_path / "probe"),
                            "RED_STARTUP_TEACHER_BUDGET": str(int(BUDGET * teacher_bytes))})
    assert p.returncode != 0 and "exitcode  : 2" in p.stderr  # a RedError (rank 0 may be stopped before it reports)
    # written by each rank as it stops (a rank torchrun stops first may not have written)
    got = [json.loads(f.read_text()) for f in sorted((tmp_path / "probe").glob("rank*.json"))]
    assert got and all(g["over_budget"] == "load" and g["stages"]["load"] == teacher_bytes for g in got)
    with capsys.disabled():
        print("\n" + table({"2 processes, today's path": got}))


def test_loader_fills_a_teacher_like_from_pretrained(deep_teacher, teacher_dirs):
    """meta_teacher + to_empty + load_teacher_shards in one process (every tensor whole)
    gives exactly load_teacher's tensors: an index of several files, a tied head, bf16 on
    disk cast to fp32, Qwen2's biases, and the rotary buffers recomputed."""
    from red.model.teacher import load_teacher, load_teacher_shards, meta_teacher

    for folder, dtype in ((deep_teacher, torch.float32), (deep_teacher, torch.bfloat16),
                          (teacher_dirs["qwen2"], torch.float32)):
        ref, _ = load_teacher(folder, dtype=dtype, with_tokenizer=False)
        m = meta_teacher(folder, dtype=dtype)
        m.to_empty(device="cpu")
        load_teacher_shards(m, folder)
        a, b = dict(ref.named_parameters()), dict(m.named_parameters())
        assert a.keys() == b.keys()
        assert all(torch.equal(a[k], b[k]) and a[k].dtype == b[k].dtype for k in a)
        assert (m.lm_head.weight is m.model.embed_tokens.weight) == ref.config.tie_word_embeddings
        for k, buf in ref.named_buffers():
            assert torch.equal(buf, m.get_buffer(k)), k
        ids = torch.randint(0, 64, (2, 12))
        assert torch.equal(ref(ids).logits, m(ids).logits)


INIT_SCRIPT = r'''
import json, sys, torch
from red.distributed import full_tensor, init_distributed, wrap_student
from red.train.initialization import initialize
from red.model.student import ProjectedStudent
from red.model.teacher import load_teacher, load_teacher_shards, meta_teacher

folder, out = sys.argv[1], sys.argv[2]
ctx = init_distributed("cpu")
teacher = meta_teacher(folder)
with torch.device("meta"):
    st = ProjectedStudent(teacher, 32)
wrap_student(st, ctx, torch.device("cpu"))
st.to_empty(device="cpu")
load_teacher_shards(teacher, folder)
ref_teacher, _ = load_teacher(folder, with_tokenizer=False)
ref = ProjectedStudent(ref_teacher, 32)
worst = {}
for method in ("red", "lrc", "orthogonal", "random-select"):
    ch = torch.arange(1, 64, 2) if method == "red" else None
    initialize(st, method, channels=ch, seed=5, sharded=True)
    initialize(ref, method, channels=ch, seed=5)
    got = {k: full_tensor(v.detach()) for k, v in st.state_dict().items()}
    want = ref.state_dict()
    assert got.keys() == want.keys()
    worst[method] = max((got[k] - want[k]).abs().max().item() for k in got)
if ctx.rank == 0:
    open(out, "w").write(json.dumps(worst))
'''


def test_sharded_initialization_is_single_process_bit_for_bit(teacher_dirs, tmp_path):
    """Every init method, made one full matrix at a time and kept as row shards on 3
    ranks, gives exactly a single process's values (gathered back and compared)."""
    import os
    import subprocess

    from helpers import ROOT, free_port

    script = tmp_path / "init.py"
    script.write_text(INIT_SCRIPT)
    env = dict(os.environ, PYTHONWARNINGS="ignore", OMP_NUM_THREADS="1",
               PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])))
    p = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=3",
                        "--master_addr=127.0.0.1", f"--master_port={free_port()}", str(script),
                        str(teacher_dirs["qwen2"]), str(tmp_path / "worst.json")],
                       capture_output=True, text=True, env=env, timeout=300)
    assert p.returncode == 0, p.stderr[-3000:]
    worst = json.loads((tmp_path / "worst.json").read_text())
    assert worst == {"red": 0.0, "lrc": 0.0, "orthogonal": 0.0, "random-select": 0.0}
