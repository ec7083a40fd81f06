"""A run owns its output folder: its paths, its lock, its safe writes and its identity.

``RunDir`` is the one place that knows the layout of a `red distill` output folder
(``run.yaml``, ``metrics.jsonl``, ``calibration.safetensors``, ``checkpoints/``,
``student/``, ``result.json``), holds the folder's OS lock for the whole run, writes every
file by temp + rename, and deletes nothing it did not write itself. ``OwnedFolder`` is the
one mechanism that knows what `red` wrote in a folder (run folders, the demo's folder,
exports): a manifest of entries, each a name directly inside the folder, checked when read
and before any removal; the names a folder held before `red` first wrote there are recorded
and never claimed. ``FolderLock`` is the one writer lock (run folders and token stores). No
write or delete follows a symbolic link out of the folder.

The run's identity and resume rules are ``red.run.identity``'s.
"""
from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path

from red.errors import RedError
from red.files import write_text_atomic, LOCK, MANIFEST, OwnedFolder, _tree_bytes

RUN_YAML = "run.yaml"
METRICS = "metrics.jsonl"
CALIBRATION = "calibration.safetensors"
CHECKPOINTS = "checkpoints"
STUDENT = "student"
RESULT = "result.json"
DATA = "data"  # token stores of the --data files, one folder per --data entry
#: names a run folder holds; a folder with any of them and no manifest is of unknown origin
RUN_MARKERS = (RUN_YAML, METRICS, CHECKPOINTS, STUDENT, RESULT, CALIBRATION)
#: what `red distill` may write at the top of its folder (besides the metrics sinks' folders)
RUN_WRITES = (RUN_YAML, METRICS, CALIBRATION, CHECKPOINTS, STUDENT, RESULT, DATA)
#: names whose temporaries (".NAME.tmp-PID") red removes when it clears a folder
KNOWN_TEMP_OWNERS = frozenset((*RUN_WRITES, MANIFEST))


# -- what red wrote in a folder ---------------------------------------------------------------


