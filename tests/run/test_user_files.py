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

from helpers import one_line
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
    one_line(capfd, distill(t, corpus_file, out, "--overwrite"), "already holds data", "red did not write")
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


# -- case 4: a store's part names are never followed out of the store -------------------------------
def _store(tmp_path, corpus_file, teacher, name="st") -> Path:
    from red.data.store import prepare_store
    from red.model.teacher import load_tokenizer

    prepare_store([str(corpus_file)], tmp_path / name, load_tokenizer(teacher), workers=1, progress=False)
    return tmp_path / name


def _edit_manifest(store: Path, change) -> None:
    m = json.loads((store / "store.json").read_text())
    change(m)
    (store / "store.json").write_text(json.dumps(m))


def test_store_part_names_outside_the_store_are_refused(teacher_dirs, corpus_file, tmp_path, capfd):
    t = teacher_dirs["llama"]
    store = _store(tmp_path / "o", corpus_file, t)
    victim = tmp_path / "victim3.txt"
    victim.write_text("precious")
    shutil.copy(store / "part-00000.tokens", tmp_path / "outside.tokens")

    def rename(m):
        m["parts"][0]["files"]["tokens"]["name"] = "../../victim3.txt"
    _edit_manifest(store, rename)
    before = tree(tmp_path)
    rc = main(["prepare", "--tokenizer", str(t), "--data", str(corpus_file), "--out", str(store), "--overwrite",
               "--quiet"])
    one_line(capfd, rc, "store.json is damaged", "not part-00000.tokens")
    assert tree(tmp_path) == before
    # an absolute name: not read (the run would train on the outside file)
    _edit_manifest(store, lambda m: m["parts"][0]["files"]["tokens"].update(name=str(tmp_path / "outside.tokens")))
    one_line(capfd, distill(t, store, tmp_path / "run"), "store.json is damaged")
    assert not (tmp_path / "run").exists()


# -- case 6: two `red prepare --append` at once ------------------------------------------------------
def test_concurrent_appends_are_refused_not_lost(teacher_dirs, corpus_file, tmp_path, capfd):
    import os
    import subprocess
    import sys
    import time

    from helpers import write_corpus

    t = teacher_dirs["llama"]
    store = _store(tmp_path, corpus_file, t)
    a, b = write_corpus(tmp_path / "a.txt", seed=1), write_corpus(tmp_path / "b.txt", seed=2)
    marker = tmp_path / "holding"
    root = Path(__file__).resolve().parents[2]
    # a real `red prepare --append`, stopped while it encodes (it holds the store's lock)
    code = ("import sys, time\nimport red.data.store as S\n"
            f"def slow(*a, **k):\n    open({str(marker)!r}, 'w').write('x')\n    time.sleep(600)\n"
            "S._encode_sources = slow\nfrom red.cli import main\n"
            f"sys.exit(main(['prepare', '--tokenizer', {str(t)!r}, '--data', {str(a)!r}, '--out', {str(store)!r}, "
            "'--append', '--quiet', '--workers', '1']))\n")
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(root), os.environ.get("PYTHONPATH", "")]))
    p = subprocess.Popen([sys.executable, "-c", code], env=env, stderr=subprocess.PIPE)
    try:
        t0 = time.time()
        while not marker.exists():
            assert p.poll() is None, p.stderr.read().decode()[-2000:]
            assert time.time() - t0 < 120
            time.sleep(0.05)
        before = tree(store)
        rc = main(["prepare", "--tokenizer", str(t), "--data", str(b), "--out", str(store), "--append", "--quiet",
                   "--workers", "1"])
        line = one_line(capfd, rc, "token store", "is in use by process")
        assert str(p.pid) in line
        assert tree(store) == before
    finally:
        p.kill()
        p.wait()
    # the killed append left its lock behind unheld: the next one goes through
    assert main(["prepare", "--tokenizer", str(t), "--data", str(b), "--out", str(store), "--append", "--quiet",
                 "--workers", "1"]) == 0
    assert len(json.loads((store / "store.json").read_text())["parts"]) == 2


