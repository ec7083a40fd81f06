"""The `red` command: help, end-to-end runs through every subcommand, and bad input."""
import json
import subprocess
import sys
from dataclasses import fields
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from red.cli import build_parser, main
from red.config import DistillConfig
from helpers import same_threads_env


def run_sub(*args, cwd=None):
    """Run `python -m red` in a subprocess: exit code, stdout, stderr."""
    env = same_threads_env()  # a rerun in this process is compared bit for bit with the child's run
    p = subprocess.run([sys.executable, "-m", "red", *map(str, args)], capture_output=True, text=True, env=env,
                       cwd=cwd, timeout=300)
    return p.returncode, p.stdout, p.stderr


@pytest.mark.parametrize("cmd", ["distill", "calibrate", "export", "analyze"])
def test_help_lists_every_option_with_default(cmd, capsys):
    with pytest.raises(SystemExit) as e:
        main([cmd, "--help"])
    assert e.value.code == 0
    text = " ".join(capsys.readouterr().out.split())
    sub = build_parser()._subparsers._group_actions[0].choices[cmd]
    for action in sub._actions:
        if action.dest == "help":
            continue
        assert action.option_strings[0] in text
    if cmd == "distill":
        for f in fields(DistillConfig):
            if f.metadata.get("cli") is False:
                continue  # written by red into run.yaml, not a flag
            assert "--" + f.name.replace("_", "-") in text, f.name
        assert "(default: 200" in text and "by preset: red 1.0, lrc 40.0" in text
    else:
        assert text.count("(default:") >= len([a for a in sub._actions if a.dest != "help" and not a.required]) - 1


def _distill_args(teacher, corpus, out, *extra):
    return ["distill", "--teacher", teacher, "--data", corpus, "--hidden-size", 32, "--out", out, "--steps", 4,
            "--seq-len", 24, "--batch-size", 2, "--save-every", 2, "--eval-every", 2, "--val-batches", 1,
            "--quiet", *extra]


def test_every_subcommand_end_to_end(teacher_dirs, corpus_file, tmp_path, run_cli):
    t, c = teacher_dirs["qwen2"], corpus_file
    # calibrate, then distill reusing that calibration
    rc, out, err = run_cli("calibrate", "--teacher", t, "--data", c, "--out", tmp_path / "cal.safetensors",
                           "--calib-samples", 4, "--seq-len", 24, "--quiet")
    assert rc == 0, err
    assert "top channels" in out
    rc, out, err = run_sub(*_distill_args(t, c, tmp_path / "run", "--calibration", tmp_path / "cal.safetensors",
                                          "--preset", "lrc", "--init-std", "null"))
    assert rc == 0, err
    run = tmp_path / "run"
    cfg = yaml.safe_load((run / "run.yaml").read_text())
    assert cfg["preset"] == "lrc" and cfg["temperature"] == 40.0 and cfg["init"] == "lrc" and cfg["init_std"] is None
    assert cfg["hidden_size"] == 32 and cfg["overwrite"] is False
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["step-0000002", "step-0000004"]
    a = load_file(str(tmp_path / "cal.safetensors"))["stats"]
    assert torch.equal(a, load_file(str(run / "calibration.safetensors"))["stats"])
    # run.yaml is enough to rerun: same trainable tensors
    rc, _, err = run_cli("distill", "--config", run / "run.yaml", "--out", tmp_path / "rerun", "--quiet")
    assert rc == 0, err
    s1 = load_file(str(run / "checkpoints/step-0000004/state.safetensors"))
    s2 = load_file(str(tmp_path / "rerun/checkpoints/step-0000004/state.safetensors"))
    trained = [k for k in s1 if k.startswith("student.")]
    assert trained and all(torch.equal(s1[k], s2[k]) for k in trained)
    # export an earlier checkpoint, analyze the run
    rc, _, err = run_cli("export", "--run", run, "--out", tmp_path / "exp",
                         "--checkpoint", run / "checkpoints/step-0000002")
    assert rc == 0, err
    assert json.loads((tmp_path / "exp/config.json").read_text())["hidden_size"] == 32
    rc, out, err = run_cli("analyze", "--teacher", t, "--student", run, "--data", c, "--out", tmp_path / "an",
                           "--samples", 3, "--seq-len", 24)
    assert rc == 0, err
    rep = json.loads((tmp_path / "an/analysis.json").read_text())
    assert len(rep["teacher_erank"]) == len(rep["student_erank"]) == 3  # embedding + 2 layers
    assert len(rep["projections"]) == 7 * 2 + 2
    assert (tmp_path / "an/erank.png").stat().st_size > 1000 and (tmp_path / "an/spectra.png").stat().st_size > 1000
    assert "s_max/s_min" in out
    # analyze also takes an exported model folder
    rc, out, err = run_cli("analyze", "--teacher", t, "--student", tmp_path / "exp", "--data", c,
                           "--samples", 2, "--seq-len", 24)
    assert rc == 0, err


