"""Run configuration: one dataclass, presets, YAML files and command-line overrides.

Resolution order (later wins): dataclass defaults < preset < YAML file < explicit
overrides. The effective configuration is written to ``run.yaml`` so a run can be
repeated with ``red distill --config OUT/run.yaml``.
"""
from __future__ import annotations

import dataclasses
import math
import re
import typing
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Callable, Optional

import yaml

from red.errors import RedError

INITS = ("red", "lrc", "orthogonal", "random-select")
SCORES = ("minitron", "rms")
CLONE_NORMS = ("teacher-ms", "none")
KERNELS = ("auto", "triton", "torch")
TEACHER_SHARDING = ("auto", "replicate", "shard")
PRECISION_CHOICES = ("auto", "bf16", "fp32")
KL_REDUCTIONS = ("mean", "sum")
DIVERGENCES = ("forward-kl", "reverse-kl", "jsd")
LOSS_ON = ("assistant", "all")
TXT_SPLITS = ("line", "paragraph", "file")
EXPORT_DTYPES = ("auto", "float32", "bfloat16", "float16")
#: shapes of the learning rate after warmup (red.train.trainer.lr_schedule)
LR_SCHEDULERS = ("linear", "cosine", "constant", "wsd")
#: what an export writes a student as: the teacher's architecture, or a Llama (red.model.export.as_llama)
EXPORT_ARCHS = ("auto", "llama")
TEACHER_DTYPES = ("bfloat16", "float16", "float32")

# --report-to: live metrics sinks beside the JSONL record (red.run.log writes them)
JSONL = "jsonl"
TENSORBOARD = "tensorboard"
WANDB = "wandb"
REPORT_TO = (JSONL, TENSORBOARD, WANDB)


def parse_report_to(value: str) -> list[str]:
    """The names in a comma-separated ``--report-to`` value (order kept, duplicates and
    blanks dropped); raises RedError on an unknown name."""
    names: list[str] = []
    for part in str(value).split(","):
        name = part.strip().lower()
        if not name or name in names:
            continue
        if name not in REPORT_TO:
            raise RedError(f"report_to={value!r} names {name!r}, which is not one of {', '.join(REPORT_TO)}; "
                           "give a comma-separated list of those (jsonl is always written)")
        names.append(name)
    return names


def valid_report_to(value) -> bool:
    """For the config rules table: True when every name is known."""
    try:
        parse_report_to(value)
    except RedError:
        return False
    return isinstance(value, str)


