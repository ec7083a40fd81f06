"""Nothing the user owns is deleted, nothing outside OUT is touched (issue 19).

Each test is one reproduction of the issue, run through the `red` command itself: before
the fix it lost or overwrote a file, or followed a name out of its folder. Every test checks
bytes on disk (``tree``), the exit code and the one-line error.
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from cli_checks import one_line
from red.cli import main

ARGS = ["--hidden-size", "32", "--steps", "2", "--seq-len", "24", "--batch-size", "2", "--save-every", "1",
        "--eval-every", "0", "--val-batches", "1", "--log-every", "1", "--lr", "3e-3", "--warmup", "1", "--quiet"]


def distill(teacher, data, out, *extra):
    return main(["distill", "--teacher", str(teacher), "--data", str(data), "--out", str(out), *ARGS,
                 *map(str, extra)])


def tree(folder: Path) -> dict:
    """Every file below ``folder`` with its bytes (to show nothing changed)."""
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def finished(teacher_dirs, corpus_file, tmp_path_factory):
    """A finished 2-step run, copied fresh (with its hidden files) by each test that changes it."""
    out = tmp_path_factory.mktemp("finished") / "run"
    assert distill(teacher_dirs["llama"], corpus_file, out) == 0
    return out


def copy_run(finished, dst: Path) -> Path:
    shutil.copytree(finished, dst, symlinks=True)
    return dst


# -- case 1: a finished run is wiped without --overwrite -----------------------------------------
def test_finished_run_without_checkpoints_is_kept(finished, teacher_dirs, corpus_file, tmp_path, capfd):
    run = copy_run(finished, tmp_path / "UF")
    shutil.rmtree(run / "checkpoints")  # the usual clean-up: keep the student, drop the checkpoints
    before = tree(run)
    t = teacher_dirs["llama"]
    one_line(capfd, distill(t, corpus_file, run, "--hidden-size", "16"), "holds a finished run", "--overwrite")
    one_line(capfd, distill(t, corpus_file, run, "--resume"), "holds a finished run", "nothing to continue from")
    assert tree(run) == before
    # --overwrite is the one way to replace it
    assert distill(t, corpus_file, run, "--hidden-size", "16", "--overwrite") == 0
    assert json.loads((run / "student" / "config.json").read_text())["hidden_size"] == 16


# -- case 2: --overwrite never claims what was there, glob inputs are inputs ----------------------
def test_overwrite_never_claims_the_folders_own_names(teacher_dirs, corpus_file, tmp_path, capfd):
    t = teacher_dirs["llama"]
    out = tmp_path / "S2"
    (out / "data").mkdir(parents=True)
    (out / "data" / "notes.txt").write_text("mine")
    before = tree(out)
    # red writes data/ (the tokenized corpus): refused, not adopted
    line = one_line(capfd, distill(t, corpus_file, out, "--overwrite"), "already holds data", "red did not write")
    assert tree(out) == before and [p.name for p in out.iterdir()] == ["data"]
    shutil.rmtree(out / "data")
    (out / "student").mkdir()
    (out / "student" / "card.md").write_text("my card")
    before = tree(out)
    one_line(capfd, distill(t, corpus_file, out, "--overwrite"), "student", "no .red-run.json")
    assert tree(out) == before and [p.name for p in out.iterdir()] == ["student"]
    shutil.rmtree(out / "student")
    # names red does not write are kept, and recorded as the folder's own, never as red's
    (out / "tensorboard").mkdir()
    (out / "tensorboard" / "events").write_text("my events")
    (out / "notes.txt").write_text("mine")
    for _ in range(2):
        assert distill(t, corpus_file, out, "--overwrite") == 0
        assert (out / "notes.txt").read_text() == "mine"
        assert (out / "tensorboard" / "events").read_text() == "my events"
    manifest = json.loads((out / ".red-run.json").read_text())
    assert {"notes.txt", "tensorboard"} <= set(manifest["foreign"])
    assert not {"notes.txt", "tensorboard"} & set(manifest["entries"])
    # and a sink that would write into the user's tensorboard/ is refused
    one_line(capfd, distill(t, corpus_file, out, "--overwrite", "--report-to", "jsonl,tensorboard"),
             "already holds tensorboard")
    assert (out / "tensorboard" / "events").read_text() == "my events"


def test_glob_inputs_inside_the_output_are_refused(teacher_dirs, corpus_file, tmp_path, capfd):
    out = tmp_path / "S2"
    (out / "data").mkdir(parents=True)
    shutil.copy(corpus_file, out / "data" / "mycorpus.txt")
    before = tree(out)
    for extra in ([], ["--val-fraction", "0.1"]):
        line = one_line(capfd, distill(teacher_dirs["llama"], out / "data" / "*.txt", out, "--overwrite", *extra),
                        "contains the data file")
        assert "mycorpus.txt" in line
    assert tree(out) == before


# -- case 3: a manifest's entries are never followed out of the folder ---------------------------
@pytest.mark.parametrize("flags", [[], ["--overwrite"], ["--resume"]])
def test_manifest_entries_outside_the_folder_are_refused(flags, teacher_dirs, corpus_file, tmp_path, capfd):
    victim = tmp_path / "victim"
    victim.mkdir()
    (victim / "precious.txt").write_text("precious")
    absolute = tmp_path / "victim2.txt"
    absolute.write_text("precious too")
    out = tmp_path / "o" / "S3"
    out.mkdir(parents=True)
    (out / ".red-run.json").write_text(json.dumps({"written_by": "red", "entries": [
        "../../victim", str(absolute), ".red-run.json"]}))
    before = tree(tmp_path)
    one_line(capfd, distill(teacher_dirs["llama"], corpus_file, out, *flags), "not a valid red manifest",
             "not a name directly inside the folder")
    assert tree(tmp_path) == before


# -- case 7: a run folder without its manifest is of unknown origin --------------------------------
def test_run_folder_without_manifest_is_refused_not_adopted(finished, teacher_dirs, corpus_file, tmp_path, capfd):
    run = tmp_path / "copy"
    run.mkdir()
    for p in finished.iterdir():  # cp -r run/* copy: the hidden files stay behind
        if not p.name.startswith("."):
            (shutil.copytree if p.is_dir() else shutil.copy)(p, run / p.name)
    before = tree(run)
    for flags in ([], ["--overwrite"], ["--resume"]):
        one_line(capfd, distill(teacher_dirs["llama"], corpus_file, run, "--seed", "1", *flags),
                 "no .red-run.json", "cp -a")
    assert tree(run) == before
