"""Corpus loading and packing into fixed-length training sequences.

Convention (shared with the demo task): a document becomes
``[bos] + tokens + [eos]`` (bos only when the tokenizer has one; a tokenizer with
neither bos nor eos ends each document with the tokens of a blank line ``"\n\n"``,
or its pad token, see ``document_separator``); documents are
concatenated and cut into blocks of ``seq_len`` tokens; the tail that does not fill a
block is dropped. The last ``val_fraction`` of the blocks is held out for validation.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch

from .errors import RedError
from .inputs import check_corpus_path


def read_documents(path: str | Path, text_field: str = "text", txt_split: str = "line") -> list[str]:
    """Read the documents of a .txt, .jsonl or .parquet file (empty ones dropped).

    Text is UTF-8 (a leading byte-order mark is dropped; Windows line ends count as
    ordinary ones). Every value of ``text_field`` must be a string: anything else (null,
    a number, a list) is an error naming the line or row, and chat rows (``messages``
    lists of role/content dicts, or prompt/completion pairs) are refused: render them to
    text first."""
    p = check_corpus_path(path)
    suffix = p.suffix.lower()
    if suffix == ".txt":
        text = _read_text(p)
        if txt_split == "line":
            docs = text.splitlines()
        elif txt_split == "paragraph":
            docs = [d for d in text.split("\n\n")]
        else:
            docs = [text]
    elif suffix in (".jsonl", ".json"):
        text = _read_text(p)
        if text.lstrip().startswith("["):
            raise RedError(f"corpus {p} holds one JSON array, not JSON lines; write one JSON object per line "
                           "(.jsonl), e.g. {\"text\": \"...\"}")
        docs = []
        for i, line in enumerate(text.splitlines(), 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError:
                raise RedError(f"corpus {p} line {i} is not valid JSON; write one JSON object per line") from None
            where = f"corpus {p} line {i}"
            if isinstance(row, dict) and text_field not in row and _is_chat_row(row):
                raise RedError(_chat_message(where))
            if not isinstance(row, dict) or text_field not in row:
                raise RedError(f"{where} has no field {text_field!r}; set --text-field to the field that holds the text")
            docs.append(_text_value(row[text_field], where, text_field))
    elif suffix == ".parquet":
        try:
            import pyarrow.parquet as pq
        except ImportError:
            raise RedError("reading .parquet needs pyarrow; install it with: pip install 'red[parquet]'") from None
        try:
            table = pq.read_table(p)
        except Exception as e:
            raise RedError(f"corpus {p} is not a readable parquet file ({type(e).__name__}); check the file") from None
        if text_field not in table.column_names:
            if _is_chat_row(dict.fromkeys(table.column_names)):
                raise RedError(_chat_message(f"corpus {p}"))
            raise RedError(f"corpus {p} has no column {text_field!r} (columns: {', '.join(table.column_names)}); "
                           "set --text-field")
        docs = [_text_value(x, f"corpus {p} row {i}", text_field)
                for i, x in enumerate(table.column(text_field).to_pylist(), 1)]
    else:
        raise RedError(f"corpus {p} has an unknown format {suffix or '(no suffix)'}; use .txt, .jsonl or .parquet")
    docs = [d for d in docs if d.strip()]
    if not docs:
        raise RedError(f"corpus {p} holds no text; give a corpus with at least a few documents")
    return docs


def _is_chat_row(row: dict) -> bool:
    """A chat-format row: a ``messages`` (or ``conversations``) column, or prompt/completion."""
    return "messages" in row or "conversations" in row or ("prompt" in row and "completion" in row)


def _is_chat_value(value) -> bool:
    return isinstance(value, list) and bool(value) and all(isinstance(m, dict) and "content" in m for m in value)


def _chat_message(where: str) -> str:
    return (f"{where} holds chat data (role/content messages or prompt/completion); chat data is not supported "
            "yet: render each conversation to plain text (e.g. with the tokenizer's chat template) into a text "
            "field and pass that")


def _text_value(value, where: str, text_field: str) -> str:
    if isinstance(value, str):
        return value
    if _is_chat_value(value):
        raise RedError(_chat_message(f"{where} field {text_field!r}"))
    kind = "null" if value is None else type(value).__name__
    raise RedError(f"{where} field {text_field!r} is {kind}, not text; every document must be a string "
                   "(fix the row or set --text-field to the field that holds the text)")


def _read_text(p: Path) -> str:
    raw = p.read_bytes()
    if raw[:2] in (b"\xff\xfe", b"\xfe\xff"):
        raise RedError(f"corpus {p} is UTF-16 text; convert it to UTF-8 (e.g. iconv -f UTF-16 -t UTF-8)")
    if b"\x00" in raw[:4096]:
        raise RedError(f"corpus {p} looks binary, not text; give a UTF-8 .txt/.jsonl file or a .parquet file")
    try:
        text = raw.decode("utf-8-sig")  # drops a UTF-8 byte-order mark
    except UnicodeDecodeError:
        raise RedError(f"corpus {p} is not UTF-8 text; re-encode it as UTF-8") from None
    return text.replace("\r\n", "\n")


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


def tokenize_documents(docs: list[str], tokenizer) -> list[int]:
    """Token ids of all documents, each wrapped as [bos] + tokens + [eos]; a tokenizer
    with neither bos nor eos ends each document with ``document_separator`` instead."""
    bos = tokenizer.bos_token_id
    end = document_separator(tokenizer)
    ids: list[int] = []
    encoded = tokenizer(docs, add_special_tokens=False)["input_ids"]
    for toks in encoded:
        if bos is not None:
            ids.append(bos)
        ids.extend(toks)
        ids.extend(end)
    return ids


def pack(ids: list[int], seq_len: int) -> torch.Tensor:
    """Cut a token stream into [n_blocks, seq_len] (the incomplete tail is dropped)."""
    n = len(ids) // seq_len
    return torch.tensor(ids[: n * seq_len], dtype=torch.long).view(n, seq_len)


@dataclass
class PackedCorpus:
    train: torch.Tensor  # [n_train, seq_len]
    val: torch.Tensor    # [n_val, seq_len]

    @property
    def seq_len(self) -> int:
        return self.train.shape[1]


def load_corpus(path: str | Path, tokenizer, seq_len: int, val_fraction: float = 0.05,
                text_field: str = "text", txt_split: str = "line", min_train_blocks: int = 1) -> PackedCorpus:
    """Read, tokenize and pack a corpus; hold out the last blocks for validation."""
    docs = read_documents(path, text_field, txt_split)
    vocab = len(tokenizer)
    blocks = pack(tokenize_documents(docs, tokenizer), seq_len)
    n = blocks.shape[0]
    n_val = max(1, int(round(n * val_fraction)))
    if n - n_val < min_train_blocks:
        raise RedError(f"corpus {path} is too short: {n} packed sequences of {seq_len} tokens, need at least "
                       f"{min_train_blocks + n_val} ({min_train_blocks} to train, {n_val} to validate); "
                       "add text or lower --seq-len")
    if blocks.numel() and int(blocks.max()) >= vocab:
        raise RedError("tokenizer produced ids beyond its vocabulary; use the teacher's own tokenizer")
    return PackedCorpus(train=blocks[: n - n_val], val=blocks[n - n_val:])


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