@dataclass
class DistillConfig:
    """Everything a distillation run needs. Field docs double as ``--help`` text."""

    # what to distill
    teacher: str = field(default="", metadata={"help": "local folder of a Llama/Qwen2/Qwen3 Hugging Face checkpoint (safetensors)"})
    data: str | list[str] = field(default="", metadata={"help": "training data: a .txt/.jsonl/.parquet file, a glob, a saved Hugging Face dataset, or a token store from `red prepare`; PATH:WEIGHT and repeated --data make a mixture (e.g. --data general.jsonl:0.9 --data math.jsonl:0.1); files are tokenized once into OUT/data"})
    hidden_size: int = field(default=0, metadata={"help": "student residual width d (0 < d < teacher's D)"})
    out: str = field(default="", metadata={"help": "output folder"})
    preset: str = field(default="red", metadata={"help": "red (T=1, red init) or lrc (T=40, lrc init)"})
    # data
    text_field: str = field(default="text", metadata={"help": "field/column holding the text in .jsonl/.parquet"})
    txt_split: str = field(default="line", metadata={"help": "how a .txt file is cut into documents: line, paragraph or file"})
    seq_len: int = field(default=256, metadata={"help": "tokens per packed training sequence"})
    val_fraction: Optional[float] = field(default=None, metadata={"help": "share of the tokens held out for validation, as whole documents, when --data files are tokenized (null: 0.05); a token store keeps the split it was prepared with, and a --val-fraction that is not its split is refused"})
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
    kl_reduction: str = field(default="mean", metadata={"help": "mean: KL averaged over scored tokens; sum: summed over the tokens of each sequence, then averaged over sequences (LRC's scale, about seq_len times larger)"})
    divergence: str = field(default="forward-kl", metadata={"help": "logit divergence: forward-kl KL(teacher||student), reverse-kl KL(student||teacher), or jsd (generalized Jensen-Shannon, see --jsd-beta)"})
    jsd_beta: float = field(default=0.5, metadata={"help": "with --divergence jsd: weight beta of the mixture beta*teacher + (1-beta)*student (0 < beta < 1)"})
    teacher_top_k: int = field(default=0, metadata={"help": "score the divergence over the teacher's top-k tokens plus one bucket for the rest (0: the full vocabulary)"})
    loss_on: str = field(default="assistant", metadata={"help": "tokens the KL and LM terms score: assistant (the assistant turns of chat data; every token of plain text) or all; the clone terms always use all tokens"})
    cross_doc_attention: bool = field(default=True, metadata={"help": "let packed documents attend to the documents before them in a sequence; --no-cross-doc-attention makes attention block-diagonal per document with positions restarting at each one"})
    # optimisation
    steps: int = field(default=200, metadata={"help": "optimizer steps"})
    batch_size: int = field(default=8, metadata={"help": "the GLOBAL micro-batch: sequences per micro-batch summed over all processes (under torchrun each of N ranks takes batch_size / N); TRL's per_device_train_batch_size is per GPU, so its per_device x GPUs is this; a step sees batch_size x grad_accum sequences"})
    grad_accum: int = field(default=1, metadata={"help": "micro-batches per optimizer step (transformers' gradient_accumulation_steps)"})
    lr: float = field(default=1e-4, metadata={"help": "peak learning rate of AdamW (transformers' learning_rate)"})
    lr_scheduler: str = field(default="linear", metadata={"help": "shape of the learning rate after the linear warmup (transformers' lr_scheduler_type): linear (to --min-lr at the last step; linear), cosine (half a cosine to --min-lr; cosine_with_min_lr), constant (the peak throughout; constant_with_warmup; --min-lr unused), wsd (warmup, stable at the peak, then half a cosine to --min-lr over the last --wsd-decay of the steps; warmup_stable_decay)"})
    min_lr: float = field(default=0.0, metadata={"help": "the learning rate a decaying --lr-scheduler ends at, absolute, at most --lr (transformers' min_lr in lr_scheduler_kwargs)"})
    wsd_decay: float = field(default=0.1, metadata={"help": "with --lr-scheduler wsd: the share of --steps the final decay takes, 0 < x <= 1 (transformers' num_decay_steps / max_steps)"})
    weight_decay: float = field(default=0.0, metadata={"help": "AdamW's decoupled weight decay (transformers' weight_decay) on the projections P (which pulls the student's weights W P toward 0 with them); the norm gains get none, as transformers' Trainer leaves biases and norm weights out"})
    adam_betas: str = field(default="0.9,0.999", metadata={"help": "AdamW's B1,B2 (transformers' adam_beta1, adam_beta2), each 0 <= B < 1"})
    adam_eps: float = field(default=1e-8, metadata={"help": "AdamW's epsilon, added to the root of the second moment (transformers' adam_epsilon); a larger value bounds how far a near-zero gradient can move a weight"})
    warmup: float = field(default=0.005, metadata={"help": "linear warmup from 0 to --lr: fraction of steps if < 1, else a step count (transformers' warmup_ratio / warmup_steps)"})
    grad_clip: float = field(default=1.0, metadata={"help": "max global grad norm (0 disables)"})
    seed: int = field(default=0, metadata={"help": "one seed for init, data order and everything else"})
    activation_checkpointing: bool = field(default=False, metadata={"help": "recompute each layer (teacher and student) in backward instead of storing its activations"})
    teacher_sharding: str = field(default="auto", metadata={"help": "under torchrun: replicate (every process holds the whole frozen teacher: no gathers in the step), shard (each holds 1/N, each teacher layer gathered once per micro-batch), or auto (of the teacher and step-weight choices that fit the GPU by red plan, the one that moves the fewest bytes; shard on CPU)"})
    step_weights: str = field(default="auto", metadata={"help": "under torchrun, the student's dense weights of a step: replicate (whole on every process, gradients summed locally and all-reduced once a step: 6-8 bytes per student weight on each GPU) or shard (fp32 rows on each process, each layer gathered for its forward and backward and its gradients reduce-scattered every micro-batch: 8 bytes per weight / N), or auto (as --teacher-sharding; replicate on CPU)"})
    device: str = field(default="auto", metadata={"help": "auto, cpu, cuda or cuda:N"})
    kernels: str = field(default="auto", metadata={"help": "auto (Triton on CUDA), triton or torch"})
    precision: str = field(default="auto", metadata={"help": "compute dtype of every matmul: bf16 (teacher in bf16, fp32 master projections) or fp32; auto is bf16 on CUDA, fp32 on CPU"})
    # logging and checkpoints
    log_every: int = field(default=10, metadata={"help": "steps between metric lines"})
    eval_every: int = field(default=50, metadata={"help": "steps between validation loss + eRank (0: only at the end)"})
    val_batches: int = field(default=4, metadata={"help": "validation micro-batches per evaluation"})
    save_every: int = field(default=100, metadata={"help": "steps between checkpoints (0: only at the end)"})
    keep_checkpoints: int = field(default=2, metadata={"help": "checkpoints kept on disk (at least 1)"})
    export_dtype: str = field(default="auto", metadata={"help": "dtype of the exported student: auto (teacher's), float32, bfloat16, float16"})
    export_arch: str = field(default="auto", metadata={"help": "architecture of the exported student: auto (the teacher's) or llama (a Qwen2 student written as a Llama with attention biases and a zero o_proj bias, the same logits; for llama.cpp and other stacks whose Qwen2 assumes heads x head_dim = hidden size)"})
    overwrite: bool = field(default=False, metadata={"help": "allow a non-empty output folder (its contents are replaced)"})
    resume: bool = field(default=False, metadata={"help": "continue from the last complete checkpoint in OUT (a folder without one starts from step 0)"})
    allow_change: str = field(default="", metadata={"help": "with --resume: comma-separated schedule settings (steps, lr, lr_scheduler, min_lr, wsd_decay, weight_decay, adam_betas, adam_eps, warmup, grad_clip, log_every, eval_every, val_batches, save_every, keep_checkpoints) allowed to differ from run.yaml; the change is recorded there"})
    trust_remote_code: bool = field(default=False, metadata={"help": "allow the teacher folder's own Python code (off by default)"})
    report_to: str = field(default="jsonl", metadata={"help": "comma-separated live metrics sinks: jsonl, tensorboard (OUT/tensorboard, pip install 'red[tensorboard]'), wandb (offline unless WANDB_MODE is set, pip install 'red[wandb]'); metrics.jsonl is the record and is always written"})
    history: list = field(default_factory=list, metadata={"help": "schedule changes made on --resume, with the step each took effect (written by red into run.yaml)", "cli": False})

    def validate(self) -> "DistillConfig":
        """Check values that do not need the teacher; raise RedError naming the fix.

        Every float must be finite, then each field is checked against ``CONFIG_RULES``
        (one declarative table), then the few rules that tie two fields together."""
        hints = typing.get_type_hints(DistillConfig)
        for f in fields(self):
            v = getattr(self, f.name)
            if float in (hints[f.name], *typing.get_args(hints[f.name])) and v is not None:
                check_finite(f.name, v)
        check_values({name: getattr(self, name) for name, _ in CONFIG_RULES}, CONFIG_RULES)
        if self.kl_weight == self.lm_weight == self.clone_weight == 0:
            raise RedError("kl_weight, lm_weight and clone_weight are all 0, so nothing would be trained; "
                           "give at least one of them a positive weight")
        if self.resume and self.overwrite:
            raise RedError("--resume and --overwrite exclude each other: --resume continues the run in --out, "
                           "--overwrite replaces it; pick one")
        if self.min_lr > self.lr:
            raise RedError(f"min_lr={self.min_lr:g} is above lr={self.lr:g}; the decay ends at --min-lr, so give "
                           "one at most --lr (0: decay to 0)")
        if self.warmup >= 1 and self.warmup > self.steps:
            raise RedError(f"warmup={self.warmup:g} steps is longer than steps={self.steps}; lower --warmup "
                           "(a value below 1 is a fraction of --steps)")
        return self

    def allowed_changes(self) -> set[str]:
        return {k.strip() for k in self.allow_change.split(",") if k.strip()}

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


