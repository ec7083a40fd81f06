"""Token stores (`red prepare`, red.data.store): format, split, parallel and streaming writes,
append, sources (globs, saved datasets, chat rows), mixtures, and bad input."""
from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from helpers import error_table_failures, snapshot
from helpers import build_tokenizer, make_teacher, write_corpus

from red.data.corpus import corpus_from_stores, load_corpus, tokenize_documents
from red.data.store import BlockSampler
from red.errors import RedError
from red.data.store import MixtureSampler, TokenStore, choose_val_ranges, prepare_store, token_dtype, tokenizer_fingerprint

CHAT_TEMPLATE = ("{% for m in messages %}[{{ m['role'] }}]: {{ m['content'] }}\n{% endfor %}"
                 "{% if add_generation_prompt %}[assistant]: {% endif %}")


def chat_tokenizer():
    tok = build_tokenizer()
    tok.chat_template = CHAT_TEMPLATE
    return tok


@pytest.fixture(scope="module")
def chat_teacher(tmp_path_factory):
    t = make_teacher(tmp_path_factory.mktemp("chat") / "t", "qwen3")
    tok = chat_tokenizer()
    tok.save_pretrained(t)
    return t


def docs_of(path: Path) -> list[str]:
    return [line for line in path.read_text().splitlines() if line.strip()]


def test_store_holds_the_documents_and_splits_by_document(tmp_path):
    tok = build_tokenizer()
    c = write_corpus(tmp_path / "c.txt", n_lines=300)
    st = prepare_store([str(c)], tmp_path / "st", tok, val_fraction=0.1, workers=1, progress=False)
    m = json.loads((tmp_path / "st" / "store.json").read_text())
    docs = docs_of(c)
    flat = tokenize_documents(docs, tok)
    part = m["parts"][0]
    assert m["dtype"] == "uint16" and m["tokenizer"]["vocab_size"] == len(tok)
    assert m["tokenizer"]["fingerprint"] == tokenizer_fingerprint(tok)
    assert (part["tokens"], part["documents"]) == (len(flat), len(docs))
    assert part["sources"][0]["sha256"] == hashlib.sha256(c.read_bytes()).hexdigest()
    assert np.fromfile(tmp_path / "st" / "part-00000.tokens", dtype=np.uint16).tolist() == flat
    # the split is whole documents: val spans start and end at document ends
    ends = set([0] + np.fromfile(tmp_path / "st" / "part-00000.ends", dtype=np.uint64).tolist())
    val = st.spans("val")
    assert val and all(a in ends and b in ends for _, a, b in val)
    held = sum(b - a for _, a, b in val)
    assert 0.1 * len(flat) <= held <= 0.1 * len(flat) + 40  # one document past the target at most
    # train is everything else, in order
    train = np.concatenate([st.parts[0].tokens[a:b] for _, a, b in st.spans("train")]).tolist()
    assert len(train) + held == len(flat)
    # blocks: the train stream cut into seq_len, tail dropped; blocks read one by one
    view = st.view("train", 16)
    assert len(view) == len(train) // 16
    assert view[:].flatten().tolist() == train[: len(view) * 16]
    assert view[[3, 0]].tolist() == [train[48:64], train[0:16]]
    assert view[torch.tensor([len(view) - 1])].tolist() == [train[(len(view) - 1) * 16: len(view) * 16]]


def test_val_ranges_are_seeded_and_never_take_everything():
    ends = np.cumsum(np.full(50, 10)).astype(np.uint64)
    a = choose_val_ranges(ends, 0.2, seed=0)
    assert a == choose_val_ranges(ends, 0.2, seed=0) and a != choose_val_ranges(ends, 0.2, seed=1)
    assert sum(b - s for s, b in a) == 10  # 20 % of 50 equal documents
    assert sum(b - s for s, b in choose_val_ranges(ends[:2], 0.99, 0)) == 1
    with pytest.raises(RedError, match="too short"):
        choose_val_ranges(ends[:1], 0.2, 0)
    assert token_dtype(65536) == np.uint16 and token_dtype(65537) == np.uint32


