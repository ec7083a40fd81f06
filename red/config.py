"""Run configuration: one dataclass, presets, YAML files and command-line overrides.

Resolution order (later wins): dataclass defaults < preset < YAML file < explicit
overrides. The effective configuration is written to ``run.yaml`` so a run can be
repeated with ``red distill --config OUT/run.yaml``.
"""
from __future__ import annotations

import dataclasses
import math
import typing
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Optional

import yaml

from .errors import RedError

INITS = ("red", "lrc", "orthogonal", "random-select")
SCORES = ("minitron", "rms")
CLONE_NORMS = ("teacher-ms", "none")
KERNELS = ("auto", "triton", "torch")
PRECISION_CHOICES = ("auto", "bf16", "fp32")


@dataclass
class DistillConfig:
    """Everything a distillation run needs. Field docs double as ``--help`` text."""

    # what to distill
    teacher: str = field(default="", metadata={"help": "local folder of a Llama/Qwen2/Qwen3 Hugging Face checkpoint (safetensors)"})
    data: str = field(default="", metadata={"help": "training corpus: .txt, .jsonl or .parquet"})
    hidden_size: int = field(default=0, metadata={"help": "student residual width d (0 < d < teacher's D)"})
    out: str = field(default="", metadata={"help": "output folder"})
    preset: str = field(default="red", metadata={"help": "red (T=1, red init) or lrc (T=40, lrc init)"})
    # data
    text_field: str = field(default="text", metadata={"help": "field/column holding the text in .jsonl/.parquet"})
    txt_split: str = field(default="line", metadata={"help": "how a .txt file is cut into documents: line, paragraph or file"})
    seq_len: int = field(default=256, metadata={"help": "tokens per packed training sequence"})
    val_fraction: float = field(default=0.05, metadata={"help": "share of packed sequences held out for validation"})
    # calibration and init
    init: str = field(default="red", metadata={"help": "projection init: red, lrc, orthogonal or random-select"})
    calibration: str = field(default="", metadata={"help": "reuse this calibration.safetensors instead of calibrating"})
    calib_samples: int = field(default=16, metadata={"help": "calibration sequences (RED: 15)"})
    score: str = field(default="minitron", metadata={"help": "channel score: minitron (mean |x| after the norm, L2 over sequences) or rms (RMS of the raw residual)"})
    init_std: Optional[float] = field(default=0.02, metadata={"help": "std of lrc init; null means 1/sqrt(D)"})
    norm_eps: Optional[float] = field(default=None, metadata={"help": "student RMSNorm eps; null means the teacher's (written into the export)"})
    # losses
    temperature: float = field(default=1.0, metadata={"help": "KL temperature T (RED 1, LRC 40)"})
    kl_weight: float = field(default=1.0, metadata={"help": "weight of KL(teacher||student)"})
    kl_t2_scale: bool = field(default=False, metadata={"help": "multiply the KL by T^2 (Hinton's gradient scaling)"})
    lm_weight: float = field(default=1.0, metadata={"help": "weight of the student's next-token cross-entropy"})
    clone_weight: float = field(default=0.2, metadata={"help": "alpha, weight of the summed clone MSE terms"})
    clone_norm: str = field(default="teacher-ms", metadata={"help": "divide each clone MSE by the teacher activation's mean square (teacher-ms) or not (none)"})
    # optimisation
    steps: int = field(default=200, metadata={"help": "optimizer steps"})
    batch_size: int = field(default=8, metadata={"help": "sequences per micro-batch"})
    grad_accum: int = field(default=1, metadata={"help": "micro-batches per optimizer step"})
    lr: float = field(default=1e-4, metadata={"help": "peak learning rate (AdamW, no weight decay)"})
    warmup: float = field(default=0.005, metadata={"help": "warmup: fraction of steps if < 1, else a step count"})
    grad_clip: float = field(default=1.0, metadata={"help": "max global grad norm (0 disables)"})
    seed: int = field(default=0, metadata={"help": "one seed for init, data order and everything else"})
    activation_checkpointing: bool = field(default=False, metadata={"help": "recompute each layer (teacher and student) in backward instead of storing its activations"})
    device: str = field(default="auto", metadata={"help": "auto, cpu or cuda[:N]"})
    kernels: str = field(default="auto", metadata={"help": "auto (Triton on CUDA), triton or torch"})
    precision: str = field(default="auto", metadata={"help": "compute dtype of every matmul: bf16 (teacher in bf16, fp32 master projections) or fp32; auto is bf16 on CUDA, fp32 on CPU"})
    recompute_weights: bool = field(default=False, metadata={"help": "re-make each student weight W_t P in backward instead of keeping it (saves 7 D x d matrices a layer, costs one GEMM each)"})
    # logging and checkpoints
    log_every: int = field(default=10, metadata={"help": "steps between metric lines"})
    eval_every: int = field(default=50, metadata={"help": "steps between validation loss + eRank (0: only at the end)"})
    val_batches: int = field(default=4, metadata={"help": "validation micro-batches per evaluation"})
    save_every: int = field(default=100, metadata={"help": "steps between checkpoints (0: only at the end)"})
    keep_checkpoints: int = field(default=2, metadata={"help": "checkpoints kept on disk"})
    export_dtype: str = field(default="auto", metadata={"help": "dtype of the exported student: auto (teacher's), float32, bfloat16, float16"})
    overwrite: bool = field(default=False, metadata={"help": "allow a non-empty output folder (its contents are replaced)"})
    resume: bool = field(default=False, metadata={"help": "continue from the last complete checkpoint in OUT (a folder without one starts from step 0)"})
    allow_change: str = field(default="", metadata={"help": "with --resume: comma-separated schedule settings (steps, lr, warmup, grad_clip, log_every, eval_every, val_batches, save_every, keep_checkpoints) allowed to differ from run.yaml; the change is recorded there"})
    trust_remote_code: bool = field(default=False, metadata={"help": "allow the teacher folder's own Python code (off by default)"})
    history: list = field(default_factory=list, metadata={"help": "schedule changes made on --resume, with the step each took effect (written by red into run.yaml)", "cli": False})

    def validate(self) -> "DistillConfig":
        """Check values that do not need the teacher; raise RedError naming the fix."""
        def choice(name, options):
            v = getattr(self, name)
            if v not in options:
                raise RedError(f"{name}={v!r} is not one of {', '.join(options)}; pick one of those")
        choice("preset", tuple(PRESETS))
        choice("init", INITS)
        choice("score", SCORES)
        choice("clone_norm", CLONE_NORMS)
        choice("kernels", KERNELS)
        choice("precision", PRECISION_CHOICES)
        choice("txt_split", ("line", "paragraph", "file"))
        choice("export_dtype", ("auto", "float32", "bfloat16", "float16"))
        for name in ("steps", "batch_size", "grad_accum", "seq_len", "calib_samples", "log_every"):
            if getattr(self, name) < 1:
                raise RedError(f"{name} must be at least 1 (got {getattr(self, name)})")
        if self.temperature <= 0:
            raise RedError(f"temperature must be positive (got {self.temperature})")
        if not 0 < self.val_fraction < 1:
            raise RedError(f"val_fraction must be in (0, 1) (got {self.val_fraction})")
        if not (math.isfinite(self.lr) and self.lr > 0):
            raise RedError(f"lr must be a positive finite number (got {self.lr})")
        return self

    def allowed_changes(self) -> set[str]:
        return {k.strip() for k in self.allow_change.split(",") if k.strip()}

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