DEFAULT_VAL_FRACTION = 0.05
#: micro-batches per optimizer step: 4096 x 8 sequences of 2048 tokens is a 67 M-token
#: step, far past any published recipe; a value beyond it is a typo that would run for ever
MAX_GRAD_ACCUM = 4096


def files_val_fraction(cfg) -> float:
    """The validation share used when ``--data`` files are tokenized (a store keeps its own)."""
    return DEFAULT_VAL_FRACTION if cfg.val_fraction is None else cfg.val_fraction


PRESETS: dict[str, dict[str, Any]] = {
    # RED: channel-selection init and KL at temperature 1, averaged over tokens (the demo
    # measured the summed KL drowning the clone term at T = 1: README, "red demo").
    "red": {"init": "red", "temperature": 1.0, "clone_weight": 0.2, "kl_reduction": "mean"},
    # LRC: Gaussian init N(0, 0.02^2), KL at temperature 40 summed over a sequence's
    # positions and averaged over sequences (LRC's scale, no T^2 factor).
    "lrc": {"init": "lrc", "temperature": 40.0, "clone_weight": 0.2, "kl_reduction": "sum"},
}


# ---------------------------------------------------------------------------
# One validation layer for numbers and choices: a rule is a test and the words that
# say what the value must be; a table of (name, rule) is checked in a loop. `red
# distill` (DistillConfig.validate), `red eval`, `red plan`, `red analyze` and
# `red calibrate` all go through check_values.

