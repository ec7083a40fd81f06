"""red: RED distillation of Hugging Face LLMs (LRC students with channel-selection init).

The public Python API; each name is documented where it is defined::

    from red import (load_teacher, load_corpus, calibrate, channel_scores, select_channels,
                     build_student, ProjectedStudent, make_config, distill, train,
                     export_student, erank, layer_eranks, analyze)

The names are resolved on first use (PEP 562), so ``import red`` -- and with it
``red --help`` and every one-line user error -- does not pay for importing torch and
transformers; the submodule that defines a name is imported when the name is first read.
"""
from __future__ import annotations

import importlib
import sys
import types

__version__ = "0.1.0"

# public name -> submodule defining it
_EXPORTS = {
    "analyze": "analyze", "load_run_student": "analyze",
    "Calibration": "calibration", "calibrate": "calibration", "channel_scores": "calibration",
    "PRESETS": "config", "DistillConfig": "config", "make_config": "config",
    "PackedCorpus": "data", "load_corpus": "data", "read_documents": "data",
    "prepare_store": "store", "TokenStore": "store",
    "RedError": "errors",
    "export_student": "export",
    "initialize": "initialization", "select_channels": "initialization", "selection_matrix": "initialization",
    "erank": "metrics", "hidden_states": "metrics", "layer_eranks": "metrics", "mean_token_cosine": "metrics",
    "spectrum": "metrics",
    "build_student": "pipeline", "distill": "pipeline", "export_run": "pipeline", "run_calibration": "pipeline",
    "LossSettings": "student", "ProjectedStudent": "student",
    "load_teacher": "teacher",
    "evaluate": "trainer", "train": "trainer",
}

__all__ = [
    "analyze", "load_run_student", "Calibration", "calibrate", "channel_scores", "PRESETS", "DistillConfig",
    "make_config", "PackedCorpus", "load_corpus", "read_documents", "prepare_store", "TokenStore", "RedError", "export_student", "initialize",
    "select_channels", "selection_matrix", "erank", "hidden_states", "layer_eranks", "mean_token_cosine",
    "spectrum", "build_student", "distill", "export_run", "run_calibration", "LossSettings", "ProjectedStudent",
    "load_teacher", "evaluate", "train",
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


class _RedPackage(types.ModuleType):
    """`red.analyze` is the function ``analyze`` (as when this package imported it eagerly),
    not the submodule of the same name: importing the submodule must not rebind it."""

    def __setattr__(self, name, value):
        if isinstance(value, types.ModuleType) and _EXPORTS.get(name) == name:
            return  # the submodule stays reachable as sys.modules["red.<name>"]
        super().__setattr__(name, value)


sys.modules[__name__].__class__ = _RedPackage
