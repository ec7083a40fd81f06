"""Corpus loading and packing into fixed-length training sequences.

Convention (shared with the demo task): a document becomes
``[bos] + tokens + [eos]`` (bos only when the tokenizer has one; a tokenizer with
neither bos nor eos ends each document with the tokens of a blank line ``"\n\n"``,
or its pad token, see ``document_separator``); documents are
concatenated and cut into blocks of ``seq_len`` tokens; the tail that does not fill a
block is dropped. Whole documents (about ``val_fraction`` of the tokens) are held out for
validation; see ``red.data.store``, which holds the tokens of every corpus trained on.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from red.errors import RedError
from red.data.store import BlockSampler, document_separator
from red.data.sources import check_corpus_path
from red.data.sources import iter_rows


def read_documents(path: str | Path, text_field: str = "text", txt_split: str = "line") -> list[str]:
    """Read the documents of a .txt, .jsonl or .parquet file (empty ones dropped), all in
    memory (training streams them instead: ``red.data.store``).

    Text is UTF-8 (a leading byte-order mark is dropped; Windows line ends count as
    ordinary ones). Every value of ``text_field`` must be a string: anything else (null,
    a number, a list) is an error naming the line or row. Chat rows are refused here (they
    are not plain documents); `red prepare` and ``--data`` take them."""
    p = check_corpus_path(path)
    docs = []
    for row in iter_rows(p, text_field, txt_split):
        if not isinstance(row, str):
            raise RedError(f"corpus {p} holds chat data (role/content messages or prompt/completion); "
                           "read_documents returns plain text only: prepare chat data with red.data.store.prepare_store")
        docs.append(row)
    if not docs:
        raise RedError(f"corpus {p} holds no text; give a corpus with at least a few documents")
    return docs


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
    """Training and validation blocks: [n, seq_len] LongTensors, or store views that read
    only the blocks indexed (``red.data.store.BlockView``/``ConcatView``, which also give each
    block's loss mask and document ids). ``weights``: mixture weights of the components
    (None: every training block equally likely)."""

    train: object
    val: object
    sizes: list | None = None
    weights: list | None = None
    fingerprint: str = ""

    @property
    def seq_len(self) -> int:
        return self.train.shape[1]

    def sampler(self, batch_size: int, seed: int):
        if self.weights is None:
            return BlockSampler(len(self.train), batch_size, seed)
        from red.data.store import MixtureSampler

        return MixtureSampler(self.sizes, self.weights, batch_size, seed)


def corpus_from_stores(stores: list, seq_len: int, weights: list | None = None, min_train_blocks: int = 1,
                       name: str = "corpus") -> PackedCorpus:
    """Pack one or more token stores into blocks of ``seq_len``; check each has training
    and validation blocks."""
    from red.data.store import ConcatView

    trains, vals = [], []
    for st in stores:
        tr, va = st.view("train", seq_len), st.view("val", seq_len)
        where = st.manifest["parts"][0]["sources"][0]["path"] if st.manifest["parts"] else st.root
        if len(tr) < min_train_blocks:
            raise RedError(f"{name} {where} is too short: its training documents pack to {len(tr)} sequences of "
                           f"{seq_len} tokens, need at least {min_train_blocks}; add text or lower --seq-len")
        if len(va) < 1:
            n_val = int(va.cum[-1])
            raise RedError(f"{name} {where} is too short: its validation documents hold {n_val} tokens, less than "
                           f"one sequence of {seq_len}; add text, raise --val-fraction or lower --seq-len")
        trains.append(tr)
        vals.append(va)
    if len(stores) == 1:
        return PackedCorpus(train=trains[0], val=vals[0], fingerprint=stores[0].fingerprint)
    fp = ",".join(f"{s.fingerprint}:{w:g}" if weights else s.fingerprint
                  for s, w in zip(stores, weights or [0] * len(stores)))
    return PackedCorpus(train=ConcatView(trains), val=ConcatView(vals, interleave=True),
                        sizes=[len(t) for t in trains], weights=weights, fingerprint=fp)


def load_corpus(path: str | Path, tokenizer, seq_len: int, val_fraction: float = 0.05,
                text_field: str = "text", txt_split: str = "line", min_train_blocks: int = 1) -> PackedCorpus:
    """Read, tokenize and pack one corpus file in this process, split by documents as
    `red prepare` splits it (the same blocks as a store made from the same file); a token
    store folder is opened instead."""
    import tempfile

    from red.data.sources import is_store
    from red.data.store import TokenStore, prepare_store

    if is_store(path):  # a token store from `red prepare`: its own split
        return corpus_from_stores([TokenStore(path, tokenizer)], seq_len, min_train_blocks=min_train_blocks)
    check_corpus_path(path)
    with tempfile.TemporaryDirectory(prefix="red-corpus-") as tmp:
        # the memory maps stay valid after the files are removed
        store = prepare_store([str(path)], Path(tmp) / "store", tokenizer, text_field=text_field,
                              txt_split=txt_split, val_fraction=val_fraction, workers=1, progress=False)
    return corpus_from_stores([store], seq_len, min_train_blocks=min_train_blocks)