@dataclass(frozen=True)
class Rule:
    """``test(value) -> bool``; ``need`` completes "NAME must be ..."."""
    test: Callable[[Any], bool]
    need: str
    hint: str = ""
    template: str = "{name} must be {need} (got {value!r})"

    def message(self, name: str, value: Any) -> str:
        text = self.template.format(name=name, need=self.need, value=value)
        return text + (f"; {self.hint}" if self.hint else "")


def at_least(n, hint: str = "") -> Rule:
    return Rule(lambda v: v >= n, f"at least {n}", hint)


POSITIVE = Rule(lambda v: v > 0, "a positive number")
NON_NEGATIVE = Rule(lambda v: v >= 0, "at least 0")
OPEN_UNIT = Rule(lambda v: 0 < v < 1, "between 0 and 1 (both excluded)")
SEED = Rule(lambda v: 0 <= v <= 2**64 - 1, "between 0 and 2**64-1 (a 64-bit seed)")
DEVICE = Rule(lambda v: isinstance(v, str) and re.fullmatch(r"auto|cpu|cuda(:\d+)?", v) is not None,
              "one of auto, cpu, cuda, cuda:N", "pick one of those", template="{name}={value!r} is not {need}")


def one_of(options) -> Rule:
    return Rule(lambda v: v in options, "one of " + ", ".join(options), "pick one of those",
                template="{name}={value!r} is not {need}")


def check_finite(name: str, value: Any) -> None:
    if isinstance(value, float) and not math.isfinite(value):
        raise RedError(f"{name}={value!r} is not a finite number; give a finite value")


def check_values(values: dict[str, Any], rules) -> None:
    """Check ``values[name]`` against each ``(name, rule)`` of ``rules`` in order; None
    means "not given" and passes. Raises RedError naming the first value that fails."""
    for name, rule in rules:
        v = values[name]
        if v is None:
            continue
        check_finite(name, v)
        if not rule.test(v):
            raise RedError(rule.message(name, v))


