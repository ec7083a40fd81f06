"""Token stores: a corpus tokenized once, then read by memory map.

A store is a folder::

    store.json              manifest: format, version, token dtype, tokenizer fingerprint and
                            vocabulary size, parts (sources with sizes and sha256, counts, the
                            validation documents), a content fingerprint
    part-00000.tokens       the tokens of every document of part 0, flat (uint16 when the
                            vocabulary fits, else uint32)
    part-00000.ends         uint64, where each document ends (exclusive, within the part)
    part-00000.mask         uint8 per token, 1 = scored under ``--loss-on assistant``
                            (only for parts holding chat rows)

`red prepare` writes one part per invocation (``--append`` adds a part; nothing already
written is modified: part files are written under temporary names, renamed when complete,
and the manifest is replaced last). Documents follow ``red.data.corpus``'s convention
(``[bos] + tokens + end``; chat rows are rendered with the chat template instead of the bos).

The validation split is made per part when it is written, by whole documents: groups of
consecutive documents drawn at random (seeded) until they hold ``val_fraction`` of the
part's tokens. Training reads the remaining documents as one stream cut into blocks of
``seq_len`` (``BlockView``), so memory does not depend on the corpus size and a rank reads
only the blocks it trains on.
"""
from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
from collections import deque
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np
import torch

from red.errors import RedError
from red.files import write_text_atomic, LOCK, FolderLock, file_sha256
from red.data.sources import STORE_MANIFEST, DatasetFiles, Row, expand_source, iter_rows, render_chat

MANIFEST = STORE_MANIFEST
FORMAT = "red-token-store"
VERSION = 1
CHUNK_CHARS = 1 << 20  # text per worker job
#: a source whose text tokens are more than this share the unknown token is refused
MAX_UNKNOWN_SHARE = 0.5


# -- the tokenizer -------------------------------------------------------------------------

def tokenizer_fingerprint(tokenizer) -> str:
    """sha256 (16 hex digits) of what decides the token ids: the vocabulary and rules, the
    special tokens and the chat template (not padding/truncation state)."""
    h = hashlib.sha256()
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:
        spec = json.loads(backend.to_str())
        spec.pop("truncation", None)
        spec.pop("padding", None)
        h.update(json.dumps(spec, sort_keys=True).encode())
    else:
        h.update(json.dumps(sorted(tokenizer.get_vocab().items())).encode())
    h.update(json.dumps([type(tokenizer).__name__, tokenizer.bos_token_id, tokenizer.eos_token_id,
                         tokenizer.pad_token_id, getattr(tokenizer, "chat_template", None) or ""]).encode())
    return h.hexdigest()[:16]


def token_dtype(vocab_size: int) -> np.dtype:
    return np.dtype(np.uint16) if vocab_size <= 1 << 16 else np.dtype(np.uint32)


# -- encoding rows ---------------------------------------------------------------------------

def encode_rows(rows: Sequence[Row], tokenizer, end: list[int]):
    """(tokens int64, document lengths int64, mask uint8 or None) of ``rows``; the mask is
    None when no row is a conversation."""
    bos = tokenizer.bos_token_id
    texts = [r for r in rows if isinstance(r, str)]
    enc = iter(tokenizer(texts, add_special_tokens=False)["input_ids"]) if texts else iter(())
    pieces, masks, lengths, any_chat = [], [], [], False
    for r in rows:
        if isinstance(r, str):
            ids = ([bos] if bos is not None else []) + next(enc) + end
            m = None
        else:
            any_chat = True
            ids, m = _encode_chat(r, tokenizer, end)
        pieces.append(np.asarray(ids, dtype=np.int64))
        masks.append(m)
        lengths.append(len(ids))
    tokens = np.concatenate(pieces) if pieces else np.zeros(0, np.int64)
    mask = None
    if any_chat:
        mask = np.concatenate([m if m is not None else np.ones(len(p), np.uint8) for p, m in zip(pieces, masks)])
    return tokens, np.asarray(lengths, dtype=np.int64), mask


def _encode_chat(messages: list, tokenizer, end: list[int]):
    text, spans = render_chat(messages, tokenizer)
    if not getattr(tokenizer, "is_fast", False):
        raise RedError("chat rows need a fast tokenizer (tokenizer.json) to find the assistant tokens; give the "
                       "teacher folder a tokenizer.json")
    enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    starts = np.asarray([a for a, _ in enc["offset_mapping"]], dtype=np.int64)
    mask = np.zeros(len(starts) + len(end), np.uint8)
    for a, b in spans:
        mask[: len(starts)][(starts >= a) & (starts < b)] = 1
    return list(enc["input_ids"]) + end, mask


_WORKER: dict = {}


def _init_worker(tokenizer, end) -> None:
    # one process per core already; also keeps the tokenizers library from warning that
    # it was forked after the parent used its thread pool. (No torch here: using OpenMP
    # in a process forked from one that already did can hang.)
    os.environ["TOKENIZERS_PARALLELISM"] = "false"
    _WORKER["tok"], _WORKER["end"] = tokenizer, end


