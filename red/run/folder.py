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

``RunIdentity`` is built once from the configuration and the inputs' fingerprints; it
holds the checkpoint metadata and decides what a ``--resume`` may change:

- identity settings (teacher, data, width, sequence length, init, losses, batch and
  accumulation, seed, precision...) define the run: a change is refused, naming each key;
- schedule settings (steps, lr, warmup, grad_clip and the log/eval/save cadence) may
  change only with ``--allow-change KEY``; the change is recorded in ``run.yaml`` under
  ``history`` with the step it took effect, so ``run.yaml`` always reproduces the run;
- execution settings (device, kernels, activation checkpointing, recomputing weights,
  export dtype, the paths of inputs whose contents are unchanged) are free.

How a schedule change continues the learning rate: see ``red.train.trainer.lr_schedule``.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import re
import shutil
import time
from pathlib import Path

from red.errors import RedError

RUN_YAML = "run.yaml"
METRICS = "metrics.jsonl"
CALIBRATION = "calibration.safetensors"
CHECKPOINTS = "checkpoints"
STUDENT = "student"
RESULT = "result.json"
DATA = "data"  # token stores of the --data files, one folder per --data entry
MANIFEST = ".red-run.json"
LOCK = ".red-lock"
#: names a run folder holds; a folder with any of them and no manifest is of unknown origin
RUN_MARKERS = (RUN_YAML, METRICS, CHECKPOINTS, STUDENT, RESULT, CALIBRATION)
#: what `red distill` may write at the top of its folder (besides the metrics sinks' folders)
RUN_WRITES = (RUN_YAML, METRICS, CALIBRATION, CHECKPOINTS, STUDENT, RESULT, DATA)
#: names whose temporaries (".NAME.tmp-PID") red removes when it clears a folder
KNOWN_TEMP_OWNERS = frozenset((*RUN_WRITES, MANIFEST))

IDENTITY_KEYS = ("hidden_size", "preset", "seq_len", "val_fraction", "text_field", "txt_split", "init",
                 "calib_samples", "score", "init_std", "norm_eps", "temperature", "kl_weight", "kl_t2_scale",
                 "lm_weight", "clone_weight", "clone_norm", "batch_size", "grad_accum", "seed", "precision",
                 "kl_reduction", "divergence", "jsd_beta", "teacher_top_k", "loss_on", "cross_doc_attention")
SCHEDULE_KEYS = ("steps", "lr", "adam_eps", "warmup", "grad_clip", "log_every", "eval_every", "val_batches", "save_every",
                 "keep_checkpoints")
# inputs compared by content (fingerprint), not by path: a moved teacher or corpus is the same run
INPUT_KEYS = ("teacher", "data", "calibration")
FREE_KEYS = ("out", "device", "kernels", "activation_checkpointing", "teacher_sharding", "step_weights", "export_dtype", "report_to",
             "overwrite", "resume", "trust_remote_code", "allow_change", "history")


_HASHES: dict[tuple, str] = {}
_RACY_NS = 2_000_000_000  # a file modified this recently may change again within the same time stamp


def file_sha256(path: str | Path) -> str:
    """sha256 of a file's bytes (hex), read in 16 MB blocks.

    Every byte is read; the digest is kept for this process only (never on disk), keyed by
    the file's identity and stamps (device, inode, size, mtime_ns, ctime_ns), so that the
    checks that fingerprint the same teacher, corpus or store read it once. Any write
    changes mtime and ctime; a file modified in the last two seconds is not cached, since
    a second write in the same clock tick would keep its stamps (git's "racy" rule)."""
    p = Path(path)
    st = p.stat()
    key = (str(p.absolute()), st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)
    if key in _HASHES:
        return _HASHES[key]
    h = hashlib.sha256()
    with open(p, "rb") as f:
        for block in iter(lambda: f.read(1 << 24), b""):
            h.update(block)
    digest = h.hexdigest()
    after = p.stat()
    same = (after.st_size, after.st_mtime_ns, after.st_ctime_ns) == key[3:]
    if same and time.time_ns() - max(st.st_mtime_ns, st.st_ctime_ns) > _RACY_NS:
        if len(_HASHES) > 4096:
            _HASHES.clear()
        _HASHES[key] = digest
    return digest


