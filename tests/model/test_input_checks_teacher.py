"""Teacher weights and student widths are checked before any work starts.

Each broken teacher folder is a copy of a tiny teacher with one thing wrong; `red distill`
must refuse it up front (exit 2, one line, no output folder) instead of training a
randomly initialized model or crashing at export. Widths transformers would refuse at
export are refused by `red distill`, `red plan` and `red export` alike; an "auto" export
follows the teacher's declared dtype.
"""
import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from red.cli import main
from red.errors import RedError
from red.model.export import check_student_width
from red.model.arch import expected_teacher_shapes
from red.model.teacher import check_teacher_weights, read_teacher_config
from helpers import build_tokenizer, tiny_config

ARCHS = ("llama", "qwen2", "qwen3")


def run_cli(argv, capfd):
    capfd.readouterr()
    try:
        rc = main([str(a) for a in argv])
    except SystemExit as e:
        rc = e.code
    return rc, capfd.readouterr().err


def distill_args(teacher, data, out, *extra):
    return ["distill", "--teacher", teacher, "--data", data, "--hidden-size", "32", "--out", out, "--steps", "1",
            "--seq-len", "24", "--batch-size", "2", "--eval-every", "0", "--val-batches", "1", "--quiet", *extra]


# ---------------------------------------------------------------- one rule for the shapes

@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("variant", ["as-is", "tied", "untied", "attention-bias"])
def test_expected_shapes_match_transformers(arch, variant):
    """``teacher_shapes`` (via ``expected_teacher_shapes``) is exactly transformers' own
    parameter list for every supported architecture."""
    from transformers import AutoModelForCausalLM

    cfg = tiny_config(arch, 80)
    if variant == "tied":
        cfg.tie_word_embeddings = True
    elif variant == "untied":
        cfg.tie_word_embeddings = False
    elif variant == "attention-bias":
        if arch != "qwen2":  # Qwen2 always has q/k/v biases; the others' biases are refused
            pytest.skip("Llama and Qwen3 teachers with attention_bias are refused (read_teacher_config)")
        cfg.attention_bias = True
    model = AutoModelForCausalLM.from_config(cfg)
    real = {k: tuple(p.shape) for k, p in model.named_parameters()}
    assert expected_teacher_shapes(cfg) == real


# ---------------------------------------------------------------- broken teacher folders

def _drop(name):
    def edit(d: Path):
        sd = load_file(d / "model.safetensors")
        del sd[name]
        save_file(sd, d / "model.safetensors", metadata={"format": "pt"})
    return edit


def _not_a_model(d: Path):
    save_file({"weight": torch.randn(3, 4)}, d / "model.safetensors", metadata={"format": "pt"})


def _untie_config(d: Path):
    cfg = json.loads((d / "config.json").read_text())
    cfg["tie_word_embeddings"] = False
    (d / "config.json").write_text(json.dumps(cfg))


def _other_head(d: Path):
    sd = load_file(d / "model.safetensors")
    sd["lm_head.weight"] = torch.randn_like(sd["model.embed_tokens.weight"])
    save_file(sd, d / "model.safetensors", metadata={"format": "pt"})


def _retype(name, dtype):
    def edit(d: Path):
        sd = load_file(d / "model.safetensors")
        sd[name] = sd[name].to(dtype)
        save_file(sd, d / "model.safetensors", metadata={"format": "pt"})
    return edit


def _extra(d: Path):
    sd = load_file(d / "model.safetensors")
    sd["model.layers.0.mlp.extra_proj.weight"] = torch.zeros(4, 4)
    save_file(sd, d / "model.safetensors", metadata={"format": "pt"})


def _config(**change):
    def edit(d: Path):
        cfg = json.loads((d / "config.json").read_text())
        cfg.update(change)
        (d / "config.json").write_text(json.dumps(cfg))
    return edit


def _sharded_missing_shard(d: Path):
    _shard(d)
    shards = sorted(d.glob("model-*.safetensors"))
    assert len(shards) > 1
    shards[-1].unlink()


def _shard(d: Path):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(d)
    (d / "model.safetensors").unlink()
    model.save_pretrained(d, max_shard_size="20KB")