def test_load_corpus_equals_a_prepared_store(tmp_path):
    tok = build_tokenizer()
    c = write_corpus(tmp_path / "c.txt")
    st = prepare_store([str(c)], tmp_path / "st", tok, workers=1, progress=False)
    a = load_corpus(c, tok, 24)
    b = corpus_from_stores([st], 24)
    assert torch.equal(a.train[:], b.train[:]) and torch.equal(a.val[:], b.val[:])
    assert a.fingerprint == b.fingerprint == st.fingerprint


def test_workers_write_the_same_bytes(tmp_path):
    tok = build_tokenizer()
    c = write_corpus(tmp_path / "c.txt", n_lines=3000)
    import red.data.store as S

    old = S.CHUNK_CHARS
    S.CHUNK_CHARS = 2000  # many jobs, so that order across processes matters
    try:
        one = prepare_store([str(c)], tmp_path / "one", tok, workers=1, progress=False)
        two = prepare_store([str(c)], tmp_path / "two", tok, workers=2, progress=False)
    finally:
        S.CHUNK_CHARS = old
    for name in ("part-00000.tokens", "part-00000.ends"):
        assert (tmp_path / "one" / name).read_bytes() == (tmp_path / "two" / name).read_bytes()
    assert one.fingerprint == two.fingerprint


def test_append_adds_a_part_and_changes_nothing_written(tmp_path):
    tok = build_tokenizer()
    a = write_corpus(tmp_path / "a.txt", seed=1)
    b = write_corpus(tmp_path / "b.txt", seed=2)
    prepare_store([str(a)], tmp_path / "st", tok, workers=1, progress=False)
    before = snapshot(tmp_path / "st")
    st = prepare_store([str(b)], tmp_path / "st", tok, workers=1, progress=False, append=True)
    after = snapshot(tmp_path / "st")
    assert {k: v for k, v in after.items() if k in before and not k.endswith("store.json")} == \
        {k: v for k, v in before.items() if not k.endswith("store.json")}
    assert len(st.manifest["parts"]) == 2 and st.manifest["tokens"] == sum(p["tokens"] for p in st.manifest["parts"])
    both = load_corpus(a, tok, 16).train[:].numel() + load_corpus(b, tok, 16).train[:].numel()
    assert abs(st.view("train", 16)[:].numel() - both) <= 16  # one stream over both parts
    with pytest.raises(RedError, match="already in store"):
        prepare_store([str(b)], tmp_path / "st", tok, workers=1, progress=False, append=True)
    assert snapshot(tmp_path / "st") == after


def test_sources_globs_datasets_and_parquet(tmp_path):
    datasets = pytest.importorskip("datasets")
    tok = build_tokenizer()
    docs = docs_of(write_corpus(tmp_path / "c.txt"))
    (tmp_path / "shards").mkdir()
    for i in range(3):
        (tmp_path / "shards" / f"{i}.jsonl").write_text("".join(json.dumps({"text": d}) + "\n" for d in docs[i::3]))
    ds = datasets.Dataset.from_dict({"text": docs})
    ds.save_to_disk(str(tmp_path / "saved"))
    datasets.DatasetDict({"train": ds}).save_to_disk(str(tmp_path / "saveddict"))
    g = prepare_store([str(tmp_path / "shards" / "*.jsonl")], tmp_path / "g", tok, workers=1, progress=False)
    assert [s["path"] for s in g.manifest["parts"][0]["sources"]] == [str(tmp_path / "shards" / f"{i}.jsonl")
                                                                      for i in range(3)]
    assert g.manifest["tokens"] == len(tokenize_documents(docs, tok))
    for name in ("saved", "saveddict"):
        h = prepare_store([str(tmp_path / name)], tmp_path / f"st-{name}", tok, workers=1, progress=False)
        assert np.asarray(h.parts[0].tokens).tolist() == tokenize_documents(docs, tok)
    # local files through datasets.load_dataset: compressed JSON lines, which our reader does not take
    import gzip

    (tmp_path / "gz").mkdir()
    for i in range(2):
        with gzip.open(tmp_path / "gz" / f"{i}.jsonl.gz", "wt") as f:
            f.write("".join(json.dumps({"text": d}) + "\n" for d in docs[i::2]))
    z = prepare_store([f"json:{tmp_path / 'gz' / '*.jsonl.gz'}"], tmp_path / "st-gz", tok, workers=1,
                      progress=False)
    assert np.asarray(z.parts[0].tokens).tolist() == tokenize_documents(docs[0::2] + docs[1::2], tok)
    with pytest.raises(RedError, match="matches no file"):
        prepare_store([f"json:{tmp_path / 'gz' / '*.nothing'}"], tmp_path / "st-none", tok, workers=1)


