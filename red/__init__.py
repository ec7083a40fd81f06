"""red: RED distillation of Hugging Face LLMs (LRC students with channel-selection init).

The public Python API; each name is documented where it is defined::

    from red import (load_teacher, load_corpus, calibrate, channel_scores, select_channels,
                     build_student, ProjectedStudent, make_config, distill, train,
                     export_student, erank, layer_eranks, analyze, import_gguf)

The names are resolved on first use (PEP 562), so ``import red`` -- and with it
``red --help`` and every one-line user error -- does not pay for importing torch and
transformers; the submodule that defines a name is imported when the name is first read.
"""
from __future__ import annotations

import importlib

__version__ = "0.1.0"

# public name -> submodule defining it
_EXPORTS = {
    "analyze": "commands.analyze", "load_run_student": "commands.analyze",
    "Calibration": "train.calibration", "calibrate": "train.calibration", "channel_scores": "train.calibration",
    "PRESETS": "config", "DistillConfig": "config", "make_config": "config",
    "PackedCorpus": "data.corpus", "load_corpus": "data.corpus", "read_documents": "data.corpus",
    "prepare_store": "data.store", "TokenStore": "data.store", "prepare": "commands.prepare",
    "RedError": "errors",
    "export_student": "model.export",
    "import_gguf": "model.gguf",
    "initialize": "train.initialization", "select_channels": "train.initialization", "selection_matrix": "train.initialization",
    "erank": "model.metrics", "hidden_states": "model.metrics", "layer_eranks": "model.metrics", "mean_token_cosine": "model.metrics",
    "spectrum": "model.metrics",
    "build_student": "train.startup", "distill": "commands.distill", "export_run": "commands.export", "run_calibration": "commands.calibrate",
    "LossSettings": "model.student", "ProjectedStudent": "model.student",
    "load_teacher": "model.teacher",
    "evaluate": "train.trainer", "train": "train.trainer",
}

__all__ = [
    "analyze", "load_run_student", "Calibration", "calibrate", "channel_scores", "PRESETS", "DistillConfig",
    "make_config", "PackedCorpus", "load_corpus", "read_documents", "prepare_store", "TokenStore", "RedError", "export_student", "initialize",
    "select_channels", "selection_matrix", "erank", "hidden_states", "layer_eranks", "mean_token_cosine",
    "spectrum", "build_student", "distill", "export_run", "run_calibration", "LossSettings", "ProjectedStudent",
    "load_teacher", "evaluate", "train", "import_gguf", "prepare",
]


def __getattr__(name: str):
    mod = _EXPORTS.get(name)
    if mod is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{mod}", __name__), name)
    globals()[name] = value  # cache: later reads are plain attribute look-ups
    return value


def __dir__():
    return sorted(set(globals()) | set(__all__))