TEACHER_CASES = [
    # (name, arch, edit, needle)
    ("one tensor dropped", "llama", _drop("model.layers.1.mlp.up_proj.weight"),
     "lack 1 tensor(s) config.json's architecture needs: model.layers.1.mlp.up_proj.weight"),
    ("one tensor dropped (qwen3 q_norm)", "qwen3", _drop("model.layers.0.self_attn.q_norm.weight"),
     "model.layers.0.self_attn.q_norm.weight"),
    ("not a model at all", "qwen2", _not_a_model, "hold no qwen2 weights (found weight)"),
    ("untied config without lm_head", "llama", _untie_config,
     "no lm_head.weight but config.json says tie_word_embeddings: false"),
    ("untied config without lm_head (qwen2)", "qwen2", _drop("lm_head.weight"), "no lm_head.weight"),
    ("tied config with another lm_head", "llama", _other_head,
     "tie_word_embeddings: true but the weights hold an lm_head.weight that differs"),
    ("integer tensor", "qwen3", _retype("model.norm.weight", torch.int32), "non-float tensors: model.norm.weight (I32)"),
    ("mixed dtypes", "qwen2", _retype("model.layers.0.mlp.up_proj.weight", torch.float16),
     "mix dtypes: most are F32 but model.layers.0.mlp.up_proj.weight (F16)"),
    ("unexpected tensor", "qwen3", _extra, "does not have: model.layers.0.mlp.extra_proj.weight"),
    ("shapes disagree with config", "llama", _config(intermediate_size=100), "do not match config.json's shapes"),
    ("qwen3 with attention biases (o_proj bias too)", "qwen3", _config(attention_bias=True),
     "Qwen3 teachers with attention_bias are not supported"),
    ("sharded, a shard missing", "qwen2", _sharded_missing_shard, "are missing from"),
]


@pytest.fixture(scope="module")
def broken_teachers(tmp_path_factory, teacher_dirs):
    root = tmp_path_factory.mktemp("broken-teachers")
    out = {}
    for i, (name, arch, edit, _) in enumerate(TEACHER_CASES):
        d = root / f"case{i}"
        shutil.copytree(teacher_dirs[arch], d)
        edit(d)
        out[name] = d
    return out


def test_broken_teacher_refused_up_front(broken_teachers, corpus_file, tmp_path, capfd):
    failures = []
    for name, _, _, needle in TEACHER_CASES:
        out = tmp_path / "out"
        rc, err = run_cli(distill_args(broken_teachers[name], corpus_file, out), capfd)
        lines = [l for l in err.splitlines() if l.strip()]
        ok = (rc == 2 and len(lines) == 1 and lines[0].startswith("red distill: error:") and needle in lines[0]
              and "Traceback" not in err)
        if not ok:
            failures.append(f"{name}: rc={rc} err={err.strip()[:400]!r}")
        if out.exists():
            failures.append(f"{name}: created the output folder")
            shutil.rmtree(out)
    assert not failures, "\n".join(failures)


def test_good_teachers_pass(teacher_dirs, tmp_path):
    """The tiny teachers, a sharded teacher and a tied teacher that also stores its head
    (equal to the embedding) all pass the weight check."""
    for arch, d in teacher_dirs.items():
        check_teacher_weights(d, read_teacher_config(d))
    sharded = tmp_path / "sharded"
    shutil.copytree(teacher_dirs["qwen3"], sharded)
    _shard(sharded)
    assert (sharded / "model.safetensors.index.json").is_file()
    check_teacher_weights(sharded, read_teacher_config(sharded))
    tied = tmp_path / "tied-with-head"
    shutil.copytree(teacher_dirs["llama"], tied)
    sd = load_file(tied / "model.safetensors")
    assert "lm_head.weight" not in sd
    sd["lm_head.weight"] = sd["model.embed_tokens.weight"].clone()
    save_file(sd, tied / "model.safetensors", metadata={"format": "pt"})
    check_teacher_weights(tied, read_teacher_config(tied))


# ---------------------------------------------------------------- student widths

