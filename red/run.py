"""A run owns its output folder: its paths, its lock, its safe writes and its identity.

``RunDir`` is the one place that knows the layout of a `red distill` output folder
(``run.yaml``, ``metrics.jsonl``, ``calibration.safetensors``, ``checkpoints/``,
``student/``, ``result.json``), holds the folder's OS lock for the whole run, writes every
file by temp + rename, and deletes nothing it did not write itself (a manifest lists what
`red` wrote). No write or delete follows a symbolic link out of the folder.

``RunIdentity`` is built once from the configuration and the inputs' fingerprints; it
holds the checkpoint metadata and decides what a ``--resume`` may change:

- identity settings (teacher, data, width, sequence length, init, losses, batch and
  accumulation, seed, precision...) define the run: a change is refused, naming each key;
- schedule settings (steps, lr, warmup, grad_clip and the log/eval/save cadence) may
  change only with ``--allow-change KEY``; the change is recorded in ``run.yaml`` under
  ``history`` with the step it took effect, so ``run.yaml`` always reproduces the run;
- execution settings (device, kernels, activation checkpointing, recomputing weights,
  export dtype, the paths of inputs whose contents are unchanged) are free.

How a schedule change continues the learning rate: see ``red.trainer.lr_schedule``.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import shutil
from pathlib import Path

from .errors import RedError

RUN_YAML = "run.yaml"
METRICS = "metrics.jsonl"
CALIBRATION = "calibration.safetensors"
CHECKPOINTS = "checkpoints"
STUDENT = "student"
RESULT = "result.json"
DATA = "data"  # token stores of the --data files, one folder per --data entry
MANIFEST = ".red-run.json"
LOCK = ".red-lock"

IDENTITY_KEYS = ("hidden_size", "preset", "seq_len", "val_fraction", "text_field", "txt_split", "init",
                 "calib_samples", "score", "init_std", "norm_eps", "temperature", "kl_weight", "kl_t2_scale",
                 "lm_weight", "clone_weight", "clone_norm", "batch_size", "grad_accum", "seed", "precision",
                 "kl_reduction", "divergence", "jsd_beta", "teacher_top_k", "loss_on", "cross_doc_attention")
SCHEDULE_KEYS = ("steps", "lr", "adam_eps", "warmup", "grad_clip", "log_every", "eval_every", "val_batches", "save_every",
                 "keep_checkpoints")
# inputs compared by content (fingerprint), not by path: a moved teacher or corpus is the same run
INPUT_KEYS = ("teacher", "data", "calibration")
FREE_KEYS = ("out", "device", "kernels", "activation_checkpointing", "teacher_sharding", "export_dtype", "report_to",
             "overwrite", "resume", "trust_remote_code", "allow_change", "history")


def file_sha256(path: str | Path) -> str:
    """sha256 of a file's bytes (hex), read in 16 MB blocks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 24), b""):
            h.update(block)
    return h.hexdigest()


def file_fingerprint(path: str | Path) -> str:
    """sha256 of a file's bytes (first 16 hex digits): tells one input file from another."""
    return file_sha256(path)[:16]


def _is_within(p: Path, root: Path) -> bool:
    return p == root or root in p.parents


def check_separate(out: str | Path, inputs: dict[str, str | Path]) -> None:
    """Refuse an output folder that is, contains or lies inside one of ``inputs``
    ({description: path}): replacing or filling it could destroy what the command reads."""
    o = Path(out).absolute().resolve()
    for what, path in inputs.items():
        if not path or not str(path):
            continue
        p = Path(path).absolute().resolve()
        if o == p or _is_within(p, o) or _is_within(o, p):
            rel = "is" if o == p else ("contains" if _is_within(p, o) else "lies inside")
            raise RedError(f"output {out} {rel} the {what} {path}; pick an output folder apart from the inputs")