def file_fingerprint(path: str | Path) -> str:
    """sha256 of a file's bytes (first 16 hex digits): tells one input file from another."""
    return file_sha256(path)[:16]


def _is_within(p: Path, root: Path) -> bool:
    return p == root or root in p.parents


def check_separate(out: str | Path, inputs) -> None:
    """Refuse an output folder that is, contains or lies inside one of ``inputs``
    ({description: path} or (description, path) pairs; globs already expanded):
    replacing or filling it could destroy what the command reads."""
    o = Path(out).absolute().resolve()
    for what, path in (inputs.items() if isinstance(inputs, dict) else inputs):
        if not path or not str(path):
            continue
        p = Path(path).absolute().resolve()
        if o == p or _is_within(p, o) or _is_within(o, p):
            rel = "is" if o == p else ("contains" if _is_within(p, o) else "lies inside")
            raise RedError(f"output {out} {rel} the {what} {path}; pick an output folder apart from the inputs")


def check_out_path(out: str | Path, flag: str = "--out") -> None:
    """Refuse an output path the file system cannot hold (a name over the length limit)
    or one that would create folders it does not end in: every folder before a ``..`` of
    ``out`` must exist, else making ``a/b/../c`` would leave an empty ``a/b`` behind.
    (os.path's tests, which never raise: pathlib's raise on a name that is too long.)"""
    text = str(out)
    if not text:
        raise RedError(f"no output path given; pass {flag} PATH")
    parts = Path(text).parts
    whole = os.path.abspath(text)
    base = whole
    while not os.path.isdir(base) and os.path.dirname(base) != base:
        base = os.path.dirname(base)
    try:
        name_max, path_max = os.pathconf(base, "PC_NAME_MAX"), os.pathconf(base, "PC_PATH_MAX")
    except (OSError, ValueError):
        name_max, path_max = 255, 4096
    long = [p for p in parts if len(os.fsencode(p)) > name_max]
    if long:
        raise RedError(f"{flag} names a file or folder of {len(os.fsencode(long[0]))} bytes ({long[0][:24]}...); "
                       f"this file system takes at most {name_max}: pick a shorter name")
    if len(os.fsencode(whole)) >= path_max:
        raise RedError(f"{flag} is a path of {len(os.fsencode(whole))} bytes; this file system takes at most "
                       f"{path_max - 1}: pick a shorter path")
    for i, part in enumerate(parts):
        if part == ".." and not os.path.isdir(os.path.join(*parts[:i])):
            raise RedError(f"{flag} {text} goes through {os.path.join(*parts[:i])}, which does not exist, and back "
                           f"out with '..'; write the path without '..' (e.g. {os.path.normpath(text)})")


def check_output_file(out: str | Path, overwrite: bool, written_by_red, kind: str, inputs=(),
                      flag: str = "--out") -> Path:
    """A single file a command writes (a calibration, an eval report): a usable path, not a
    link or a folder, apart from the command's ``inputs``; an existing file is replaced only
    with ``overwrite`` and only when ``written_by_red(path)`` says red wrote it. Reads only."""
    check_out_path(out, flag)
    p = Path(out)
    if p.is_symlink():
        raise RedError(f"{flag} {p} is a symbolic link; red does not write through links: pick another {flag}")
    if p.exists() and not p.is_file():
        raise RedError(f"{flag} {p} is not a file; pass the path of the {kind} to write")
    check_separate(p, inputs)
    if p.exists():
        if not overwrite:
            raise RedError(f"{p} already exists; choose another {flag} or pass --overwrite")
        if not written_by_red(p):
            raise RedError(f"{p} exists and is not a {kind} red wrote; --overwrite replaces only red's own files: "
                           f"pick another {flag}")
    return p


def write_file_atomic(path: str | Path, write) -> None:
    """``write(tmp)`` into a temporary name next to ``path``, then one rename: ``path`` is
    never half written, and on any error (a full disk) the temporary goes and ``path`` is as
    it was; an OSError or a safetensors error becomes one line."""
    p = Path(path)
    tmp = p.with_name(f".{p.name}.tmp-{os.getpid()}")
    try:
        write(tmp)
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, p)
    except Exception as e:
        if not is_write_error(e):
            raise
        raise RedError(f"could not write {p} ({write_error_text(e)}); free space or fix permissions") from None
    finally:
        tmp.unlink(missing_ok=True)


