"""A run owns its folder (red.run.folder): every case below lost data or misled on the main
before RunDir/RunIdentity, and is checked here through the `red` command itself."""
import errno
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from red.run.checkpoint import list_checkpoints
from helpers import one_line
from helpers import same_threads_env
from red.cli import main
from red.train.trainer import lr_schedule

ARGS = ["--hidden-size", "32", "--steps", "4", "--seq-len", "24", "--batch-size", "2", "--save-every", "2",
        "--eval-every", "0", "--val-batches", "1", "--log-every", "1", "--lr", "3e-3", "--warmup", "1", "--quiet"]


def distill(teacher, data, out, *extra):
    return main(["distill", "--teacher", str(teacher), "--data", str(data), "--out", str(out), *ARGS, *extra])


def tree(folder: Path) -> dict:
    """Every file below ``folder`` with its bytes (to show nothing changed)."""
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def steps_of(out: Path) -> list[int]:
    return [json.loads(line)["step"] for line in (out / "metrics.jsonl").read_text().splitlines()
            if "loss" in json.loads(line)]


@pytest.fixture
def world(teacher_dirs, corpus_file, tmp_path):
    """A folder P holding a copy of the teacher and of the corpus, as a user might keep them."""
    p = tmp_path / "P"
    shutil.copytree(teacher_dirs["llama"], p / "teacher")
    shutil.copy(corpus_file, p / "corpus.txt")
    return p


@pytest.fixture(scope="module")
def finished(teacher_dirs, corpus_file, tmp_path_factory):
    """A finished 4-step run (checkpoints at 2 and 4), copied fresh for each test that changes it."""
    out = tmp_path_factory.mktemp("finished") / "run"
    assert distill(teacher_dirs["llama"], corpus_file, out) == 0
    return out


def copy_run(finished, tmp_path) -> Path:
    dst = tmp_path / "run"
    shutil.copytree(finished, dst, symlinks=True)
    return dst


# -- inputs are sacred ---------------------------------------------------------------------
def test_overwrite_never_deletes_the_inputs(world, tmp_path, capfd):
    before = tree(world)
    t, c = world / "teacher", world / "corpus.txt"
    one_line(capfd, distill(t, c, world, "--overwrite"), "contains the teacher folder")
    one_line(capfd, distill(t, c, t, "--overwrite"), "is the teacher folder")
    one_line(capfd, distill(t, c, t / "run", "--overwrite"), "lies inside the teacher folder")
    assert tree(world) == before
    # calibrate over the teacher's weights
    rc = main(["calibrate", "--teacher", str(t), "--data", str(c), "--out", str(t / "model.safetensors"),
               "--overwrite"])
    one_line(capfd, rc, "lies inside the teacher folder")
    assert tree(world) == before


def test_export_over_its_own_run_is_refused(finished, tmp_path, capfd):
    run = copy_run(finished, tmp_path)
    before = tree(run)
    one_line(capfd, main(["export", "--run", str(run), "--out", str(run), "--overwrite"]), "is the run folder")
    one_line(capfd, main(["export", "--run", str(run), "--out", str(run / "student"), "--overwrite"]),
             "lies inside the run folder")
    assert tree(run) == before


def test_overwrite_removes_only_what_red_wrote(finished, teacher_dirs, corpus_file, tmp_path):
    run = copy_run(finished, tmp_path)
    (run / "notes.txt").write_text("mine")
    (run / "mydata").mkdir()
    (run / "mydata" / "x.bin").write_bytes(b"\x00\x01")
    old_ckpt = (run / "checkpoints/step-0000004/state.safetensors").read_bytes()
    assert distill(teacher_dirs["llama"], corpus_file, run, "--overwrite", "--seed", "1") == 0
    assert (run / "notes.txt").read_text() == "mine" and (run / "mydata/x.bin").read_bytes() == b"\x00\x01"
    assert (run / "checkpoints/step-0000004/state.safetensors").read_bytes() != old_ckpt  # the new run's
    # an export over a folder with the user's files replaces only the export's own files
    exp = tmp_path / "exp"
    exp.mkdir()
    (exp / "README.md").write_text("my model card")
    assert main(["export", "--run", str(run), "--out", str(exp), "--overwrite"]) == 0
    assert main(["export", "--run", str(run), "--out", str(exp), "--overwrite"]) == 0
    assert (exp / "README.md").read_text() == "my model card" and (exp / "model.safetensors").is_file()


