"""Where training text comes from: `--data` specs, their files, and their rows, streamed.

A spec is ``PATH`` or ``PATH:WEIGHT`` (a mixture weight, a positive number). PATH is a
.txt/.jsonl/.parquet file, a glob pattern of such files (``shards/*.jsonl``), a folder
written by Hugging Face ``datasets``' ``save_to_disk``, ``BUILDER:GLOB`` (local files read
through ``datasets.load_dataset(BUILDER, data_files=...)``: json, parquet, text, csv), or
a token store made by `red prepare` (``red.data.store``).

Rows are read one at a time (memory does not grow with the file): a row is either a
document's text (``str``) or a conversation (``list`` of ``{"role", "content"}`` dicts),
taken from a ``messages``/``conversations`` column or from ``prompt`` + ``completion``.
``render_chat`` turns a conversation into text with the tokenizer's chat template and
returns the character spans of the assistant turns, from which the store keeps a
per-token loss mask.
"""
from __future__ import annotations

import glob
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Union

from red.errors import RedError

Row = Union[str, list]
CHAT_ROLES = ("system", "user", "assistant", "tool")
GLOB_CHARS = "*?["
STORE_MANIFEST = "store.json"  # red.data.store.MANIFEST (named here so that checks need no numpy)
LINE_BREAKS = "\n\r\x0b\x0c\x1c\x1d\x1e\x85\u2028\u2029"
LOAD_DATASET_BUILDERS = ("json", "parquet", "text", "csv")
HF_DATASET_FILES = ("dataset_info.json", "state.json", "dataset_dict.json")
#: longest document red takes, in characters: a document is tokenized at once, and the
#: tokenizer needs a few hundred bytes per character (measured: 1 M characters, 0.4 GB)
MAX_DOC_CHARS = 1_000_000
MAX_LINE_CHARS = 4 * MAX_DOC_CHARS  # a JSON line: its text and the escapes around it


@dataclass(frozen=True)
class DataSpec:
    """One ``--data`` entry: what it names and its mixture weight (None: not given)."""
    path: str
    weight: float | None = None

    def __str__(self) -> str:
        return self.path if self.weight is None else f"{self.path}:{self.weight:g}"


def parse_data_spec(spec: str) -> DataSpec:
    """``PATH`` or ``PATH:WEIGHT``. A suffix after the last ``:`` that reads as a number is
    the weight; otherwise the whole text is the path."""
    spec = str(spec)
    if not spec:
        raise RedError("no corpus given; pass --data FILE (.txt, .jsonl or .parquet), a glob, a saved dataset "
                       "or a token store from `red prepare`")
    head, sep, tail = spec.rpartition(":")
    if sep and head:
        try:
            w = float(tail)
        except ValueError:
            if not Path(spec).exists() and Path(head).exists():
                raise RedError(f"mixture weight {tail!r} in --data {spec} is not a number; write PATH:WEIGHT "
                               "with a positive weight, e.g. math.jsonl:0.1") from None
            return DataSpec(spec)
        if not (w > 0 and w != float("inf")):
            raise RedError(f"mixture weight {tail} in --data {spec} must be a positive number; "
                           "e.g. --data general.jsonl:0.9 --data math.jsonl:0.1")
        return DataSpec(head, w)
    return DataSpec(spec)


def split_data(data) -> list[DataSpec]:
    """The ``data`` setting (one spec, or a list of them) as DataSpecs."""
    items = data if isinstance(data, (list, tuple)) else [data]
    specs = [parse_data_spec(s) for s in items]
    if len(specs) > 1 and any(s.weight is None for s in specs) and any(s.weight is not None for s in specs):
        raise RedError("give every --data a mixture weight or none of them (e.g. --data a.jsonl:0.9 "
                       "--data b.jsonl:0.1)")
    return specs


# -- what a path names ----------------------------------------------------------------------

