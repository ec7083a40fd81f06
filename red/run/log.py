"""Live metrics sinks beside the JSONL record (``--report-to jsonl,tensorboard,wandb``).

``metrics.jsonl`` is always written: it is the run's record (resume truncates it, plots and
``result.json`` read it). The sinks here only mirror each row for live viewing:

* ``tensorboard``: ``OUT/tensorboard/`` through ``torch.utils.tensorboard.SummaryWriter``
  (``pip install 'red[tensorboard]'``); the config is logged once as hyper-parameters and
  as the text of its YAML.
* ``wandb``: Weights & Biases under ``OUT/wandb/``, offline unless ``WANDB_MODE`` says
  otherwise (``pip install 'red[wandb]'``); the config is the run's ``config``.

A row is ``{"step": int, name: number, ...}``; every other numeric key is one scalar. Its
tag in the sinks (``sink_tag``) is grouped the way transformers' Trainer groups its own
(``train/loss``, ``eval/loss``), so dashboards put training and validation curves in two
sections: a validation number (``val_X`` and the eRank of the validation batch) is
``eval/X``, anything else ``train/KEY`` ("train/loss", "train/clone/q", "train/lr",
"train/grad_norm", "train/tokens_per_s", "eval/loss", "eval/erank_last"). The JSONL keys
stay as they are: they are the record that plots and ``result.json`` read.
"""
from __future__ import annotations

import json

import importlib
import math
import os
from pathlib import Path

from red.errors import RedError
from red.config import JSONL, REPORT_TO, TENSORBOARD, WANDB, parse_report_to


#: keys of a metrics row that ``red.train.trainer.evaluate`` writes without the ``val_`` prefix
EVAL_KEYS = ("erank_last",)


def sink_tag(key: str) -> str:
    """The TensorBoard / W&B tag of a metrics row's key: ``eval/...`` for validation
    numbers, ``train/...`` for the rest (see the module's docstring)."""
    if key.startswith("val_"):
        return "eval/" + key[len("val_"):]
    return ("eval/" if key in EVAL_KEYS else "train/") + key


def scalars(row: dict) -> dict[str, float]:
    """The numeric, non-step entries of a metrics row as floats (bools and text left out)."""
    out = {}
    for k, v in row.items():
        if k == "step" or isinstance(v, bool):
            continue
        if isinstance(v, (int, float)):
            out[k] = float(v)
        elif hasattr(v, "item") and getattr(v, "numel", lambda: 0)() == 1:
            out[k] = float(v.item())
    return out


class Sink:
    """One live destination of metrics rows."""

    def log(self, row: dict) -> None:  # pragma: no cover - interface
        raise NotImplementedError

    def close(self) -> None:
        pass


def _import(module: str, extra: str):
    try:
        mod = importlib.import_module(module)
    except ImportError:
        mod = None
    if mod is None:
        raise RedError(f"--report-to {extra} needs `pip install 'red[{extra}]'`")
    return mod


def _hparam_value(v):
    if isinstance(v, (bool, int, float, str)) and not (isinstance(v, float) and not math.isfinite(v)):
        return v
    return "null" if v is None else str(v)


class TensorBoardSink(Sink):
    """Scalars into ``run_dir/tensorboard`` (one event file per writer)."""

    def __init__(self, run_dir: str | Path, config: dict | None = None, purge_step: int | None = None):
        _import("tensorboard", TENSORBOARD)  # torch.utils.tensorboard needs the tensorboard package
        try:
            from torch.utils.tensorboard import SummaryWriter
            from torch.utils.tensorboard.summary import hparams
        except ImportError:
            raise RedError(f"--report-to {TENSORBOARD} needs `pip install 'red[{TENSORBOARD}]'`") from None
        self.logdir = Path(run_dir) / TENSORBOARD
        self.writer = SummaryWriter(log_dir=str(self.logdir), purge_step=purge_step)
        if config:
            import yaml

            self.writer.add_text("config", "```\n" + yaml.safe_dump(config, sort_keys=False) + "```", 0)
            # hparams in this same event file (SummaryWriter.add_hparams would open a second run)
            h = {k: _hparam_value(v) for k, v in config.items()}
            for summary in hparams(h, {sink_tag("loss"): 0.0, sink_tag("val_loss"): 0.0}):
                self.writer.file_writer.add_summary(summary)
        self.writer.flush()

    def log(self, row: dict) -> None:
        step = int(row.get("step", 0))
        for k, v in scalars(row).items():
            self.writer.add_scalar(sink_tag(k), v, step)
        self.writer.flush()

    def close(self) -> None:
        self.writer.close()