# -- a folder with no checkpoint is not a run yet --------------------------------------------
def _start_held(teacher, corpus, out, hold, *extra):
    """`red distill` in a subprocess that stops (sleeping) at ``hold`` (tests/helpers.py, hold)."""
    env = same_threads_env()
    cmd = [sys.executable, "-m", "helpers", "hold", hold, "distill", "--teacher", str(teacher), "--data", str(corpus),
           "--out", str(out), *ARGS, *extra]
    p = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    point, step = hold.split(":")
    marker = out / "checkpoints" / f".hold-{point}-{step}"
    t0 = time.time()
    while not marker.exists():
        if p.poll() is not None:
            raise AssertionError(p.stderr.read().decode()[-2000:])
        assert time.time() - t0 < 120, "fault point not reached"
        time.sleep(0.05)
    return p


def _kill(p):
    os.kill(p.pid, signal.SIGKILL)
    p.wait()


@pytest.mark.parametrize("how", ["sigkill-before-first-checkpoint", "no-cuda"])
def test_an_early_stop_does_not_wedge_the_folder(how, teacher_dirs, corpus_file, tmp_path, capfd):
    t = teacher_dirs["llama"]

    def stop_early(out):
        if how == "no-cuda":
            if torch.cuda.is_available():
                pytest.skip("needs a machine without CUDA")
            assert distill(t, corpus_file, out, "--device", "cuda") == 2
            capfd.readouterr()
            assert not out.exists()  # the device is checked with every other input, before anything is written
        else:
            _kill(_start_held(t, corpus_file, out, "train:1"))  # killed after step 1, before checkpoint 2
            assert (out / "run.yaml").is_file() and not list_checkpoints(out / "checkpoints")

    out = tmp_path / "run"
    stop_early(out)
    # the same command continues without --overwrite
    assert distill(t, corpus_file, out) == 0
    assert [c.name for c in list_checkpoints(out / "checkpoints")] == ["step-0000002", "step-0000004"]
    assert steps_of(out) == [1, 2, 3, 4]
    # and --resume on a folder without a checkpoint starts from step 0
    out2 = tmp_path / "run2"
    stop_early(out2)
    assert distill(t, corpus_file, out2, "--resume") == 0
    assert steps_of(out2) == [1, 2, 3, 4]


# -- resume: identity refused, schedule only when allowed, run.yaml tells the truth ----------
def test_resume_refuses_a_changed_identity(finished, teacher_dirs, corpus_file, tmp_path, capfd):
    run = copy_run(finished, tmp_path)
    before = tree(run)
    t = teacher_dirs["llama"]
    line = one_line(capfd, distill(t, corpus_file, run, "--resume", "--temperature", "2", "--clone-weight", "0.5",
                                   "--batch-size", "4"), "cannot change what defines the run")
    for key in ("temperature", "clone_weight", "batch_size"):
        assert key in line
    # another corpus that packs to the same number of sequences
    other = tmp_path / "other.txt"
    text = corpus_file.read_text()
    other.write_text(text.swapcase())
    one_line(capfd, distill(t, other, run, "--resume"), "another corpus")
    assert tree(run) == before