def check_unknown_share(source, unknown: int, text_tokens: int, tokenizer) -> None:
    """Refuse a source whose text tokens are mostly the tokenizer's unknown token (over
    ``MAX_UNKNOWN_SHARE``): text it cannot represent (another script or encoding) would
    train the student on one repeated token."""
    if text_tokens > 0 and unknown > MAX_UNKNOWN_SHARE * text_tokens:
        raise RedError(f"corpus {source}: {100 * unknown / text_tokens:.0f}% of its tokens are the tokenizer's unknown "
                       f"token {tokenizer.unk_token!r}, so the text is mostly what the tokenizer cannot represent "
                       f"(red refuses over {100 * MAX_UNKNOWN_SHARE:.0f}%); check the file's language and encoding, "
                       "or use the teacher's own tokenizer")


def _encode_job(rows):
    return encode_rows(rows, _WORKER["tok"], _WORKER["end"])


def _chunks(rows: Iterable[Row], chars: int = CHUNK_CHARS):
    """Rows in jobs of about ``chars`` characters (the unit of work of one worker)."""
    job, size = [], 0
    for r in rows:
        job.append(r)
        size += len(r) if isinstance(r, str) else sum(len(m["content"]) for m in r)
        if size >= chars:
            yield job, size
            job, size = [], 0
    if job:
        yield job, size


# -- writing a part ----------------------------------------------------------------------------

class _PartWriter:
    """Appends encoded documents to a part's files under temporary names; ``finish`` renames
    them into place, ``abort`` deletes them."""

    def __init__(self, root: Path, index: int, dtype: np.dtype, vocab_size: int, unk_id: int | None = None):
        self.root, self.name, self.dtype, self.vocab_size = root, f"part-{index:05d}", dtype, vocab_size
        self.unk_id = unk_id
        self.tokens = self.documents = self.unknown = 0
        self.files = {}
        self.hashes = {}
        for kind in ("tokens", "ends"):
            self._open(kind)
        self.has_mask = False

    def _tmp(self, kind: str) -> Path:
        return self.root / f".{self.name}.{kind}.tmp-{os.getpid()}"

    def _open(self, kind: str) -> None:
        self.files[kind] = open(self._tmp(kind), "wb")
        self.hashes[kind] = hashlib.sha256()

    def _write(self, kind: str, arr: np.ndarray) -> None:
        b = arr.tobytes()
        self.files[kind].write(b)
        self.hashes[kind].update(b)

    def write(self, tokens: np.ndarray, lengths: np.ndarray, mask: np.ndarray | None) -> None:
        if mask is not None and not self.has_mask:  # first chat rows: every earlier token is scored
            self._open("mask")
            self.has_mask = True
            for start in range(0, self.tokens, 1 << 24):
                self._write("mask", np.ones(min(1 << 24, self.tokens - start), np.uint8))
        if len(tokens) and int(tokens.max()) >= self.vocab_size:
            raise RedError("the tokenizer produced ids beyond its vocabulary; use the teacher's own tokenizer")
        self._write("tokens", tokens.astype(self.dtype))
        self._write("ends", (self.tokens + np.cumsum(lengths)).astype(np.uint64))
        if self.has_mask:
            self._write("mask", mask if mask is not None else np.ones(len(tokens), np.uint8))
        if self.unk_id is not None:
            self.unknown += int((tokens == self.unk_id).sum())
        self.tokens += len(tokens)
        self.documents += len(lengths)

    def close(self) -> None:
        for f in self.files.values():
            f.close()

    def finish(self) -> dict:
        self.close()
        files = {}
        for kind in self.files:
            final = self.root / f"{self.name}.{kind}"
            os.replace(self._tmp(kind), final)
            files[kind] = {"name": final.name, "bytes": final.stat().st_size,
                           "sha256": self.hashes[kind].hexdigest()}
        return files

    def abort(self) -> None:
        self.close()
        for kind in self.files:
            self._tmp(kind).unlink(missing_ok=True)