# -- tampered store files: one line, never a traceback ---------------------------------------------
def _rehash(store: Path, m: dict) -> None:
    import hashlib

    from red.data.store import _content_fingerprint

    for i, p in enumerate(m["parts"]):
        for kind, f in p["files"].items():
            f["sha256"] = hashlib.sha256((store / f["name"]).read_bytes()).hexdigest()
    m["fingerprint"] = _content_fingerprint(m)


def _set_bytes(f: Path, at: int, data: bytes) -> None:
    b = bytearray(f.read_bytes())
    b[at: at + len(data)] = data
    f.write_bytes(bytes(b))


@pytest.mark.parametrize("tamper, needle", [
    ("name is a number", "store.json is damaged"),
    ("reversed validation range", "validation range"),
    ("no document", "damaged"),
    ("a byte changed mid-file", "differ from its manifest's sha256"),
    ("ends rewritten, sha256 updated", "content fingerprint"),
    ("ids beyond the vocabulary, manifest redone", "beyond the vocabulary"),
    ("ends not rising, manifest redone", "do not rise"),
])
def test_tampered_store_is_one_line(tamper, needle, teacher_dirs, corpus_file, tmp_path, capfd):
    import numpy as np

    t = teacher_dirs["llama"]
    store = _store(tmp_path, corpus_file, t)
    tok, ends = store / "part-00000.tokens", store / "part-00000.ends"
    m = json.loads((store / "store.json").read_text())
    p = m["parts"][0]
    if tamper == "name is a number":
        p["files"]["tokens"]["name"] = 5
    elif tamper == "reversed validation range":
        p["val"] = [[3, 1]]
    elif tamper == "no document":
        p["documents"] = p["tokens"] = 0
    elif tamper == "a byte changed mid-file":
        _set_bytes(tok, tok.stat().st_size // 2, b"\x07\x00")
    elif tamper == "ends rewritten, sha256 updated":
        _set_bytes(ends, 8, np.asarray([1], np.uint64).tobytes())
        p["files"]["ends"]["sha256"] = __import__("hashlib").sha256(ends.read_bytes()).hexdigest()
    elif tamper == "ids beyond the vocabulary, manifest redone":
        _set_bytes(tok, 2 * 10, np.asarray([60000], np.uint16).tobytes())
        _rehash(store, m)
    elif tamper == "ends not rising, manifest redone":
        e = np.fromfile(ends, np.uint64)
        e[1], e[2] = e[2], e[1]
        e.tofile(ends)
        _rehash(store, m)
    (store / "store.json").write_text(json.dumps(m))
    before = tree(store)
    one_line(capfd, distill(t, store, tmp_path / "run"), needle)
    assert not (tmp_path / "run").exists() and tree(store) == before


# -- case 12: text the tokenizer cannot represent -------------------------------------------------
def test_a_corpus_of_unknown_tokens_is_refused(teacher_dirs, tmp_path, capfd):
    t = teacher_dirs["llama"]
    greek = tmp_path / "greek.txt"
    greek.write_text("".join("αβγδ εζηθ ικλμ νξοπ ρστυ φχψω\n" for _ in range(300)))
    one_line(capfd, distill(t, greek, tmp_path / "run"), "unknown token", "over 50%")
    assert not (tmp_path / "run").exists()
    rc = main(["prepare", "--tokenizer", str(t), "--data", str(greek), "--out", str(tmp_path / "st"), "--quiet",
               "--workers", "1"])
    one_line(capfd, rc, "unknown token")
    assert not (tmp_path / "st").exists()
    # a little unknown text among known text is fine
    mixed = tmp_path / "mixed.txt"
    mixed.write_text("".join(f"alpha beta gamma {i} is the sum δ\n" for i in range(300)))
    assert distill(t, mixed, tmp_path / "ok") == 0


# -- case 5: `red eval --out`, `red calibrate --out` and exports replace only red's own files ---------
DEMO_TEACHER = Path(__file__).resolve().parents[2] / "red" / "assets" / "demo-teacher"


def test_eval_out_never_overwrites_a_file_red_did_not_write(teacher_dirs, tmp_path, capfd):
    teacher = tmp_path / "TEACHER"
    shutil.copytree(teacher_dirs["llama"], teacher)
    mine = tmp_path / "notes.json"
    mine.write_text('{"mine": true}')
    before = tree(tmp_path)
    ev = lambda out, *a: main(["eval", "--model", str(DEMO_TEACHER), "--ks", "1", "--n-per-k", "1", "--out",
                               str(out), *a])
    one_line(capfd, ev(teacher / "config.json"), "already exists")
    one_line(capfd, ev(teacher / "config.json", "--overwrite"), "is not a report red wrote")
    one_line(capfd, ev(mine, "--overwrite"), "is not a report red wrote")
    one_line(capfd, main(["eval", "--model", str(teacher), "--out", str(teacher / "eval.json")]),
             "lies inside the model folder")
    assert tree(tmp_path) == before
    # its own report: refused without --overwrite, replaced with it
    report = tmp_path / "r" / "eval.json"
    assert ev(report) == 0 and json.loads(report.read_text())["written_by"] == "red eval"
    one_line(capfd, ev(report), "already exists", "--overwrite")
    assert ev(report, "--overwrite") == 0


def test_calibrate_overwrite_replaces_only_a_calibration_file(teacher_dirs, corpus_file, tmp_path, capfd):
    from safetensors.torch import save_file
    import torch

    t = teacher_dirs["llama"]
    mine = tmp_path / "weights.safetensors"
    save_file({"w": torch.ones(2)}, str(mine))
    before = mine.read_bytes()
    cal = lambda out, *a: main(["calibrate", "--teacher", str(t), "--data", str(corpus_file), "--out", str(out),
                                "--seq-len", "24", "--calib-samples", "2", "--quiet", *a])
    one_line(capfd, cal(mine, "--overwrite"), "is not a calibration file red wrote")
    assert mine.read_bytes() == before
    own = tmp_path / "cal.safetensors"
    assert cal(own) == 0 and cal(own, "--overwrite") == 0


def test_export_never_replaces_the_users_files(finished, tmp_path, capfd):
    exp = tmp_path / "exp"
    exp.mkdir()
    (exp / "config.json").write_text('{"my": "config"}')
    (exp / "README.md").write_text("my card")
    before = tree(exp)
    one_line(capfd, main(["export", "--run", str(finished), "--out", str(exp), "--overwrite"]),
             "already holds config.json", "red did not write")
    assert tree(exp) == before
    (exp / "config.json").unlink()
    assert main(["export", "--run", str(finished), "--out", str(exp), "--overwrite"]) == 0
    assert main(["export", "--run", str(finished), "--out", str(exp), "--overwrite"]) == 0  # its own: replaced
    assert (exp / "README.md").read_text() == "my card" and (exp / "model.safetensors").is_file()
    m = json.loads((exp / ".red-export.json").read_text())
    assert "README.md" in m["foreign"] and "README.md" not in m["entries"]


# -- case 12: the export names no code it does not copy ------------------------------------------------
def test_export_drops_auto_map(teacher_dirs, corpus_file, tmp_path):
    t = tmp_path / "teacher"
    shutil.copytree(teacher_dirs["llama"], t)
    cfg = json.loads((t / "config.json").read_text())
    cfg["auto_map"] = {"AutoModelForCausalLM": "modeling_x.MyModel", "AutoConfig": "configuration_x.MyConfig"}
    (t / "config.json").write_text(json.dumps(cfg))
    assert distill(t, corpus_file, tmp_path / "run") == 0
    exported = json.loads((tmp_path / "run" / "student" / "config.json").read_text())
    assert "auto_map" not in exported and not list((tmp_path / "run" / "student").glob("*.py"))
    from transformers import AutoModelForCausalLM

    AutoModelForCausalLM.from_pretrained(tmp_path / "run" / "student")  # loads without remote code


# -- case 2: `red demo --overwrite` keeps the user's files in its folder -----------------------------
@pytest.mark.parametrize("name", ["general.txt", "table.txt", "runs"])
def test_demo_overwrite_refuses_the_users_names(name, tmp_path, capfd):
    out = tmp_path / "demo"
    out.mkdir()
    target = out / name
    if name == "runs":
        (target / "my-old-run").mkdir(parents=True)
        (target / "my-old-run" / "notes.txt").write_text("mine")
    else:
        target.write_text("mine")
    before = tree(out)
    rc = main(["demo", "--out", str(out), "--overwrite", "--steps", "1", "--quiet"])
    one_line(capfd, rc, f"already holds {name}", "red did not write")
    assert tree(out) == before and sorted(p.name for p in out.iterdir()) == [name]


def test_demo_n_per_k_0_is_one_line(tmp_path, capfd):
    one_line(capfd, main(["demo", "--out", str(tmp_path / "d"), "--n-per-k", "0", "--quiet"]),
             "--n-per-k must be at least 1")
    assert not (tmp_path / "d").exists()


# -- case 10: a teacher edited in the middle of its weights --------------------------------------------
def test_a_teacher_edited_mid_file_is_another_teacher(teacher_dirs, corpus_file, tmp_path, capfd):
    import struct

    t = tmp_path / "teacher"
    shutil.copytree(teacher_dirs["llama"], t)
    run = tmp_path / "run"
    assert distill(t, corpus_file, run) == 0
    cal = tmp_path / "cal.safetensors"
    assert main(["calibrate", "--teacher", str(t), "--data", str(corpus_file), "--out", str(cal), "--seq-len", "24",
                 "--calib-samples", "2", "--quiet"]) == 0
    w = t / "model.safetensors"
    b = bytearray(w.read_bytes())
    mid = len(b) // 2 // 4 * 4  # a float in the middle of the tensor data, far from both ends
    (x,) = struct.unpack_from("<f", b, mid)
    struct.pack_into("<f", b, mid, 3 * x + 1.0)
    w.write_bytes(bytes(b))
    before = tree(run)
    one_line(capfd, distill(t, corpus_file, run, "--resume", "--steps", "3", "--allow-change", "steps"),
             "belongs to another teacher")
    one_line(capfd, main(["export", "--run", str(run), "--out", str(tmp_path / "exp")]), "belongs to another teacher")
    one_line(capfd, distill(t, corpus_file, tmp_path / "run2", "--calibration", cal), "was made on another teacher")
    assert tree(run) == before and not (tmp_path / "exp").exists()


def test_checkpoints_with_the_old_sampled_fingerprint_still_resume(finished, teacher_dirs, corpus_file, tmp_path):
    """Checkpoints written before whole-file fingerprints hold the sampled digest: the same
    teacher is still recognized by it (the only digest they can be checked with)."""
    from red.model.teacher import legacy_teacher_fingerprint

    run = copy_run(finished, tmp_path / "old")
    for info in run.glob("checkpoints/*/trainer.json"):
        d = json.loads(info.read_text())
        d["meta"]["teacher_fingerprint"] = legacy_teacher_fingerprint(teacher_dirs["llama"])
        d["meta"].pop("teacher_fingerprint_v1")
        info.write_text(json.dumps(d))
    assert distill(teacher_dirs["llama"], corpus_file, run, "--resume", "--steps", "3", "--allow-change", "steps") == 0


# -- case 8: a full disk ---------------------------------------------------------------------------------
def _disk_full_error():
    from safetensors import SafetensorError

    # what safetensors' save_file raises when the disk fills up (not an OSError)
    return SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)")


