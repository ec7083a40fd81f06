"""Exports that serving stacks take as the teacher (issue 22): the teacher's tokenizer files
byte for byte, and a Qwen2 student relabelled as a Llama for stacks whose Qwen2 sizes its
heads from hidden_size. Checked with the real clients: transformers' tokenizers and forward,
sentencepiece, and (when its script is given) llama.cpp's own converter with the gguf reader."""
from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest

from helpers import make_spm_teacher, one_line
from red.cli import main
from red.model.export import TOKENIZER_FILES

ARGS = ["--hidden-size", "32", "--steps", "1", "--seq-len", "24", "--batch-size", "2", "--eval-every", "0",
        "--val-batches", "1", "--quiet"]
TEXTS = ["red reds redder", "alpha beta gamma = 1 + 2", "the quick brown fox; sum of x is y!", "  two  spaces\n"]
#: what an export writes besides the tokenizer files
MODEL_FILES = {"config.json", "model.safetensors", "generation_config.json", ".red-export.json"}


def distill(teacher, data, out, *extra):
    return main(["distill", "--teacher", str(teacher), "--data", str(data), "--out", str(out), *ARGS,
                 *map(str, extra)])


def tokenizer_bytes(folder: Path) -> dict[str, bytes]:
    """Every tokenizer file of ``folder`` (the names of TOKENIZER_FILES, folders walked)."""
    out = {}
    for name in TOKENIZER_FILES:
        p = folder / name
        if p.is_dir():
            out.update({str(f.relative_to(folder)): f.read_bytes() for f in sorted(p.rglob("*")) if f.is_file()})
        elif p.exists():
            out[name] = p.read_bytes()
    return out


def same_tokenization(teacher: Path, student: Path) -> None:
    from transformers import AutoTokenizer

    a, b = AutoTokenizer.from_pretrained(teacher), AutoTokenizer.from_pretrained(student)
    assert type(a) is type(b)
    for text in TEXTS:
        assert a(text)["input_ids"] == b(text)["input_ids"], text
        assert a.tokenize(text) == b.tokenize(text), text
    assert a.all_special_tokens == b.all_special_tokens


@pytest.fixture(scope="module")
def rich_teacher(teacher_dirs, tmp_path_factory):
    """The tiny Llama teacher with every kind of tokenizer file a Hub repo has: a chat
    template file, special_tokens_map.json, added_tokens.json, a named chat template, and
    tokenizer.json as a link into a blob store (as in a Hugging Face cache)."""
    t = tmp_path_factory.mktemp("rich") / "teacher"
    shutil.copytree(teacher_dirs["llama"], t)
    (t / "chat_template.jinja").write_text("{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}\n"
                                           "{% endfor %}")
    (t / "special_tokens_map.json").write_text(json.dumps({"bos_token": "<s>", "eos_token": "</s>",
                                                           "unk_token": "<unk>", "pad_token": "<pad>"}, indent=2))
    (t / "added_tokens.json").write_text("{}\n")
    (t / "additional_chat_templates").mkdir()
    (t / "additional_chat_templates" / "tool_use.jinja").write_text("{{ messages[0]['content'] }}")
    blobs = t.parent / "blobs"
    blobs.mkdir()
    shutil.move(str(t / "tokenizer.json"), str(blobs / "0a1b2c"))
    (t / "tokenizer.json").symlink_to(blobs / "0a1b2c")
    return t


def test_export_copies_the_teachers_tokenizer_files_byte_for_byte(rich_teacher, corpus_file, tmp_path):
    run = tmp_path / "run"
    assert distill(rich_teacher, corpus_file, run) == 0
    assert main(["export", "--run", str(run), "--out", str(tmp_path / "exp")]) == 0
    want = tokenizer_bytes(rich_teacher)
    assert {"tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json",
            "chat_template.jinja", "additional_chat_templates/tool_use.jinja"} <= set(want)
    for student in (run / "student", tmp_path / "exp"):
        assert tokenizer_bytes(student) == want
        # nothing else is written: the model's files and the export's manifest
        top = {n for n in want if "/" not in n} | {"additional_chat_templates"}
        assert set(os.listdir(student)) == top | MODEL_FILES, set(os.listdir(student)) ^ (top | MODEL_FILES)
        assert not (student / "tokenizer.json").is_symlink()
        same_tokenization(rich_teacher, student)
        from transformers import AutoTokenizer

        chat = [{"role": "user", "content": "hi"}]
        assert AutoTokenizer.from_pretrained(student).apply_chat_template(chat, tokenize=False) == "<user>hi\n"
    m = json.loads((tmp_path / "exp" / ".red-export.json").read_text())
    assert set(m["entries"]) >= set(os.listdir(tmp_path / "exp")) - {".red-export.json"}


def test_sentencepiece_teacher_keeps_tokenizer_model(corpus_file, tmp_path):
    """A SentencePiece teacher (Llama 2, Mistral) keeps tokenizer.model, so older
    transformers and llama.cpp's converter read the same pieces and scores; the student
    splits words as the teacher does, checked with sentencepiece itself."""
    spm = pytest.importorskip("sentencepiece")
    text = corpus_file.read_text() + "red reds redder the quick brown fox\n" * 20
    (tmp_path / "c.txt").write_text(text)
    t = make_spm_teacher(tmp_path / "teacher", tmp_path / "c.txt")
    run = tmp_path / "run"
    assert distill(t, tmp_path / "c.txt", run) == 0
    student = run / "student"
    assert (student / "tokenizer.model").read_bytes() == (t / "tokenizer.model").read_bytes()
    assert tokenizer_bytes(student) == tokenizer_bytes(t)
    assert {"tokenizer.model", "special_tokens_map.json", "tokenizer.json", "tokenizer_config.json"} <= set(
        tokenizer_bytes(student))
    same_tokenization(t, student)
    from transformers import AutoTokenizer

    sp = spm.SentencePieceProcessor(model_file=str(student / "tokenizer.model"))
    hf = AutoTokenizer.from_pretrained(student)
    for line in ("red reds redder", "alpha beta gamma = 1 + 2", "the quick brown fox sum of x is y"):
        assert sp.encode(line, out_type=str) == hf.tokenize(line), line
    assert sp.encode("red reds", out_type=str)[0] == "\u2581red"  # a whole-word piece: "r|ed" would be a split


def test_export_refuses_a_users_tokenizer_file(rich_teacher, corpus_file, tmp_path, capfd):
    run = tmp_path / "run"
    assert distill(rich_teacher, corpus_file, run) == 0
    exp = tmp_path / "exp"
    exp.mkdir()
    (exp / "chat_template.jinja").write_text("my template")
    one_line(capfd, main(["export", "--run", str(run), "--out", str(exp), "--overwrite"]),
             "already holds chat_template.jinja", "red did not write")
    assert os.listdir(exp) == ["chat_template.jinja"] and (exp / "chat_template.jinja").read_text() == "my template"