class WandbSink(Sink):
    """A Weights & Biases run under ``run_dir/wandb``; offline unless WANDB_MODE is set."""

    def __init__(self, run_dir: str | Path, config: dict | None = None):
        wandb = _import("wandb", WANDB)
        self.wandb = wandb
        self.run = wandb.init(project="red", dir=str(run_dir), config=dict(config or {}),
                              mode=os.environ.get("WANDB_MODE", "offline"))

    def log(self, row: dict) -> None:
        self.wandb.log({sink_tag(k): v for k, v in scalars(row).items()}, step=int(row.get("step", 0)))

    def close(self) -> None:
        self.wandb.finish()


def sink_folders(names) -> list[str]:
    """Top-level entries of the run folder the sinks ``names`` write."""
    return [n for n in (TENSORBOARD, WANDB) if n in names]


def open_sinks(names, run_dir: str | Path, config_dict: dict | None = None,
               start_step: int | None = None) -> list[Sink]:
    """Open the live sinks among ``names`` (a list or a ``--report-to`` string; "jsonl" is
    the record, written by ``red.train.trainer.MetricsLog``, and opens nothing here). Every
    optional package is checked before any sink is opened, so a missing one stops the run
    before its first step. ``start_step`` (a resumed run) hides TensorBoard events past it."""
    if isinstance(names, str):
        names = parse_report_to(names)
    names = [n for n in names if n != JSONL]
    for n in names:
        if n not in REPORT_TO:
            raise RedError(f"unknown metrics sink {n!r}; pick from {', '.join(REPORT_TO)}")
    if TENSORBOARD in names:
        _import("tensorboard", TENSORBOARD)
    if WANDB in names:
        _import("wandb", WANDB)
    sinks: list[Sink] = []
    try:
        for n in names:
            if n == TENSORBOARD:
                sinks.append(TensorBoardSink(run_dir, config_dict, purge_step=(start_step + 1) if start_step else None))
            elif n == WANDB:
                sinks.append(WandbSink(run_dir, config_dict))
    except BaseException:
        for s in sinks:
            s.close()
        raise
    return sinks


class MetricsLog:
    """Append-only JSONL log; one JSON object per line.

    The JSONL file is the run's record; ``sinks`` (``red.run.log``: TensorBoard,
    W&B) get a copy of every row written, on the writing rank only. ``close()`` closes them."""

    def __init__(self, path: Path, enabled: bool = True, sinks: list | None = None):
        self.path = path
        self.enabled = enabled  # False on ranks other than 0: rows are kept, nothing is written
        self.rows: list[dict] = []
        self.sinks = list(sinks or []) if enabled else []

    def write(self, row: dict) -> None:
        row = {k: (float(v) if hasattr(v, "item") else v) for k, v in row.items()}
        self.rows.append(row)
        if not self.enabled:
            return
        with open(self.path, "a") as f:
            f.write(json.dumps(row) + "\n")
        for sink in self.sinks:
            sink.log(row)

    def close(self) -> None:
        """Close the live sinks (idempotent); the rows stay readable."""
        sinks, self.sinks = self.sinks, []
        for sink in sinks:
            sink.close()
