"""matplotlib is the optional `plots` extra: without it, commands that plot say so in one
line and still write their JSON; with it, they write PNGs."""
import json
import sys

import pytest

from red.cli import main


def _no_matplotlib(monkeypatch):
    # a None entry in sys.modules makes `import matplotlib` raise ImportError
    for name in ("matplotlib", "matplotlib.pyplot"):
        monkeypatch.setitem(sys.modules, name, None)


def _analyze(teacher_dirs, corpus_file, out):
    t = str(teacher_dirs["llama"])
    return main(["analyze", "--teacher", t, "--student", t, "--data", str(corpus_file), "--samples", "2",
                 "--seq-len", "24", "--out", str(out)])


def test_analyze_without_matplotlib_writes_json_and_says_so(teacher_dirs, corpus_file, tmp_path, monkeypatch,
                                                            capsys):
    _no_matplotlib(monkeypatch)
    out = tmp_path / "an"
    assert _analyze(teacher_dirs, corpus_file, out) == 0
    rep = json.loads((out / "analysis.json").read_text())
    assert len(rep["teacher_erank"]) == 3
    assert not list(out.glob("*.png"))
    err = [line for line in capsys.readouterr().err.splitlines() if "matplotlib" in line]
    assert err == ["red analyze: matplotlib is not installed; wrote analysis.json without plots "
                   "(pip install 'red[plots]')"]


def test_analyze_with_matplotlib_writes_pngs(teacher_dirs, corpus_file, tmp_path, capsys):
    pytest.importorskip("matplotlib")
    out = tmp_path / "an"
    assert _analyze(teacher_dirs, corpus_file, out) == 0
    assert (out / "analysis.json").is_file()
    assert (out / "erank.png").stat().st_size > 1000
    assert "matplotlib" not in capsys.readouterr().err


def test_plot_helper_without_and_with_matplotlib(monkeypatch, capsys):
    from red.commands.plots import pyplot

    with monkeypatch.context() as m:
        _no_matplotlib(m)
        assert pyplot("demo", "report.json") is None
    assert capsys.readouterr().err == ("red demo: matplotlib is not installed; wrote report.json without plots "
                                       "(pip install 'red[plots]')\n")
    pytest.importorskip("matplotlib")
    plt = pyplot("demo", "report.json")
    assert plt is not None and hasattr(plt, "subplots") and capsys.readouterr().err == ""


def test_demo_plots_skip_without_matplotlib(tmp_path, monkeypatch, capsys):
    from red.commands.demo.run import plot_demo

    _no_matplotlib(monkeypatch)
    assert plot_demo({"summary": {}, "runs": []}, tmp_path, [1, 2]) == []
    assert not list(tmp_path.iterdir())
    assert "red demo: matplotlib is not installed; wrote report.json without plots" in capsys.readouterr().err
