"""Only safetensors/JSON/YAML are read, remote code stays off, nothing is written outside
the output folder."""
import re
from pathlib import Path

from red.cli import main
from red.config import DistillConfig

SRC = Path(__file__).resolve().parents[1] / "red"


def test_no_pickle_is_ever_read():
    for f in SRC.rglob("*.py"):
        text = f.read_text()
        assert "import pickle" not in text and "pickle.load" not in text, f
        assert "broadcast_object_list" not in text and "all_gather_object" not in text, f  # pickled collectives
        for call in re.findall(r"torch\.load\([^)]*\)", text):
            assert "weights_only=True" in call, (f, call)
        assert "torch.distributed.checkpoint" not in text, f  # DCP metadata is pickled


def test_remote_code_is_off_unless_asked():
    assert DistillConfig().trust_remote_code is False
    for f in SRC.rglob("*.py"):
        assert "trust_remote_code=True" not in f.read_text(), f


def test_distill_and_export_write_only_inside_their_output(teacher_dirs, corpus_file, tmp_path):
    (tmp_path / "a").mkdir()
    run = tmp_path / "a/run"
    assert main(["distill", "--teacher", str(teacher_dirs["qwen3"]), "--data", str(corpus_file), "--hidden-size", "32",
                 "--out", str(run), "--steps", "2", "--seq-len", "24", "--batch-size", "2", "--eval-every", "0",
                 "--val-batches", "1", "--quiet"]) == 0
    assert [p.name for p in (tmp_path / "a").iterdir()] == ["run"]
    dot = {p.name for p in run.rglob("*") if p.name.startswith(".")}
    assert dot <= {".red-run.json", ".red-lock", ".red-export.json"}, dot  # red's own records, no temporaries
    (tmp_path / "b").mkdir()
    assert main(["export", "--run", str(run), "--out", str(tmp_path / "b/exp")]) == 0
    assert [p.name for p in (tmp_path / "b").iterdir()] == ["exp"]
    assert (tmp_path / "b/exp/model.safetensors").is_file()
    assert not list(run.parent.parent.glob("*.tmp*"))