def test_full_disk_at_a_checkpoint_keeps_the_last_one_and_resumes(teacher_dirs, corpus_file, tmp_path,
                                                                   monkeypatch, capfd):
    import red.run.checkpoint as C
    import red.files as P  # check_writable and the disk checks live there
    from red.commands.distill import disk_need
    from red.run.checkpoint import list_checkpoints
    from red.config import make_config
    from red.model.teacher import read_teacher_config
    from red.model.arch import Arch

    real = C.save_file
    calls = {"n": 0}

    def full_disk(tensors, path, *a, **k):
        calls["n"] += 1
        if calls["n"] == 2:
            Path(path).write_bytes(b"\x00" * 100)  # a partial file, then the disk is full
            raise _disk_full_error()
        return real(tensors, path, *a, **k)

    t = teacher_dirs["llama"]
    out = tmp_path / "run"
    monkeypatch.setattr(C, "save_file", full_disk)
    one_line(capfd, distill(t, corpus_file, out, "--steps", "3"), "No space left on device",
             "the last complete checkpoint", "step-0000001")
    monkeypatch.setattr(C, "save_file", real)
    assert [c.name for c in list_checkpoints(out / "checkpoints")] == ["step-0000001"]
    assert not list((out / "checkpoints").glob(".step-*"))  # no temporary folder left to block a resume
    # the resume needs room only for what it adds: the kept checkpoint already counts
    arch = Arch.from_config(read_teacher_config(t))
    need = disk_need(make_config(teacher=str(t), data=str(corpus_file), hidden_size=32, out=str(out), steps=3,
                                   save_every=1), arch)
    have = sum(f.stat().st_size for f in (out / "checkpoints" / "step-0000001").iterdir())
    monkeypatch.setattr(P, "free_disk_bytes", lambda p: need - have + 1024)
    assert distill(t, corpus_file, out, "--steps", "3", "--resume") == 0
    assert [c.name for c in list_checkpoints(out / "checkpoints")] == ["step-0000002", "step-0000003"]


