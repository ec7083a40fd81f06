"""Every input checked before the work starts, table-driven.

Each row is one bad input: exit code 2, exactly one line "red <command>: error: ..." on
stderr naming the problem, no traceback, no output folder created and nothing that was on
disk changed. Below the table: the corpus fixes that are not errors (CRLF paragraphs, the
UTF-8 byte-order mark, packing with a tokenizer without bos/eos, 64-bit seeds) and the
checks that need the teacher (check_seq_len, check_calib_samples)."""
import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from red.config import check_calib_samples, make_config
from red.model.arch import check_seq_len
from red.data.corpus import load_corpus, read_documents, tokenize_documents
from red.data.store import BlockSampler
from red.errors import RedError
from helpers import error_table_failures, snapshot
from helpers import build_tokenizer


@pytest.fixture(scope="module")
def world(tmp_path_factory, teacher_dirs, corpus_file):
    root = tmp_path_factory.mktemp("checks")
    w = {"t": str(teacher_dirs["llama"]), "c": str(corpus_file), "root": root}
    good = "\n".join(json.dumps({"text": f"document number {i} is fine"}) for i in range(50))
    chat = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]
    files = {
        "null.jsonl": good + '\n{"text": null}\n',
        "list.jsonl": good + '\n{"text": ["a", "b"]}\n',
        "number.jsonl": '{"text": 42}\n' + good,
        "chat.jsonl": "\n".join(json.dumps({"messages": chat}) for _ in range(5)),
        "prompt.jsonl": "\n".join(json.dumps({"prompt": "1+1?", "completion": "2"}) for _ in range(5)),
        "array.json": json.dumps([{"text": "one"}, {"text": "two"}]),
    }
    for name, text in files.items():
        (root / name).write_text(text)
    (root / "utf16.txt").write_bytes(("some text\n" * 50).encode("utf-16"))
    pq.write_table(pa.table({"text": ["fine text"] * 3 + [None]}), root / "null.parquet")
    pq.write_table(pa.table({"messages": [chat] * 3}), root / "chat.parquet")
    (root / "a-folder").mkdir()
    (root / "lr-inf.yaml").write_text("lr: .inf\n")
    busy = root / "eval-out"  # an existing folder given as red eval's --out
    busy.mkdir()
    (busy / "keep.txt").write_text("precious")
    w["busy"] = busy
    afile = root / "analysis-out.txt"  # an existing file given as red analyze's --out
    afile.write_text("precious")
    w["afile"] = afile
    return w


