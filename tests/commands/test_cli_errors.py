"""Every CLI path ends in one line for user errors, table-driven.

The paths not already in test_bad_input.py / test_input_checks.py: each row runs one
subcommand over one bad input through ``red.cli.main`` in-process and expects exit code 2,
exactly one stderr line "red <command>: error: ..." naming the problem, no traceback, the
row's output path not created and nothing that was on disk changed.

Also here: companion files carry the teacher's fingerprint. A calibration file made on
another teacher (another architecture, or the same architecture with other weights) of the
same width is refused by `red distill --calibration`; `red analyze` refuses a --teacher that
is not its run's teacher, and an exported --student of another architecture or depth.
Calibration files written before the fingerprint was stored are accepted on their width.
"""
import json
from pathlib import Path

import pytest

from red.train.calibration import Calibration, check_calibration_teacher
from red.cli import main
from red.errors import RedError
from red.model.teacher import teacher_fingerprint
from helpers import error_table_failures, run_cli_err, snapshot
from helpers import make_teacher


@pytest.fixture(scope="module")
def world(tmp_path_factory, teacher_dirs, corpus_file):
    root = tmp_path_factory.mktemp("cli-errors")
    t, q, c = str(teacher_dirs["llama"]), str(teacher_dirs["qwen2"]), str(corpus_file)
    w = {"t": t, "q": q, "c": c, "root": root}
    run = root / "run"
    assert main(["distill", "--teacher", t, "--data", c, "--hidden-size", "32", "--out", str(run), "--steps", "1",
                 "--seq-len", "24", "--batch-size", "2", "--save-every", "1", "--eval-every", "0",
                 "--val-batches", "1", "--calib-samples", "2", "--quiet"]) == 0
    w["run"] = run
    other = make_teacher(root / "other-llama", "llama", seed=7)  # same shape as t, other weights
    w["other"] = str(other)
    deeper = make_teacher(root / "deep-llama", "llama", seed=3, layers=3)  # an "exported model" of another depth
    w["deep"] = str(deeper)
    for name, teacher in (("cal-qwen2", q), ("cal-other", other), ("cal-own", t)):
        f = root / f"{name}.safetensors"
        assert main(["calibrate", "--teacher", str(teacher), "--data", c, "--out", str(f), "--seq-len", "24",
                     "--calib-samples", "2", "--quiet"]) == 0
        w[name] = f
    (root / "empty").mkdir()
    w["empty"] = root / "empty"
    noconf = root / "no-config"
    noconf.mkdir()
    (noconf / "README.md").write_text("not a model")
    w["noconf"] = noconf
    gpt2 = root / "gpt2"
    gpt2.mkdir()
    (gpt2 / "config.json").write_text(json.dumps({"model_type": "gpt2", "n_embd": 64, "n_layer": 2, "n_head": 4,
                                                  "vocab_size": 80}))
    w["gpt2"] = gpt2
    exists = root / "exists.safetensors"
    exists.write_bytes(b"precious")
    w["exists"] = exists
    return w


def cases(w):
    t, q, c, R = w["t"], w["q"], w["c"], w["root"]
    new = R / "new-out"
    cal = lambda *a, teacher=t, data=c, out=new / "cal.safetensors": (
        ["calibrate", "--teacher", teacher, "--data", data, "--out", out, "--seq-len", "24", "--quiet", *a])
    exp = lambda *a: ["export", "--run", w["run"], "--out", new, *a]
    an = lambda *a, teacher=t, student=w["run"], data=c: (
        ["analyze", "--teacher", teacher, "--student", student, "--data", data, "--seq-len", "24", "--samples", "2",
         "--out", new, *a])
    ev = lambda model, *a: ["eval", "--model", model, "--n-per-k", "2", "--out", new / "eval.json", *a]
    pl = lambda *a, teacher=t: ["plan", "--teacher", teacher, "--hidden-size", "32", *a]
    be = lambda *a, teacher=t, hs="32": ["bench", "--teacher", teacher, "--hidden-size", hs, "--seq-len", "8",
                                         "--quiet", *a]
    de = lambda *a: ["demo", "--out", new, "--quiet", *a]
    di = lambda *a: ["distill", "--teacher", t, "--data", c, "--hidden-size", "32", "--out", new, "--steps", "1",
                     "--seq-len", "24", "--batch-size", "2", "--quiet", *a]
    return [
        # red calibrate
        ("calibrate: missing teacher", cal(teacher=R / "nope"), "does not exist"),
        ("calibrate: missing data", cal(data=R / "nope.txt"), "does not exist"),
        ("calibrate: out not .safetensors", cal(out=new / "cal.bin"), "must end in .safetensors"),
        ("calibrate: out exists", cal(out=w["exists"]), "already exists"),
        ("calibrate: out inside the teacher folder", cal(out=Path(t) / "cal.safetensors"), "teacher folder"),
        # red export
        ("export: invalid dtype", exp("--dtype", "int8"), "invalid choice: 'int8'"),
        ("export: not a checkpoint", exp("--checkpoint", w["empty"]), "is not a red checkpoint"),
        # red analyze
        ("analyze: missing teacher", an(teacher=R / "nope"), "does not exist"),
        ("analyze: empty student folder", an(student=w["empty"]), f"student folder {w['empty']}"),
        ("analyze: student of another architecture", an(student=q), "model_type"),
        ("analyze: student of another depth", an(student=w["deep"]), "layers"),
        ("analyze: missing data", an(data=R / "nope.txt"), "does not exist"),
        ("analyze: another run's teacher", an(teacher=w["other"]), "is not the teacher of run"),
        ("analyze: another architecture's teacher", an(teacher=q), "is not the teacher of run"),
        # red eval
        ("eval: missing model", ev(R / "nope"), "does not exist"),
        ("eval: not a model folder", ev(w["noconf"]), "no config.json"),
        # red plan
        ("plan: no config.json", pl(teacher=w["noconf"]), "no config.json"),
        ("plan: unsupported architecture", pl(teacher=w["gpt2"]), "'gpt2' is not supported"),
        ("plan: 0 gpus", pl("--gpus", "0"), "--gpus must be at least 1"),
        # red bench
        ("bench: missing teacher", be(teacher=R / "nope"), "does not exist"),
        ("bench: width not below D", be(hs="64"), "--hidden-size 64 must be between 1 and 63"),
        # red demo
        ("demo: missing teacher", de("--teacher", R / "nope"), f"{R / 'nope'}"),
        ("demo: unknown preset", de("--presets", "magic"), "unknown preset 'magic'"),
        ("demo: bad option type", de("--steps", "many"), "invalid int value: 'many'"),
        # red distill: calibration files of another teacher of the same width
        ("distill: calibration of another architecture", di("--calibration", w["cal-qwen2"]),
         "was made on another teacher"),
        ("distill: calibration of another llama", di("--calibration", w["cal-other"]), "was made on another teacher"),
    ]


