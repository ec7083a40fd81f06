"""Live metrics sinks (--report-to): TensorBoard read back from its event file, W&B through a
fake module, bad names refused on one line. metrics.jsonl stays the record."""
import json
import sys
import types

import pytest
import yaml

from helpers import one_line
from red.cli import main
from red.errors import RedError
from red.run.log import open_sinks
from red.config import parse_report_to

ARGS = ["--hidden-size", "32", "--steps", "4", "--seq-len", "24", "--batch-size", "2", "--save-every", "2",
        "--eval-every", "2", "--val-batches", "1", "--log-every", "1", "--quiet"]


def distill(teacher, data, out, *extra):
    return main(["distill", "--teacher", str(teacher), "--data", str(data), "--out", str(out), *ARGS, *extra])


def jsonl_rows(out):
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def tag_of(key: str) -> str:
    """The tag a sink must give a JSONL key, written out here as transformers' Trainer
    names its own: validation numbers under eval/, the rest under train/."""
    if key.startswith("val_"):
        return "eval/" + key[4:]
    return "eval/erank_last" if key == "erank_last" else "train/" + key


def expected_scalars(rows) -> dict[str, dict[int, float]]:
    """{tag: {step: value}} of every numeric non-step key of the JSONL rows."""
    want: dict[str, dict[int, float]] = {}
    for r in rows:
        for k, v in r.items():
            if k != "step" and isinstance(v, (int, float)) and not isinstance(v, bool):
                want.setdefault(tag_of(k), {})[r["step"]] = float(v)
    return want


#: the tags a run must show, by name (the JSONL keys: loss ... erank_last, unchanged)
TRAIN_TAGS = {"train/loss", "train/kl", "train/lm", "train/clone", "train/lr", "train/grad_norm",
              "train/tokens_per_s"}
EVAL_TAGS = {"eval/loss", "eval/kl", "eval/lm", "eval/clone", "eval/erank_last"}


def test_tensorboard_scalars_match_jsonl(teacher_dirs, corpus_file, tmp_path):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    out = tmp_path / "run"
    assert distill(teacher_dirs["llama"], corpus_file, out, "--report-to", "jsonl,tensorboard") == 0
    rows = jsonl_rows(out)
    train_rows = [r for r in rows if "loss" in r]
    assert [r["step"] for r in train_rows] == [1, 2, 3, 4]
    events = list((out / "tensorboard").glob("events.out.tfevents.*"))
    assert len(events) == 1, events

    acc = EventAccumulator(str(out / "tensorboard"), size_guidance={"scalars": 0, "tensors": 0})
    acc.Reload()
    tags = set(acc.Tags()["scalars"])
    want = expected_scalars(rows)
    # every loss term of the training rows, plus the schedule, speed and validation numbers
    need = {tag_of(k) for k in train_rows[0]} - {"train/step"}
    assert TRAIN_TAGS | EVAL_TAGS <= tags, tags
    assert all(t.startswith(("train/", "eval/")) for t in tags), tags
    assert any(t.startswith("train/clone/") for t in tags) and any(t.startswith("eval/clone/") for t in tags), tags
    assert {"loss", "val_loss", "erank_last", "lr"} <= {k for r in rows for k in r}  # the JSONL keys are unchanged
    assert need <= tags and set(want) == tags, (need - tags, set(want) ^ tags)
    for tag, by_step in want.items():
        got = {e.step: e.value for e in acc.Scalars(tag)}
        assert set(got) == set(by_step), (tag, got, by_step)
        for step, v in by_step.items():
            assert got[step] == pytest.approx(v, rel=1e-6, abs=1e-6), (tag, step, got[step], v)
    assert set(want["eval/loss"]) == {0, 2, 4}

    # the config went in once, as text (its YAML) and as hyper-parameters
    assert "config/text_summary" in acc.Tags()["tensors"]
    text = acc.Tensors("config/text_summary")[0].tensor_proto.string_val[0].decode()
    cfg = yaml.safe_load(text.strip("`\n"))
    assert cfg["hidden_size"] == 32 and cfg["report_to"] == "jsonl,tensorboard"
    from tensorboard.plugins.hparams import plugin_data_pb2
    plugin = acc.PluginTagToContent("hparams")
    experiment = plugin_data_pb2.HParamsPluginData.FromString(plugin["_hparams_/experiment"])
    assert {m.name.tag for m in experiment.experiment.metric_infos} == {"train/loss", "eval/loss"}
    session = plugin_data_pb2.HParamsPluginData.FromString(plugin["_hparams_/session_start_info"])
    assert session.session_start_info.hparams["hidden_size"].number_value == 32
    assert session.session_start_info.hparams["preset"].string_value == "red"
    # the run owns its TensorBoard folder (a later --overwrite clears it with the rest)
    assert "tensorboard" in json.loads((out / ".red-run.json").read_text())["entries"]