def is_write_error(e: BaseException) -> bool:
    """An error of the disk under a write: OSError (full, read-only, I/O), or safetensors'
    own error type, which is what ``save_file`` raises on a full disk."""
    return isinstance(e, OSError) or type(e).__name__ == "SafetensorError"


def write_error_text(e: BaseException) -> str:
    if isinstance(e, OSError):
        return e.strerror or type(e).__name__
    text = " ".join(str(e).split())
    return text[:200] or type(e).__name__


_RED_TEMP = re.compile(r"^\.(.+\.tmp-\d+|staging-\d+)$")


# -- what red wrote in a folder ---------------------------------------------------------------

def is_entry_name(name) -> bool:
    """A name directly inside a folder: not empty, not ``.`` or ``..``, no separator, not
    absolute. The only kind of name a manifest may list (anything else would lead out)."""
    return (isinstance(name, str) and name not in ("", ".", "..") and "/" not in name and "\\" not in name
            and "\0" not in name and not os.path.isabs(name) and (os.altsep is None or os.altsep not in name))


def read_manifest(folder: Path, name: str, legacy_key: str | None = None) -> tuple[set, set] | None:
    """(entries red wrote, names that were there before) of the manifest ``folder/name``;
    None when there is none. A manifest that is not red's or lists anything but names
    directly inside ``folder`` is refused (one line): red never follows it."""
    f = folder / name

    def bad(why: str) -> RedError:
        return RedError(f"{f} is not a valid red manifest ({why}); red deletes nothing it lists: if the folder is "
                        f"yours, remove {name} and run again, or pick another folder")

    if f.is_symlink():
        raise bad("it is a symbolic link")
    if not f.exists():
        return None
    try:
        m = json.loads(f.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        raise bad("not readable JSON") from None
    if not isinstance(m, dict) or m.get("written_by") != "red":
        raise bad("not written by red")
    entries = m.get("entries", m.get(legacy_key) if legacy_key else None)
    foreign = m.get("foreign", [])
    for what, names in (("entries", entries), ("foreign", foreign)):
        if not isinstance(names, list):
            raise bad(f"{what} is not a list")
        odd = [n for n in names if not is_entry_name(n)]
        if odd:
            raise bad(f"{what} lists {odd[0]!r}, which is not a name directly inside the folder")
    both = set(entries) & set(foreign)
    if both:
        raise bad(f"{sorted(both)[0]!r} is listed both as red's and as there before red")
    return set(entries), set(foreign)


class FolderLock:
    """The OS lock (fcntl, on ``root/.red-lock``) a process holds on a folder it writes:
    one writer at a time; a second is refused with one line naming the holder's pid.
    Run folders and token stores take the same lock."""

    def __init__(self, root: str | Path, what: str = "output folder", fix: str = "pick another --out"):
        self.root, self.what, self.fix = Path(root), what, fix
        self._fd: int | None = None

    @property
    def held(self) -> bool:
        return self._fd is not None

    def acquire(self) -> None:
        """Take the lock (making the folder if needed), or raise RedError naming the holder."""
        import fcntl

        self.root.mkdir(parents=True, exist_ok=True)
        f = self.root / LOCK
        if f.is_symlink():
            raise RedError(f"{f} is a symbolic link; red writes only inside its folders, never through links: "
                           "remove the link")
        fd = os.open(f, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            holder = os.read(fd, 64).decode(errors="replace").strip() or "another process"
            os.close(fd)
            raise RedError(self.busy(holder)) from None
        os.ftruncate(fd, 0)
        os.write(fd, str(os.getpid()).encode())
        self._fd = fd

    def busy(self, holder: str) -> str:
        return f"{self.what} {self.root} is in use by process {holder}; wait for it to finish or {self.fix}"

    def holder(self) -> str | None:
        """The pid holding the lock, or None (checked without taking it)."""
        import fcntl

        f = self.root / LOCK
        if self._fd is not None or f.is_symlink() or not f.is_file():
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

    def check_free(self) -> None:
        """RedError when another process holds the lock (this one takes nothing)."""
        holder = self.holder()
        if holder is not None:
            raise RedError(self.busy(holder))

    def release(self) -> None:
        if self._fd is not None:
            os.close(self._fd)  # closing releases the flock
            self._fd = None


_STALE_TMP = re.compile(r"^\.(?P<name>.+)\.tmp-\d+$")


class OwnedFolder:
    """A folder `red` writes into and its manifest of what it wrote there.

    The one mechanism behind every "delete only what red wrote" rule (run folders, the
    demo's folder and its ``runs/``, exports):

    - the manifest lists entries, names directly inside the folder, each checked when read
      and before anything is removed (``read_manifest``); an invalid manifest is refused;
    - the first time red writes its manifest into a folder that already holds files, their
      names are recorded as ``foreign``: they are never claimed, and red refuses to write
      an entry of that name (``own`` and ``conflicts``), whatever the flags;
    - ``own(name)`` is called before ``name`` is written, and refuses a name that already
      exists without being red's;
    - ``clear_own`` removes only the entries (a sub-folder with its own manifest only
      through that manifest), never through a symbolic link.
    """

    def __init__(self, root: str | Path, manifest: str = MANIFEST, what: str = "output folder",
                 legacy_key: str | None = None):
        if not str(root):
            raise RedError("no output folder given; pass --out DIR")
        self.root = Path(root)
        self.manifest_name, self.what, self.legacy_key = manifest, what, legacy_key
        self._lock = FolderLock(self.root, what)

    # -- paths ------------------------------------------------------------------------
    def path(self, *parts: str) -> Path:
        """``root/parts``, refused when any existing piece of it below the root is a symbolic
        link (a write there could land outside the folder) or a part is not a plain name."""
        p = self.root
        for part in parts:
            if not is_entry_name(part):
                raise RedError(f"{part!r} is not a name inside {self.root}; red writes only inside its folders")
            p = p / part
            if p.is_symlink():
                raise RedError(f"{p} is a symbolic link; red writes only inside its output folder, never "
                               "through links: remove the link or pick another --out")
        return p

    def entries(self) -> list[str]:
        """Names in the folder now (red's or not)."""
        return sorted(p.name for p in self.root.iterdir()) if self.root.is_dir() else []

    # -- the manifest -------------------------------------------------------------------
    def _read(self) -> tuple[set, set] | None:
        return read_manifest(self.root, self.manifest_name, self.legacy_key)

    def has_manifest(self) -> bool:
        return self._read() is not None

    def manifest(self) -> set[str]:
        """Names of the entries `red` wrote into this folder."""
        m = self._read()
        return m[0] if m else set()

    def foreign(self) -> set[str]:
        """Names that were in the folder before `red` first wrote there."""
        m = self._read()
        return m[1] if m else set()

    def _write_manifest(self, entries: set, foreign: set) -> None:
        text = json.dumps({"written_by": "red", "entries": sorted(entries | {self.manifest_name}),
                           "foreign": sorted(foreign)}, indent=1)
        final = self.path(self.manifest_name)
        tmp = self.path(f".{self.manifest_name}.tmp-{os.getpid()}")
        try:
            with open(tmp, "w") as f:
                f.write(text)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, final)
        except OSError as e:
            tmp.unlink(missing_ok=True)
            raise RedError(f"could not write {final} ({e.strerror or e}); free space or fix permissions") from None

    def conflicts(self, names) -> list[str]:
        """Those of ``names`` that exist here but were not written by red (red must not
        write there)."""
        own = self.manifest()
        return [n for n in names if n not in own and os.path.lexists(self.root / n)]

    def own(self, *names: str) -> None:
        """Record ``names`` (top-level entries) as written by `red`; call it before writing
        them. Refuses a name that is already there and not red's."""
        for n in names:
            if not is_entry_name(n):
                raise RedError(f"{n!r} is not a name inside {self.root}; red writes only inside its folders")
        m = self._read()
        if m is None:  # red's first write here: what is already there stays the folder's own
            entries = set()
            foreign = {n for n in self.entries() if n not in (self.manifest_name, LOCK) and not _RED_TEMP.match(n)}
        else:
            entries, foreign = m
        new = [n for n in dict.fromkeys(names) if n not in entries]
        if not new and m is not None:
            return
        clash = [n for n in new if n in foreign or (n != LOCK and os.path.lexists(self.root / n))]
        if clash:
            raise RedError(self.clash_message(clash))
        self.root.mkdir(parents=True, exist_ok=True)
        self._write_manifest(entries | set(new), foreign)

    def clash_message(self, names) -> str:
        listed = ", ".join(names)
        return (f"{self.what} {self.root} already holds {listed}, which red did not write, and red would write "
                f"its own {listed} there; move {'it' if len(names) == 1 else 'them'} aside or pick another folder")

    # -- one writer ---------------------------------------------------------------------
    def lock(self) -> None:
        """Take the folder's OS lock for this process, or fail naming the holder."""
        self._lock.acquire()
        try:
            self.own(LOCK)
        except RedError:
            self.unlock()
            raise

    def holder(self) -> str | None:
        return self._lock.holder()

    @property
    def _lock_fd(self) -> int | None:
        return self._lock._fd

    def unlock(self) -> None:
        self._lock.release()

    # -- replacing --------------------------------------------------------------------------
    def clear_own(self, keep: set[str] = frozenset()) -> None:
        """Delete what `red` wrote here (the manifest's entries but ``keep``), nothing else.
        Entries that have become symbolic links are refused, not followed; a sub-folder
        with a manifest of its own is cleared through it (and removed only when empty)."""
        m = self._read()
        if m is None:
            return
        entries, foreign = m
        kept = entries & set(keep)
        for name in sorted(entries - {LOCK, self.manifest_name} - kept):
            if not remove_owned(self.path(name)):  # path() refuses links
                kept.add(name)  # a folder of red's that still holds others' files stays red's
        for stale in self.root.iterdir():
            hit = _STALE_TMP.match(stale.name)
            if hit and hit.group("name") in entries | KNOWN_TEMP_OWNERS and not stale.is_symlink():
                shutil.rmtree(stale) if stale.is_dir() else stale.unlink()
        self._write_manifest((entries & ({self.manifest_name, LOCK} | kept)), foreign)

    def discard(self, remove_root: bool) -> None:
        """Undo a start that failed before training: delete what `red` wrote, its manifest
        and lock file, and the folder itself when ``remove_root`` (this run created it)."""
        self.clear_own()
        for name in (self.manifest_name, LOCK):
            p = self.root / name
            if p.is_file() and not p.is_symlink():
                p.unlink()
        if remove_root and self.root.is_dir() and not any(self.root.iterdir()):
            self.root.rmdir()


def _tree_bytes(p: Path) -> int:
    """Bytes of the files under ``p`` (links not followed)."""
    if p.is_symlink() or not p.exists():
        return 0
    if p.is_file():
        return p.stat().st_size
    return sum(f.stat().st_size for f in p.rglob("*") if f.is_file() and not f.is_symlink())


def remove_owned(p: Path) -> bool:
    """Remove ``p``, an entry red wrote: a folder with a run manifest of its own only through
    that manifest (what it lists; the folder itself once nothing else is left in it), any
    other folder whole. Returns whether ``p`` is gone (False: files red did not write are
    still in it, and it stays red's)."""
    if p.is_symlink():
        raise RedError(f"{p} is a symbolic link; red deletes nothing through links: remove the link yourself")
    if p.is_dir():
        if not (p / MANIFEST).is_file():
            shutil.rmtree(p)
            return True
        inner = OwnedFolder(p)
        holder = inner.holder()
        if holder is not None:
            raise RedError(f"folder {p} is in use by process {holder}; wait for it to finish")
        inner.clear_own()
        if any(n not in (MANIFEST, LOCK) for n in inner.entries()):
            return False
        for name in (MANIFEST, LOCK):
            (p / name).unlink(missing_ok=True)
        p.rmdir()
        return True
    if os.path.lexists(p):
        p.unlink()
    return True


class RunDir(OwnedFolder):
    """The output folder of one `red distill` run (see the module docstring)."""

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


#: Observers of a run's progress: callables ``hook(event, step, folder)``. Events:
#: "checkpoint-written" (a checkpoint's files are on disk in a temporary folder, not yet
#: renamed into place) and "step-done" (after an optimizer step and its checkpoint, if any).
#: Empty in production; tests use it to stop a process at a known point.
HOOKS: list = []


def emit(event: str, step: int, folder: Path) -> None:
    for hook in HOOKS:
        hook(event, step, Path(folder))