def test_full_disk_at_the_export_is_one_line_and_resume_finishes(teacher_dirs, corpus_file, tmp_path, monkeypatch,
                                                                 capfd):
    import red.model.export as E

    real = E.save_file

    def full_disk(*a, **k):
        raise _disk_full_error()

    out = tmp_path / "run"
    monkeypatch.setattr(E, "save_file", full_disk)
    one_line(capfd, distill(teacher_dirs["llama"], corpus_file, out), "could not write the export",
             "No space left on device")
    monkeypatch.setattr(E, "save_file", real)
    assert not (out / "student" / "model.safetensors").exists() and not list((out / "student").glob(".staging*"))
    assert distill(teacher_dirs["llama"], corpus_file, out, "--resume") == 0
    assert (out / "student" / "model.safetensors").is_file() and (out / "result.json").is_file()


def test_resume_and_overwrite_together_are_refused(finished, teacher_dirs, corpus_file, tmp_path, capfd):
    run = copy_run(finished, tmp_path / "run")
    before = tree(run)
    one_line(capfd, distill(teacher_dirs["llama"], corpus_file, run, "--resume", "--overwrite"),
             "--resume and --overwrite exclude each other")
    assert tree(run) == before


def test_full_disk_while_appending_to_a_store_leaves_it_as_it_was(teacher_dirs, corpus_file, tmp_path,
                                                                   monkeypatch, capfd):
    import errno

    import red.data.store as S
    from helpers import write_corpus

    t = teacher_dirs["llama"]
    store = _store(tmp_path, corpus_file, t)
    before = tree(store)

    def full(self, kind, arr):
        raise OSError(errno.ENOSPC, "No space left on device")
    monkeypatch.setattr(S._PartWriter, "_write", full)
    rc = main(["prepare", "--tokenizer", str(t), "--data", str(write_corpus(tmp_path / "more.txt", seed=3)),
               "--out", str(store), "--append", "--quiet", "--workers", "1"])
    one_line(capfd, rc, "could not write token store", "No space left on device", "nothing was added")
    assert tree(store) == before


