"""Files red writes and reads, safely: hashing, the one temp-then-rename writer, the one
writer lock, the record of what red wrote in a folder, and safetensors headers.

``OwnedFolder`` is the one mechanism that knows what `red` wrote in a folder (run folders,
the demo's folder, exports): a manifest of entries, each a name directly inside the
folder, checked when read and before any removal; the names a folder held before `red`
first wrote there are recorded and never claimed. ``FolderLock`` is the one writer lock
(run folders and token stores). No write or delete follows a symbolic link out of the
folder.
"""
from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import time
from pathlib import Path

from red.errors import RedError

MANIFEST = ".red-run.json"  # a run folder's manifest; OwnedFolder's default


LOCK = ".red-lock"


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


def write_text_atomic(path: str | Path, text: str) -> Path:
    """``write_file_atomic`` of a text."""
    write_file_atomic(path, lambda tmp: Path(tmp).write_text(text))
    return Path(path)


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

    #: names whose stale temporaries (``.NAME.tmp-PID``) this folder may clean even before
    #: they are entries (a subclass lists the names it writes)
    temp_owners: frozenset = frozenset()

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
        write_text_atomic(self.path(self.manifest_name), text)

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

    def forget(self, *names: str) -> None:
        """Drop ``names`` from the manifest: entries red wrote here that are gone now (a
        later write no longer makes them), so the manifest lists only what is there."""
        m = self._read()
        if m is None or not set(names) & m[0]:
            return
        self._write_manifest(m[0] - set(names), m[1])

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
            if hit and hit.group("name") in entries | self.temp_owners | {self.manifest_name} and not stale.is_symlink():
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


def prepare_output(out: str | Path, overwrite: bool = False, entries=()) -> OwnedFolder:
    """Make ``out`` ready for a command that writes the top-level ``entries`` in a folder
    (``red demo``), and lock it: the folder must be new or empty, or ``overwrite`` removes
    what `red` wrote there before (nothing else); an entry the folder already holds that red
    did not write is refused, whatever the flags. Returns the folder, locked (``unlock``
    it when done); ``own`` each entry before writing it."""
    check_out_path(out)
    folder = OwnedFolder(out)
    check_writable(folder.root, 0)

    def check() -> None:
        if [n for n in folder.entries() if n not in (LOCK, MANIFEST)] and not overwrite:
            raise RedError(f"output folder {out} is not empty; choose a new --out or pass --overwrite")
        clash = folder.conflicts(entries)
        if clash:
            raise RedError(folder.clash_message(clash))

    check()  # before anything is written (the lock itself is a file)
    folder.lock()
    try:
        check()  # again, now that no other red can change the folder
        folder.clear_own()
    except RedError:
        folder.unlock()
        raise
    return folder


def free_disk_bytes(path: str | Path) -> int:
    """Free bytes on the file system that holds ``path`` (or its nearest existing parent)."""
    p = Path(path).absolute()
    while not p.exists() and p != p.parent:
        p = p.parent
    return shutil.disk_usage(p).free


def _probe_writable(folder: Path) -> None:
    probe = folder / f".write-test-{os.getpid()}"
    probe.write_text("ok")
    probe.unlink()


def check_writable(out: str | Path, need_bytes: int = 0) -> None:
    """Raise RedError (and change nothing) unless ``out`` (or the nearest existing parent
    it would be made in) is a writable folder with ``need_bytes`` free."""
    p = Path(out)
    if p.exists() and not p.is_dir():
        raise RedError(f"output path {p} is a file; pass a folder to --out")
    target = p if p.is_dir() else next((q for q in p.absolute().parents if q.exists()), None)
    try:
        if target is None or not target.is_dir():
            raise NotADirectoryError(20, "Not a directory")
        _probe_writable(target)
    except OSError as e:
        raise RedError(f"output folder {p} is not writable ({e.strerror or type(e).__name__}); "
                       "pick a writable --out") from None
    if need_bytes:
        free = free_disk_bytes(p)
        if free < need_bytes:
            raise RedError(f"not enough disk space for {p}: the run's checkpoints and export need about "
                           f"{format_bytes(need_bytes)}, {format_bytes(free)} are free; free space or pick another --out")


def format_bytes(n: float, digits: int = 1, width: int = 0) -> str:
    """``n`` bytes in the largest binary unit it reaches ("1.5 GiB", "812 B"), the number
    right-aligned in ``width`` characters (tables)."""
    for unit, k in (("TiB", 40), ("GiB", 30), ("MiB", 20), ("KiB", 10)):
        if n >= 2 ** k:
            return f"{n / 2 ** k:{width}.{digits}f} {unit}"
    return f"{int(n):{width}d} B"