class RunDir:
    """The output folder of one `red distill` run (see the module docstring)."""

    def __init__(self, root: str | Path):
        if not str(root):
            raise RedError("no output folder given; pass --out DIR")
        self.root = Path(root)
        self._lock_fd: int | None = None

    # -- paths ------------------------------------------------------------------------
    def path(self, *parts: str) -> Path:
        """``root/parts``, refused when any existing piece of it below the root is a symbolic
        link (a write there could land outside the folder)."""
        p = self.root
        for part in parts:
            p = p / part
            if p.is_symlink():
                raise RedError(f"{p} is a symbolic link; red writes only inside its output folder, never "
                               "through links: remove the link or pick another --out")
        return p

    @property
    def run_yaml(self) -> Path:
        return self.path(RUN_YAML)

    @property
    def metrics(self) -> Path:
        return self.path(METRICS)

    @property
    def checkpoints(self) -> Path:
        return self.path(CHECKPOINTS)

    @property
    def student(self) -> Path:
        return self.path(STUDENT)

    @property
    def calibration(self) -> Path:
        return self.path(CALIBRATION)

    @property
    def result(self) -> Path:
        return self.path(RESULT)

    def check_links(self) -> None:
        """Refuse the folder when any entry `red` writes in it is a symbolic link (checked
        before any work, so nothing is written through it). The folder itself may be a
        link: that is where the user asked the run to go."""
        for name in (RUN_YAML, METRICS, CALIBRATION, CHECKPOINTS, STUDENT, RESULT, DATA, MANIFEST, LOCK):
            self.path(name)
        if (self.root / CHECKPOINTS).is_dir():
            for p in (self.root / CHECKPOINTS).iterdir():
                self.path(CHECKPOINTS, p.name)

    # -- what is there ----------------------------------------------------------------
    def manifest(self) -> set[str]:
        """Names of the entries `red` wrote into this folder."""
        f = self.root / MANIFEST
        if f.is_symlink() or not f.is_file():
            return set()
        try:
            return set(json.loads(f.read_text()).get("entries", []))
        except (OSError, json.JSONDecodeError, AttributeError):
            return set()

    def own(self, *names: str) -> None:
        """Record ``names`` (top-level entries) as written by `red`."""
        have = self.manifest()
        if set(names) <= have:
            return
        self.write_json(MANIFEST, {"written_by": "red", "entries": sorted(have | set(names) | {MANIFEST})},
                        record=False)

    def entries(self) -> list[str]:
        return sorted(p.name for p in self.root.iterdir()) if self.root.is_dir() else []

    def complete_checkpoints(self) -> list[Path]:
        from .checkpoint import list_checkpoints

        return list_checkpoints(self.checkpoints)

    def state(self) -> str:
        """"new" (absent or empty), "unfinished" (only red's own files and no complete
        checkpoint: not a run yet), "run" (it has a complete checkpoint), or "foreign"."""
        if self.root.exists() and not self.root.is_dir():
            raise RedError(f"output path {self.root} is a file; pass a folder to --out")
        names = [n for n in self.entries() if n != LOCK]
        if not names:
            return "new"
        if self.complete_checkpoints():
            return "run"
        own = self.manifest()
        if own and set(names) <= own:
            return "unfinished"
        return "foreign"

    # -- one writer ---------------------------------------------------------------------
    def lock(self) -> None:
        """Take the folder's OS lock (fcntl) for this process, or fail naming the holder."""
        import fcntl

        self.root.mkdir(parents=True, exist_ok=True)
        f = self.path(LOCK)
        fd = os.open(f, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            holder = os.read(fd, 64).decode(errors="replace").strip() or "another process"
            os.close(fd)
            raise RedError(f"output folder {self.root} is in use by process {holder}; wait for it to finish "
                           "or pick another --out") from None
        os.ftruncate(fd, 0)
        os.write(fd, str(os.getpid()).encode())
        self._lock_fd = fd
        self.own(LOCK)

    def holder(self) -> str | None:
        """The pid holding the folder's lock, or None (checked without taking it)."""
        import fcntl

        f = self.root / LOCK
        if f.is_symlink() or not f.is_file():
            return None
        fd = os.open(f, os.O_RDONLY)
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
            fcntl.flock(fd, fcntl.LOCK_UN)
            return None
        except OSError:
            return os.read(fd, 64).decode(errors="replace").strip() or "another process"
        finally:
            os.close(fd)

    def unlock(self) -> None:
        if self._lock_fd is not None:
            os.close(self._lock_fd)  # closing releases the flock
            self._lock_fd = None

    # -- safe writes ----------------------------------------------------------------------
    def write_text(self, name: str, text: str, record: bool = True) -> Path:
        """Write ``root/name`` through a temporary file and a rename (never half written)."""
        final = self.path(name)
        tmp = self.path(f".{name}.tmp-{os.getpid()}")
        try:
            with open(tmp, "w") as f:
                f.write(text)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, final)
        except OSError as e:
            tmp.unlink(missing_ok=True)
            raise RedError(f"could not write {final} ({e.strerror or e}); free space or fix permissions") from None
        if record:
            self.own(name)
        return final

    def write_json(self, name: str, obj, record: bool = True) -> Path:
        return self.write_text(name, json.dumps(obj, indent=1), record=record)

    def truncate_metrics(self, step: int) -> None:
        """Keep only metrics rows up to ``step`` (rows a killed run wrote past its last
        checkpoint are replayed after resuming)."""
        f = self.metrics
        if not f.is_file():
            return
        keep = []
        for line in f.read_text().splitlines():
            try:
                if json.loads(line).get("step", 0) <= step:
                    keep.append(line)
            except json.JSONDecodeError:
                continue  # a row cut by the kill
        self.write_text(METRICS, "".join(k + "\n" for k in keep))

    # -- replacing --------------------------------------------------------------------------
    def clear_own(self, keep: set[str] = frozenset()) -> None:
        """Delete what `red` wrote here (the manifest's entries but ``keep``), nothing else.
        Entries that have become symbolic links are refused, not followed."""
        kept = self.manifest() & set(keep)
        for name in sorted(self.manifest() - {LOCK, MANIFEST} - kept):
            p = self.path(name)  # refuses links
            if p.is_dir():
                shutil.rmtree(p)
            elif p.exists():
                p.unlink()
        for stale in self.root.glob(".*.tmp-*"):
            if not stale.is_symlink():
                shutil.rmtree(stale) if stale.is_dir() else stale.unlink()
        if self.manifest():
            self.write_json(MANIFEST, {"written_by": "red", "entries": sorted(({MANIFEST, LOCK} | kept)
                                                                              & self.manifest() | {MANIFEST})},
                            record=False)

    def discard(self, remove_root: bool) -> None:
        """Undo a start that failed before training: delete what `red` wrote, its manifest
        and lock file, and the folder itself when ``remove_root`` (this run created it)."""
        self.clear_own()
        for name in (MANIFEST, LOCK):
            p = self.root / name
            if p.is_file() and not p.is_symlink():
                p.unlink()
        if remove_root and self.root.is_dir() and not any(self.root.iterdir()):
            self.root.rmdir()

    def check_usable(self, overwrite: bool, resume: bool) -> str:
        """Raise RedError unless this folder can take a run started with these flags;
        returns its state (see ``state``). Changes nothing."""
        state = self.state()
        if state == "foreign" and not overwrite:
            raise RedError(f"output folder {self.root} is not empty and was not written by red; choose a new "
                           "--out, or --overwrite to add this run beside its files (they are kept)")
        if state == "run" and not (resume or overwrite):
            step = self.complete_checkpoints()[-1].name
            raise RedError(f"output folder {self.root} holds a run (last checkpoint {step}); add --resume to "
                           "continue it, or --overwrite to replace it")
        return state

    def prepare(self, overwrite: bool, resume: bool, keep: set[str] = frozenset()) -> str:
        """Check the folder can take this run (again, now under the lock) and make it ready;
        returns what it held ("new", "unfinished", "run"). ``keep``: entries of red's to
        keep when the folder is cleared (tokenized data this run reuses)."""
        state = self.check_usable(overwrite, resume)
        if overwrite or state == "unfinished" or (state == "run" and not resume):
            self.clear_own(keep)  # an unfinished folder is not a run yet: start it again
            state = "new" if state != "foreign" else state
        self.root.mkdir(parents=True, exist_ok=True)
        return state


