"""Staging of a run's ``--data``: each entry a token store ready to read, or files to
tokenize into the run folder once (reused by --resume and by a repeated run)."""
from __future__ import annotations

import shutil
from dataclasses import dataclass
from pathlib import Path

from red.config import DistillConfig, files_val_fraction
from red.data.corpus import PackedCorpus, corpus_from_stores
from red.data.sources import DataSpec, iter_rows, render_chat
from red.data.store import MANIFEST as STORE_MANIFEST
from red.data.store import TokenStore, prepare_store, source_record, tokenizer_fingerprint
from red.distributed import DistContext
from red.errors import RedError
from red.run.folder import DATA, RunDir

@dataclass
class DataEntry:
    """One ``--data`` entry of a run: a token store ready to read, or the files to
    tokenize into the run folder (``target``, a folder under OUT/data) first."""

    spec: DataSpec
    store: TokenStore | None
    files: list
    records: list
    target: str = ""


def plan_data(data, cfg: DistillConfig, tokenizer, run: RunDir) -> list[DataEntry]:
    """Check every --data entry (``data``: ``red.commands.checks``' entries, globs already
    expanded) without writing anything: stores are opened and every byte read; files'
    first rows are parsed (the rest is checked while they are tokenized); a store already
    made from the same files in OUT/data is reused, so a resumed or repeated run never
    tokenizes again."""
    entries = []
    fp = tokenizer_fingerprint(tokenizer)
    for i, found in enumerate(data):
        spec = found.spec
        if found.store:
            # every byte read once: the store's fingerprint then stands for what is trained on
            entries.append(DataEntry(spec, TokenStore(spec.path, tokenizer, verify=True), [], []))
            continue
        files = list(found.files)
        _check_first_rows(files, cfg, tokenizer)
        records = [source_record(f) for f in files]
        target = f"{DATA}/{i}"
        entries.append(DataEntry(spec, _matching_store(run.root / target, records, cfg, fp, tokenizer),
                                 files, records, target))
    return entries


def _check_first_rows(files, cfg: DistillConfig, tokenizer, n: int = 64) -> None:
    from red.data.store import check_unknown_share, encode_rows

    for f in files:
        rows = []
        for row in iter_rows(f, cfg.text_field, cfg.txt_split):
            rows.append(row)
            if len(rows) >= n:
                break
        if not rows:
            raise RedError(f"corpus {f} holds no text; give a corpus with at least a few documents")
        texts = [r for r in rows if isinstance(r, str)]
        if texts and tokenizer.unk_token_id is not None:  # the whole file is checked again while tokenized
            ids = [i for t in tokenizer(texts, add_special_tokens=False)["input_ids"] for i in t]
            check_unknown_share(f, sum(i == tokenizer.unk_token_id for i in ids), len(ids), tokenizer)
        chat = [r for r in rows if not isinstance(r, str)]
        if chat:
            render_chat(chat[0], tokenizer)
            encode_rows(chat[:1], tokenizer, [])


def _matching_store(root: Path, records: list, cfg: DistillConfig, fp: str, tokenizer) -> TokenStore | None:
    """The store at ``root`` if it was made from exactly these files with these settings."""
    if not (root / STORE_MANIFEST).is_file():
        return None
    try:
        store = TokenStore(root, verify=True)
    except RedError:
        return None  # damaged or changed: tokenized again
    m = store.manifest
    part = m["parts"][0] if len(m["parts"]) == 1 else {}
    same = (m["tokenizer"]["fingerprint"] == fp
            and [s["sha256"] for s in part.get("sources", [])] == [r["sha256"] for r in records]
            and (part.get("text_field"), part.get("txt_split"), part.get("val_fraction"), part.get("split_seed"))
            == (cfg.text_field, cfg.txt_split, files_val_fraction(cfg), 0))
    return store if same else None


def make_data_ready(entries: list[DataEntry], cfg: DistillConfig, tokenizer, run: RunDir, ctx: DistContext,
                    progress: bool = True) -> PackedCorpus:
    """Tokenize the entries that need it into the run folder (rank 0; the others wait and
    then open what it wrote) and pack every store into training/validation blocks."""
    if ctx.is_main:
        for e in entries:
            if e.store is None:
                run.own(DATA)
                target = run.path(*e.target.split("/"))
                if target.exists():
                    shutil.rmtree(target)  # ours (under OUT/data): a store of other files or settings
                e.store = prepare_store(e.files, target, tokenizer, text_field=cfg.text_field,
                                        txt_split=cfg.txt_split, val_fraction=files_val_fraction(cfg), seed=0,  # split: not the training seed
                                        progress=progress, records=e.records)
    ctx.barrier()
    for e in entries:
        if e.store is None:
            e.store = TokenStore(run.path(*e.target.split("/")), tokenizer)
    weights = [e.spec.weight for e in entries] if entries[0].spec.weight is not None else None
    return corpus_from_stores([e.store for e in entries], cfg.seq_len, weights)


def check_scored_tokens(entries: list[DataEntry], cfg: DistillConfig) -> None:
    """Under ``--loss-on assistant`` every store trained on must hold assistant tokens in both
    splits: otherwise its KL and LM terms are 0 at every step and the run trains the clone
    terms alone, while its losses look better than a real run's."""
    if cfg.loss_on != "assistant":
        return
    for e in entries:
        for split, what in (("train", "training"), ("val", "validation")):
            if e.store is not None and e.store.has_mask and e.store.scored_tokens(split) == 0:
                raise RedError(f"--data {e.spec.path}: its {what} documents hold no assistant token, and under "
                               "--loss-on assistant (the default) only assistant turns are scored, so the KL and "
                               "LM terms would be 0 at every step; give conversations with assistant turns, or "
                               "--loss-on all to score every token")


def check_store_splits(entries: list[DataEntry], cfg: DistillConfig) -> None:
    """A token store keeps the validation split it was prepared with: a ``--val-fraction``
    given for it must be that split's, or it would be recorded in run.yaml and not applied."""
    if cfg.val_fraction is None:
        return
    for e in entries:
        if e.store is not None and not e.target:  # a store given as --data (not one made here)
            made = sorted({p["val_fraction"] for p in e.store.manifest["parts"]})
            if made != [cfg.val_fraction]:
                raise RedError(f"--val-fraction {cfg.val_fraction:g} cannot apply to token store {e.spec.path}: its "
                               f"validation split was made when it was prepared (--val-fraction "
                               f"{', '.join(f'{v:g}' for v in made)}); drop --val-fraction, or prepare the store "
                               "again with the split you want")