def is_store(path: str | Path) -> bool:
    return Path(path).is_dir() and (Path(path) / STORE_MANIFEST).is_file()


def is_hf_dataset(path: str | Path) -> bool:
    p = Path(path)
    return p.is_dir() and any((p / f).is_file() for f in HF_DATASET_FILES)


@dataclass(frozen=True)
class DatasetFiles:
    """Local files read through Hugging Face ``datasets.load_dataset(builder,
    data_files=...)`` (streaming): a spec ``json:GLOB``, ``parquet:GLOB``, ``text:GLOB`` or
    ``csv:GLOB``. Gives what that library reads and ours does not, e.g. compressed
    ``.jsonl.gz`` shards."""
    builder: str
    files: tuple

    def __str__(self) -> str:
        return f"{self.builder}:{','.join(map(str, self.files))}"


def expand_source(path: str) -> list:
    """The files (or the one saved-dataset folder, or one ``DatasetFiles``) a non-store PATH
    names, checked to exist and be of a known kind; a glob is expanded in sorted order."""
    builder, sep, pattern = path.partition(":")
    if sep and builder in LOAD_DATASET_BUILDERS and not Path(path).exists():
        found = sorted(Path(p) for p in glob.glob(pattern, recursive=True) if Path(p).is_file())
        if not found:
            raise RedError(f"--data {path}: the pattern {pattern} matches no file; check the pattern (quote it "
                           "so the shell does not expand it)")
        return [DatasetFiles(builder, tuple(found))]
    if any(c in path for c in GLOB_CHARS) and not Path(path).exists():
        found = sorted(Path(p) for p in glob.glob(path, recursive=True))
        files = [p for p in found if p.is_file()]
        if not files:
            raise RedError(f"--data pattern {path} matches no file; check the pattern (quote it so the shell "
                           "does not expand it)")
        for p in files:
            check_corpus_path(p)
        return files
    p = Path(path)
    if p.is_dir():
        if is_hf_dataset(p):
            return [p]
        raise RedError(f"corpus {p} is a folder, not a file, a token store or a saved dataset; pass a .txt, "
                       f".jsonl or .parquet file, a glob such as {p}/*.jsonl, or a folder from `red prepare` "
                       "or datasets' save_to_disk")
    return [check_corpus_path(p)]


# -- rows ---------------------------------------------------------------------------------

def iter_rows(path: Path, text_field: str = "text", txt_split: str = "line") -> Iterator[Row]:
    """Stream the rows of one source file (or saved dataset); empty text documents dropped."""
    if isinstance(path, DatasetFiles):
        yield from _load_dataset_rows(path, text_field)
        return
    if path.is_dir():
        yield from _hf_rows(path, text_field)
        return
    suffix = path.suffix.lower()
    if suffix == ".txt":
        for doc in _txt_docs(path, txt_split):
            if doc.strip():
                yield doc
    elif suffix in (".jsonl", ".json"):
        yield from _jsonl_rows(path, text_field)
    elif suffix == ".parquet":
        yield from _parquet_rows(path, text_field)
    else:  # check_corpus_path refused it already
        raise RedError(f"corpus {path} has an unknown format {suffix}; use {', '.join(CORPUS_SUFFIXES)}")


def _check_head(p: Path) -> None:
    with open(p, "rb") as f:
        head = f.read(4096)
    if head[:2] in (b"\xff\xfe", b"\xfe\xff"):
        raise RedError(f"corpus {p} is UTF-16 text; convert it to UTF-8 (e.g. iconv -f UTF-16 -t UTF-8)")
    if b"\x00" in head:
        raise RedError(f"corpus {p} looks binary, not text; give a UTF-8 .txt/.jsonl file or a .parquet file")


def _text_chunks(p: Path, size: int = 1 << 20) -> Iterator[str]:
    """UTF-8 text in pieces (a leading byte-order mark dropped, line ends made "\\n")."""
    _check_head(p)
    try:
        with open(p, encoding="utf-8-sig", newline=None) as f:
            for chunk in iter(lambda: f.read(size), ""):
                yield chunk
    except UnicodeDecodeError:
        raise RedError(f"corpus {p} is not UTF-8 text; re-encode it as UTF-8") from None