def test_cli_error_table(world, capfd):
    watched = [world["run"], world["empty"], world["noconf"], world["exists"], Path(world["t"]),
               world["cal-qwen2"], world["cal-other"]]
    before = snapshot(*watched)
    failures = error_table_failures(cases(world), capfd, world["root"] / "new-out")
    assert not failures, "\n".join(failures)
    assert snapshot(*watched) == before  # nothing that existed was touched


def test_calibration_carries_the_teacher(world):
    cal = Calibration.load(world["cal-own"])
    assert cal.meta["teacher_fingerprint"] == teacher_fingerprint(world["t"])
    assert cal.meta["model_type"] == "llama" and cal.meta["hidden_size"] == 64 and cal.meta["num_layers"] == 2
    run_cal = Calibration.load(world["run"] / "calibration.safetensors")  # made inside `red distill`
    assert run_cal.meta["teacher_fingerprint"] == teacher_fingerprint(world["t"])


def test_calibration_teacher_check(world, tmp_path):
    from red.model.teacher import read_teacher_config
    from red.model.arch import Arch

    arch = Arch.from_config(read_teacher_config(world["t"]))
    check_calibration_teacher(Calibration.load(world["cal-own"]), world["cal-own"], world["t"], arch)
    with pytest.raises(RedError, match="was made on another teacher"):
        check_calibration_teacher(Calibration.load(world["cal-other"]), world["cal-other"], world["t"], arch)
    # a file written before the fingerprint was stored: its width alone is checked
    old = Calibration.load(world["cal-other"])
    old.meta = {k: v for k, v in old.meta.items() if k not in ("teacher_fingerprint", "num_layers")}
    old.save(tmp_path / "old.safetensors")
    old = Calibration.load(tmp_path / "old.safetensors")
    check_calibration_teacher(old, tmp_path / "old.safetensors", world["t"], arch)
    narrow = Calibration(stats=old.stats[..., :32], tokens_per_seq=old.tokens_per_seq, points=old.points,
                         meta=dict(old.meta, hidden_size=32))
    with pytest.raises(RedError, match="was made for width 32"):
        check_calibration_teacher(narrow, "narrow.safetensors", world["t"], arch)


def test_distill_accepts_its_own_teachers_calibration(world, tmp_path, capfd):
    rc, err = run_cli_err(["distill", "--teacher", world["t"], "--data", world["c"], "--hidden-size", "32",
                    "--out", tmp_path / "run", "--steps", "1", "--seq-len", "24", "--batch-size", "2",
                    "--eval-every", "0", "--val-batches", "1", "--calibration", world["cal-own"], "--quiet"], capfd)
    assert rc == 0, err


def test_analyze_accepts_the_runs_teacher(world, tmp_path, capfd):
    rc, err = run_cli_err(["analyze", "--teacher", world["t"], "--student", world["run"], "--data", world["c"],
                    "--seq-len", "24", "--samples", "2"], capfd)
    assert rc == 0, err
    rc, err = run_cli_err(["analyze", "--teacher", world["t"], "--student", world["run"] / "student", "--data", world["c"],
                    "--seq-len", "24", "--samples", "2"], capfd)
    assert rc == 0, err


@pytest.mark.parametrize("change, needle", [({"attention_bias": True}, "attention_bias"),
                                            ({"mlp_bias": True}, "mlp_bias"),
                                            ({"use_sliding_window": True}, "sliding-window")])
def test_plan_refuses_the_teachers_distill_refuses(change, needle, teacher_dirs, corpus_file, tmp_path, capfd):
    import json
    import shutil

    t = tmp_path / "teacher"
    shutil.copytree(teacher_dirs["llama"], t)
    cfg = json.loads((t / "config.json").read_text())
    cfg.update(change)
    (t / "config.json").write_text(json.dumps(cfg))
    for argv in (["plan", "--teacher", str(t), "--hidden-size", "32"],
                 ["distill", "--teacher", str(t), "--data", str(corpus_file), "--hidden-size", "32",
                  "--out", str(tmp_path / "run")]):
        rc = main(argv)
        err = [line for line in capfd.readouterr().err.splitlines() if line.strip()]
        assert rc == 2 and len(err) == 1 and needle in err[0], (argv[0], err)
    assert not (tmp_path / "run").exists()