def test_resume_schedule_change_needs_allow_change_and_is_recorded(finished, teacher_dirs, corpus_file, tmp_path,
                                                                   capfd):
    run = copy_run(finished, tmp_path)
    before = tree(run)
    t = teacher_dirs["llama"]
    one_line(capfd, distill(t, corpus_file, run, "--resume", "--lr", "1"), "lr 0.003 -> 1.0", "--allow-change lr")
    assert tree(run) == before  # run.yaml still says what the run used
    # extending the finished run, with a new lr, explicitly allowed
    assert distill(t, corpus_file, run, "--resume", "--steps", "8", "--lr", "1e-3",
                   "--allow-change", "steps,lr") == 0
    saved = yaml.safe_load((run / "run.yaml").read_text())
    assert saved["steps"] == 8 and saved["lr"] == 1e-3
    assert saved["history"] == [{"step": 4, "changed": {"steps": [4, 8], "lr": [0.003, 0.001]}}]
    assert steps_of(run) == list(range(1, 9))
    rows = {r["step"]: r for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines()) if "lr" in r}
    f = lr_schedule(8, 1, saved["history"], 1e-3)
    for step, r in rows.items():
        assert r["lr"] == pytest.approx(3e-3 * f(step - 1), rel=1e-9), step
    assert rows[5]["lr"] > 0 and rows[8]["lr"] > 0
    # run.yaml reproduces the run that exists, bit for bit
    again = tmp_path / "again"
    assert main(["distill", "--config", str(run / "run.yaml"), "--out", str(again), "--quiet"]) == 0
    a = load_file(str(run / "checkpoints/step-0000008/state.safetensors"))
    b = load_file(str(again / "checkpoints/step-0000008/state.safetensors"))
    trained = [k for k in a if k.startswith("student.")]
    assert trained and all(torch.equal(a[k], b[k]) for k in trained)


def test_allow_change_is_only_for_the_schedule(finished, teacher_dirs, corpus_file, tmp_path, capfd):
    run = copy_run(finished, tmp_path)
    one_line(capfd, distill(teacher_dirs["llama"], corpus_file, run, "--resume", "--seed", "3",
                            "--allow-change", "seed"), "cannot change what defines the run", "seed")


# -- one writer --------------------------------------------------------------------------------
def test_a_second_process_is_refused_while_a_run_holds_the_folder(finished, teacher_dirs, corpus_file, tmp_path, capfd):
    run = copy_run(finished, tmp_path)
    p = _start_held(teacher_dirs["llama"], corpus_file, run, "train:5", "--resume", "--steps", "8",
                    "--allow-change", "steps")
    try:
        before = tree(run)
        for extra in (["--resume", "--steps", "8", "--allow-change", "steps"], ["--overwrite"]):
            line = one_line(capfd, distill(teacher_dirs["llama"], corpus_file, run, *extra), "is in use by process")
            assert str(p.pid) in line
        assert tree(run) == before
    finally:
        _kill(p)


# -- disk full mid-run ---------------------------------------------------------------------------
def test_disk_full_at_a_checkpoint_keeps_the_last_one(teacher_dirs, corpus_file, tmp_path, monkeypatch, capfd):
    import red.run.checkpoint as C

    real = C.save_file
    calls = {"n": 0}

    def full_disk(tensors, path, *a, **k):
        calls["n"] += 1
        if calls["n"] == 2:
            with open(path, "wb") as f:
                f.write(b"\x00" * 100)  # a partial write, then the disk is full
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(tensors, path, *a, **k)

    monkeypatch.setattr(C, "save_file", full_disk)
    out = tmp_path / "run"
    one_line(capfd, distill(teacher_dirs["llama"], corpus_file, out), "No space left on device",
             "the last complete checkpoint", "step-0000002")
    assert [c.name for c in list_checkpoints(out / "checkpoints")] == ["step-0000002"]
    assert not list((out / "checkpoints").glob(".step-*"))  # the partial temp folder is gone
    monkeypatch.setattr(C, "save_file", real)
    assert distill(teacher_dirs["llama"], corpus_file, out, "--resume") == 0