def _bad_cases(tmp_path, teacher_dirs, corpus_file):
    t, c = str(teacher_dirs["llama"]), str(corpus_file)
    gpt2 = tmp_path / "gpt2"
    gpt2.mkdir()
    (gpt2 / "config.json").write_text(json.dumps({"model_type": "gpt2"}))
    nobin = tmp_path / "nosafetensors"
    nobin.mkdir()
    (nobin / "config.json").write_text((Path(t) / "config.json").read_text())
    (nobin / "pytorch_model.bin").write_bytes(b"not loaded")
    notok = tmp_path / "notok"
    notok.mkdir()
    for f in ("config.json", "model.safetensors"):
        (notok / f).write_bytes((Path(t) / f).read_bytes())
    corrupt = tmp_path / "corrupt"
    corrupt.mkdir()
    for f in Path(t).iterdir():
        (corrupt / f.name).write_bytes(f.read_bytes())
    data = (corrupt / "model.safetensors").read_bytes()
    (corrupt / "model.safetensors").write_bytes(data[: len(data) - 1000])
    empty = tmp_path / "empty.txt"
    empty.write_text("\n\n  \n")
    short = tmp_path / "short.txt"
    short.write_text("hi\n")
    binary = tmp_path / "bin.txt"
    binary.write_bytes(b"\x00\x01\x02" * 100)
    unknown = tmp_path / "corpus.csv"
    unknown.write_text("a,b\n")
    base = lambda **kw: {**{"teacher": t, "data": c, "hidden-size": "32"}, **kw}
    return [
        ("missing teacher", base(teacher=str(tmp_path / "nope")), "does not exist"),
        ("unsupported arch", base(teacher=str(gpt2)), "LlamaForCausalLM, Qwen2ForCausalLM, Qwen3ForCausalLM"),
        ("no safetensors", base(teacher=str(nobin)), "no *.safetensors"),
        ("no tokenizer", base(teacher=str(notok)), "no tokenizer files"),
        ("corrupt weights", base(teacher=str(corrupt)), "corrupt or truncated"),
        ("width = D", base(**{"hidden-size": "64"}), "between 1 and 63"),
        ("width 0", base(**{"hidden-size": "0"}), "between 1 and 63"),
        ("empty corpus", base(data=str(empty)), "holds no text"),
        ("short corpus", base(data=str(short)), "too short"),
        ("binary corpus", base(data=str(binary)), "binary"),
        ("unknown format", base(data=str(unknown)), "unknown format"),
        ("missing corpus", base(data=str(tmp_path / "nope.txt")), "does not exist"),
        ("bad preset", base(preset="fast"), "preset"),
    ]


def test_bad_input_one_line_exit_2_nothing_lost(teacher_dirs, corpus_file, tmp_path, run_cli):
    for name, opts, needle in _bad_cases(tmp_path, teacher_dirs, corpus_file):
        out = tmp_path / f"out-{name.replace(' ', '_')}"
        args = ["distill", "--out", str(out), "--quiet", "--steps", "1", "--seq-len", "24"]
        for k, v in opts.items():
            args += [f"--{k}", v]
        rc, _, err = run_cli(*args)
        lines = [l for l in err.splitlines() if l.strip() and "Warning" not in l and "warn(" not in l]
        assert rc == 2, (name, err)
        assert "Traceback" not in err, name
        assert len(lines) == 1 and needle in lines[0], (name, err)
        assert lines[0].startswith("red distill: error:")


def test_existing_output_is_never_clobbered(teacher_dirs, corpus_file, tmp_path, run_cli):
    out = tmp_path / "busy"
    out.mkdir()
    (out / "precious.txt").write_text("keep me")
    rc, _, err = run_cli(*_distill_args(teacher_dirs["llama"], corpus_file, out))
    assert rc == 2 and "not empty" in err and "--overwrite" in err
    assert (out / "precious.txt").read_text() == "keep me"
    rc, _, err = run_cli("calibrate", "--teacher", teacher_dirs["llama"], "--data", corpus_file,
                         "--out", out / "precious.txt")
    assert rc == 2 and (out / "precious.txt").read_text() == "keep me"
    # --resume on a folder red did not write says so, and touches nothing
    rc, _, err = run_cli(*_distill_args(teacher_dirs["llama"], corpus_file, out, "--resume"))
    assert rc == 2 and "not written by red" in err
    assert [p.name for p in out.iterdir()] == ["precious.txt"]


def test_unknown_yaml_key_and_wrong_type(tmp_path, teacher_dirs, corpus_file, run_cli):
    bad = tmp_path / "bad.yaml"
    bad.write_text("hidden_size: 32\nlearning_rate: 0.1\n")
    rc, _, err = run_cli("distill", "--config", bad, "--out", tmp_path / "o")
    assert rc == 2 and "unknown configuration key 'learning_rate'" in err
    bad.write_text("hidden_size: thirty\n")
    rc, _, err = run_cli("distill", "--config", bad, "--out", tmp_path / "o")
    assert rc == 2 and "hidden_size='thirty' is not a valid int" in err
    bad.write_text("steps: [1, 2\n")
    rc, _, err = run_cli("distill", "--config", bad, "--out", tmp_path / "o")
    assert rc == 2 and "not valid YAML" in err
