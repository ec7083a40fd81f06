"""Only safetensors, JSON and YAML are read (never a pickle), remote code stays off unless
asked for, and nothing is written outside the output folder: held by what the commands
do, with every unpickling entry point watched."""
import pickle
import shutil

import pytest
import torch
import transformers

from red.cli import main

ARGS = ["--hidden-size", "32", "--steps", "2", "--seq-len", "24", "--batch-size", "2", "--eval-every", "0",
        "--val-batches", "1", "--quiet"]


@pytest.fixture
def no_unpickling(monkeypatch):
    """Every way to unpickle raises (and is recorded): torch.load, pickle.load(s), Unpickler."""
    calls = []

    def refuse(name):
        def f(*a, **k):
            calls.append(name)
            raise AssertionError(f"{name} was called")
        return f
    monkeypatch.setattr(torch, "load", refuse("torch.load"))
    monkeypatch.setattr(pickle, "load", refuse("pickle.load"))
    monkeypatch.setattr(pickle, "loads", refuse("pickle.loads"))
    monkeypatch.setattr(pickle, "Unpickler", refuse("pickle.Unpickler"))
    return calls


def test_a_pickle_only_teacher_is_refused_without_unpickling(teacher_dirs, corpus_file, tmp_path, capfd,
                                                              no_unpickling):
    t = tmp_path / "teacher"
    shutil.copytree(teacher_dirs["llama"], t)
    (t / "model.safetensors").unlink()
    (t / "pytorch_model.bin").write_bytes(b"not read")  # what a pickled checkpoint is named
    rc = main(["distill", "--teacher", str(t), "--data", str(corpus_file), "--out", str(tmp_path / "run"), *ARGS])
    err = [line for line in capfd.readouterr().err.splitlines() if line.strip()]
    assert rc == 2 and len(err) == 1 and "safetensors" in err[0], err
    assert no_unpickling == [] and not (tmp_path / "run").exists()


def test_a_pickled_checkpoint_is_never_loaded(teacher_dirs, corpus_file, tmp_path, capfd, no_unpickling):
    run = tmp_path / "run"
    assert main(["distill", "--teacher", str(teacher_dirs["qwen3"]), "--data", str(corpus_file), "--out", str(run),
                 *ARGS]) == 0
    ckpt = run / "checkpoints/step-0000002"
    (ckpt / "state.safetensors").unlink()
    (ckpt / "state.pt").write_bytes(pickle.dumps({"x": 1}))  # what a pickled checkpoint would hold
    capfd.readouterr()
    for argv in (["export", "--run", str(run), "--out", str(tmp_path / "exp"), "--checkpoint", str(ckpt)],
                 ["distill", "--teacher", str(teacher_dirs["qwen3"]), "--data", str(corpus_file), "--out", str(run),
                  *ARGS, "--resume", "--steps", "3", "--allow-change", "steps"]):
        rc = main(argv)
        err = [line for line in capfd.readouterr().err.splitlines() if line.strip()]
        assert rc == 2 and len(err) == 1 and err[0].startswith(f"red {argv[0]}: error:"), (argv[0], err)
    assert no_unpickling == []


def test_remote_code_is_off_unless_asked(teacher_dirs, corpus_file, tmp_path, monkeypatch):
    """Every transformers loader a run calls gets trust_remote_code=False (its default when
    the keyword is absent), and True only with --trust-remote-code."""
    seen = []
    for cls in (transformers.AutoConfig, transformers.AutoTokenizer, transformers.AutoModelForCausalLM):
        real = cls.from_pretrained.__func__

        def spy(klass, *a, _real=real, **k):
            seen.append(bool(k.get("trust_remote_code", False)))
            return _real(klass, *a, **k)
        monkeypatch.setattr(cls, "from_pretrained", classmethod(spy))
    base = ["distill", "--teacher", str(teacher_dirs["llama"]), "--data", str(corpus_file), *ARGS]
    assert main([*base, "--out", str(tmp_path / "a")]) == 0
    assert seen and not any(seen)
    seen.clear()
    assert main([*base, "--out", str(tmp_path / "b"), "--trust-remote-code"]) == 0
    assert seen and all(seen)


def test_distill_and_export_write_only_inside_their_output(teacher_dirs, corpus_file, tmp_path):
    (tmp_path / "a").mkdir()
    run = tmp_path / "a/run"
    assert main(["distill", "--teacher", str(teacher_dirs["qwen3"]), "--data", str(corpus_file), "--out", str(run),
                 *ARGS]) == 0
    assert [p.name for p in (tmp_path / "a").iterdir()] == ["run"]
    dot = {p.name for p in run.rglob("*") if p.name.startswith(".")}
    assert dot <= {".red-run.json", ".red-lock", ".red-export.json"}, dot  # red's own records, no temporaries
    (tmp_path / "b").mkdir()
    assert main(["export", "--run", str(run), "--out", str(tmp_path / "b/exp")]) == 0
    assert [p.name for p in (tmp_path / "b").iterdir()] == ["exp"]
    assert (tmp_path / "b/exp/model.safetensors").is_file()
    assert not list(run.parent.parent.glob("*.tmp*"))
