"""A run's identity and what a ``--resume`` may change.

``RunIdentity`` is built once from the configuration and the inputs' fingerprints; it
holds the checkpoint metadata and decides what a ``--resume`` may change:

- identity settings (teacher, data, width, sequence length, init, losses, batch and
  accumulation, seed, precision...) define the run: a change is refused, naming each key;
- schedule settings (steps, the learning-rate schedule and AdamW's settings: lr,
  lr_scheduler, min_lr, wsd_decay, warmup, weight_decay, adam_betas, adam_eps; grad_clip
  and the log/eval/save cadence) may change only with ``--allow-change KEY``; the change is
  recorded in ``run.yaml`` under ``history`` with the step it took effect, so ``run.yaml``
  always reproduces the run;
- execution settings (device, kernels, activation checkpointing, the placements of a
  multi-process run, export dtype and architecture, the paths of inputs whose contents
  are unchanged) are free.

How a schedule change continues the learning rate: see ``red.train.trainer.lr_schedule``.
"""
from __future__ import annotations

import dataclasses

from red.errors import RedError
from red.files import file_fingerprint


IDENTITY_KEYS = ("hidden_size", "preset", "seq_len", "val_fraction", "text_field", "txt_split", "init",
                 "calib_samples", "score", "init_std", "norm_eps", "temperature", "kl_weight", "kl_t2_scale",
                 "lm_weight", "clone_weight", "clone_norm", "batch_size", "grad_accum", "seed", "precision",
                 "kl_reduction", "divergence", "jsd_beta", "teacher_top_k", "loss_on", "cross_doc_attention")


SCHEDULE_KEYS = ("steps", "lr", "lr_scheduler", "min_lr", "wsd_decay", "weight_decay", "adam_betas", "adam_eps",
                 "warmup", "grad_clip", "log_every", "eval_every", "val_batches", "save_every", "keep_checkpoints")


# inputs compared by content (fingerprint), not by path: a moved teacher or corpus is the same run
INPUT_KEYS = ("teacher", "data", "calibration")


FREE_KEYS = ("out", "device", "kernels", "activation_checkpointing", "teacher_sharding", "step_weights", "export_dtype",
             "export_arch", "report_to", "overwrite", "resume", "trust_remote_code", "allow_change", "history")


@dataclasses.dataclass
class RunIdentity:
    """What makes a run this run: the identity settings and the inputs' fingerprints."""

    settings: dict
    fingerprints: dict  # teacher, data, calibration -> digest ("" when not given)
    arch: dict  # model_type, num_layers, teacher_hidden_size

    @classmethod
    def from_config(cls, cfg, arch, data_fingerprint: str = "") -> "RunIdentity":
        """``data_fingerprint``: of the tokens trained on (``PackedCorpus.fingerprint``)."""
        from red.model.teacher import legacy_teacher_fingerprint, teacher_fingerprint

        fps = {"teacher": teacher_fingerprint(cfg.teacher), "teacher_v1": legacy_teacher_fingerprint(cfg.teacher),
               "data": data_fingerprint,
               "calibration": file_fingerprint(cfg.calibration) if cfg.calibration else ""}
        from red.config import files_val_fraction

        # the split share the data was cut with (null means the default): what older checkpoints record
        settings = {k: getattr(cfg, k) for k in IDENTITY_KEYS} | {"val_fraction": files_val_fraction(cfg)}
        return cls(settings=settings, fingerprints=fps,
                   arch={"model_type": arch.model_type, "num_layers": arch.num_layers,
                         "teacher_hidden_size": arch.hidden_size})

    def checkpoint_meta(self) -> dict:
        """What every checkpoint of the run records and a resume must match."""
        return {**self.arch, "hidden_size": self.settings["hidden_size"], "init": self.settings["init"],
                "teacher_fingerprint": self.fingerprints["teacher"], "data_fingerprint": self.fingerprints["data"],
                "teacher_fingerprint_v1": self.fingerprints["teacher_v1"],
                "identity": self.settings}


def resume_changes(saved: dict, cfg, allow: set[str]) -> dict:
    """Compare the run's saved configuration with this invocation's; return the schedule
    changes to record ({key: [old, new]}), or raise RedError naming every refused key."""
    from red.config import DistillConfig

    from red.config import DEFAULT_VAL_FRACTION

    def value(k, v):  # a val_fraction of null means the default (run.yaml of older runs holds the number)
        return DEFAULT_VAL_FRACTION if k == "val_fraction" and v is None else v

    names = [f.name for f in dataclasses.fields(DistillConfig)]
    changed = {k: (saved.get(k), getattr(cfg, k)) for k in names if k in saved and k not in FREE_KEYS
               and k not in INPUT_KEYS and value(k, saved.get(k)) != value(k, getattr(cfg, k))}
    identity = {k: v for k, v in changed.items() if k in IDENTITY_KEYS}
    if identity:
        what = ", ".join(f"{k} {a!r} -> {b!r}" for k, (a, b) in identity.items())
        raise RedError(f"--resume cannot change what defines the run ({what}); resume with the run's own settings "
                       f"(red distill --config {cfg.out}/run.yaml --resume) or start a new --out")
    schedule = {k: v for k, v in changed.items() if k in SCHEDULE_KEYS}
    refused = [k for k in schedule if k not in allow]
    if refused:
        what = ", ".join(f"{k} {schedule[k][0]!r} -> {schedule[k][1]!r}" for k in refused)
        flags = " ".join(f"--allow-change {k}" for k in refused)
        raise RedError(f"--resume would change the schedule ({what}); add {flags} to change it from the resumed "
                       "step on, or resume with the run's own settings")
    unknown = sorted(allow - set(SCHEDULE_KEYS))
    if unknown:
        raise RedError(f"--allow-change {', '.join(unknown)}: only schedule settings can change on resume "
                       f"({', '.join(SCHEDULE_KEYS)})")
    return {k: list(v) for k, v in schedule.items()}