class RunDir(OwnedFolder):
    """The output folder of one `red distill` run (see the module docstring)."""

    temp_owners = KNOWN_TEMP_OWNERS

    def __init__(self, root: str | Path):
        super().__init__(root, MANIFEST, "output folder")

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
    def complete_checkpoints(self) -> list[Path]:
        from red.run.checkpoint_files import list_checkpoints

        return list_checkpoints(self.checkpoints)

    def state(self) -> str:
        """What the folder holds:

        - "new": absent or empty;
        - "unknown": no manifest, but names a run writes (run.yaml, checkpoints/, student/,
          ...): an older red's run or a copy without its hidden files; red cannot tell
          what it wrote, so it is refused, never adopted;
        - "run": red's checkpoints/ holds a complete checkpoint;
        - "finished": no complete checkpoint, but red's student/ or result.json;
        - "unfinished": only red's files and the names that were there before it (a
          start stopped before its first checkpoint: not a run yet);
        - "foreign": anything else (files red did not write)."""
        if self.root.exists() and not self.root.is_dir():
            raise RedError(f"output path {self.root} is a file; pass a folder to --out")
        names = [n for n in self.entries() if n != LOCK]
        if not names:
            return "new"
        m = self._read()
        if m is None:
            return "unknown" if set(names) & set(RUN_MARKERS) else "foreign"
        own, foreign = m
        if CHECKPOINTS in own and self.complete_checkpoints():
            return "run"
        if any(n in own for n in (RESULT, STUDENT) if os.path.lexists(self.root / n)):
            return "finished"
        if set(names) <= own | foreign | {MANIFEST}:
            return "unfinished"
        return "foreign"

    def check_usable(self, overwrite: bool, resume: bool, writes=()) -> str:
        """Raise RedError unless this folder can take a run started with these flags that
        writes the top-level names ``writes``; returns its state (see ``state``). Changes
        nothing."""
        if overwrite and resume:
            raise RedError("--resume and --overwrite exclude each other: --resume continues the run in the "
                           "folder, --overwrite replaces it; pick one")
        state = self.state()
        if state == "unknown":
            seen = ", ".join(n for n in RUN_MARKERS if os.path.lexists(self.root / n))
            raise RedError(f"output folder {self.root} holds a run's files ({seen}) but no {MANIFEST}, so red "
                           "cannot tell which files it wrote (an older red made it, or it was copied without "
                           "its hidden files); copy it with its hidden files (cp -a), remove the files yourself, "
                           "or pick another --out")
        if state == "foreign" and not overwrite:
            raise RedError(f"output folder {self.root} is not empty and was not written by red; choose a new "
                           "--out, or --overwrite to add this run beside its files (they are kept)")
        if state == "run" and not (resume or overwrite):
            step = self.complete_checkpoints()[-1].name
            raise RedError(f"output folder {self.root} holds a run (last checkpoint {step}); add --resume to "
                           "continue it, or --overwrite to replace it")
        if state == "finished" and not overwrite:
            seen = " and ".join(n for n in (STUDENT, RESULT) if os.path.lexists(self.root / n))
            why = "; --resume has nothing to continue from" if resume else ""
            raise RedError(f"output folder {self.root} holds a finished run ({seen}) and no checkpoint{why}; "
                           "pick a new --out, or --overwrite to replace it")
        clash = self.conflicts(writes)
        if clash:
            raise RedError(self.clash_message(clash))
        return state

    def prepare(self, overwrite: bool, resume: bool, keep: set[str] = frozenset(), writes=()) -> str:
        """Check the folder can take this run (again, now under the lock) and make it ready;
        returns what it held ("new", "unfinished", "run", "foreign"). ``keep``: entries of
        red's to keep when the folder is cleared (tokenized data this run reuses)."""
        state = self.check_usable(overwrite, resume, writes)
        if overwrite or state == "unfinished":
            self.clear_own(keep)  # an unfinished folder is not a run yet: start it again
            state = "new" if state != "foreign" else state
        self.root.mkdir(parents=True, exist_ok=True)
        for stale in self.stale_checkpoint_temps():  # a killed or failed save's: no writer is left (we hold the lock)
            shutil.rmtree(stale, ignore_errors=True)
        return state

    def stale_checkpoint_temps(self) -> list[Path]:
        """Temporary checkpoint folders (``checkpoints/.step-N.tmp-PID``) red left behind."""
        if CHECKPOINTS not in self.manifest() or not (self.root / CHECKPOINTS).is_dir():
            return []
        return [p for p in self.checkpoints.iterdir()
                if re.fullmatch(r"\.step-\d+\.tmp-\d+", p.name) and p.is_dir() and not p.is_symlink()]

    def reusable_bytes(self, resume: bool, overwrite: bool) -> int:
        """Bytes already in the folder that count toward a run's peak use of the disk: the
        stale checkpoint temporaries (removed once the lock is held) and, when resuming or
        overwriting, red's checkpoints and export (kept among the run's own, or replaced)."""
        total = sum(_tree_bytes(p) for p in self.stale_checkpoint_temps())
        own = self.manifest()
        if resume or overwrite:
            if CHECKPOINTS in own:
                total += sum(_tree_bytes(p) for p in self.complete_checkpoints())
            if STUDENT in own:
                total += _tree_bytes(self.root / STUDENT)
        return total

    # -- safe writes ----------------------------------------------------------------------
    def write_text(self, name: str, text: str, record: bool = True) -> Path:
        """Write ``root/name`` through a temporary file and a rename (never half written);
        ``record``: claim the name first (``own``)."""
        final = self.path(name)
        if record:
            self.own(name)
        write_text_atomic(final, text)
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


#: Observers of a run's progress: callables ``hook(event, step, folder)``. Events:
#: "checkpoint-written" (a checkpoint's files are on disk in a temporary folder, not yet
#: renamed into place) and "step-done" (after an optimizer step and its checkpoint, if any).
#: Empty in production; tests use it to stop a process at a known point.
HOOKS: list = []


def emit(event: str, step: int, folder: Path) -> None:
    for hook in HOOKS:
        hook(event, step, Path(folder))