def choose_val_ranges(ends: np.ndarray, fraction: float, seed: int) -> list[list[int]]:
    """[start, stop) ranges of documents held out: groups of consecutive documents (at most
    ~1000 groups) drawn in a seeded random order until they hold ``fraction`` of the
    tokens; at least one group, never all of them."""
    n = len(ends)
    if n < 2:
        raise RedError(f"the corpus is too short: it holds {n} document(s) and a validation split by documents "
                       "needs at least 2; add text (with --txt-split file a .txt is one document: use line or "
                       "paragraph)")
    g = max(1, n // 1000)
    starts = np.arange(0, n, g)
    stops = np.minimum(starts + g, n)
    ends64 = ends.astype(np.int64)
    first = np.concatenate([[0], ends64[:-1]])
    lens = ends64[stops - 1] - first[starts]
    order = np.random.default_rng(seed).permutation(len(starts))
    cum = np.cumsum(lens[order])
    k = int(np.searchsorted(cum, fraction * ends64[-1])) + 1
    k = max(1, min(k, len(starts) - 1))
    picked = sorted(order[:k])
    ranges: list[list[int]] = []
    for gi in picked:
        a, b = int(starts[gi]), int(stops[gi])
        if ranges and ranges[-1][1] == a:
            ranges[-1][1] = b
        else:
            ranges.append([a, b])
    return ranges


def source_record(p) -> dict:
    """A source's identity: name, size and sha256 (of every file, for a saved dataset or a
    ``DatasetFiles`` set)."""
    if isinstance(p, DatasetFiles):
        h = hashlib.sha256()
        for f in p.files:
            h.update(str(f.name).encode() + b"\0" + file_sha256(f).encode())
        return {"path": str(p), "bytes": sum(f.stat().st_size for f in p.files), "sha256": h.hexdigest()}
    if p.is_dir():
        files = sorted(f for f in p.rglob("*") if f.is_file())
        h = hashlib.sha256()
        for f in files:
            h.update(f.relative_to(p).as_posix().encode() + b"\0" + file_sha256(f).encode())
        return {"path": str(p), "bytes": sum(f.stat().st_size for f in files), "sha256": h.hexdigest()}
    return {"path": str(p), "bytes": p.stat().st_size, "sha256": file_sha256(p)}


def _content_fingerprint(manifest: dict) -> str:
    keep = {"dtype": manifest["dtype"], "tokenizer": manifest["tokenizer"]["fingerprint"],
            "parts": [{"files": {k: v["sha256"] for k, v in p["files"].items()}, "val": p["val"]}
                      for p in manifest["parts"]]}
    return hashlib.sha256(json.dumps(keep, sort_keys=True).encode()).hexdigest()[:16]


def _write_manifest(root: Path, manifest: dict) -> None:
    manifest["tokens"] = sum(p["tokens"] for p in manifest["parts"])
    manifest["documents"] = sum(p["documents"] for p in manifest["parts"])
    manifest["fingerprint"] = _content_fingerprint(manifest)
    write_text_atomic(root / MANIFEST, json.dumps(manifest, indent=1))


def prepare_store(sources: Sequence[str], out: str | Path, tokenizer, *, text_field: str = "text",
                  txt_split: str = "line", val_fraction: float = 0.05, seed: int = 0, workers: int = 0,
                  append: bool = False, overwrite: bool = False, progress: bool = True,
                  records: list | None = None) -> "TokenStore":
    """Tokenize ``sources`` (paths or glob patterns) into the store ``out`` (one new part).

    Streams the rows (memory does not grow with the corpus), encodes them in ``workers``
    processes (0: one per core but one; 1: in this process), shows progress, and writes nothing
    that stays behind on an error: a new store folder is removed, an appended part's
    files are deleted and the manifest is untouched."""
    root = Path(out)
    # a DatasetFiles is a source already expanded (red distill's plan): its text joins the
    # files with commas and is no pattern, so it is taken as it is, not globbed again
    files = [f if isinstance(f, DatasetFiles) else Path(f) for s in sources
             for f in ([s] if isinstance(s, DatasetFiles) else expand_source(str(s)))]
    if not files:
        raise RedError("no source given; pass at least one file, glob or saved dataset")
    # read-only checks first: nothing (not even the lock file) is written into a folder refused here
    if root.exists() and not root.is_dir():
        raise RedError(f"store path {root} is a file; pass a folder to --out")
    if append:
        TokenStore(root, tokenizer)  # checks it, and that the tokenizer is the same
    elif root.is_dir() and any(n.name != LOCK for n in root.iterdir()):
        if not (root / MANIFEST).is_file():
            raise RedError(f"folder {root} is not empty and is not a token store; pick a new --out")
        if not overwrite:
            raise RedError(f"{root} already holds a token store; add --append to add sources to it, or "
                           "--overwrite to replace it")
        TokenStore.read_manifest(root)  # its part names are checked before anything is deleted
    created = not root.exists()
    fresh = created or not any(root.iterdir())
    lock = FolderLock(root, "token store", "pick another --out")
    lock.acquire()  # one writer: a second `red prepare` on this store is refused, naming this process
    try:
        return _prepare_locked(files, root, tokenizer, text_field, txt_split, val_fraction, seed, workers, append,
                               overwrite, progress, records, created, fresh)
    except BaseException:
        if created:
            lock.release()
            shutil.rmtree(root, ignore_errors=True)
        elif fresh:
            (root / LOCK).unlink(missing_ok=True)
        raise
    finally:
        lock.release()


def _prepare_locked(files, root: Path, tokenizer, text_field, txt_split, val_fraction, seed, workers, append,
                    overwrite, progress, records, created: bool, fresh: bool) -> "TokenStore":
    """``prepare_store`` once the store's lock is held: its manifest is read again here."""
    fp = tokenizer_fingerprint(tokenizer)
    store, manifest, known = _locked_manifest(root, tokenizer, fp, append, overwrite)
    end = document_separator(tokenizer)
    # 0: a worker per core but one, which this process needs to read, order and write
    # (measured on 2 cores: 2 workers were slower than 1 at 100 M tokens)
    workers = workers or max(1, (os.cpu_count() or 1) - 1)
    writer = _PartWriter(root, len(manifest["parts"]), np.dtype(manifest["dtype"]),
                         manifest["tokenizer"]["vocab_size"], tokenizer.unk_token_id)
    records, per_source, val, part_files = _write_part(writer, files, root, tokenizer, end, text_field, txt_split,
                                                       val_fraction, seed + len(manifest["parts"]), workers,
                                                       progress, records, known)
    for r, (docs, toks) in zip(records, per_source):
        r["documents"], r["tokens"] = docs, toks
        r["kind"] = "chat" if writer.has_mask else "text"
    manifest["parts"].append({"files": part_files, "tokens": writer.tokens, "documents": writer.documents,
                              "has_mask": writer.has_mask, "sources": records, "text_field": text_field,
                              "txt_split": txt_split, "val_fraction": val_fraction, "split_seed": seed,
                              "val": val})
    _commit_manifest(root, manifest, part_files)
    del store
    return TokenStore(root, tokenizer)


def _locked_manifest(root: Path, tokenizer, fp: str, append: bool, overwrite: bool) -> tuple:
    """``(store, manifest, known)`` under the lock: with ``append`` the store as it is now
    (another append may have added a part) and its sources by sha256; else a new empty
    manifest for ``tokenizer`` (fingerprint ``fp``), once ``overwrite`` has removed the old
    store's own files."""
    if append:
        store = TokenStore(root, tokenizer)  # read under the lock: another append may have added a part
        manifest = store.manifest
        known = {s["sha256"]: s["path"] for p in manifest["parts"] for s in p["sources"]}
        return store, manifest, known
    if overwrite and (root / MANIFEST).is_file():
        _remove_store(root)
    manifest = {"format": FORMAT, "version": VERSION, "dtype": token_dtype(len(tokenizer)).name,
                "tokenizer": {"fingerprint": fp, "vocab_size": len(tokenizer),
                              "class": type(tokenizer).__name__},
                "parts": []}
    return None, manifest, {}


def _write_part(writer: "_PartWriter", files, root: Path, tokenizer, end, text_field, txt_split, val_fraction,
                split_seed: int, workers: int, progress, records, known: dict) -> tuple:
    """Encode the sources into the new part's files: ``(records, per_source, val, part_files)``.
    A source the store already holds is refused first; on any failure the part's
    temporaries go and the store is as it was (an OSError, e.g. a full disk, as RedError)."""
    try:
        records = records or [source_record(f) for f in files]
        for r in records:
            if r["sha256"] in known:
                raise RedError(f"source {r['path']} is already in store {root} (as {known[r['sha256']]}); "
                               "nothing was added")
        per_source = _encode_sources(files, records, writer, tokenizer, end, text_field, txt_split, workers,
                                     progress)
        if writer.tokens == 0:
            raise RedError(f"corpus {', '.join(map(str, files))} holds no text; give a corpus with at least a "
                           "few documents")
        writer.close()
        ends = np.fromfile(writer._tmp("ends"), dtype=np.uint64)
        val = choose_val_ranges(ends, val_fraction, split_seed)
        part_files = writer.finish()
    except OSError as e:  # a full disk, an I/O error: the part's temporaries go, the store is as it was
        writer.abort()
        raise RedError(f"could not write token store {root} ({e.strerror or type(e).__name__}); nothing was "
                       "added to it: free space and run again") from None
    except BaseException:
        writer.abort()
        raise
    return records, per_source, val, part_files


def _commit_manifest(root: Path, manifest: dict, part_files: dict) -> None:
    """Write the manifest that lists the new part; if that fails (e.g. the disk filled up)
    the unlisted part's files go, so the store is as it was before this call."""
    try:
        _write_manifest(root, manifest)
    except OSError as e:  # e.g. the disk filled up: the new part is not listed, so it goes
        for f in part_files.values():
            (root / f["name"]).unlink(missing_ok=True)
        raise RedError(f"could not write {root / MANIFEST} ({e.strerror or e}); the store is as it was before "
                       "this call: free space and run red prepare again") from None


_STORE_TMP = re.compile(r"^\.(part-\d{5}\.(tokens|ends|mask)|" + re.escape(MANIFEST) + r")\.tmp-\d+$")


def _remove_store(root: Path) -> None:
    """Delete a store's own files (``--overwrite``): the part files its valid manifest
    names, temporaries of its own names, the manifest. Anything else in the folder stays."""
    old = TokenStore.read_manifest(root)
    for f in store_files(root, old):
        if f.is_symlink() or f.is_file():
            f.unlink()  # a link itself, never what it points to
    for p in root.iterdir():
        if _STORE_TMP.match(p.name) and (p.is_symlink() or p.is_file()):
            p.unlink()
    (root / MANIFEST).unlink()


def _encode_sources(files, records, writer, tokenizer, end, text_field, txt_split, workers, progress):
    """Encode every source into ``writer`` in order; returns (documents, tokens) per source."""
    from tqdm import tqdm

    bar = tqdm(total=sum(r["bytes"] for r in records), unit="B", unit_scale=True, desc="tokenizing",
               disable=not progress)
    out = []
    pool = None
    if workers > 1:
        import multiprocessing as mp

        ctx = mp.get_context("fork" if "fork" in mp.get_all_start_methods() else "spawn")
        pool = ctx.Pool(workers, initializer=_init_worker, initargs=(tokenizer, end))
    else:
        _WORKER["tok"], _WORKER["end"] = tokenizer, end
    try:
        for f in files:
            d0, t0, u0 = writer.documents, writer.tokens, writer.unknown
            pending: deque = deque()
            for job, size in _chunks(iter_rows(f, text_field, txt_split)):
                if pool is None:
                    writer.write(*_encode_job(job))
                    bar.update(size)
                    continue
                pending.append((pool.apply_async(_encode_job, (job,)), size))
                while len(pending) > 2 * workers:  # bounded: memory does not grow with the corpus
                    res, n = pending.popleft()
                    writer.write(*res.get())
                    bar.update(n)
            while pending:
                res, n = pending.popleft()
                writer.write(*res.get())
                bar.update(n)
            docs, toks = writer.documents - d0, writer.tokens - t0
            check_unknown_share(f, writer.unknown - u0, toks - docs * (len(end) + (tokenizer.bos_token_id is not None)),
                                tokenizer)
            out.append((docs, toks))
    finally:
        if pool is not None:
            pool.terminate()
        bar.close()
    return out


# -- reading ------------------------------------------------------------------------------

def part_file_name(index: int, kind: str) -> str:
    """The one name part ``index``'s ``kind`` file may have (a manifest naming anything else
    is refused: its names are never followed out of the store)."""
    return f"part-{index:05d}.{kind}"


PART_KINDS = ("tokens", "ends", "mask")
_HEX64 = re.compile(r"[0-9a-f]{64}")


def _is_count(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and v >= 0


def manifest_problem(m: dict) -> str | None:
    """What is wrong with the fields of a store manifest ``m`` (None when nothing): the
    dtype, the tokenizer record, and every part's files (each named exactly
    ``part_file_name``, with a size and a sha256), counts and validation ranges (sorted,
    disjoint document ranges inside the part), and the content fingerprint."""
    if m.get("dtype") not in ("uint16", "uint32"):
        return f"dtype {m.get('dtype')!r} is not uint16 or uint32"
    tok = m.get("tokenizer")
    if not (isinstance(tok, dict) and isinstance(tok.get("fingerprint"), str) and _is_count(tok.get("vocab_size"))
            and tok["vocab_size"] > 0):
        return "the tokenizer record lacks its fingerprint or vocabulary size"
    if m["dtype"] == "uint16" and tok["vocab_size"] > 1 << 16:
        return f"a vocabulary of {tok['vocab_size']} tokens does not fit uint16"
    parts = m.get("parts")
    if not isinstance(parts, list):
        return "parts is not a list"
    for i, p in enumerate(parts):
        if not isinstance(p, dict) or not isinstance(p.get("files"), dict):
            return f"part {i} is not a record with files"
        if not (_is_count(p.get("tokens")) and _is_count(p.get("documents"))):
            return f"part {i}'s token and document counts are not counts"
        for kind, f in p["files"].items():
            if kind not in PART_KINDS or not isinstance(f, dict):
                return f"part {i} lists a file of unknown kind {kind!r}"
            if f.get("name") != part_file_name(i, kind):
                return f"part {i}'s {kind} file is named {f.get('name')!r}, not {part_file_name(i, kind)}"
            if not _is_count(f.get("bytes")) or not isinstance(f.get("sha256"), str) \
                    or not _HEX64.fullmatch(f["sha256"]):
                return f"part {i}'s {kind} file lacks its size or sha256"
        val, at = p.get("val"), 0
        if not isinstance(val, list):
            return f"part {i}'s validation ranges are not a list"
        for r in val:
            if not (isinstance(r, list) and len(r) == 2 and all(_is_count(x) for x in r)
                    and at <= r[0] < r[1] <= p["documents"]):
                return f"part {i}'s validation range {r!r} is not a sorted range of its {p['documents']} documents"
            at = r[1]
        if not isinstance(p.get("sources", []), list):
            return f"part {i}'s sources are not a list"
    if m.get("fingerprint") != _content_fingerprint(m):
        return "its content fingerprint does not match its parts"
    return None


def store_files(root: Path, manifest: dict) -> list[Path]:
    """The part files of a (valid) manifest: the only files of a store red reads or deletes."""
    return [root / part_file_name(i, kind) for i, p in enumerate(manifest["parts"]) for kind in p["files"]]


def _check_contents(store: "TokenStore", m: dict) -> None:
    """What a same-size edit of a part file could break, read once in chunks: document ends
    rise and stop at the part's tokens, ids are inside the vocabulary, the mask is 0/1."""
    vocab = m["tokenizer"]["vocab_size"]
    step = 1 << 24
    for i, p in enumerate(store.parts):
        prev = 0
        for a in range(0, len(p.ends), step):
            e = np.asarray(p.ends[a: a + step]).astype(np.int64)
            if len(e) and (int(e[0]) < prev or bool((np.diff(e) < 0).any())):
                raise store._mismatch(f"part {i}'s document ends do not rise")
            prev = int(e[-1]) if len(e) else prev
        for a in range(0, len(p.tokens), step):
            if int(np.asarray(p.tokens[a: a + step]).max(initial=0)) >= vocab:
                raise store._mismatch(f"part {i} holds token ids beyond the vocabulary of {vocab}")
        if p.mask is not None:
            for a in range(0, len(p.mask), step):
                if int(np.asarray(p.mask[a: a + step]).max(initial=0)) > 1:
                    raise store._mismatch(f"part {i}'s loss mask holds values other than 0 and 1")


@dataclass
class _Part:
    tokens: np.ndarray        # memmap
    ends: np.ndarray          # memmap, uint64
    mask: np.ndarray | None   # memmap, uint8
    doc_base: int             # documents in earlier parts
    val: list


class TokenStore:
    """A store opened for reading; every check that needs no full read is made here, and
    with ``verify`` every byte is read: each file's sha256 against the manifest (the store's
    fingerprint then stands for its contents) and the contents' own rules."""

    def __init__(self, root: str | Path, tokenizer=None, verify: bool = False):
        self.root = Path(root)
        self.manifest = self.read_manifest(self.root)
        m = self.manifest
        if tokenizer is not None:
            fp = tokenizer_fingerprint(tokenizer)
            if fp != m["tokenizer"]["fingerprint"]:
                raise RedError(f"token store {self.root} was made with another tokenizer ({m['tokenizer']['class']}, "
                               f"{m['tokenizer']['vocab_size']} tokens, fingerprint {m['tokenizer']['fingerprint']}; "
                               f"the teacher's is {fp}); prepare it again with the teacher's tokenizer: "
                               "red prepare --tokenizer TEACHER")
        dtype = np.dtype(m["dtype"])
        self.parts: list[_Part] = []
        docs = 0
        for i, p in enumerate(m["parts"]):
            want = {"tokens": p["tokens"] * dtype.itemsize, "ends": p["documents"] * 8}
            if p.get("has_mask"):
                want["mask"] = p["tokens"]
            if set(want) != set(p["files"]):
                raise self._mismatch(f"part {i} lists files {sorted(p['files'])}, expected {sorted(want)}")
            if p["documents"] == 0 or p["tokens"] == 0:
                raise self._mismatch(f"part {i} holds no document")
            arrays = {}
            for kind, size in want.items():
                f = self.root / part_file_name(i, kind)  # the manifest's name, checked to be exactly this
                if f.is_symlink() or not f.is_file():
                    raise self._mismatch(f"{f.name} is missing")
                have = f.stat().st_size
                if have != size or p["files"][kind]["bytes"] != size:
                    raise self._mismatch(f"{f.name} holds {have} bytes, its manifest says {size}"
                                         + (" (truncated)" if have < size else ""))
                if verify and file_sha256(f) != p["files"][kind]["sha256"]:
                    raise self._mismatch(f"{f.name}'s contents differ from its manifest's sha256")
                arrays[kind] = np.memmap(f, dtype={"tokens": dtype, "ends": np.uint64, "mask": np.uint8}[kind],
                                         mode="r")
            if int(arrays["ends"][-1]) != p["tokens"]:
                raise self._mismatch(f"part {i}'s document ends do not end at its {p['tokens']} tokens")
            self.parts.append(_Part(arrays["tokens"], arrays["ends"], arrays.get("mask"), docs, p["val"]))
            docs += p["documents"]
        if not self.parts:
            raise self._mismatch("it lists no parts")
        if verify:
            _check_contents(self, m)

    @staticmethod
    def read_manifest(root: Path) -> dict:
        """``store.json`` of the store ``root``, every field checked (``check_manifest``)."""
        f = root / MANIFEST
        if not root.is_dir():
            raise RedError(f"token store {root} does not exist; make it with red prepare")
        if f.is_symlink() or not f.is_file():
            raise RedError(f"{root} is not a token store (no {MANIFEST}); make one with red prepare")
        try:
            m = json.loads(f.read_text())
        except (OSError, json.JSONDecodeError, UnicodeDecodeError):
            raise RedError(f"token store {root}: {MANIFEST} is not valid JSON; prepare the store again") from None
        if not isinstance(m, dict) or m.get("format") != FORMAT:
            raise RedError(f"token store {root}: {MANIFEST} is not a red token store manifest; prepare it again")
        if m.get("version") != VERSION:
            raise RedError(f"token store {root} has format version {m.get('version')}, this red reads {VERSION}; "
                           "prepare it again with this red")
        why = manifest_problem(m)
        if why:
            raise RedError(f"token store {root}: {MANIFEST} is damaged ({why}); red reads and deletes only the "
                           "part files a valid manifest names: prepare the store again (red prepare --overwrite)")
        return m

    def _mismatch(self, what: str) -> RedError:
        return RedError(f"token store {self.root} does not match its manifest: {what}; prepare it again "
                        "(red prepare --overwrite)")

    @property
    def fingerprint(self) -> str:
        return self.manifest["fingerprint"]

    @property
    def has_mask(self) -> bool:
        return any(p.mask is not None for p in self.parts)

    def spans(self, split: str) -> list[tuple[int, int, int]]:
        """(part, start, stop) token ranges of the ``train`` or ``val`` documents, in order."""
        out = []
        for i, p in enumerate(self.parts):
            n_docs = len(p.ends)

            def tok(doc: int) -> int:
                return 0 if doc == 0 else int(p.ends[doc - 1])

            held = [(a, b) for a, b in p.val]
            if split == "val":
                out += [(i, tok(a), tok(b)) for a, b in held]
            else:
                prev = 0
                for a, b in held + [(n_docs, n_docs)]:
                    if a > prev:
                        out.append((i, tok(prev), tok(a)))
                    prev = b
        return out

    def scored_tokens(self, split: str) -> int:
        """Tokens of the ``train`` or ``val`` documents that ``--loss-on assistant`` scores
        (every token of a part without chat rows; the mask's ones otherwise), read in chunks."""
        n = 0
        for part, a, b in self.spans(split):
            mask = self.parts[part].mask
            if mask is None:
                n += b - a
                continue
            for c in range(a, b, 1 << 24):
                n += int(np.count_nonzero(mask[c: min(b, c + (1 << 24))]))
        return n

    def view(self, split: str, seq_len: int) -> "BlockView":
        return BlockView(self, self.spans(split), seq_len)


class _Blocks:
    """``n`` blocks of ``seq_len`` tokens: what the trainer asks of any list of blocks."""

    n: int
    seq_len: int

    def __len__(self) -> int:
        return self.n

    @property
    def shape(self) -> tuple[int, int]:
        return (self.n, self.seq_len)


class BlockView(_Blocks):
    """Blocks of ``seq_len`` tokens cut from the concatenation of ``spans`` (the tail that
    does not fill a block is dropped). Indexing returns a LongTensor [n, seq_len]; only the
    indexed blocks are read from disk."""

    def __init__(self, store: TokenStore, spans, seq_len: int):
        self.store, self.spans, self.seq_len = store, spans, seq_len
        lens = np.asarray([b - a for _, a, b in spans], dtype=np.int64)
        self.cum = np.concatenate([[0], np.cumsum(lens)])
        self.n = int(self.cum[-1] // seq_len)

    @property
    def has_mask(self) -> bool:
        return self.store.has_mask

    def _indices(self, idx) -> np.ndarray:
        if isinstance(idx, slice):
            return np.arange(self.n)[idx]
        if isinstance(idx, torch.Tensor):
            idx = idx.cpu().numpy()
        a = np.atleast_1d(np.asarray(idx, dtype=np.int64))
        if a.size and (a.min() < -self.n or a.max() >= self.n):
            raise IndexError(f"block index out of range for {self.n} blocks")
        return np.where(a < 0, a + self.n, a)

    def _pieces(self, i: int):
        """(part, start, stop, offset in block) pieces of block ``i``."""
        L = self.seq_len
        pos, stop = i * L, (i + 1) * L
        k = int(np.searchsorted(self.cum, pos, side="right")) - 1
        while pos < stop:
            part, a, _b = self.spans[k]
            off = pos - int(self.cum[k])
            take = min(stop - pos, int(self.cum[k + 1]) - pos)
            yield part, a + off, a + off + take, pos - i * L
            pos += take
            k += 1

    def _gather(self, idx, fn, dtype) -> torch.Tensor:
        ids = self._indices(idx)
        out = np.empty((len(ids), self.seq_len), dtype=dtype)
        for r, i in enumerate(ids):
            for part, a, b, o in self._pieces(int(i)):
                out[r, o: o + b - a] = fn(self.store.parts[part], a, b)
        return torch.from_numpy(out)

    def __getitem__(self, idx) -> torch.Tensor:
        return self._gather(idx, lambda p, a, b: p.tokens[a:b], np.int64)

    def loss_mask(self, idx) -> torch.Tensor | None:
        """1 where a token is scored under --loss-on assistant; None when the store has no chat data."""
        if not self.has_mask:
            return None
        return self._gather(idx, lambda p, a, b: p.mask[a:b] if p.mask is not None else 1, np.uint8).bool()

    def doc_ids(self, idx) -> torch.Tensor:
        """The document index (global in the store) of every token of the blocks."""
        def docs(p: _Part, a, b):
            return np.searchsorted(p.ends, np.arange(a, b, dtype=np.uint64), side="right") + p.doc_base
        return self._gather(idx, docs, np.int64)


class ConcatView(_Blocks):
    """Several BlockViews as one list of blocks (component c's block j is at
    ``offsets[c] + j``); ``order`` optionally reorders them (validation interleaves)."""

    def __init__(self, views: list, interleave: bool = False):
        self.views = views
        self.offsets = np.concatenate([[0], np.cumsum([len(v) for v in views])]).astype(np.int64)
        self.n = int(self.offsets[-1])
        self.seq_len = views[0].seq_len
        self.order = None
        if interleave and len(views) > 1:  # round robin over the components
            keys = np.concatenate([np.arange(len(v)) * len(views) + c for c, v in enumerate(views)])
            self.order = np.argsort(keys, kind="stable")

    @property
    def has_mask(self) -> bool:
        return any(getattr(v, "has_mask", False) for v in self.views)

    def _split(self, idx):
        ids = np.atleast_1d(np.arange(self.n)[idx] if isinstance(idx, slice) else
                            np.asarray(idx.cpu().numpy() if isinstance(idx, torch.Tensor) else idx, np.int64))
        if self.order is not None:
            ids = self.order[ids]
        comp = np.searchsorted(self.offsets, ids, side="right") - 1
        return ids, comp

    def _gather(self, idx, fn, dtype):
        ids, comp = self._split(idx)
        out = torch.empty((len(ids), self.seq_len), dtype=dtype)
        for c in np.unique(comp):
            rows = np.nonzero(comp == c)[0]
            out[torch.from_numpy(rows)] = fn(self.views[c], ids[rows] - self.offsets[c]).to(dtype)
        return out

    def __getitem__(self, idx) -> torch.Tensor:
        return self._gather(idx, lambda v, i: v[i], torch.long)

    def loss_mask(self, idx):
        if not self.has_mask:
            return None

        def m(v, i):
            got = v.loss_mask(i) if getattr(v, "has_mask", False) else None
            return got if got is not None else torch.ones(len(i), self.seq_len, dtype=torch.bool)
        return self._gather(idx, m, torch.bool)

    def doc_ids(self, idx):
        # only equality within a block matters, and a block comes from one component
        return self._gather(idx, lambda v, i: v.doc_ids(i), torch.long)


class MixtureSampler:
    """Micro-batches drawn from several components with given weights, resumable.

    Each draw picks a component with probability ∝ its weight (a generator seeded by
    (seed, batches drawn so far), so the choice is a pure function of the state) and takes
    that component's next block in its own shuffled epoch order (a ``BlockSampler``)."""

    def __init__(self, sizes: list[int], weights: list[float], batch_size: int, seed: int):

        self.sizes, self.batch_size, self.seed = list(sizes), batch_size, seed
        w = np.asarray(weights, dtype=np.float64)
        self.cum = np.cumsum(w / w.sum())
        self.offsets = np.concatenate([[0], np.cumsum(sizes)]).astype(np.int64)
        self.parts = [BlockSampler(n, 1, seed * 7919 + c + 1) for c, n in enumerate(sizes)]
        self.batches = 0

    @property
    def n(self) -> int:
        return int(self.offsets[-1])

    def next(self) -> torch.Tensor:
        u = np.random.default_rng([self.seed, self.batches]).random(self.batch_size)
        comps = np.minimum(np.searchsorted(self.cum, u, side="right"), len(self.sizes) - 1)
        self.batches += 1
        return torch.tensor([int(self.offsets[c]) + int(self.parts[c].next()[0]) for c in comps])

    def state_dict(self) -> dict:
        return {"n": self.n, "batches": self.batches, "batch_size": self.batch_size, "seed": self.seed,
                "parts": [p.state_dict() for p in self.parts]}

    def load_state_dict(self, s: dict) -> None:
        if s.get("n") != self.n or len(s.get("parts", [])) != len(self.parts):
            raise RedError(f"checkpoint was made with {s.get('n')} training sequences, this data packs to "
                           f"{self.n}; resume with the same --data and --seq-len")
        self.batches = int(s["batches"])
        for p, st in zip(self.parts, s["parts"]):
            p.load_state_dict(st)


def document_separator(tokenizer) -> list[int]:
    """Tokens that end each document: ``[eos]`` when the tokenizer has one, nothing when
    it has only a bos (the bos of the next document separates them), and, for a tokenizer
    with neither, the encoding of a blank line ``"\n\n"`` (the pad token if that encodes to
    nothing or to unknown tokens), so packed documents are never glued together."""
    bos, eos = tokenizer.bos_token_id, tokenizer.eos_token_id
    if eos is not None:
        return [eos]
    if bos is not None:
        return []
    sep = tokenizer("\n\n", add_special_tokens=False)["input_ids"]
    if sep and tokenizer.unk_token_id not in sep:
        return list(sep)
    if tokenizer.pad_token_id is not None:
        return [tokenizer.pad_token_id]
    raise RedError("the tokenizer has no bos, eos or pad token and cannot encode a blank line, so documents "
                   "could not be told apart when packed; use a tokenizer with an eos token")


class BlockSampler:
    """Shuffled micro-batches of training blocks; the position is saved in checkpoints.

    Each epoch is a fresh permutation drawn from ``seed + epoch``, so the data order is a
    pure function of (seed, epoch, index) and resuming reproduces it bit for bit.
    """

    def __init__(self, n_blocks: int, batch_size: int, seed: int):
        self.n, self.batch_size, self.seed = n_blocks, batch_size, seed
        self.epoch, self.index = 0, 0
        self._order = self._perm(0)

    def _perm(self, epoch: int) -> torch.Tensor:
        g = torch.Generator().manual_seed((self.seed * 1_000_003 + epoch) % 2**64)  # any 64-bit seed
        return torch.randperm(self.n, generator=g)

    def next(self) -> torch.Tensor:
        out, count = [], 0
        while count < self.batch_size:
            if self.index >= self.n:
                self.epoch, self.index = self.epoch + 1, 0
                self._order = self._perm(self.epoch)
            take = min(self.batch_size - count, self.n - self.index)
            out.append(self._order[self.index: self.index + take])
            self.index += take
            count += take
        return torch.cat(out)

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "index": self.index, "n": self.n, "batch_size": self.batch_size, "seed": self.seed}

    def load_state_dict(self, s: dict) -> None:
        if s["n"] != self.n:
            raise RedError(f"checkpoint was made with {s['n']} training sequences, this corpus packs to {self.n}; "
                           "resume with the same --data and --seq-len")
        self.epoch, self.index = int(s["epoch"]), int(s["index"])
        self._order = self._perm(self.epoch)