def _too_long(p: Path, unit: str) -> RedError:
    return RedError(f"corpus {p} holds a document ({unit}) of more than {MAX_DOC_CHARS:,} characters; red "
                    "tokenizes a document at once, and one this long would take gigabytes of memory: split it into "
                    "shorter documents (lines or paragraphs, with --txt-split line or paragraph)")


def _txt_docs(p: Path, txt_split: str) -> Iterator[str]:
    """The documents of a .txt file, streamed; a document longer than ``MAX_DOC_CHARS`` is
    refused as soon as it is seen (never held whole)."""
    unit = {"file": "the whole file, with --txt-split file", "line": "a line", "paragraph": "a paragraph"}[txt_split]
    if txt_split == "file":
        pieces, n = [], 0
        for chunk in _text_chunks(p):
            n += len(chunk)
            if n > MAX_DOC_CHARS:
                raise _too_long(p, unit)
            pieces.append(chunk)
        yield "".join(pieces)
        return
    sep_lines = txt_split == "line"
    carry = ""
    for chunk in _text_chunks(p):
        text = carry + chunk
        if sep_lines:  # str.splitlines' line breaks, as reading the whole file would give
            parts = text.splitlines()
            carry = parts.pop() if parts and text[-1] not in LINE_BREAKS else ""
        else:
            parts = text.split("\n\n")
            carry = parts.pop()
        if len(carry) > MAX_DOC_CHARS or any(len(x) > MAX_DOC_CHARS for x in parts):
            raise _too_long(p, unit)
        yield from parts
    if carry:
        yield carry


def _jsonl_lines(p: Path) -> Iterator[tuple[int, str]]:
    carry, n, first = "", 0, True
    for chunk in _text_chunks(p):
        if first and chunk.lstrip().startswith("["):
            raise RedError(f"corpus {p} holds one JSON array, not JSON lines; write one JSON object per line "
                           "(.jsonl), e.g. {\"text\": \"...\"}")
        first = first and not chunk.strip()
        lines = (carry + chunk).split("\n")
        carry = lines.pop()
        for line in lines:
            n += 1
            if len(line) > MAX_LINE_CHARS:
                break
            yield n, line
        if len(carry) > MAX_LINE_CHARS or any(len(x) > MAX_LINE_CHARS for x in lines):
            raise RedError(f"corpus {p} line {n + 1 if len(carry) > MAX_LINE_CHARS else n} is longer than "
                           f"{MAX_LINE_CHARS:,} characters; red takes documents of up to {MAX_DOC_CHARS:,} "
                           "characters (each is tokenized at once): split it into shorter documents")
    if carry:
        yield n + 1, carry


def _jsonl_rows(p: Path, text_field: str) -> Iterator[Row]:
    for i, line in _jsonl_lines(p):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            raise RedError(f"corpus {p} line {i} is not valid JSON; write one JSON object per line") from None
        if not isinstance(row, dict):
            raise RedError(f"corpus {p} line {i} is not a JSON object; write one object per line, e.g. "
                           "{\"text\": \"...\"}")
        out = row_value(row, f"corpus {p} line {i}", text_field)
        if out is not None:
            yield out


def _parquet_rows(p: Path, text_field: str) -> Iterator[Row]:
    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise RedError("reading .parquet needs pyarrow; install it with: pip install 'red[parquet]'") from None
    try:
        f = pq.ParquetFile(p)
    except Exception as e:
        raise RedError(f"corpus {p} is not a readable parquet file ({type(e).__name__}); check the file") from None
    names = f.schema_arrow.names
    columns = [c for c in (text_field, "messages", "conversations", "prompt", "completion") if c in names]
    if not columns:
        raise RedError(f"corpus {p} has no column {text_field!r} (columns: {', '.join(names)}); set --text-field")
    i = 0
    try:
        for batch in f.iter_batches(batch_size=1024, columns=columns):
            for row in batch.to_pylist():
                i += 1
                out = row_value(row, f"corpus {p} row {i}", text_field)
                if out is not None:
                    yield out
    except RedError:
        raise
    except Exception as e:
        raise RedError(f"corpus {p} is not a readable parquet file ({type(e).__name__}); check the file") from None