#: What each field of DistillConfig must be (fields that are free text are absent).
CONFIG_RULES: tuple[tuple[str, Rule], ...] = (
    ("preset", one_of(tuple(PRESETS))),
    ("init", one_of(INITS)),
    ("score", one_of(SCORES)),
    ("clone_norm", one_of(CLONE_NORMS)),
    ("kl_reduction", one_of(KL_REDUCTIONS)),
    ("divergence", one_of(DIVERGENCES)),
    ("jsd_beta", OPEN_UNIT),
    ("teacher_top_k", NON_NEGATIVE),
    ("loss_on", one_of(LOSS_ON)),
    ("kernels", one_of(KERNELS)),
    ("teacher_sharding", one_of(TEACHER_SHARDING)),
    ("step_weights", one_of(TEACHER_SHARDING)),
    ("precision", one_of(PRECISION_CHOICES)),
    ("txt_split", one_of(TXT_SPLITS)),
    ("export_dtype", one_of(EXPORT_DTYPES)),
    ("export_arch", one_of(EXPORT_ARCHS)),
    ("device", DEVICE),
    ("steps", at_least(1)),
    ("batch_size", at_least(1)),
    ("grad_accum", Rule(lambda v: 1 <= v <= MAX_GRAD_ACCUM, f"between 1 and {MAX_GRAD_ACCUM}",
                        "for a larger global batch raise --batch-size or add processes")),
    ("seq_len", at_least(2, "a sequence needs an input and a next token")),
    ("calib_samples", at_least(1)),
    ("log_every", at_least(1)),
    ("val_batches", at_least(1)),
    ("keep_checkpoints", at_least(1, "give how many checkpoints to keep (0 no longer means all: to keep all, give steps/save_every or more)")),
    ("eval_every", NON_NEGATIVE),
    ("save_every", NON_NEGATIVE),
    ("seed", SEED),
    ("val_fraction", OPEN_UNIT),
    ("temperature", POSITIVE),
    ("lr", POSITIVE),
    ("lr_scheduler", one_of(LR_SCHEDULERS)),
    ("min_lr", NON_NEGATIVE),
    ("wsd_decay", Rule(lambda v: 0 < v <= 1, "above 0 and at most 1", "it is the share of --steps the last decay "
                       "takes (0.1: the last tenth)")),
    ("weight_decay", NON_NEGATIVE),
    ("adam_eps", POSITIVE),
    ("kl_weight", NON_NEGATIVE),
    ("lm_weight", NON_NEGATIVE),
    ("clone_weight", NON_NEGATIVE),
    ("warmup", NON_NEGATIVE),
    ("grad_clip", Rule(lambda v: v >= 0, "at least 0", "0 disables clipping")),
    ("init_std", Rule(lambda v: v > 0, "a positive number", "or null for 1/sqrt(D)")),
    ("norm_eps", Rule(lambda v: v > 0, "a positive number", "or null for the teacher's")),
    ("report_to", Rule(valid_report_to, "a comma-separated list of " + ", ".join(REPORT_TO), "pick from those "
                       "(jsonl, the record, is always written)", template="{name}={value!r} is not {need}")),
)


#: `red plan`'s numbers (flag -> rule); ``validate_plan_inputs`` checks them.
PLAN_RULES: tuple[tuple[str, Rule], ...] = (
    ("--hidden-size", at_least(1)),
    ("--seq-len", at_least(2)),
    ("--micro-batch", at_least(1)),
    ("--gpus", at_least(1)),
    ("--logits-chunk", Rule(lambda v: v >= 0, "at least 0", "0 means the kernel's default chunk")),
)


def validate_plan_inputs(hidden_size: int, seq_len: int, micro_batch: int, gpus: int = 1,
                         logits_chunk: int = 0) -> None:
    """The checks of `red plan`'s numbers that need no teacher (plan_memory checks the
    width against the teacher and --micro-batch against --gpus)."""
    check_values({"--hidden-size": hidden_size, "--seq-len": seq_len, "--micro-batch": micro_batch,
                  "--gpus": gpus, "--logits-chunk": logits_chunk}, PLAN_RULES)

def check_calib_samples(cfg: DistillConfig, n_sequences: int) -> None:
    """Calibration reads ``calib_samples`` training sequences: the corpus must pack to that
    many (unless a calibration file is given)."""
    if not cfg.calibration and cfg.calib_samples > n_sequences:
        raise RedError(f"calib_samples={cfg.calib_samples} is more than the {n_sequences} training sequences the "
                       f"corpus packs to at seq_len={cfg.seq_len}; lower --calib-samples or add text")


def parse_betas(value) -> tuple[float, float]:
    """AdamW's (beta1, beta2) from "B1,B2" (or a YAML list of two numbers), each in
    [0, 1); RedError naming ``adam_betas`` otherwise."""
    parts = list(value) if isinstance(value, (list, tuple)) else str(value).split(",")
    try:
        betas = tuple(float(b) for b in parts)
    except (TypeError, ValueError):
        betas = ()
    if len(betas) != 2 or not all(math.isfinite(b) and 0 <= b < 1 for b in betas):
        raise RedError(f"adam_betas={value!r} is not two numbers B1,B2 with 0 <= B < 1; give e.g. --adam-betas "
                       "0.9,0.999 (transformers' adam_beta1, adam_beta2)")
    return betas