def cases(w):
    t, c, R = w["t"], w["c"], w["root"]
    new = str(R / "new-out")
    d = lambda *a: ["distill", "--teacher", t, "--data", c, "--hidden-size", "32", "--out", new, "--steps", "2",
                    "--seq-len", "24", "--batch-size", "2", "--quiet", *map(str, a)]
    ev = lambda *a: ["eval", "--model", t, "--n-per-k", "2", *map(str, a)]
    pl = lambda *a: ["plan", "--teacher", t, "--hidden-size", "32", *map(str, a)]
    an = lambda *a: ["analyze", "--teacher", t, "--student", t, "--data", c, "--seq-len", "24", *map(str, a)]
    cal = lambda *a: ["calibrate", "--teacher", t, "--data", c, "--out", str(R / "new-out" / "cal.safetensors"),
                      "--seq-len", "24", *map(str, a)]
    return [
        # (1) numbers of DistillConfig: finite, then the rules table, then the cross-field rules
        ("temperature inf", d("--temperature", "inf"), "temperature=inf is not a finite number"),
        ("temperature nan", d("--temperature", "nan"), "temperature=nan is not a finite number"),
        ("lr inf, no checkpoint yet", d("--lr", "inf"), "lr=inf is not a finite number"),
        ("lr inf from yaml", d("--config", R / "lr-inf.yaml"), "lr=inf is not a finite number"),
        ("norm_eps 0", d("--norm-eps", "0"), "norm_eps must be a positive number"),
        ("norm_eps negative", d("--norm-eps=-1e-6"), "norm_eps must be a positive number"),
        ("init_std 0", d("--init-std", "0"), "init_std must be a positive number"),
        ("negative loss weight", d("--kl-weight", "-1"), "kl_weight must be at least 0"),
        ("all loss weights 0", d("--kl-weight", "0", "--lm-weight", "0", "--clone-weight", "0"),
         "are all 0, so nothing would be trained"),
        ("negative warmup", d("--warmup", "-1"), "warmup must be at least 0"),
        ("warmup longer than steps", d("--warmup", "50"), "warmup=50 steps is longer than steps=2"),
        ("seq_len 1", d("--seq-len", "1"), "seq_len must be at least 2"),
        ("seed beyond 64 bits", d("--seed", str(2**64)), "seed must be between 0 and 2**64-1"),
        ("negative seed", d("--seed", "-1"), "seed must be between 0 and 2**64-1"),
        ("keep 0 checkpoints", d("--keep-checkpoints", "0"), "keep_checkpoints must be at least 1"),
        ("unknown device", d("--device", "foo"), "device='foo' is not one of auto, cpu, cuda, cuda:N"),
        ("meta device", d("--device", "meta"), "device='meta' is not one of"),
        ("negative grad_clip", d("--grad-clip", "-1"), "grad_clip must be at least 0"),
        ("val_fraction 1", d("--val-fraction", "1"), "val_fraction must be between 0 and 1"),
        ("negative save_every", d("--save-every", "-1"), "save_every must be at least 0"),
        ("negative eval_every", d("--eval-every", "-5"), "eval_every must be at least 0"),
        ("val_batches 0", d("--val-batches", "0"), "val_batches must be at least 1"),
        # (2) red eval, red plan, red analyze, red calibrate: the same layer
        ("eval: k beyond the benchmark", ev("--ks", "40"), "between 1 and 8"),
        ("eval: nothing to evaluate", ev("--n-per-k", "0"), "nothing to evaluate"),
        ("eval: negative n-per-k", ev("--n-per-k", "-3"), "--n-per-k must be at least 0"),
        ("eval: out is a folder", ev("--out", w["busy"]), "is a folder; --out takes the JSON file"),
        ("eval: seed beyond 64 bits", ev("--seed", str(2**64)), "--seed must be between 0 and 2**64-1"),
        ("plan: negative logits chunk", pl("--logits-chunk", "-7"), "--logits-chunk must be at least 0"),
        ("plan: seq-len 1", pl("--seq-len", "1"), "--seq-len must be at least 2"),
        ("analyze: 0 samples", an("--samples", "0"), "--samples must be at least 1"),
        ("analyze: out is a file", an("--out", w["afile"]), "is a file; --out takes a folder"),
        ("calibrate: unknown device", cal("--device", "foo"), "--device='foo' is not one of"),
        ("bench: meta device", ["bench", "--teacher", t, "--hidden-size", "32", "--seq-len", "8", "--device", "meta"],
         "--device='meta' is not one of"),
        ("calibrate: 0 samples", cal("--calib-samples", "0"), "--calib-samples must be at least 1"),
        # (3) corpus rows and files
        ("jsonl: null text", d("--data", R / "null.jsonl"), "line 51 field 'text' is null, not text"),
        ("jsonl: list text", d("--data", R / "list.jsonl"), "line 51 field 'text' is list, not text"),
        ("jsonl: number text", d("--data", R / "number.jsonl"), "line 1 field 'text' is int, not text"),
        # chat rows are rendered with the chat template: this tokenizer has none
        ("jsonl: chat rows", d("--data", R / "chat.jsonl"), "has no chat template"),
        ("jsonl: chat field as text", d("--data", R / "chat.jsonl", "--text-field", "messages"),
         "has no chat template"),
        ("jsonl: prompt/completion", d("--data", R / "prompt.jsonl"), "has no chat template"),
        ("parquet: null text", d("--data", R / "null.parquet"), "row 4 field 'text' is null"),
        ("parquet: chat column", d("--data", R / "chat.parquet"), "has no chat template"),
        ("corpus is a folder", d("--data", R / "a-folder"), "is a folder, not a file"),
        ("json array", d("--data", R / "array.json"), "holds one JSON array, not JSON lines"),
        ("utf-16 text", d("--data", R / "utf16.txt"), "is UTF-16 text; convert it to UTF-8"),
    ]