def _hf_rows(p: Path, text_field: str) -> Iterator[Row]:
    datasets = _datasets(f"{p} is a saved Hugging Face dataset; reading it")
    try:
        ds = datasets.load_from_disk(str(p))
    except Exception as e:
        raise RedError(f"saved dataset {p} could not be read ({type(e).__name__}: {e}); save it again with "
                       "save_to_disk") from None
    if isinstance(ds, datasets.DatasetDict):
        if "train" in ds:
            ds = ds["train"]
        elif len(ds) == 1:
            ds = next(iter(ds.values()))
        else:
            raise RedError(f"saved dataset {p} has splits {', '.join(ds)} and none is 'train'; save the split "
                           "to distill on by itself")
    columns = [c for c in (text_field, "messages", "conversations", "prompt", "completion") if c in ds.column_names]
    if not columns:
        raise RedError(f"saved dataset {p} has no column {text_field!r} (columns: {', '.join(ds.column_names)}); "
                       "set --text-field")
    ds = ds.select_columns(columns)
    i = 0
    for batch in ds.iter(batch_size=1024):
        keys = list(batch)
        for values in zip(*(batch[k] for k in keys)):
            i += 1
            out = row_value(dict(zip(keys, values)), f"dataset {p} row {i}", text_field)
            if out is not None:
                yield out


def _load_dataset_rows(src: DatasetFiles, text_field: str) -> Iterator[Row]:
    datasets = _datasets(f"--data {src.builder}:...")
    try:
        ds = datasets.load_dataset(src.builder, data_files=[str(f) for f in src.files], split="train",
                                   streaming=True)
        for i, row in enumerate(ds, 1):
            out = row_value(row, f"{src.builder} data {src.files[0] if len(src.files) == 1 else src.files[0].parent} "
                                 f"row {i}", text_field)
            if out is not None:
                yield out
    except RedError:
        raise
    except Exception as e:
        raise RedError(f"datasets could not read {src} ({type(e).__name__}: {str(e)[:200]}); check the files "
                       "and the builder name") from None


def _datasets(what: str):
    try:
        import datasets
    except ImportError:
        raise RedError(f"{what} needs the datasets library: pip install 'red[datasets]'") from None
    return datasets


# -- one row ------------------------------------------------------------------------------

def row_value(row: dict, where: str, text_field: str) -> Row | None:
    """The document text or the conversation of ``row``; None for an empty text."""
    if text_field in row:
        v = row[text_field]
        if isinstance(v, str):
            if len(v) > MAX_DOC_CHARS:
                raise RedError(f"{where} is a document of {len(v):,} characters, more than the {MAX_DOC_CHARS:,} "
                               "red takes (each document is tokenized at once): split it into shorter documents")
            return v if v.strip() else None
        if is_chat_value(v):
            return check_messages(v, f"{where} field {text_field!r}")
        kind = "null" if v is None else type(v).__name__
        raise RedError(f"{where} field {text_field!r} is {kind}, not text; every document must be a string "
                       "(fix the row or set --text-field to the field that holds the text)")
    for key in ("messages", "conversations"):
        if key in row and row[key] is not None:
            return check_messages(row[key], f"{where} field {key!r}")
    if "prompt" in row and "completion" in row:
        return prompt_completion(row["prompt"], row["completion"], where)
    raise RedError(f"{where} has no field {text_field!r}; set --text-field to the field that holds the text "
                   "(or give chat rows with 'messages' or 'prompt' and 'completion')")