def test_width_rule_per_architecture(teacher_dirs):
    """Llama's config demands hidden_size % num_attention_heads == 0 (4 heads here);
    Qwen2/Qwen3 accept any width (head_dim is explicit)."""
    llama = read_teacher_config(teacher_dirs["llama"])
    with pytest.raises(RedError) as e:
        check_student_width(llama, 37)
    msg = str(e.value)
    assert "--hidden-size 37" in msg and "not a multiple of the number of attention heads (4)" in msg
    assert "pick --hidden-size 36 or 40" in msg
    for d in (4, 32, 36, 60):
        check_student_width(llama, d)
    for arch in ("qwen2", "qwen3"):
        cfg = read_teacher_config(teacher_dirs[arch])
        for d in (3, 10, 37, 63):
            check_student_width(cfg, d)


def test_invalid_width_refused_by_distill_and_plan(teacher_dirs, corpus_file, tmp_path, capfd):
    t = teacher_dirs["llama"]
    out = tmp_path / "out"
    for argv in (distill_args(t, corpus_file, out, "--hidden-size", "37"),
                 ["plan", "--teacher", t, "--hidden-size", "37"]):
        rc, err = run_cli(argv, capfd)
        lines = [l for l in err.splitlines() if l.strip()]
        assert rc == 2 and len(lines) == 1, err
        assert lines[0].startswith(f"red {argv[0]}: error: --hidden-size 37 is not a valid width for a llama student")
        assert "pick --hidden-size 36 or 40" in lines[0]
        assert not out.exists()
    # the Qwen architectures plan (and train) at that width
    rc, err = run_cli(["plan", "--teacher", teacher_dirs["qwen2"], "--hidden-size", "37"], capfd)
    assert rc == 0, err


def test_invalid_width_refused_by_export(teacher_dirs, corpus_file, tmp_path, capfd, monkeypatch):
    """A run made at a width transformers refuses (as runs before this check could be):
    `red export` refuses it up front instead of a transformers traceback."""
    import red.commands.distill

    run = tmp_path / "run"
    with monkeypatch.context() as m:
        m.setattr(red.commands.distill, "check_student_width", lambda *a, **k: None)
        with pytest.raises(Exception):  # the run's own export at the end fails (transformers validation)
            main([str(a) for a in distill_args(teacher_dirs["llama"], corpus_file, run, "--hidden-size", "37",
                                               "--save-every", "1")])
    assert list((run / "checkpoints").iterdir())
    out = tmp_path / "export"
    rc, err = run_cli(["export", "--run", run, "--out", out], capfd)
    lines = [l for l in err.splitlines() if l.strip()]
    assert rc == 2 and len(lines) == 1, err
    assert lines[0].startswith("red export: error: --hidden-size 37 is not a valid width for a llama student")
    assert not out.exists()


# ---------------------------------------------------------------- export dtype

def test_auto_export_follows_teacher_dtype(teacher_dirs, corpus_file, tmp_path, capfd):
    """A bf16 teacher (config.json dtype bfloat16) loaded in fp32 on the CPU exports bf16
    under --export-dtype auto."""
    from transformers import AutoModelForCausalLM

    t = tmp_path / "bf16-teacher"
    AutoModelForCausalLM.from_pretrained(teacher_dirs["qwen3"], dtype=torch.bfloat16).save_pretrained(t)
    build_tokenizer().save_pretrained(t)
    raw = json.loads((t / "config.json").read_text())
    assert (raw.get("dtype") or raw.get("torch_dtype")) == "bfloat16"
    out = tmp_path / "run"
    rc, err = run_cli(distill_args(t, corpus_file, out, "--export-dtype", "auto", "--precision", "fp32"), capfd)
    assert rc == 0, err
    exported = json.loads((out / "student/config.json").read_text())
    assert (exported.get("dtype") or exported.get("torch_dtype")) == "bfloat16"
    with safe_open(str(out / "student/model.safetensors"), "pt") as f:
        dtypes = {f.get_slice(k).get_dtype() for k in f.keys()}
    assert dtypes == {"BF16"}