# -- case 11: chat data with no assistant turn ------------------------------------------------------------
@pytest.fixture(scope="module")
def chat_teacher(tmp_path_factory):
    from helpers import build_tokenizer, make_teacher

    t = make_teacher(tmp_path_factory.mktemp("chat") / "t", "qwen3")
    tok = build_tokenizer()
    tok.chat_template = ("{% for m in messages %}[{{ m['role'] }}]: {{ m['content'] }}\n{% endfor %}"
                         "{% if add_generation_prompt %}[assistant]: {% endif %}")
    tok.save_pretrained(t)
    return t


def test_chat_data_without_an_assistant_turn_is_refused(chat_teacher, tmp_path, capfd):
    rows = [{"messages": [{"role": "system", "content": "be brief"}, {"role": "user", "content": f"what is {i}+{i}?"}]}
            for i in range(80)]
    (tmp_path / "chat.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    one_line(capfd, distill(chat_teacher, tmp_path / "chat.jsonl", tmp_path / "run"), "no assistant token",
             "--loss-on all")
    assert not (tmp_path / "run").exists()
    # the same data scored on every token is a valid run
    assert distill(chat_teacher, tmp_path / "chat.jsonl", tmp_path / "all", "--loss-on", "all") == 0


# -- case 12: --resume that shortens, --val-fraction with a store, --out through '..' ------------------------
def test_resume_cannot_shorten_a_run(finished, teacher_dirs, corpus_file, tmp_path, capfd):
    run = copy_run(finished, tmp_path / "run")
    before = tree(run)
    one_line(capfd, distill(teacher_dirs["llama"], corpus_file, run, "--resume", "--steps", "1", "--allow-change",
                            "steps"), "--steps 1 is below step 2", "cannot shorten it")
    assert tree(run) == before


