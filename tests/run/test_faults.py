"""Faults: SIGKILL mid-training and mid-checkpoint, NaN/inf, unwritable or full output."""
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from red.run.checkpoint import list_checkpoints
from red.cli import main
from red.config import make_config
from red.data.corpus import load_corpus
from red.errors import RedError
from red.train.startup import build_student
from red.train.calibration import calibrate
from red.train.trainer import train

from helpers import same_threads_env

ARGS = ["--hidden-size", 32, "--steps", 6, "--seq-len", 24, "--batch-size", 3, "--save-every", 2,
        "--eval-every", 0, "--val-batches", 1, "--lr", 3e-3, "--warmup", 1, "--quiet"]


def _env(**extra):
    # the killed run is resumed in this process and compared bit for bit with one made here
    return same_threads_env(**extra)


def _run_and_kill(teacher, corpus, out: Path, hold: str, timeout=120):
    """Start `red distill` with the fault hook of tests/helpers.py (hold), wait until it says the
    run reached ``hold`` ("save:4" = inside the write of checkpoint 4, "train:5" = after
    step 5), SIGKILL it."""
    cmd = [sys.executable, "-m", "helpers", "hold", hold, "distill", "--teacher", teacher, "--data", corpus, "--out", out,
           *ARGS]
    p = subprocess.Popen([str(c) for c in cmd], env=_env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    point, step = hold.split(":")
    marker = out / "checkpoints" / f".hold-{point}-{step}"
    t0 = time.time()
    while not marker.exists():
        if p.poll() is not None:
            raise AssertionError(f"run ended before the fault point: {p.stderr.read().decode()[-2000:]}")
        if time.time() - t0 > timeout:
            p.kill()
            raise AssertionError("fault point not reached")
        time.sleep(0.05)
    os.kill(p.pid, signal.SIGKILL)
    p.wait()
    assert p.returncode == -signal.SIGKILL


def _final(out: Path) -> dict:
    sd = load_file(str(out / "checkpoints/step-0000006/state.safetensors"))
    return {k: v for k, v in sd.items() if k.startswith("student.")}


def test_sigkill_in_checkpoint_write_and_in_training_resumes_bitwise(teacher_dirs, corpus_file, tmp_path):
    t = teacher_dirs["qwen2"]
    straight = tmp_path / "straight"
    assert main(["distill", "--teacher", str(t), "--data", str(corpus_file), "--out", str(straight),
                 *map(str, ARGS)]) == 0
    want = _final(straight)

    # killed while checkpoint 4 is being written: its tensors are on disk, not yet renamed
    a = tmp_path / "killed-in-save"
    _run_and_kill(t, corpus_file, a, "save:4")
    assert [c.name for c in list_checkpoints(a / "checkpoints")] == ["step-0000002"]
    half = list((a / "checkpoints").glob(".step-0000004.tmp-*"))
    assert len(half) == 1 and (half[0] / "state.safetensors").is_file()  # the half-written one is ignored
    assert main(["distill", "--teacher", str(t), "--data", str(corpus_file), "--out", str(a), "--resume",
                 *map(str, ARGS)]) == 0
    got = _final(a)
    assert set(got) == set(want) and all(torch.equal(got[k], want[k]) for k in want)
    assert not list((a / "checkpoints").glob(".step-*"))  # stale temporary folders are cleaned

    # killed between optimizer steps 5 and 6 (checkpoint 4 is the last complete one)
    b = tmp_path / "killed-in-train"
    _run_and_kill(t, corpus_file, b, "train:5")
    assert [c.name for c in list_checkpoints(b / "checkpoints")] == ["step-0000002", "step-0000004"]
    assert main(["distill", "--teacher", str(t), "--data", str(corpus_file), "--out", str(b), "--resume",
                 *map(str, ARGS)]) == 0
    got = _final(b)
    assert all(torch.equal(got[k], want[k]) for k in want)
    e1 = (straight / "student/model.safetensors").read_bytes()
    assert (b / "student/model.safetensors").read_bytes() == e1


def _setup(loaded_teachers, teacher_dirs, corpus_file, out, **kw):
    teacher, tok = loaded_teachers["llama"]
    corpus = load_corpus(corpus_file, tok, 24)
    cal = calibrate(teacher, corpus.train[:4], progress=False)
    st = build_student(teacher, 32, "red", cal, seed=0)
    cfg = make_config(teacher=str(teacher_dirs["llama"]), data=str(corpus_file), hidden_size=32, out=str(out),
                      steps=6, seq_len=24, batch_size=3, eval_every=0, save_every=2, val_batches=1, lr=3e-3,
                      warmup=1, **kw)
    out.mkdir()
    return st, corpus, cfg


def test_nan_loss_names_step_and_terms_and_keeps_last_checkpoint(loaded_teachers, teacher_dirs, corpus_file, tmp_path):
    st, corpus, cfg = _setup(loaded_teachers, teacher_dirs, corpus_file, tmp_path / "r")
    train(st, corpus, cfg, tmp_path / "r", progress=False, on_step=lambda step: step >= 2)
    good = (tmp_path / "r/checkpoints/step-0000002/state.safetensors").read_bytes()
    with torch.no_grad():
        st.layers[0].up[3, 1] = float("inf")
    cfg.resume = False
    with pytest.raises(RedError, match=r"non-finite loss at step 1 in term\(s\) loss, .*clone/up") as e:
        train(st, corpus, cfg, tmp_path / "r", progress=False)
    assert "last good checkpoint is kept" in str(e.value) and "\n" not in str(e.value)
    assert [c.name for c in list_checkpoints(tmp_path / "r/checkpoints")] == ["step-0000002"]
    assert (tmp_path / "r/checkpoints/step-0000002/state.safetensors").read_bytes() == good


def test_nan_gradient_names_step_and_parameter(loaded_teachers, teacher_dirs, corpus_file, tmp_path):
    st, corpus, cfg = _setup(loaded_teachers, teacher_dirs, corpus_file, tmp_path / "r")
    train(st, corpus, cfg, tmp_path / "r", progress=False, on_step=lambda step: step >= 2)
    cfg.resume = True
    calls = {"n": 0}

    backward = st.weight_backward

    def poison(*a, **k):  # the loss stays finite; only this gradient turns NaN, at step 3
        backward(*a, **k)
        calls["n"] += 1
        st.layers[1].gate.grad[0, 0] = float("nan")

    st.weight_backward = poison
    with pytest.raises(RedError, match=r"non-finite gradient at step 3 .* in layers\.1\.gate;"):
        train(st, corpus, cfg, tmp_path / "r", progress=False)
    del st.weight_backward
    assert calls["n"] == 1
    assert [c.name for c in list_checkpoints(tmp_path / "r/checkpoints")] == ["step-0000002"]


def _one_line_error(capfd, rc, needle, cmd="distill"):
    err = capfd.readouterr().err
    lines = [l for l in err.splitlines() if l.strip()]
    assert rc == 2, err
    assert len(lines) == 1 and lines[0].startswith(f"red {cmd}: error:") and needle in lines[0], err


def test_unwritable_output_and_full_disk_are_reported_before_training(teacher_dirs, corpus_file, tmp_path,
                                                                        monkeypatch, capfd):
    base = ["distill", "--teacher", str(teacher_dirs["llama"]), "--data", str(corpus_file), *map(str, ARGS)]
    blocker = tmp_path / "a-file"
    blocker.write_text("x")
    rc = main(base + ["--out", str(blocker / "run")])
    _one_line_error(capfd, rc, "is not writable")
    assert blocker.read_text() == "x"

    import red.files as P  # check_writable and the disk checks live there
    from red.commands.distill import disk_need

    def no_write(folder):
        raise PermissionError(13, "Permission denied")
    with monkeypatch.context() as m:
        m.setattr(P, "_probe_writable", no_write)
        rc = main(base + ["--out", str(tmp_path / "ro")])
    _one_line_error(capfd, rc, "is not writable (Permission denied)")
    assert not (tmp_path / "ro").exists()

    from red.train.plan import checkpoint_bytes
    from red.model.teacher import read_teacher_config
    from red.model.arch import Arch
    arch = Arch.from_config(read_teacher_config(teacher_dirs["llama"]))
    need = disk_need(make_config(teacher=str(teacher_dirs["llama"]), data=str(corpus_file), hidden_size=32,
                                   out="x", steps=6, save_every=2), arch)
    with monkeypatch.context() as m:
        m.setattr(P, "free_disk_bytes", lambda p: need - 1)
        rc = main(base + ["--out", str(tmp_path / "full")])
    _one_line_error(capfd, rc, "not enough disk space")
    assert not (tmp_path / "full").exists()
    # the estimate is an upper bound of a real checkpoint of this run
    with monkeypatch.context() as m:
        m.setattr(P, "free_disk_bytes", lambda p: need)
        assert main(base + ["--out", str(tmp_path / "fits")]) == 0
    # the estimate is an upper bound of what the run held at its peak: the kept checkpoints
    # (keep=2), one more being written, and the export
    ckpt = sum(f.stat().st_size for f in (tmp_path / "fits/checkpoints/step-0000006").iterdir())
    export = sum(f.stat().st_size for f in (tmp_path / "fits/student").iterdir())
    real = 3 * ckpt + export
    assert real <= need <= 1.3 * real
    assert checkpoint_bytes(arch, 32) >= ckpt