@dataclasses.dataclass
class RunIdentity:
    """What makes a run this run: the identity settings and the inputs' fingerprints."""

    settings: dict
    fingerprints: dict  # teacher, data, calibration -> digest ("" when not given)
    arch: dict  # model_type, num_layers, teacher_hidden_size

    @classmethod
    def from_config(cls, cfg, arch, data_fingerprint: str = "") -> "RunIdentity":
        """``data_fingerprint``: of the tokens trained on (``PackedCorpus.fingerprint``)."""
        from .teacher import teacher_fingerprint

        fps = {"teacher": teacher_fingerprint(cfg.teacher),
               "data": data_fingerprint,
               "calibration": file_fingerprint(cfg.calibration) if cfg.calibration else ""}
        return cls(settings={k: getattr(cfg, k) for k in IDENTITY_KEYS}, fingerprints=fps,
                   arch={"model_type": arch.model_type, "num_layers": arch.num_layers,
                         "teacher_hidden_size": arch.hidden_size})

    def checkpoint_meta(self) -> dict:
        """What every checkpoint of the run records and a resume must match."""
        return {**self.arch, "hidden_size": self.settings["hidden_size"], "init": self.settings["init"],
                "teacher_fingerprint": self.fingerprints["teacher"], "data_fingerprint": self.fingerprints["data"],
                "identity": self.settings}


def resume_changes(saved: dict, cfg, allow: set[str]) -> dict:
    """Compare the run's saved configuration with this invocation's; return the schedule
    changes to record ({key: [old, new]}), or raise RedError naming every refused key."""
    from .config import DistillConfig

    names = [f.name for f in dataclasses.fields(DistillConfig)]
    changed = {k: (saved.get(k), getattr(cfg, k)) for k in names
               if k in saved and k not in FREE_KEYS and k not in INPUT_KEYS and saved.get(k) != getattr(cfg, k)}
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


#: Observers of a run's progress: callables ``hook(event, step, folder)``. Events:
#: "checkpoint-written" (a checkpoint's files are on disk in a temporary folder, not yet
#: renamed into place) and "step-done" (after an optimizer step and its checkpoint, if any).
#: Empty in production; tests use it to stop a process at a known point.
HOOKS: list = []


def emit(event: str, step: int, folder: Path) -> None:
    for hook in HOOKS:
        hook(event, step, Path(folder))
