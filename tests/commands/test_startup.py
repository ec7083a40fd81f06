"""Fast start: `red --help`, usage errors and config errors must not import torch or
transformers (importing them takes seconds). Each case runs `python -X importtime -m red`
in a fresh process and reads the modules it imported from the importtime lines."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
HEAVY = ("torch", "transformers", "triton", "red_kernels")
SUBCOMMANDS = ("distill", "calibrate", "export", "demo", "eval", "plan", "bench", "analyze", "import")


def _red(args, cwd):
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    p = subprocess.run([sys.executable, "-X", "importtime", "-m", "red", *args], cwd=cwd, env=env,
                       capture_output=True, text=True, timeout=120)
    imported, messages = set(), []
    for line in p.stderr.splitlines():
        if line.startswith("import time:"):
            imported.add(line.rsplit("|", 1)[-1].strip())
        else:
            messages.append(line)
    return p.returncode, p.stdout, messages, imported


def _no_heavy(imported):
    heavy = sorted(m for m in imported if m.split(".")[0] in HEAVY)
    assert not heavy, f"imported {heavy[:5]}"


def test_python_m_red_help(tmp_path):
    rc, out, err, imported = _red(["--help"], tmp_path)
    assert rc == 0, err
    assert "usage: red" in out and all(c in out for c in SUBCOMMANDS)
    assert "red.cli" in imported  # importtime lines were read
    _no_heavy(imported)


@pytest.mark.parametrize("command", SUBCOMMANDS)
def test_subcommand_help(tmp_path, command):
    rc, out, err, imported = _red([command, "--help"], tmp_path)
    assert rc == 0, err
    assert f"usage: red {command}" in out
    _no_heavy(imported)


DEMO_TEACHER = Path(__file__).resolve().parents[2] / "red" / "assets" / "demo-teacher"


@pytest.mark.parametrize("args, expect", [
    (["--no-such-option"], "red: error:"),
    (["distill", "--no-such-option", "1"], "red distill: error: unrecognized arguments: --no-such-option 1"),
    (["plan", "--teacher", "t", "--hidden-size", "abc"], "red plan: error: argument --hidden-size"),
    (["distill", "--teacher", "x", "--data", "y", "--hidden-size", "8", "--out", "o", "--lr", "nan"],
     "red distill: error: lr=nan"),
    (["distill", "--config", "no-such-file.yaml"], "red distill: error:"),
    (["plan", "--teacher", "t", "--hidden-size", "0"], "red plan: error:"),
    (["calibrate", "--teacher", "t", "--data", "d", "--out", "o.safetensors", "--seq-len", "1"],
     "red calibrate: error:"),
    (["bench", "--teacher", "t", "--hidden-size", "8", "--seq-len", "4", "--device", "tpu"], "red bench: error:"),
    # pre-flight errors that need no teacher weights: paths, architecture, width
    (["distill", "--teacher", "no-such-teacher", "--data", "d.txt", "--hidden-size", "8", "--out", "o"],
     "red distill: error: teacher folder no-such-teacher does not exist"),
    (["distill", "--teacher", str(DEMO_TEACHER), "--data", "no-such.txt", "--hidden-size", "8", "--out", "o"],
     "red distill: error: corpus no-such.txt does not exist"),
    (["distill", "--teacher", str(DEMO_TEACHER), "--data", str(DEMO_TEACHER / "README.md"), "--hidden-size", "8",
      "--out", "o"], "red distill: error: corpus"),
    (["distill", "--teacher", str(DEMO_TEACHER), "--data", "d.txt", "--hidden-size", "4096", "--out", "o"],
     "red distill: error: --hidden-size 4096 must be between 1 and 127"),
])
def test_user_errors_are_one_line_without_torch(tmp_path, args, expect):
    rc, out, err, imported = _red(args, tmp_path)
    assert rc == 2
    assert len(err) == 1 and err[0].startswith(expect), err
    _no_heavy(imported)
    assert not (tmp_path / "o").exists()  # nothing written by a rejected run


# errors about paths, for every command, answer before torch is imported (issue 19)
@pytest.mark.parametrize("args, expect", [
    (["export", "--run", "no-such-run", "--out", "e"], "red export: error: no-such-run is not a red run folder"),
    (["plan", "--teacher", "no-such-teacher", "--hidden-size", "8"], "red plan: error: teacher folder no-such"),
    (["bench", "--teacher", "no-such-teacher", "--hidden-size", "8", "--seq-len", "8"], "red bench: error: teacher"),
    (["bench", "--teacher", str(DEMO_TEACHER), "--hidden-size", "8", "--seq-len", "100000"],
     "red bench: error: --seq-len 100000 is above the teacher's max_position_embeddings"),
    (["eval", "--model", "no-such-model"], "red eval: error: model folder no-such-model does not exist"),
    (["analyze", "--teacher", "no-such-teacher", "--student", "s", "--data", "d.txt"], "red analyze: error: teacher"),
    (["analyze", "--teacher", str(DEMO_TEACHER), "--student", "no-such-student", "--data", "d.txt"],
     "red analyze: error: student folder no-such-student does not exist"),
    (["calibrate", "--teacher", "no-such-teacher", "--data", "d.txt", "--out", "o.safetensors"],
     "red calibrate: error: teacher folder"),
    (["calibrate", "--teacher", str(DEMO_TEACHER), "--data", str(DEMO_TEACHER / "config.json"), "--out",
      str(DEMO_TEACHER / "o.safetensors")], "red calibrate: error: output"),
    (["distill", "--teacher", str(DEMO_TEACHER), "--data", str(DEMO_TEACHER / "README.md"), "--hidden-size", "8",
      "--out", str(DEMO_TEACHER)], "red distill: error: corpus"),
])
def test_path_errors_of_every_command_answer_without_torch(tmp_path, args, expect):
    rc, out, err, imported = _red(args, tmp_path)
    assert rc == 2
    assert len(err) == 1 and err[0].startswith(expect), err
    _no_heavy(imported)


def test_out_equal_to_the_teacher_and_a_locked_folder_answer_without_torch(tmp_path):
    import shutil

    from red.files import FolderLock

    teacher = tmp_path / "teacher"
    shutil.copytree(DEMO_TEACHER, teacher)
    (tmp_path / "d.txt").write_text("alpha beta\n" * 50)
    base = ["distill", "--teacher", str(teacher), "--data", str(tmp_path / "d.txt"), "--hidden-size", "8"]
    rc, out, err, imported = _red(base + ["--out", str(teacher)], tmp_path)
    assert rc == 2 and len(err) == 1 and "is the teacher folder" in err[0], err
    _no_heavy(imported)
    lock = FolderLock(tmp_path / "busy")
    lock.acquire()  # this test process holds the folder, as a running red would
    try:
        rc, out, err, imported = _red(base + ["--out", str(tmp_path / "busy")], tmp_path)
    finally:
        lock.release()
    assert rc == 2 and len(err) == 1 and f"is in use by process {os.getpid()}" in err[0], err
    _no_heavy(imported)


def test_lazy_package_api():
    code = ("import sys, red\n"
            "assert not any(m.split('.')[0] in ('torch', 'transformers') for m in sys.modules)\n"
            "assert set(red.__all__) <= set(dir(red))\n"
            "from red import RedError, DistillConfig, make_config\n"
            "assert 'torch' not in sys.modules\n"
            "from red import analyze, distill, load_teacher\n"
            "import red.commands.analyze\n"
            "assert red.analyze is analyze and callable(analyze)\n"
            "assert red.distill is distill and red.load_teacher is load_teacher\n"
            "try:\n    red.no_such_name\nexcept AttributeError:\n    pass\nelse:\n    raise SystemExit('no error')\n")
    p = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert p.returncode == 0, p.stderr
