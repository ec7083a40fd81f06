"""Bad input, table-driven: every case is one line "red <command>: error: ...", exit
code 2, no traceback, and nothing that was on disk changes (no new output either)."""
import shutil

import pytest
import yaml

from red.cli import main
from helpers import error_table_failures, snapshot
from helpers import build_tokenizer, make_teacher


@pytest.fixture(scope="module")
def world(tmp_path_factory, teacher_dirs, corpus_file):
    """A finished run (checkpoints at steps 1 and 2) and the broken things the table uses."""
    root = tmp_path_factory.mktemp("bad")
    t, c = teacher_dirs["llama"], corpus_file
    run = root / "run"
    assert main(["distill", "--teacher", str(t), "--data", str(c), "--hidden-size", "32", "--out", str(run),
                 "--steps", "2", "--seq-len", "24", "--batch-size", "2", "--save-every", "1", "--eval-every", "0",
                 "--val-batches", "1", "--quiet"]) == 0
    w = {"t": str(t), "c": str(c), "run": run, "root": root}
    # a run whose last checkpoint was truncated on disk
    trunc = root / "run-truncated"
    shutil.copytree(run, trunc)
    f = trunc / "checkpoints/step-0000002/state.safetensors"
    f.write_bytes(f.read_bytes()[:-500])
    w["trunc"] = trunc
    # a run whose run.yaml names another teacher of the same shape / another width
    other = make_teacher(root / "other-llama", "llama", seed=7)
    w["other"] = str(other)
    for name, change in (("run-other-teacher", {"teacher": str(other)}), ("run-other-width", {"hidden_size": 16})):
        d = root / name
        shutil.copytree(run, d)
        cfg = yaml.safe_load((d / "run.yaml").read_text())
        cfg.update(change)
        (d / "run.yaml").write_text(yaml.safe_dump(cfg))
        w[name] = d
    # a teacher whose tokenizer has more tokens than its embedding has rows
    big = root / "big-tokenizer"
    shutil.copytree(t, big)
    tok = build_tokenizer()
    tok.add_tokens([f"<extra{i}>" for i in range(10)])
    tok.save_pretrained(big)
    w["bigtok"] = str(big)
    # corpora and configs
    files = {"empty.txt": b"\n \n", "binary.txt": b"\x00\x01\xff" * 200, "corpus.csv": b"a,b\n1,2\n",
             "bad.jsonl": b'{"text": "ok"}\n{not json\n', "notutf8.txt": b"caf\xe9 " * 50,
             "unknown-key.yaml": b"hidden_size: 32\nlearning_rate: 0.1\n", "wrong-type.yaml": b"warmup: soon\n",
             "broken.yaml": b"steps: [1, 2\n", "list.yaml": b"- 1\n- 2\n", "neg.yaml": b"calib_samples: -3\n",
             "notsafetensors.safetensors": b"\x08\x00\x00\x00\x00\x00\x00\x00{}garbage"}
    for name, data in files.items():
        (root / name).write_bytes(data)
    busy = root / "busy"
    busy.mkdir()
    (busy / "keep.txt").write_text("precious")
    w["busy"] = busy
    return w


def cases(w):
    t, c, r, R = w["t"], w["c"], w["run"], w["root"]
    new = str(R / "new-out")
    d = lambda *a, out=new: ["distill", "--teacher", t, "--data", c, "--hidden-size", "32", "--out", out,
                             "--steps", "2", "--seq-len", "24", "--batch-size", "2", "--quiet", *map(str, a)]
    # resuming with the run's own settings (what the run was made with, above), then one change
    resume = lambda run, *a: d("--resume", "--save-every", 1, "--eval-every", 0, "--val-batches", 1, *a, out=str(run))
    exp = lambda run, *a: ["export", "--run", str(run), "--out", new, *map(str, a)]
    return [
        # configuration
        ("unknown yaml key", d("--config", R / "unknown-key.yaml"), "unknown configuration key 'learning_rate'"),
        ("wrong yaml type", d("--config", R / "wrong-type.yaml"), "warmup='soon' is not a valid float"),
        ("malformed yaml", d("--config", R / "broken.yaml"), "not valid YAML"),
        ("yaml not a mapping", d("--config", R / "list.yaml"), "must hold a mapping"),
        ("out-of-range value", d("--config", R / "neg.yaml"), "calib_samples must be at least 1"),
        ("missing config file", d("--config", R / "nope.yaml"), "does not exist"),
        ("wrong flag type", d("--lr", "fast"), "invalid float value: 'fast'"),
        ("unknown flag", d("--learning-rate", "1"), "unrecognized arguments: --learning-rate"),
        ("bad choice", d("--init", "magic"), "init='magic' is not one of"),
        ("width too large", d("--hidden-size", 64), "between 1 and 63"),
        # paths
        ("missing teacher", ["distill", "--teacher", str(R / "nope"), "--data", c, "--hidden-size", "32",
                             "--out", new], "does not exist"),
        ("missing corpus", d("--data", R / "nope.txt"), "does not exist"),
        ("missing calibration", d("--calibration", R / "nope.safetensors"), "does not exist"),
        ("not a calibration", d("--calibration", R / "notsafetensors.safetensors"), "corrupt or truncated"),
        ("export: missing run", exp(R / "nope"), "not a red run folder"),
        ("export: missing checkpoint", exp(r, "--checkpoint", R / "nope"), "does not exist"),
        ("plan: missing teacher", ["plan", "--teacher", str(R / "nope"), "--hidden-size", "32"], "does not exist"),
        # corpora
        ("empty corpus", d("--data", R / "empty.txt"), "holds no text"),
        ("binary corpus", d("--data", R / "binary.txt"), "looks binary"),
        ("unknown format", d("--data", R / "corpus.csv"), "unknown format .csv"),
        ("malformed jsonl", d("--data", R / "bad.jsonl"), "line 2 is not valid JSON"),
        ("not utf-8", d("--data", R / "notutf8.txt"), "not UTF-8"),
        # tokenizer vs teacher
        ("tokenizer bigger than embedding", d("--teacher", w["bigtok"]), "the teacher's embedding has"),
        # checkpoints: resume
        ("resume: truncated checkpoint", resume(w["trunc"]), "corrupt or truncated"),
        ("resume: another teacher", resume(r, "--teacher", w["other"]), "belongs to another teacher"),
        ("resume: another width", resume(r, "--hidden-size", 16), "hidden_size 32 -> 16"),
        ("resume: another sequence length", resume(r, "--seq-len", 20), "seq_len 24 -> 20"),
        # checkpoints: export
        ("export: truncated checkpoint", exp(w["trunc"]), "corrupt or truncated"),
        ("export: another teacher", exp(w["run-other-teacher"]), "belongs to another teacher"),
        ("export: another width", exp(w["run-other-width"]), "hidden_size=32, this run has hidden_size=16"),
        ("export: busy folder", ["export", "--run", str(r), "--out", str(w["busy"])], "is not empty"),
        ("distill: busy folder", d(out=str(w["busy"])), "is not empty"),
    ]


def test_bad_input_table(world, capfd):
    watched = [world["run"], world["trunc"], world["run-other-teacher"], world["run-other-width"], world["busy"]]
    before = snapshot(*watched)
    failures = error_table_failures(cases(world), capfd, world["root"] / "new-out")
    assert not failures, "\n".join(failures)
    assert snapshot(*watched) == before  # nothing that existed was touched