def test_chat_rows_render_with_the_template_and_mask_the_assistant(tmp_path):
    tok = chat_tokenizer()
    conv = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "2+2?"},
            {"role": "assistant", "content": "4"}, {"role": "user", "content": "and 3+3?"},
            {"role": "assistant", "content": "6, surely"}]
    rows = [{"messages": conv}, {"prompt": "hi", "completion": "hello there"}] * 10
    (tmp_path / "chat.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    st = prepare_store([str(tmp_path / "chat.jsonl")], tmp_path / "st", tok, workers=1, progress=False)
    p = st.parts[0]
    assert p.mask is not None and st.manifest["parts"][0]["sources"][0]["kind"] == "chat"
    first = np.asarray(p.tokens[: int(p.ends[0])]).tolist()
    mask = np.asarray(p.mask[: int(p.ends[0])]).tolist()
    text = tok.apply_chat_template(conv, tokenize=False)
    assert first == tok(text, add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
    scored = "".join(tok.convert_ids_to_tokens(t) for t, m in zip(first, mask) if m)
    assert scored == "4\n6, surely\n"  # the assistant turns (and their end), nothing of the prompt
    second = np.asarray(p.mask[int(p.ends[0]): int(p.ends[1])]).tolist()
    ids = np.asarray(p.tokens[int(p.ends[0]): int(p.ends[1])]).tolist()
    assert "".join(tok.convert_ids_to_tokens(t) for t, m in zip(ids, second) if m) == "hello there\n"
    # the view gives the mask block by block, aligned with the tokens
    v = st.view("train", 32)
    assert v.loss_mask([0]).shape == (1, 32) and v.loss_mask([0]).dtype == torch.bool


def test_text_then_chat_in_one_part_scores_all_text_tokens(tmp_path):
    tok = chat_tokenizer()
    (tmp_path / "a.jsonl").write_text("".join(json.dumps({"text": f"plain {i}"}) + "\n" for i in range(5)))
    (tmp_path / "b.jsonl").write_text("".join(json.dumps({"prompt": "q", "completion": "a"}) + "\n"
                                              for _ in range(5)))
    st = prepare_store([str(tmp_path / "a.jsonl"), str(tmp_path / "b.jsonl")], tmp_path / "st", tok, workers=1,
                       progress=False)
    p = st.parts[0]
    n_text = int(p.ends[4])
    assert np.asarray(p.mask[:n_text]).all() and not np.asarray(p.mask[n_text:]).all()


def test_mixture_sampler_follows_weights_and_resumes():
    s = MixtureSampler([50, 500], [0.5, 0.5], batch_size=8, seed=3)
    draws = torch.cat([s.next() for _ in range(250)])
    share = (draws < 50).float().mean().item()
    assert 0.45 < share < 0.55  # weights, not sizes (sizes would give 0.09)
    a = MixtureSampler([50, 500], [0.9, 0.1], 8, 3)
    for _ in range(7):
        a.next()
    b = MixtureSampler([50, 500], [0.9, 0.1], 8, 3)
    b.load_state_dict(json.loads(json.dumps(a.state_dict())))
    assert all(torch.equal(a.next(), b.next()) for _ in range(20))
    with pytest.raises(RedError, match="same --data"):
        MixtureSampler([50, 501], [0.9, 0.1], 8, 3).load_state_dict(a.state_dict())
    # one component without weights is the plain sampler
    assert isinstance(corpus_like(None).sampler(4, 0), BlockSampler)


def corpus_like(weights):
    from red.data.corpus import PackedCorpus

    return PackedCorpus(train=torch.zeros(10, 4, dtype=torch.long), val=torch.zeros(2, 4, dtype=torch.long),
                        weights=weights)


def test_views_read_only_the_blocks_asked(tmp_path, monkeypatch):
    tok = build_tokenizer()
    st = prepare_store([str(write_corpus(tmp_path / "c.txt"))], tmp_path / "st", tok, workers=1, progress=False)
    view = st.view("train", 16)
    reads = []
    real = view._pieces
    monkeypatch.setattr(view, "_pieces", lambda i: (reads.append(i), real(i))[1])
    view[[5, 2]]
    assert sorted(reads) == [2, 5]


# -- distill from stores -------------------------------------------------------------------------

def _distill(t, data, out, *extra):
    from red.cli import main

    args = ["distill", "--teacher", str(t), "--hidden-size", "32", "--out", str(out), "--steps", "2",
            "--seq-len", "24", "--batch-size", "2", "--quiet", "--eval-every", "0", "--val-batches", "1"]
    for d in data:
        args += ["--data", str(d)]
    return main(args + [str(x) for x in extra])


def test_data_file_is_tokenized_once_into_the_run(tmp_path, teacher_dirs, corpus_file, monkeypatch):
    import red.data.staging as P

    t = teacher_dirs["llama"]
    assert _distill(t, [corpus_file], tmp_path / "r", "--save-every", "1") == 0
    st = TokenStore(tmp_path / "r" / "data" / "0")
    assert st.manifest["parts"][0]["sources"][0]["sha256"] == hashlib.sha256(corpus_file.read_bytes()).hexdigest()
    monkeypatch.setattr(P, "prepare_store", lambda *a, **k: pytest.fail("tokenized again"))
    assert _distill(t, [corpus_file], tmp_path / "r", "--resume", "--steps", "3", "--allow-change", "steps",
                    "--save-every", "1") == 0
    # the same run from the store itself trains on the same tokens
    res = json.loads((tmp_path / "r" / "result.json").read_text())
    assert res["steps"] == 3


def test_mixture_and_store_runs(tmp_path, teacher_dirs, corpus_file):
    from red.model.teacher import load_tokenizer

    t = teacher_dirs["llama"]
    tok = load_tokenizer(t)
    other = write_corpus(tmp_path / "other.txt", seed=5)
    prepare_store([str(other)], tmp_path / "st", tok, workers=1, progress=False)
    assert _distill(t, [f"{corpus_file}:0.75", f"{tmp_path / 'st'}:0.25"], tmp_path / "mix") == 0
    assert TokenStore(tmp_path / "mix" / "data" / "0").manifest["tokens"] > 0
    assert not (tmp_path / "mix" / "data" / "1").exists()  # a store is read where it is
    rows = [json.loads(x) for x in (tmp_path / "mix" / "metrics.jsonl").read_text().splitlines()]
    assert any("val_loss" in r for r in rows)


def test_chat_data_trains_on_assistant_tokens(tmp_path, chat_teacher):
    from red.train.trainer import read_batch
    from red.config import make_config

    rows = [{"prompt": f"what is {i}+{i}?", "completion": f"it is {2 * i}."} for i in range(60)]
    (tmp_path / "chat.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert _distill(chat_teacher, [tmp_path / "chat.jsonl"], tmp_path / "r") == 0
    st = TokenStore(tmp_path / "r" / "data" / "0")
    view = st.view("train", 24)
    cfg = make_config(teacher="t", data="d", hidden_size=8, out="o")
    b = read_batch(view, torch.tensor([0, 1]), cfg, "cpu")
    assert b["loss_mask"].shape == (2, 24) and 0 < b["loss_mask"].float().mean() < 1
    cfg_all = make_config(teacher="t", data="d", hidden_size=8, out="o", loss_on="all")
    assert "loss_mask" not in read_batch(view, torch.tensor([0, 1]), cfg_all, "cpu")
    cfg_doc = make_config(teacher="t", data="d", hidden_size=8, out="o", cross_doc_attention=False)
    docs = read_batch(st.view("train", 128), torch.tensor([0]), cfg_doc, "cpu")["doc_ids"][0]
    ends = set(int(e) for e in st.parts[0].ends)
    start = st.spans("train")[0][1]
    # a new document id starts exactly where a document ended in the store
    changes = [start + i for i in range(1, 128) if docs[i] != docs[i - 1]]
    assert changes and all(c in ends for c in changes)
    assert _distill(chat_teacher, [tmp_path / "chat.jsonl"], tmp_path / "r2", "--no-cross-doc-attention",
                    "--loss-on", "assistant") == 0


# -- bad input ---------------------------------------------------------------------------------

def test_bad_store_input_one_line_nothing_written(tmp_path, teacher_dirs, corpus_file, chat_teacher, capfd):
    t = str(teacher_dirs["llama"])
    R = tmp_path
    tok = build_tokenizer()
    other_tok = build_tokenizer()
    other_tok.add_tokens(["<extra>"])
    (R / "othertok").mkdir()
    other_tok.save_pretrained(R / "othertok")
    prepare_store([str(corpus_file)], R / "st-other", other_tok, workers=1, progress=False)
    prepare_store([str(corpus_file)], R / "good", tok, workers=1, progress=False)
    shutil.copytree(R / "good", R / "trunc")
    f = R / "trunc" / "part-00000.tokens"
    f.write_bytes(f.read_bytes()[:-10])
    shutil.copytree(R / "good", R / "mism")
    m = json.loads((R / "mism" / "store.json").read_text())
    m["parts"][0]["documents"] += 1
    (R / "mism" / "store.json").write_text(json.dumps(m))
    (R / "badrole.jsonl").write_text(json.dumps({"messages": [{"role": "wizard", "content": "x"}]}) + "\n")
    new = str(R / "new-out")
    d = lambda *data, teacher=t: ["distill", "--teacher", teacher, "--hidden-size", "32", "--out", new, "--quiet",
                                  "--seq-len", "24", *[x for p in data for x in ("--data", str(p))]]
    prep = lambda *a: ["prepare", "--tokenizer", t, "--out", new, "--quiet", *map(str, a)]
    cases = [
        ("store of another tokenizer", d(R / "st-other"), "made with another tokenizer"),
        ("truncated token file", d(R / "trunc"), "truncated"),
        ("manifest not matching", d(R / "mism"), "does not match its manifest"),
        ("zero weight", d(f"{corpus_file}:0", f"{R / 'good'}:1"), "must be a positive number"),
        ("negative weight", d(f"{corpus_file}:-1", f"{R / 'good'}:1"), "must be a positive number"),
        ("weights on some only", d(f"{corpus_file}:0.5", R / "good"), "every --data a mixture weight"),
        ("unknown chat role", d(R / "badrole.jsonl", teacher=str(chat_teacher)), "role 'wizard'"),
        ("glob matching nothing", d(R / "nothing-*.jsonl"), "matches no file"),
        ("prepare: unknown chat role", prep("--data", R / "badrole.jsonl", "--tokenizer", chat_teacher),
         "role 'wizard'"),
        ("prepare: weight", prep("--data", f"{corpus_file}:0.5"), "mixture weights belong to red distill"),
        ("prepare: existing store", prep("--data", corpus_file, "--out", R / "good"), "already holds a token store"),
        ("prepare: missing tokenizer", prep("--data", corpus_file, "--tokenizer", R / "nope"), "does not exist"),
    ]
    watched = [R / "st-other", R / "good", R / "trunc", R / "mism"]
    before = snapshot(*watched)
    failures = error_table_failures(cases, capfd, R / "new-out")
    assert not failures, "\n".join(failures)
    assert snapshot(*watched) == before


def test_a_bad_row_deep_in_the_file_leaves_no_run_folder(tmp_path, teacher_dirs, corpus_file, capfd):
    # found while tokenizing (past the rows checked before the start), not before it
    lines = [json.dumps({"text": f"row {i} alpha beta"}) for i in range(400)] + ["{broken"]
    (tmp_path / "late.jsonl").write_text("\n".join(lines) + "\n")
    rc = _distill(teacher_dirs["llama"], [tmp_path / "late.jsonl"], tmp_path / "r")
    assert rc == 2 and "line 401 is not valid JSON" in capfd.readouterr().err
    assert not (tmp_path / "r").exists()


def test_mixture_run_resumes_bitwise(tmp_path, teacher_dirs, corpus_file):
    from safetensors.torch import load_file

    import red.run.folder as R

    t = teacher_dirs["qwen2"]
    from red.model.teacher import load_tokenizer

    # the teacher's own tokenizer: a saved tokenizer can load as another class (here
    # Qwen2Tokenizer, which tokenizes differently), and a store refuses a tokenizer not its own
    prepare_store([str(write_corpus(tmp_path / "other.txt", seed=7))], tmp_path / "st", load_tokenizer(t),
                  workers=1, progress=False)
    data = [f"{corpus_file}:0.7", f"{tmp_path / 'st'}:0.3"]
    args = ("--steps", "4", "--save-every", "2", "--no-cross-doc-attention", "--lr", "3e-3", "--warmup", "1")
    assert _distill(t, data, tmp_path / "straight", *args) == 0

    def stop_after_3(event, step, folder):
        if event == "step-done" and step == 3:
            raise KeyboardInterrupt
    R.HOOKS.append(stop_after_3)
    try:
        assert _distill(t, data, tmp_path / "cut", *args) == 130
    finally:
        R.HOOKS.remove(stop_after_3)
    assert _distill(t, data, tmp_path / "cut", *args, "--resume") == 0
    final = lambda out: load_file(str(out / "checkpoints/step-0000004/state.safetensors"))
    want, got = final(tmp_path / "straight"), final(tmp_path / "cut")
    assert set(got) == set(want) and all(torch.equal(got[k], want[k]) for k in want)


def test_distill_reads_a_builder_glob_of_several_shards_as_prepare_does(tmp_path, teacher_dirs, corpus_file):
    """Issue 22: `--data 'json:shards/*.jsonl.gz'` matching several files failed in `red
    distill` (the expanded list was joined into one string and globbed again) while `red
    prepare` took it."""
    import gzip

    pytest.importorskip("datasets")
    from red.cli import main
    from red.model.teacher import load_tokenizer

    docs = docs_of(corpus_file)
    (tmp_path / "shards").mkdir()
    for i in range(3):
        with gzip.open(tmp_path / "shards" / f"{i}.jsonl.gz", "wt") as f:
            f.write("".join(json.dumps({"text": d}) + "\n" for d in docs[i::3]))
    spec = f"json:{tmp_path / 'shards' / '*.jsonl.gz'}"
    t = teacher_dirs["llama"]
    assert _distill(t, [spec], tmp_path / "r") == 0
    assert main(["prepare", "--tokenizer", str(t), "--data", spec, "--out", str(tmp_path / "st"), "--workers", "1",
                 "--quiet"]) == 0
    run_store, prepared = TokenStore(tmp_path / "r" / "data" / "0"), TokenStore(tmp_path / "st")
    expected = tokenize_documents(docs[0::3] + docs[1::3] + docs[2::3], load_tokenizer(t))
    assert np.asarray(run_store.parts[0].tokens).tolist() == expected
    assert np.asarray(prepared.parts[0].tokens).tolist() == expected
    sources = run_store.manifest["parts"][0]["sources"]
    assert len(sources) == 1 and sources[0]["path"].count(".jsonl.gz") == 3


def test_the_prepare_api_checks_and_writes_what_red_prepare_does(tmp_path, teacher_dirs, corpus_file):
    """`red.prepare` is `red prepare` without the parser: the same checks (a mixture weight
    refused before anything is written), the same store."""
    import red
    from red.cli import main

    t = teacher_dirs["llama"]
    with pytest.raises(RedError, match="mixture weights belong to red distill"):
        red.prepare([f"{corpus_file}:0.5"], t, tmp_path / "w")
    assert not (tmp_path / "w").exists()
    store = red.prepare([str(corpus_file)], t, tmp_path / "api", workers=1, progress=False)
    assert main(["prepare", "--tokenizer", str(t), "--data", str(corpus_file), "--out", str(tmp_path / "cli"),
                 "--workers", "1", "--quiet"]) == 0
    cli = TokenStore(tmp_path / "cli")
    assert store.manifest["tokens"] == cli.manifest["tokens"] > 0
    assert np.asarray(store.parts[0].tokens).tolist() == np.asarray(cli.parts[0].tokens).tolist()
