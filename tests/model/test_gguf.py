"""`red import`'s conversion (red.model.gguf): a GGUF file becomes a teacher folder that
computes what the file holds.

The GGUF files are written here with the ``gguf`` package's writer from random
transformers models (``helpers.write_gguf``), each weight in one of the quantization types
the real SmolLM2 file uses (Q4_1, Q8_0, F32) or another (F16, BF16, Q5_0). The imported
folder, loaded by plain transformers, must give the logits of the model the file holds
(the original weights, each quantized and dequantized as stored) and, for Llama, those of
transformers' own GGUF loading; its tokenizer must be transformers' own reading of the
file, chat template included; red must accept it as a teacher. The user errors are in
tests/commands/test_import_errors.py.
"""
from __future__ import annotations

import json

import pytest
import torch

pytest.importorskip("gguf")

from helpers import gguf_vocabulary, tiny_gguf_model, write_gguf  # noqa: E402
from red.cli import main  # noqa: E402


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """One GGUF per architecture: {arch: (path, the state dict the file holds)}."""
    root = tmp_path_factory.mktemp("gguf")
    out = {}
    for i, arch in enumerate(("llama", "qwen2", "qwen3")):
        p = root / f"{arch}.gguf"
        out[arch] = (p, write_gguf(p, tiny_gguf_model(arch, seed=i)))
    return out


def _logits(model, ids):
    with torch.no_grad():
        return model(input_ids=ids).logits.float()


def _check_tokenizer(out, path) -> None:
    """The folder's tokenizer is transformers' own reading of the file, with its merges,
    special tokens and chat template."""
    from transformers import AutoTokenizer

    tok, from_file = AutoTokenizer.from_pretrained(out), AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    text = "the cat in a hat, 12 + 30 = 42 ü"
    assert tok(text)["input_ids"] == from_file(text)["input_ids"]
    assert tok.decode(tok(text)["input_ids"]) == text
    assert len(tok(" the")["input_ids"]) == 1  # the file's merges are used ("Ġ t", "Ġt he")
    chat = [{"role": "user", "content": "hi"}]
    assert tok.apply_chat_template(chat, tokenize=False, add_generation_prompt=True) == \
        "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"
    assert (tok.bos_token, tok.eos_token, tok.pad_token) == ("<s>", "<|im_end|>", "<pad>")


@pytest.mark.parametrize("arch", ["llama", "qwen2", "qwen3"])
def test_import_computes_what_the_file_holds(files, tmp_path, arch, capfd):
    from transformers import AutoModelForCausalLM

    from red.model.teacher import load_teacher

    path, held = files[arch]
    out = tmp_path / "teacher"
    assert main(["import", "--gguf", str(path), "--out", str(out), "--dtype", "float32", "--quiet"]) == 0
    assert f"teacher folder written to {out}" in capfd.readouterr().out
    got = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    ref = tiny_gguf_model(arch, seed=0)
    missing, unexpected = ref.load_state_dict(held, strict=False)
    assert not unexpected and set(missing) <= {"lm_head.weight"} and ref.config.tie_word_embeddings == bool(missing)
    ids = torch.randint(0, len(gguf_vocabulary()), (2, 19), generator=torch.Generator().manual_seed(1))
    want = _logits(ref, ids)
    assert want.abs().max() > 0.5  # a model that says something
    torch.testing.assert_close(_logits(got, ids), want, rtol=0, atol=1e-5)
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["model_type"] == arch and cfg["head_dim"] == 24 and cfg["dtype"] == "float32"
    assert cfg["tie_word_embeddings"] == ref.config.tie_word_embeddings
    assert "quantization_config" not in cfg
    gen = json.loads((out / "generation_config.json").read_text())
    assert (gen["bos_token_id"], gen["eos_token_id"], gen["pad_token_id"]) == (2, 3, 0)
    _check_tokenizer(out, path)
    teacher, _ = load_teacher(out)  # red's own checks of a teacher folder
    torch.testing.assert_close(_logits(teacher, ids), want, rtol=0, atol=1e-5)


def test_llama_import_matches_transformers_gguf_loading(files, tmp_path):
    """transformers' own GGUF loading (its name mapping and q/k un-permutation, not ours)."""
    pytest.importorskip("accelerate")  # transformers needs it to load a GGUF model
    from transformers import AutoModelForCausalLM

    path, _ = files["llama"]
    out = tmp_path / "teacher"
    assert main(["import", "--gguf", str(path), "--out", str(out), "--dtype", "float32", "--quiet"]) == 0
    theirs = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name).eval()
    ours = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    ids = torch.randint(0, len(gguf_vocabulary()), (3, 23), generator=torch.Generator().manual_seed(2))
    assert torch.equal(_logits(ours, ids), _logits(theirs, ids))


def test_dtype_and_shards(files, tmp_path):
    """bfloat16 (the default) is the float32 import rounded once; a shard limit splits the
    weights into files with an index that red and transformers read."""
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    from red import import_gguf
    from red.model.teacher import load_teacher

    path, _ = files["qwen2"]
    f32, bf16, sharded = tmp_path / "f32", tmp_path / "bf16", tmp_path / "sharded"
    import_gguf(path, f32, "float32")
    assert import_gguf(path, bf16) == bf16
    a, b = load_file(f32 / "model.safetensors"), load_file(bf16 / "model.safetensors")
    assert a.keys() == b.keys() and all(b[k].dtype == torch.bfloat16 and torch.equal(a[k].bfloat16(), b[k]) for k in a)
    assert json.loads((bf16 / "config.json").read_text())["dtype"] == "bfloat16"

    import_gguf(path, sharded, "float32", shard_bytes=60_000)
    index = json.loads((sharded / "model.safetensors.index.json").read_text())
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) > 2 and sorted(p.name for p in sharded.glob("*.safetensors")) == shards
    assert set(index["weight_map"]) == set(a)
    assert index["metadata"]["total_size"] == sum(t.numel() * 4 for t in a.values())
    ids = torch.randint(0, len(gguf_vocabulary()), (2, 11), generator=torch.Generator().manual_seed(3))
    want = _logits(AutoModelForCausalLM.from_pretrained(f32, dtype=torch.float32).eval(), ids)
    assert torch.equal(_logits(AutoModelForCausalLM.from_pretrained(sharded, dtype=torch.float32).eval(), ids), want)
    assert torch.equal(_logits(load_teacher(sharded)[0], ids), want)


def test_reimport_replaces_the_earlier_files_and_forgets_the_stale_ones(files, tmp_path):
    """--overwrite of a sharded import by a single-file one: the shards and the index go,
    and the manifest lists exactly what the folder holds."""
    from red import import_gguf

    path, _ = files["qwen3"]
    out = tmp_path / "teacher"
    import_gguf(path, out, "float32", shard_bytes=60_000)
    assert (out / "model.safetensors.index.json").is_file()
    import_gguf(path, out, "float32", overwrite=True)
    names = sorted(p.name for p in out.iterdir())
    assert "model.safetensors" in names and not [n for n in names if n.startswith("model-") or "index" in n]
    assert not [n for n in names if n.startswith(".staging-")]
    assert sorted(json.loads((out / ".red-import.json").read_text())["entries"]) == names