def format_betas(betas) -> str:
    """The one text of a pair of betas that run.yaml holds ("0.9,0.95"), so that the same
    values written another way are not a change on --resume."""
    return ",".join(repr(float(b)) for b in betas)


#: Keys of earlier versions that a run.yaml may still hold; read and ignored, with why.
RETIRED_KEYS = {"recompute_weights": "the student's weights are made once per optimizer step and kept for it"}


def _coerce_data(value) -> str | list[str]:
    """``data``: one source (a string) or a mixture (a list of at least two)."""
    if isinstance(value, (list, tuple)):
        if not value:
            raise RedError("data is an empty list; give at least one source (a file, glob, saved dataset or "
                           "token store), e.g. data: [corpus.jsonl]")
        items = [str(v) for v in value]
        return items[0] if len(items) == 1 else items
    return str(value)


def _coerce(name: str, value: Any) -> Any:
    """Convert a YAML/CLI value to the field's type, with an error that names the key."""
    hints = typing.get_type_hints(DistillConfig)
    if name not in hints:
        known = ", ".join(f.name for f in fields(DistillConfig))
        raise RedError(f"unknown configuration key {name!r}; known keys: {known}")
    tp = hints[name]
    optional = typing.get_origin(tp) is typing.Union and type(None) in typing.get_args(tp)
    base = [a for a in typing.get_args(tp) if a is not type(None)][0] if optional else tp
    if name == "data" and value is not None:
        return _coerce_data(value)
    if value is None or (optional and isinstance(value, str) and value.lower() in ("none", "null")):
        if optional:
            return None
        raise RedError(f"{name} cannot be empty; give a {'source' if name == 'data' else base.__name__}")
    if name == "adam_betas":
        return format_betas(parse_betas(value))
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


MAX_YAML_BYTES = 1 << 20  # a run's configuration is a few kB; anything near this is not one


class _AliasFound(Exception):
    pass


class _PlainLoader(yaml.SafeLoader):
    """yaml's safe loader without aliases: a few hundred bytes of nested aliases expand to
    gigabytes (a "billion laughs"), and a configuration has no use for them."""

    def compose_node(self, parent, index):
        if self.check_event(yaml.AliasEvent):
            raise _AliasFound(self.peek_event().anchor)
        return super().compose_node(parent, index)


class _PlainDumper(yaml.SafeDumper):
    """Writes every value out (no anchors or aliases), so that red reads back what it writes."""

    def ignore_aliases(self, data):
        return True


def load_yaml(path: str | Path) -> dict:
    """Read a YAML mapping of config keys (at most ``MAX_YAML_BYTES``, no aliases); errors
    name the file and the problem."""
    p = Path(path)
    if not p.is_file():
        raise RedError(f"config file {p} does not exist; pass an existing YAML file to --config")
    if p.stat().st_size > MAX_YAML_BYTES:
        raise RedError(f"config file {p} holds {p.stat().st_size:,} bytes, more than a configuration's "
                       f"{MAX_YAML_BYTES:,}; pass the run's YAML file (e.g. OUT/run.yaml)")
    try:
        data = yaml.load(p.read_text(), Loader=_PlainLoader) or {}
    except _AliasFound as e:
        raise RedError(f"config file {p} uses a YAML alias (*{e}); red reads plain YAML: write the value out "
                       "instead of the alias") from None
    except UnicodeDecodeError:
        raise RedError(f"config file {p} is not UTF-8 text; pass a YAML file") from None
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
    values.update({k: v for k, v in from_yaml.items() if k not in RETIRED_KEYS})
    values.update(explicit)
    cfg = DistillConfig(**{k: _coerce(k, v) for k, v in values.items()})
    return cfg.validate()


def config_yaml(cfg: DistillConfig) -> str:
    """The YAML text of ``cfg`` (what ``run.yaml`` holds)."""
    return yaml.dump(cfg.to_dict(), Dumper=_PlainDumper, sort_keys=False)