def test_val_fraction_that_a_store_cannot_apply_is_refused(teacher_dirs, corpus_file, tmp_path, capfd):
    import yaml

    t = teacher_dirs["llama"]
    store = _store(tmp_path, corpus_file, t)  # prepared with the default split, 0.05
    one_line(capfd, distill(t, store, tmp_path / "run", "--val-fraction", "0.1"),
             "--val-fraction 0.1 cannot apply to token store", "0.05")
    assert not (tmp_path / "run").exists()
    assert distill(t, store, tmp_path / "run") == 0
    assert yaml.safe_load((tmp_path / "run" / "run.yaml").read_text())["val_fraction"] is None  # the store's own
    assert distill(t, store, tmp_path / "run2", "--val-fraction", "0.05") == 0  # the store's split: fine
    # run.yaml repeats the run
    assert main(["distill", "--config", str(tmp_path / "run" / "run.yaml"), "--out", str(tmp_path / "again"),
                 "--quiet"]) == 0


@pytest.mark.parametrize("command", ["distill", "prepare", "export", "calibrate", "eval", "demo"])
def test_out_through_dot_dot_creates_nothing(command, finished, teacher_dirs, corpus_file, tmp_path, capfd,
                                             monkeypatch):
    monkeypatch.chdir(tmp_path)
    t, c = str(teacher_dirs["llama"]), str(corpus_file)
    argv = {"distill": ["distill", "--teacher", t, "--data", c, "--hidden-size", "32", "--out", "a/b/../c"],
            "prepare": ["prepare", "--tokenizer", t, "--data", c, "--out", "a/b/../c"],
            "export": ["export", "--run", str(finished), "--out", "a/b/../c"],
            "calibrate": ["calibrate", "--teacher", t, "--data", c, "--out", "a/b/../c.safetensors"],
            "eval": ["eval", "--model", str(DEMO_TEACHER), "--out", "a/b/../c.json"],
            "demo": ["demo", "--out", "a/b/../c"]}[command]
    one_line(capfd, main(argv), "goes through a/b, which does not exist")
    assert list(tmp_path.iterdir()) == []


# -- hangs and tracebacks ------------------------------------------------------------------------------------
def test_hangs_and_tracebacks_are_one_line(finished, teacher_dirs, corpus_file, tmp_path, capfd):
    import os

    from helpers import error_table_failures

    t, c, R = str(teacher_dirs["llama"]), str(corpus_file), tmp_path
    new = R / "new-out"
    (R / "empty-data.yaml").write_text(f"teacher: {t}\nhidden_size: 32\ndata: []\n")
    levels = ['l0: &l0 ["x","x","x","x","x","x","x","x","x"]'] + [
        f"l{i}: &l{i} [" + ",".join([f"*l{i - 1}"] * 9) + "]" for i in range(1, 9)]
    (R / "bomb.yaml").write_text("\n".join(levels) + f"\ndata: *l8\nteacher: {t}\nhidden_size: 32\n")  # 9**9 strings
    (R / "big.yaml").write_text("# " + "x" * (2 << 20) + "\n")
    long = str(R / ("x" * 300))
    di = lambda *a: ["distill", "--teacher", t, "--data", c, "--hidden-size", "32", "--out", new, "--quiet", *a]
    cases = [
        ("bench: --seq-len beyond the teacher", ["bench", "--teacher", t, "--hidden-size", "32", "--seq-len",
                                                 "100000", "--quiet"], "max_position_embeddings=256"),
        ("distill: --seq-len beyond the teacher", di("--seq-len", "100000"), "max_position_embeddings=256"),
        ("distill: --grad-accum 1e9", di("--grad-accum", "1000000000"), "grad_accum must be between 1 and 4096"),
        ("distill: data: [] in YAML", ["distill", "--config", R / "empty-data.yaml", "--out", new],
         "data is an empty list"),
        ("distill: YAML aliases", ["distill", "--config", R / "bomb.yaml", "--out", new], "uses a YAML alias"),
        ("distill: YAML of 2 MB", ["distill", "--config", R / "big.yaml", "--out", new], "more than a configuration"),
        ("distill: over-long --out", ["distill", "--teacher", t, "--data", c, "--hidden-size", "32", "--out", long],
         "this file system takes at most"),
        ("prepare: over-long --out", ["prepare", "--tokenizer", t, "--data", c, "--out", long],
         "this file system takes at most"),
        ("export: over-long --out", ["export", "--run", finished, "--out", long], "this file system takes at most"),
        ("calibrate: over-long --out", ["calibrate", "--teacher", t, "--data", c, "--out", long + ".safetensors"],
         "this file system takes at most"),
        ("eval: over-long --out", ["eval", "--model", DEMO_TEACHER, "--out", long + ".json"],
         "this file system takes at most"),
        ("demo: over-long --out", ["demo", "--out", long], "this file system takes at most"),
        ("demo: --n-per-k 0", ["demo", "--out", new, "--n-per-k", "0"], "--n-per-k must be at least 1"),
    ]
    failures = error_table_failures(cases, capfd, new)
    assert not failures, "\n".join(failures)
    assert not os.path.lexists(long)  # (pathlib raises on a name this long)


