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
import torch

from helpers import build_qwen2_tokenizer, make_spm_teacher, make_teacher, one_line
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


# -- a Qwen2 student as a Llama ----------------------------------------------------------------------
def test_qwen2_student_relabelled_as_llama_gives_the_same_logits(corpus_file, tmp_path):
    """With a byte-level BPE saved as transformers' Qwen2Tokenizer, as a real Qwen2 repo has:
    AutoTokenizer reads the class from the copied tokenizer_config.json, so the Llama-labelled
    student tokenizes as the teacher."""
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM, LlamaForCausalLM, Qwen2ForCausalLM

    teacher = make_teacher(tmp_path / "teacher", "qwen2", tokenizer=build_qwen2_tokenizer(corpus_file))
    run = tmp_path / "run"
    assert distill(teacher, corpus_file, run, "--export-arch", "llama", "--steps", "2", "--lr", "3e-3") == 0
    assert json.loads((run / "student" / "config.json").read_text())["architectures"] == ["LlamaForCausalLM"]
    for arch in ("auto", "llama"):
        assert main(["export", "--run", str(run), "--out", str(tmp_path / arch), "--dtype", "float32",
                     "--arch", arch]) == 0
    qwen = AutoModelForCausalLM.from_pretrained(tmp_path / "auto")
    llama = AutoModelForCausalLM.from_pretrained(tmp_path / "llama")
    assert type(qwen) is Qwen2ForCausalLM and type(llama) is LlamaForCausalLM
    c = llama.config
    assert c.attention_bias is True and c.mlp_bias is False
    assert (c.hidden_size, c.head_dim, c.num_attention_heads, c.num_key_value_heads) == (
        qwen.config.hidden_size, qwen.config.head_dim, qwen.config.num_attention_heads,
        qwen.config.num_key_value_heads)
    assert c.num_attention_heads * c.head_dim != c.hidden_size  # the shape llama.cpp's Qwen2 graph cannot take
    assert c.rms_norm_eps == qwen.config.rms_norm_eps and c.tie_word_embeddings == qwen.config.tie_word_embeddings
    assert c.rope_parameters == qwen.config.rope_parameters
    # the same tensors, plus one zero o_proj bias per layer
    a, b = load_file(str(tmp_path / "auto" / "model.safetensors")), load_file(str(tmp_path / "llama" / "model.safetensors"))
    extra = sorted(set(b) - set(a))
    assert extra == [f"model.layers.{i}.self_attn.o_proj.bias" for i in range(c.num_hidden_layers)]
    assert all(torch.equal(a[k], b[k]) for k in a) and all(not b[k].any() for k in extra)
    assert a["model.layers.0.self_attn.q_proj.bias"].abs().sum() > 0  # the biases that matter are there
    ids = torch.randint(0, c.vocab_size, (3, 20), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        diff = (llama(input_ids=ids).logits - qwen(input_ids=ids).logits).abs().max().item()
    assert diff <= 1e-6, diff
    assert tokenizer_bytes(tmp_path / "llama") == tokenizer_bytes(teacher)
    assert json.loads((teacher / "tokenizer_config.json").read_text())["tokenizer_class"] == "Qwen2Tokenizer"
    same_tokenization(teacher, tmp_path / "llama")


def test_export_arch_llama_is_refused_where_it_cannot_hold(teacher_dirs, corpus_file, tmp_path, capfd):
    from transformers import Qwen2Config

    from red.errors import RedError
    from red.model.export import check_export_arch

    one_line(capfd, distill(teacher_dirs["qwen3"], corpus_file, tmp_path / "q3", "--export-arch", "llama"),
             "--export-arch llama", "qwen3", "--export-arch auto")
    assert not (tmp_path / "q3").exists()
    one_line(capfd, distill(teacher_dirs["qwen2"], corpus_file, tmp_path / "x", "--export-arch", "mistral"),
             "export_arch='mistral'", "auto, llama")
    run = tmp_path / "run"
    assert distill(teacher_dirs["qwen3"], corpus_file, run) == 0
    one_line(capfd, main(["export", "--run", str(run), "--out", str(tmp_path / "e"), "--arch", "llama"]),
             "--arch llama", "qwen3")
    assert not (tmp_path / "e").exists()
    sliding = Qwen2Config(num_hidden_layers=4, use_sliding_window=True, sliding_window=64, max_window_layers=2)
    with pytest.raises(RedError, match=r"sliding-window attention \(layers 2, 3\)"):
        check_export_arch(sliding, "llama")
    check_export_arch(Qwen2Config(num_hidden_layers=4, use_sliding_window=False, sliding_window=64), "llama")


# -- llama.cpp's own converter (opt-in: RED_LLAMA_CPP_CONVERT=path/to/convert_hf_to_gguf.py) -----------
CONVERTER = os.environ.get("RED_LLAMA_CPP_CONVERT", "")


@pytest.mark.skipif(not CONVERTER, reason="set RED_LLAMA_CPP_CONVERT to llama.cpp's convert_hf_to_gguf.py (for "
                    "instance from the llama-cpp-python sdist: vendor/llama.cpp/convert_hf_to_gguf.py)")
@pytest.mark.parametrize("teacher_arch", ["llama", "qwen2"])
def test_llama_cpp_converter_reads_the_student_as_the_teacher(teacher_arch, corpus_file, tmp_path):
    """llama.cpp's convert_hf_to_gguf.py on a Llama student and on a Qwen2 student exported
    with --export-arch llama; the GGUF read back with the gguf package: a Llama graph with
    head_dim as key length, every tensor of the right shape (a zero attn_output bias for the
    Qwen2), and the teacher's SentencePiece pieces and scores."""
    import subprocess
    import sys

    gguf = pytest.importorskip("gguf")
    spm = pytest.importorskip("sentencepiece")
    from safetensors.torch import load_file

    (tmp_path / "c.txt").write_text(corpus_file.read_text() + "red reds redder the quick brown fox\n" * 20)
    t = make_spm_teacher(tmp_path / "teacher", tmp_path / "c.txt", arch=teacher_arch)
    run = tmp_path / "run"
    assert distill(t, tmp_path / "c.txt", run, "--export-arch", "llama", "--export-dtype", "float32") == 0
    student = run / "student"
    out = tmp_path / "student.gguf"
    done = subprocess.run([sys.executable, CONVERTER, str(student), "--outfile", str(out), "--outtype", "f32"],
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    r = gguf.GGUFReader(str(out))
    field = lambda k: r.fields[k].contents()
    cfg = json.loads((student / "config.json").read_text())
    assert field("general.architecture") == "llama"
    assert (field("llama.embedding_length"), field("llama.attention.head_count"),
            field("llama.attention.head_count_kv"), field("llama.attention.key_length"),
            field("llama.attention.value_length"), field("llama.block_count")) == (
        32, cfg["num_attention_heads"], cfg["num_key_value_heads"], cfg["head_dim"], cfg["head_dim"],
        cfg["num_hidden_layers"])
    sp = spm.SentencePieceProcessor(model_file=str(t / "tokenizer.model"))
    assert field("tokenizer.ggml.model") == "llama"
    n = sp.get_piece_size()  # a padded embedding (the Qwen2's) adds placeholder tokens after the pieces
    assert field("tokenizer.ggml.tokens")[:n] == [sp.id_to_piece(i) for i in range(n)]
    assert field("tokenizer.ggml.scores")[:n] == pytest.approx([sp.get_score(i) for i in range(n)])
    assert len(field("tokenizer.ggml.tokens")) == cfg["vocab_size"]
    # every tensor, its shape as llama.cpp reads it (GGUF lists dims innermost first)
    sd = load_file(str(student / "model.safetensors"))
    tensors = {x.name: x for x in r.tensors}
    names = {"model.embed_tokens.weight": "token_embd.weight", "model.norm.weight": "output_norm.weight",
             "lm_head.weight": "output.weight"}
    parts = {"self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
             "self_attn.o_proj": "attn_output", "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up",
             "mlp.down_proj": "ffn_down", "input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm"}
    for i in range(cfg["num_hidden_layers"]):
        for hf, gg in parts.items():
            for kind in ("weight", "bias"):
                names[f"model.layers.{i}.{hf}.{kind}"] = f"blk.{i}.{gg}.{kind}"
    assert set(tensors) == {names[k] for k in sd}, set(tensors) ^ {names[k] for k in sd}
    for k, v in sd.items():
        g = tensors[names[k]]
        assert list(g.shape) == list(reversed(v.shape)), k
        if not any(p in k for p in ("q_proj", "k_proj")):  # the converter permutes q and k rows for RoPE
            assert torch.equal(torch.from_numpy(g.data.copy()).reshape(v.shape), v), k
    biased = teacher_arch == "qwen2"
    assert ("blk.0.attn_q.bias" in tensors) == biased and ("blk.0.attn_output.bias" in tensors) == biased
    if biased:
        assert not tensors["blk.0.attn_output.bias"].data.any() and tensors["blk.0.attn_q.bias"].data.any()