PRESETS: dict[str, dict[str, Any]] = {
    # RED: channel-selection init and KL at temperature 1.
    "red": {"init": "red", "temperature": 1.0, "clone_weight": 0.2},
    # LRC: Gaussian init N(0, 0.02^2) and KL at temperature 40.
    "lrc": {"init": "lrc", "temperature": 40.0, "clone_weight": 0.2},
}


def _coerce(name: str, value: Any) -> Any:
    """Convert a YAML/CLI value to the field's type, with an error that names the key."""
    hints = typing.get_type_hints(DistillConfig)
    if name not in hints:
        known = ", ".join(f.name for f in fields(DistillConfig))
        raise RedError(f"unknown configuration key {name!r}; known keys: {known}")
    tp = hints[name]
    optional = typing.get_origin(tp) is typing.Union and type(None) in typing.get_args(tp)
    base = [a for a in typing.get_args(tp) if a is not type(None)][0] if optional else tp
    if value is None or (optional and isinstance(value, str) and value.lower() in ("none", "null")):
        if optional:
            return None
        raise RedError(f"{name} cannot be empty; give a {base.__name__}")
    try:
        if base is bool:
            if isinstance(value, bool):
                return value
            if str(value).lower() in ("1", "true", "yes", "on"):
                return True
            if str(value).lower() in ("0", "false", "no", "off"):
                return False
            raise ValueError
        if base is int and isinstance(value, float) and not value.is_integer():
            raise ValueError
        if base in (int, float) and isinstance(value, bool):
            raise ValueError
        return base(value)
    except (TypeError, ValueError):
        raise RedError(f"{name}={value!r} is not a valid {base.__name__}") from None


def load_yaml(path: str | Path) -> dict:
    """Read a YAML mapping of config keys; errors name the file and the problem."""
    p = Path(path)
    if not p.is_file():
        raise RedError(f"config file {p} does not exist; pass an existing YAML file to --config")
    try:
        data = yaml.safe_load(p.read_text()) or {}
    except yaml.YAMLError as e:
        raise RedError(f"config file {p} is not valid YAML ({str(e).splitlines()[0]}); fix the syntax") from None
    if not isinstance(data, dict):
        raise RedError(f"config file {p} must hold a mapping of keys to values")
    return data


def make_config(yaml_path: str | Path | None = None, **overrides) -> DistillConfig:
    """Build a validated DistillConfig: defaults < preset < YAML < overrides (None = unset)."""
    from_yaml = load_yaml(yaml_path) if yaml_path else {}
    explicit = {k: v for k, v in overrides.items() if v is not None}
    preset = explicit.get("preset", from_yaml.get("preset", DistillConfig.preset))
    if preset not in PRESETS:
        raise RedError(f"preset={preset!r} is not one of {', '.join(PRESETS)}; pick one of those")
    values: dict[str, Any] = dict(PRESETS[preset])
    values.update(from_yaml)
    values.update(explicit)
    cfg = DistillConfig(**{k: _coerce(k, v) for k, v in values.items()})
    return cfg.validate()


def save_yaml(cfg: DistillConfig, path: str | Path) -> None:
    Path(path).write_text(config_yaml(cfg))


def config_yaml(cfg: DistillConfig) -> str:
    """The YAML text of ``cfg`` (what ``run.yaml`` holds)."""
    return yaml.safe_dump(cfg.to_dict(), sort_keys=False)
