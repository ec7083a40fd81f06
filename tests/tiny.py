"""Tiny teachers and tokenizers built locally (no downloads) for the tests."""
from __future__ import annotations

import string
from pathlib import Path

import torch

CHARS = string.ascii_letters + string.digits + " .,;:!?'\"-+*/=()[]\n"


def build_tokenizer():
    """A character-level Hugging Face tokenizer made with `tokenizers`."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    specials = ["<pad>", "<unk>", "<s>", "</s>"]
    vocab = {t: i for i, t in enumerate(specials + list(CHARS))}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    tok.decoder = decoders.Fuse()
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>",
                                   pad_token="<pad>", unk_token="<unk>")


def tiny_config(arch: str, vocab_size: int, hidden_size: int = 64, layers: int = 2):
    from transformers import LlamaConfig, Qwen2Config, Qwen3Config

    common = dict(vocab_size=vocab_size, hidden_size=hidden_size, intermediate_size=96, num_hidden_layers=layers,
                  num_attention_heads=4, num_key_value_heads=2, head_dim=24, max_position_embeddings=256,
                  bos_token_id=2, eos_token_id=3, pad_token_id=0)
    if arch == "llama":
        return LlamaConfig(**common, tie_word_embeddings=True, rms_norm_eps=1e-5)
    if arch == "qwen2":
        return Qwen2Config(**common, tie_word_embeddings=False, rms_norm_eps=1e-6)
    if arch == "qwen3":
        return Qwen3Config(**common, tie_word_embeddings=False, rms_norm_eps=1e-6)
    raise ValueError(arch)


def make_teacher(folder: Path, arch: str = "llama", seed: int = 0, hidden_size: int = 64, layers: int = 2) -> Path:
    """Save a randomly initialized tiny teacher and a tokenizer to ``folder``.

    Norm gains and biases are randomized too, so that tests notice if any is dropped.
    """
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    tok = build_tokenizer()
    cfg = tiny_config(arch, len(tok), hidden_size, layers)
    model = AutoModelForCausalLM.from_config(cfg)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.copy_(1.0 + 0.5 * torch.randn_like(p))
            elif name.endswith(".bias"):
                p.copy_(0.1 * torch.randn_like(p))
            else:
                p.copy_(torch.randn_like(p) * (0.3 / p.shape[-1] ** 0.5 if p.dim() == 2 else 1.0))
        # A few loud channels, as real residual streams have: selection should find them.
        model.model.embed_tokens.weight[:, :4] *= 6.0
    model.save_pretrained(folder)
    tok.save_pretrained(folder)
    return folder


def write_corpus(path: Path, n_lines: int = 400, seed: int = 0) -> Path:
    import random

    rng = random.Random(seed)
    words = ["alpha", "beta", "gamma", "delta", "sum", "of", "is", "the", "x", "y", "=", "+", "1", "2", "3"]
    lines = [" ".join(rng.choice(words) for _ in range(rng.randint(4, 12))) for _ in range(n_lines)]
    path.write_text("\n".join(lines) + "\n")
    return path