def test_input_checks_table(world, capfd):
    watched = [world["busy"], world["afile"]]
    before = snapshot(*watched)
    failures = error_table_failures(cases(world), capfd, world["root"] / "new-out")
    assert not failures, "\n".join(failures)
    assert snapshot(*watched) == before


def test_crlf_paragraphs_and_utf8_bom(tmp_path):
    (tmp_path / "crlf.txt").write_bytes(b"para one\r\nstill one\r\n\r\npara two\r\n")
    assert read_documents(tmp_path / "crlf.txt", txt_split="paragraph") == ["para one\nstill one", "para two\n"]
    (tmp_path / "bom.txt").write_bytes("\ufefffirst doc\nsecond doc\n".encode("utf-8"))
    assert read_documents(tmp_path / "bom.txt") == ["first doc", "second doc"]
    (tmp_path / "bom.jsonl").write_bytes("\ufeff".encode() + b'{"text": "first"}\r\n{"text": "second"}\r\n')
    assert read_documents(tmp_path / "bom.jsonl") == ["first", "second"]


def _tokenizer_without_bos_eos(split=r"."):
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    from helpers import CHARS

    vocab = {t: i for i, t in enumerate(["<pad>", "<unk>"] + list(CHARS))}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex(split), behavior="isolated")
    tok.decoder = decoders.Fuse()
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", unk_token="<unk>")


def test_documents_are_separated_without_bos_and_eos(tmp_path):
    # a tokenizer that encodes newlines: documents end with the tokens of a blank line
    tok = _tokenizer_without_bos_eos(r".|\n")
    assert tok.bos_token_id is None and tok.eos_token_id is None
    a, b, nl = (tok.convert_tokens_to_ids(x) for x in "ab\n")
    assert tokenize_documents(["a", "b"], tok) == [a, nl, nl, b, nl, nl]  # not glued into "ab"
    (tmp_path / "c.txt").write_text("\n".join(["abc"] * 40))
    corpus = load_corpus(tmp_path / "c.txt", tok, seq_len=10, val_fraction=0.2)
    assert (corpus.train[:] == nl).any()
    # one whose "\n\n" is unknown (its "." does not match newlines): the pad token
    tok = _tokenizer_without_bos_eos()
    a, b = tok.convert_tokens_to_ids("a"), tok.convert_tokens_to_ids("b")
    assert tokenize_documents(["a", "b"], tok) == [a, tok.pad_token_id, b, tok.pad_token_id]
    # a tokenizer with bos/eos keeps the [bos] + tokens + [eos] convention
    t2 = build_tokenizer()
    a2 = t2.convert_tokens_to_ids("a")
    assert tokenize_documents(["a"], t2) == [t2.bos_token_id, a2, t2.eos_token_id]


def test_any_64_bit_seed_runs():
    cfg = make_config(teacher="t", data="d", hidden_size=8, out="o", seed=2**64 - 1)
    s = BlockSampler(10, 4, cfg.seed)
    for _ in range(5):  # crosses epochs
        assert s.next().shape == (4,)
    assert BlockSampler(10, 4, 3).next().tolist() == BlockSampler(10, 4, 3).next().tolist()


def test_seq_len_and_calibration_samples_against_the_teacher_and_corpus(teacher_dirs):
    raw = json.loads((teacher_dirs["llama"] / "config.json").read_text())  # max_position_embeddings 256
    check_seq_len(raw, 256)
    with pytest.raises(RedError, match="--seq-len 300 is above the teacher's max_position_embeddings=256"):
        check_seq_len(raw, 300)
    ok = make_config(teacher="t", data="d", hidden_size=8, out="o", seq_len=256, calib_samples=4)
    check_calib_samples(ok, 4)
    with pytest.raises(RedError, match="calib_samples=4 is more than the 3 training sequences"):
        check_calib_samples(ok, 3)
    # a given calibration file needs no sequences of this corpus
    check_calib_samples(make_config(teacher="t", data="d", hidden_size=8, out="o", calib_samples=4,
                                    calibration="cal.safetensors"), 1)