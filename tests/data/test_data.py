"""Corpus formats, the packing convention, the data sampler and checkpoint atomicity."""
import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from red.run.checkpoint import list_checkpoints
from red.data.corpus import load_corpus, read_documents, tokenize_documents
from red.data.store import BlockSampler
from red.errors import RedError
from helpers import build_tokenizer


def test_formats_give_the_same_documents(tmp_path):
    docs = ["first doc", "second one", "third: x=1"]
    (tmp_path / "a.txt").write_text("\n".join(docs) + "\n\n")
    (tmp_path / "a.jsonl").write_text("\n".join(json.dumps({"body": d, "id": i}) for i, d in enumerate(docs)))
    pq.write_table(pa.table({"body": docs}), tmp_path / "a.parquet")
    assert read_documents(tmp_path / "a.txt") == docs
    assert read_documents(tmp_path / "a.jsonl", text_field="body") == docs
    assert read_documents(tmp_path / "a.parquet", text_field="body") == docs
    (tmp_path / "p.txt").write_text("para one\nstill one\n\npara two\n")
    assert read_documents(tmp_path / "p.txt", txt_split="paragraph") == ["para one\nstill one", "para two\n"]
    with pytest.raises(RedError, match="no field 'text'.*--text-field"):
        read_documents(tmp_path / "a.jsonl")
    with pytest.raises(RedError, match="no column 'text'"):
        read_documents(tmp_path / "a.parquet")
    (tmp_path / "bad.jsonl").write_text('{"text": "ok"}\n{broken\n')
    with pytest.raises(RedError, match="line 2 is not valid JSON"):
        read_documents(tmp_path / "bad.jsonl")


def test_packing_convention(tmp_path):
    tok = build_tokenizer()
    ids = tokenize_documents(["ab", "c"], tok)
    a, b, c = (tok.convert_tokens_to_ids(x) for x in "abc")
    assert ids == [tok.bos_token_id, a, b, tok.eos_token_id, tok.bos_token_id, c, tok.eos_token_id]
    (tmp_path / "c.txt").write_text("\n".join(["abcdefg"] * 20))
    corpus = load_corpus(tmp_path / "c.txt", tok, seq_len=8, val_fraction=0.2)
    # 20 documents of 9 tokens; 4 whole documents (20 % of the tokens) are held out, and
    # each split is its documents' tokens concatenated and cut into blocks of 8
    assert corpus.train.shape[1] == 8
    assert (len(corpus.train), len(corpus.val)) == (16 * 9 // 8, 4 * 9 // 8)
    assert corpus.train[:].flatten().tolist() == tokenize_documents(["abcdefg"] * 16, tok)[: 18 * 8]
    assert corpus.val[:].flatten().tolist() == tokenize_documents(["abcdefg"] * 4, tok)[: 4 * 8]


def test_sampler_is_a_pure_function_of_seed_and_position():
    s = BlockSampler(10, 4, seed=3)
    seen = [s.next() for _ in range(5)]  # 20 draws = 2 epochs
    assert sorted(torch.cat(seen[:2]).tolist() + seen[2][:2].tolist()) == list(range(10))
    t = BlockSampler(10, 4, seed=3)
    t.next()
    t.next()
    state = t.state_dict()
    u = BlockSampler(10, 4, seed=3)
    u.load_state_dict(state)
    assert all(torch.equal(u.next(), x) for x in seen[2:])
    assert not torch.equal(BlockSampler(10, 4, seed=4).next(), seen[0])
    with pytest.raises(RedError, match="same --data"):
        BlockSampler(11, 4, seed=3).load_state_dict(state)


def test_half_written_checkpoint_is_never_taken(tmp_path):
    root = tmp_path / "checkpoints"
    (root / "step-0000004").mkdir(parents=True)
    (root / "step-0000004" / "trainer.json").write_text("{}")
    (root / "step-0000004" / "state.safetensors").write_bytes(b"x")
    (root / ".step-0000006.tmp-123").mkdir()  # a crash mid-write
    (root / "step-0000008").mkdir()  # no files: not complete
    assert [p.name for p in list_checkpoints(root)] == ["step-0000004"]
