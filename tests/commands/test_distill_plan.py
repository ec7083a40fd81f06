"""One checked plan per run: one `red distill` (through the CLI, as a user runs it) checks
each input once. The functions that check or expand an input are counted where the run
calls them."""
import collections
import functools

import pytest

import red.commands.checks as checks
import red.commands.distill as distill
import red.data.sources as sources
import red.data.staging as staging
import red.files as files
import red.model.arch as arch
import red.run.identity as identity
from red.cli import main
from red.config import DistillConfig


def _count(monkeypatch, counts, owner, name, label=None):
    real = getattr(owner, name)
    if isinstance(real, classmethod) or (isinstance(owner, type) and isinstance(owner.__dict__.get(name), classmethod)):
        fn = owner.__dict__[name].__func__

        def wrapped(cls, *a, **k):
            counts[label or name] += 1
            return fn(cls, *a, **k)
        monkeypatch.setattr(owner, name, classmethod(wrapped))
        return

    @functools.wraps(real)
    def wrapped(*a, **k):
        counts[label or name] += 1
        return real(*a, **k)
    monkeypatch.setattr(owner, name, wrapped)


@pytest.mark.parametrize("data", ["file", "store"])
def test_one_red_distill_checks_each_input_once(data, teacher_dirs, corpus_file, tmp_path, monkeypatch):
    t = teacher_dirs["llama"]
    src = corpus_file
    if data == "store":  # a token store made first: the run reads it, tokenizes nothing
        assert main(["prepare", "--tokenizer", str(t), "--data", str(corpus_file), "--out", str(tmp_path / "st"),
                     "--workers", "0", "--quiet"]) == 0
        src = tmp_path / "st"
    counts = collections.Counter()
    for owner, name in ((DistillConfig, "validate"), (checks, "check_distill_inputs"), (checks, "data_entries"),
                        (distill, "read_teacher_config"), (distill, "check_teacher_weights"),
                        (distill, "check_student_width"), (distill, "plan_data"), (distill, "corpus_from_stores"),
                        (staging, "corpus_from_stores"), (distill, "check_calib_samples"),
                        (files.FolderLock, "holder"), (identity.RunIdentity, "from_config"),
                        (arch.Arch, "from_config")):
        _count(monkeypatch, counts, owner, name,
               "corpus_from_stores" if name == "corpus_from_stores" else f"{getattr(owner, '__name__', owner)}.{name}")
    for name in ("split_data", "expand_source"):  # wherever they are imported from
        for owner in (sources, checks, staging):
            if hasattr(owner, name):
                _count(monkeypatch, counts, owner, name, name)
    rc = main(["distill", "--teacher", str(t), "--data", str(src), "--hidden-size", "32", "--out", str(tmp_path / "run"),
               "--steps", "1", "--seq-len", "24", "--batch-size", "2", "--eval-every", "0", "--val-batches", "1",
               "--calib-samples", "2", "--quiet"])
    assert rc == 0
    once = {k: v for k, v in counts.items() if k != "Arch.from_config"}
    assert once and all(v == 1 for v in once.values()), dict(counts)
    assert counts["split_data"] == 1 and counts["expand_source"] == (1 if data == "file" else 0)
    assert counts["DistillConfig.validate"] == 1 and counts["red.commands.checks.check_distill_inputs"] == 1
    # the plan's, and the student's own (it is built from the teacher module it is given)
    assert counts["Arch.from_config"] == 2, dict(counts)