def test_kernels_triton_without_the_interpreter_on_a_cpu_is_one_line(teacher_dirs, corpus_file, tmp_path):
    import os
    import subprocess
    import sys

    import torch

    if torch.cuda.is_available():
        pytest.skip("needs a machine without CUDA")
    root = Path(__file__).resolve().parents[2]
    env = {k: v for k, v in os.environ.items() if k not in ("TRITON_INTERPRET", "RANK", "WORLD_SIZE")}
    env["PYTHONPATH"] = os.pathsep.join([str(root), env.get("PYTHONPATH", "")])
    p = subprocess.run([sys.executable, "-m", "red", "distill", "--teacher", str(teacher_dirs["llama"]), "--data",
                        str(corpus_file), "--hidden-size", "32", "--out", str(tmp_path / "run"), "--kernels", "triton",
                        "--quiet"], env=env, capture_output=True, text=True, timeout=300)
    lines = [line for line in p.stderr.splitlines() if line.strip()]
    assert p.returncode == 2 and len(lines) == 1 and "--kernels triton cannot run on cpu" in lines[0], p.stderr
    assert not (tmp_path / "run").exists()


def test_a_32_mb_file_of_two_lines_is_refused_in_little_memory(teacher_dirs, tmp_path):
    import os
    import subprocess
    import sys

    two = tmp_path / "two.txt"
    line = "alpha beta gamma " * ((16 << 20) // 17)
    two.write_text(line + "\n" + line + "\n")
    assert two.stat().st_size > 30 << 20
    root = Path(__file__).resolve().parents[2]
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(root), os.environ.get("PYTHONPATH", "")]))
    code = ("import resource, sys\nfrom red.cli import main\n"
            f"rc = main(['prepare', '--tokenizer', {str(teacher_dirs['llama'])!r}, '--data', {str(two)!r}, '--out', "
            f"{str(tmp_path / 'st')!r}, '--quiet', '--workers', '1'])\n"
            "print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)\nsys.exit(rc)\n")
    p = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    lines = [line for line in p.stderr.splitlines() if line.strip()]
    assert p.returncode == 2 and len(lines) == 1 and "more than 1,000,000 characters" in lines[0], p.stderr
    assert int(p.stdout.split()[-1]) < 1_500_000  # kB: about torch's own footprint, not gigabytes
    assert not (tmp_path / "st").exists()


def test_analyze_out_never_replaces_the_users_files(finished, teacher_dirs, corpus_file, tmp_path, capfd):
    out = tmp_path / "an"
    out.mkdir()
    (out / "analysis.json").write_text('{"mine": 1}')
    an = lambda: main(["analyze", "--teacher", str(teacher_dirs["llama"]), "--student", str(finished), "--data",
                       str(corpus_file), "--seq-len", "24", "--samples", "2", "--out", str(out)])
    one_line(capfd, an(), "already holds analysis.json", "red did not write")
    assert (out / "analysis.json").read_text() == '{"mine": 1}'
    (out / "analysis.json").unlink()
    assert an() == 0 and an() == 0  # its own files: replaced