def test_default_is_jsonl_only(teacher_dirs, corpus_file, tmp_path):
    out = tmp_path / "run"
    assert distill(teacher_dirs["llama"], corpus_file, out) == 0
    assert not (out / "tensorboard").exists() and not (out / "wandb").exists()
    assert yaml.safe_load((out / "run.yaml").read_text())["report_to"] == "jsonl"


def test_bad_report_to_is_one_line(teacher_dirs, corpus_file, tmp_path, capfd):
    out = tmp_path / "run"
    one_line(capfd, distill(teacher_dirs["llama"], corpus_file, out, "--report-to", "foo"),
             "report_to", "foo", "jsonl, tensorboard, wandb")
    one_line(capfd, distill(teacher_dirs["llama"], corpus_file, out, "--report-to", "jsonl,tensorbord"),
             "tensorbord")
    assert not out.exists() or not any(out.iterdir())


def test_parse_report_to():
    assert parse_report_to("jsonl") == ["jsonl"]
    assert parse_report_to(" TensorBoard , wandb,wandb,") == ["tensorboard", "wandb"]
    assert parse_report_to("") == []
    with pytest.raises(RedError, match="not one of"):
        parse_report_to("jsonl,mlflow")


def test_wandb_missing_stops_before_step_one(teacher_dirs, corpus_file, tmp_path, capfd, monkeypatch):
    monkeypatch.setitem(sys.modules, "wandb", None)  # import wandb -> ImportError
    with pytest.raises(RedError, match=r"--report-to wandb needs `pip install 'red\[wandb\]'`"):
        open_sinks(["jsonl", "wandb"], tmp_path, {})
    out = tmp_path / "run"
    err = one_line(capfd, distill(teacher_dirs["llama"], corpus_file, out, "--report-to", "jsonl,wandb"),
                   "--report-to wandb needs `pip install 'red[wandb]'`")
    assert "Traceback" not in err
    assert not (out / "checkpoints").exists() or not any((out / "checkpoints").iterdir())
    assert not (out / "metrics.jsonl").exists()


class FakeWandb(types.ModuleType):
    def __init__(self):
        super().__init__("wandb")
        self.calls = []

    def init(self, **kw):
        self.calls.append(("init", kw))
        return object()

    def log(self, data, step=None):
        self.calls.append(("log", dict(data), step))

    def finish(self):
        self.calls.append(("finish",))


def test_wandb_gets_config_and_scalars(teacher_dirs, corpus_file, tmp_path, monkeypatch):
    fake = FakeWandb()
    monkeypatch.setitem(sys.modules, "wandb", fake)
    monkeypatch.delenv("WANDB_MODE", raising=False)
    out = tmp_path / "run"
    assert distill(teacher_dirs["llama"], corpus_file, out, "--report-to", "wandb") == 0
    kinds = [c[0] for c in fake.calls]
    assert kinds[0] == "init" and kinds[-1] == "finish" and kinds.count("init") == kinds.count("finish") == 1
    init = fake.calls[0][1]
    assert init["mode"] == "offline" and init["project"] == "red" and init["dir"] == str(out)
    assert init["config"]["hidden_size"] == 32 and init["config"]["steps"] == 4
    logged: dict[str, dict[int, float]] = {}
    for c in fake.calls:
        if c[0] == "log":
            assert "step" not in c[1]
            for k, v in c[1].items():
                logged.setdefault(k, {})[c[2]] = v
    assert logged == expected_scalars(jsonl_rows(out))  # jsonl written too: it is the record
    assert TRAIN_TAGS | EVAL_TAGS <= set(logged)


def test_wandb_mode_from_environment(tmp_path, monkeypatch):
    fake = FakeWandb()
    monkeypatch.setitem(sys.modules, "wandb", fake)
    monkeypatch.setenv("WANDB_MODE", "online")
    (sink,) = open_sinks("wandb", tmp_path, {"a": 1})
    sink.log({"step": 3, "loss": 1.5, "note": "text"})
    sink.close()
    assert fake.calls == [("init", {"project": "red", "dir": str(tmp_path), "config": {"a": 1}, "mode": "online"}),
                          ("log", {"train/loss": 1.5}, 3), ("finish",)]


def test_tensorboard_continues_on_resume(teacher_dirs, corpus_file, tmp_path):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    out = tmp_path / "run"
    assert distill(teacher_dirs["llama"], corpus_file, out, "--report-to", "tensorboard") == 0
    assert distill(teacher_dirs["llama"], corpus_file, out, "--report-to", "tensorboard", "--resume",
                   "--steps", "6", "--allow-change", "steps") == 0
    acc = EventAccumulator(str(out / "tensorboard"), size_guidance={"scalars": 0})
    acc.Reload()
    want = expected_scalars(jsonl_rows(out))
    assert sorted(want["train/loss"]) == [1, 2, 3, 4, 5, 6]
    for tag, by_step in want.items():
        got = {e.step: e.value for e in acc.Scalars(tag)}
        assert got == pytest.approx(by_step, rel=1e-6, abs=1e-6), tag