def is_chat_value(value) -> bool:
    return isinstance(value, list) and bool(value) and all(isinstance(m, dict) and "content" in m for m in value)


def check_messages(messages, where: str) -> list:
    if not isinstance(messages, list) or not messages:
        raise RedError(f"{where} is not a list of messages; give [{{\"role\": \"user\", \"content\": \"...\"}}, ...]")
    out = []
    for j, m in enumerate(messages, 1):
        if not isinstance(m, dict) or "role" not in m or "content" not in m:
            raise RedError(f"{where} message {j} needs 'role' and 'content'; fix the row")
        if m["role"] not in CHAT_ROLES:
            raise RedError(f"{where} message {j} has role {m['role']!r}, not one of {', '.join(CHAT_ROLES)}; "
                           "rename the role")
        if not isinstance(m["content"], str):
            raise RedError(f"{where} message {j} content is {type(m['content']).__name__}, not text; fix the row")
        out.append({"role": m["role"], "content": m["content"]})
    if sum(len(m["content"]) for m in out) > MAX_DOC_CHARS:
        raise RedError(f"{where} is a conversation of more than {MAX_DOC_CHARS:,} characters, the longest document "
                       "red takes (each is tokenized at once): split it into shorter conversations")
    return out


def prompt_completion(prompt, completion, where: str) -> list:
    """A prompt/completion row as messages: strings become one user and one assistant
    turn; lists of messages are taken as they are."""
    p = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else prompt
    c = [{"role": "assistant", "content": completion}] if isinstance(completion, str) else completion
    msgs = check_messages(p, f"{where} field 'prompt'") + check_messages(c, f"{where} field 'completion'")
    return msgs


def render_chat(messages: list, tokenizer) -> tuple[str, list[tuple[int, int]]]:
    """(text, assistant character spans) of one conversation through the chat template.

    An assistant turn's span is what rendering it adds after the conversation so far with
    the generation prompt (the assistant header belongs to the prompt, not the span). The
    template must render each conversation prefix as a prefix of the whole."""
    if not getattr(tokenizer, "chat_template", None):
        raise RedError("the data holds chat rows but the teacher's tokenizer has no chat template; give the "
                       "tokenizer a chat_template or render the conversations to text first")

    def render(msgs, gen=False) -> str:
        return tokenizer.apply_chat_template(msgs, tokenize=False, add_generation_prompt=gen)

    full = render(messages)
    spans = []
    for i, m in enumerate(messages):
        if m["role"] != "assistant":
            continue
        before = render(messages[:i], gen=True) if i else ""
        upto = render(messages[: i + 1])
        if not (full.startswith(upto) and upto.startswith(before)):
            raise RedError("the tokenizer's chat template does not render a conversation's first turns as the "
                           "start of the whole (it rewrites earlier turns), so assistant tokens cannot be found; "
                           "use --loss-on all with text rendered beforehand")
        spans.append((len(before), len(upto)))
    return full, spans


CORPUS_SUFFIXES = (".txt", ".jsonl", ".json", ".parquet")  # .json: JSON lines under that name


def check_corpus_path(path: str | Path) -> Path:
    """The corpus path names one existing file of a supported format."""
    p = Path(path)
    if not str(path):
        raise RedError("no corpus given; pass --data FILE (.txt, .jsonl or .parquet)")
    if p.is_dir():
        raise RedError(f"corpus {p} is a folder, not a file; pass --data with one .txt, .jsonl or .parquet file")
    if not p.is_file():
        raise RedError(f"corpus {p} does not exist; pass --data with an existing .txt, .jsonl or .parquet file")
    if p.suffix.lower() not in CORPUS_SUFFIXES:
        raise RedError(f"corpus {p} has an unknown format {p.suffix.lower() or '(no suffix)'}; "
                       "use .txt, .jsonl or .parquet")
    return p
