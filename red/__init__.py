"""red: RED distillation of Hugging Face LLMs (LRC students with channel-selection init).

The public Python API; each name is documented where it is defined::

    from red import (load_teacher, load_corpus, calibrate, channel_scores, select_channels,
                     build_student, ProjectedStudent, make_config, distill, train,
                     export_student, erank, layer_eranks, analyze)
"""
from .analyze import analyze, load_run_student
from .calibration import Calibration, calibrate, channel_scores
from .config import PRESETS, DistillConfig, make_config
from .data import PackedCorpus, load_corpus, read_documents
from .errors import RedError
from .export import export_student
from .initialization import initialize, select_channels, selection_matrix
from .metrics import erank, hidden_states, layer_eranks, mean_token_cosine, spectrum
from .pipeline import build_student, distill, export_run, run_calibration
from .student import LossSettings, ProjectedStudent
from .teacher import load_teacher
from .trainer import evaluate, train

__version__ = "0.1.0"

__all__ = [
    "analyze", "load_run_student", "Calibration", "calibrate", "channel_scores", "PRESETS", "DistillConfig",
    "make_config", "PackedCorpus", "load_corpus", "read_documents", "RedError", "export_student", "initialize",
    "select_channels", "selection_matrix", "erank", "hidden_states", "layer_eranks", "mean_token_cosine",
    "spectrum", "build_student", "distill", "export_run", "run_calibration", "LossSettings", "ProjectedStudent",
    "load_teacher", "evaluate", "train",
]