def test_preflight_needs_room_for_kept_checkpoints_and_export(teacher_dirs, corpus_file, tmp_path, monkeypatch, capfd):
    import red.files as P  # check_writable and the disk checks live there
    from red.commands.distill import disk_need
    from red.config import make_config
    from red.train.plan import checkpoint_bytes
    from red.model.teacher import read_teacher_config
    from red.model.arch import Arch

    arch = Arch.from_config(read_teacher_config(teacher_dirs["llama"]))
    cfg = make_config(teacher=str(teacher_dirs["llama"]), data=str(corpus_file), hidden_size=32, out="x", steps=4,
                      save_every=2, keep_checkpoints=2)
    need = disk_need(cfg, arch)
    assert need > 3 * checkpoint_bytes(arch, 32)  # keep + 1 checkpoints, and the export
    monkeypatch.setattr(P, "free_disk_bytes", lambda p: need - 1)
    one_line(capfd, distill(teacher_dirs["llama"], corpus_file, tmp_path / "run"), "not enough disk space")
    assert not (tmp_path / "run").exists()


# -- symbolic links --------------------------------------------------------------------------------
@pytest.mark.parametrize("entry", ["student", "metrics.jsonl", "checkpoints"])
def test_no_write_follows_a_symlink_out_of_the_folder(entry, finished, teacher_dirs, corpus_file, tmp_path, capfd):
    run = copy_run(finished, tmp_path)
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "keep.txt").write_text("not red's")
    real = run / entry
    target = outside / entry
    shutil.move(str(real), str(target))
    real.symlink_to(target, target_is_directory=target.is_dir())
    before = tree(outside)
    one_line(capfd, distill(teacher_dirs["llama"], corpus_file, run, "--resume", "--steps", "6",
                            "--allow-change", "steps"), "symbolic link")
    one_line(capfd, distill(teacher_dirs["llama"], corpus_file, run, "--overwrite"), "symbolic link")
    assert tree(outside) == before


# -- metrics after a kill and a resume ----------------------------------------------------------------
def test_metrics_have_one_row_per_step_after_kill_and_resume(teacher_dirs, corpus_file, tmp_path):
    out = tmp_path / "run"
    _kill(_start_held(teacher_dirs["llama"], corpus_file, out, "train:3"))
    assert steps_of(out) == [1, 2, 3]  # step 3 was logged, the last checkpoint is step 2
    assert distill(teacher_dirs["llama"], corpus_file, out, "--resume") == 0
    assert steps_of(out) == [1, 2, 3, 4]


def test_a_symlinked_output_folder_is_where_the_run_goes(teacher_dirs, corpus_file, tmp_path):
    """--out may itself be a link (to a scratch disk): the run goes there, --overwrite keeps
    the files red did not write (a traceback before RunDir)."""
    real = tmp_path / "scratch"
    real.mkdir()
    (real / "mine.txt").write_text("mine")
    link = tmp_path / "out"
    link.symlink_to(real, target_is_directory=True)
    assert distill(teacher_dirs["llama"], corpus_file, link, "--overwrite") == 0
    assert (real / "mine.txt").read_text() == "mine" and (real / "student" / "model.safetensors").is_file()
    assert link.is_symlink()


def test_adam_eps_reaches_adamw_and_changes_only_when_allowed(tmp_path, teacher_dirs, corpus_file, capfd):
    run = tmp_path / "run"
    assert distill(teacher_dirs["llama"], corpus_file, run, "--adam-eps", "0.25") == 0
    groups = lambda step: json.loads((run / f"checkpoints/step-{step:07d}/trainer.json").read_text())[
        "optimizer_param_groups"]
    assert [g["eps"] for g in groups(4)] == [0.25, 0.25]  # the projections' group and the gains'

    # a schedule setting: refused on resume unless allowed, then in force from the resumed step
    one_line(capfd, distill(teacher_dirs["llama"], corpus_file, run, "--resume", "--steps", "6",
                            "--allow-change", "steps", "--adam-eps", "0.5"), "adam_eps 0.25 -> 0.5")
    assert distill(teacher_dirs["llama"], corpus_file, run, "--resume", "--steps", "6", "--adam-eps", "0.5",
                   "--allow-change", "steps,adam_eps") == 0
    assert [g["eps"] for g in groups(6)] == [0.5, 0.5]
    saved = yaml.safe_load((run / "run.yaml").read_text())
    assert saved["history"] == [{"step": 4, "changed": {"steps": [4, 6], "adam_eps": [0.25, 0.5]}}]
