"""`red import`'s user errors: one line, exit 2, nothing written; the early ones answer
before torch is imported. (The conversion itself: tests/model/test_gguf.py.)"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

gguf = pytest.importorskip("gguf")

from helpers import finish_gguf, run_cli_err, snapshot, tiny_gguf_model, write_gguf  # noqa: E402
from red.cli import main  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def good_file(tmp_path_factory):
    p = tmp_path_factory.mktemp("gguf") / "llama.gguf"
    write_gguf(p, tiny_gguf_model("llama"))
    return p


def _unsupported_arch(p: Path):
    w = gguf.GGUFWriter(str(p), "gemma2")
    w.add_block_count(1)
    w.add_tensor("token_embd.weight", torch.zeros(8, 32).numpy())
    finish_gguf(w)


def _q8_1(p: Path):
    # a type the gguf package cannot dequantize: Q8_1 (blocks of 32 values in 40 bytes)
    w = gguf.GGUFWriter(str(p), "llama")
    w.add_tensor("token_embd.weight", torch.zeros(8, 40 * 2, dtype=torch.uint8).numpy(),
                 raw_dtype=gguf.GGMLQuantizationType.Q8_1)
    finish_gguf(w)


@pytest.fixture(scope="module")
def bad_files(tmp_path_factory):
    import numpy as np

    root = tmp_path_factory.mktemp("bad-gguf")
    model = tiny_gguf_model("llama")
    files = {"gemma2": root / "gemma2.gguf", "q8_1": root / "q8_1.gguf", "rope": root / "rope.gguf",
             "text": root / "notes.gguf", "cut": root / "cut.gguf"}
    _unsupported_arch(files["gemma2"])
    _q8_1(files["q8_1"])
    write_gguf(files["rope"], model, extra_tensors={"rope_freqs.weight": (np.ones(12, dtype=np.float32), None)})
    files["text"].write_text("not a model\n")
    full = root / "full.gguf"
    write_gguf(full, model)
    files["cut"].write_bytes(full.read_bytes()[:300])
    return files


def test_overwrite_replaces_only_an_import(good_file, tmp_path, capfd):
    out = tmp_path / "teacher"
    args = ["import", "--gguf", str(good_file), "--out", str(out), "--quiet"]
    assert main(args) == 0
    before = snapshot(out)
    rc, err = run_cli_err(args, capfd)  # exists, no --overwrite
    assert rc == 2 and err.strip() == f"red import: error: teacher folder {out} is not empty; choose another --out " \
                                      "or pass --overwrite"
    assert snapshot(out) == before
    assert main([*args, "--overwrite", "--dtype", "float32"]) == 0  # red's own import: replaced
    assert json.loads((out / "config.json").read_text())["dtype"] == "float32"
    assert sorted(json.loads((out / ".red-import.json").read_text())["entries"]) == sorted(
        p.name for p in out.iterdir() if p.name != ".red-lock")
    (out / "notes.txt").write_text("mine")  # the user's file: --overwrite now refuses the folder
    before = snapshot(out)
    rc, err = run_cli_err([*args, "--overwrite"], capfd)
    assert rc == 2 and "notes.txt" in err and "red import did not write" in err and len(err.strip().splitlines()) == 1
    assert snapshot(out) == before


def test_user_errors_one_line_nothing_written(good_file, bad_files, tmp_path, capfd, monkeypatch):
    new = tmp_path / "new-teacher"
    theirs = tmp_path / "theirs"
    theirs.mkdir()
    (theirs / "config.json").write_text("{}")
    cases = [
        ("unsupported architecture", bad_files["gemma2"], new, [], "GGUF architecture 'gemma2'"),
        ("type gguf cannot dequantize", bad_files["q8_1"], new, [], "quantization type Q8_1"),
        ("tensor without a counterpart", bad_files["rope"], new, [], "rope_freqs.weight"),
        ("not a GGUF", bad_files["text"], new, [], "is not a GGUF file"),
        ("cut short", bad_files["cut"], new, [], "could not be read"),
        ("missing file", tmp_path / "nope.gguf", new, [], "does not exist"),
        ("a folder", tmp_path, new, [], "is a folder"),
        ("output not red's, --overwrite", good_file, theirs, ["--overwrite"], "red import did not write"),
        ("output a file", good_file, theirs / "config.json", [], "is a file"),
        ("output holds the GGUF", good_file, good_file.parent, ["--overwrite"], "GGUF file"),
    ]
    before = snapshot(tmp_path, good_file.parent)
    for name, src, out, extra, needle in cases:
        rc, err = run_cli_err(["import", "--gguf", src, "--out", out, *extra], capfd)
        lines = [line for line in err.splitlines() if line.strip()]
        assert rc == 2 and len(lines) == 1 and lines[0].startswith("red import: error: ") and needle in lines[0], \
            (name, err)
        assert not new.exists(), name
    assert snapshot(tmp_path, good_file.parent) == before

    monkeypatch.setitem(sys.modules, "gguf", None)  # the optional extra not installed
    rc, err = run_cli_err(["import", "--gguf", good_file, "--out", new], capfd)
    assert rc == 2 and err.strip().endswith("install it with pip install 'red[gguf]'") and not new.exists()


def test_early_errors_do_not_import_torch(bad_files, tmp_path):
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]))
    p = subprocess.run([sys.executable, "-X", "importtime", "-m", "red", "import", "--gguf",
                        str(bad_files["q8_1"]), "--out", str(tmp_path / "t")], env=env, capture_output=True,
                       text=True, timeout=120)
    lines = [line for line in p.stderr.splitlines() if not line.startswith("import time:")]
    imported = {line.rsplit("|", 1)[-1].strip() for line in p.stderr.splitlines() if line.startswith("import time:")}
    assert p.returncode == 2 and len(lines) == 1 and "Q8_1" in lines[0]
    assert "gguf" in imported and not {m for m in imported if m.split(".")[0] in ("torch", "transformers")}
