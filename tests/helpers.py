"""What the tests share: tiny teachers and corpora, tiny GGUF files, the CLI's one-line
errors, comparing two runs, multi-process runs, and the fault injection and start-up probe
that child processes run.

``python -m helpers hold POINT:STEP <red arguments>`` runs `red` with a hook on
``red.run.folder.HOOKS`` that stops (sleeping) when the run reaches POINT at STEP, so that
a test can kill it there; ``disk-full RANK:STEP`` makes that rank's checkpoint write fail
as a full disk does; ``python -m helpers probe <red arguments>`` runs `red` with a
``StartupProbe`` watching its start-up. (pyproject.toml puts tests/ on pytest's path;
child processes get it through ``child_env``.)
"""
from __future__ import annotations

import hashlib
import json
import math
import os
import shutil
import socket
import string
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from red.cli import main
from red.distributed import local_tensor
from red.errors import RedError

ROOT = Path(__file__).resolve().parents[1]


# -- Tiny teachers and tokenizers built locally (no downloads) for the tests.
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


def build_qwen2_tokenizer(corpus: Path, vocab_size: int = 300):
    """A byte-level BPE trained here on ``corpus`` as transformers' ``Qwen2Tokenizer`` (its
    tokenizer_config.json names that class, as a real Qwen2 repo's does)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import Qwen2Tokenizer

    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    bpe.train([str(corpus)], trainers.BpeTrainer(vocab_size=vocab_size, show_progress=False,
                                                 initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                                 special_tokens=["<|endoftext|>"]))
    model = json.loads(bpe.to_str())["model"]
    return Qwen2Tokenizer(vocab=model["vocab"], merges=[tuple(m) for m in model["merges"]])


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


def randomize_weights(model, scale: float) -> None:
    """Norm gains around 1, small biases, matrices of std ``scale``/sqrt(fan-in): random,
    so that a dropped gain or bias shows in the outputs. Call under no_grad."""
    for name, p in model.named_parameters():
        if name.endswith("norm.weight"):
            p.copy_(1.0 + 0.5 * torch.randn_like(p))
        elif name.endswith(".bias"):
            p.copy_(0.1 * torch.randn_like(p))
        else:
            p.copy_(torch.randn_like(p) * (scale / p.shape[-1] ** 0.5 if p.dim() == 2 else 1.0))


def make_teacher(folder: Path, arch: str = "llama", seed: int = 0, hidden_size: int = 64, layers: int = 2,
                 tokenizer=None) -> Path:
    """Save a randomly initialized tiny teacher and a tokenizer (``tokenizer``, else the
    character-level one) to ``folder``.

    Norm gains and biases are randomized too, so that tests notice if any is dropped.
    """
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    tok = tokenizer if tokenizer is not None else build_tokenizer()
    cfg = tiny_config(arch, len(tok), hidden_size, layers)
    model = AutoModelForCausalLM.from_config(cfg)
    with torch.no_grad():
        randomize_weights(model, 0.3)
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


# -- Tiny GGUF files written with the ``gguf`` package's writer (no download), for the tests
# of `red import`: a random transformers model's weights in llama.cpp's layout and
# quantization types, with a byte-level BPE tokenizer and a chat template.
GGUF_CHAT_TEMPLATE = ("{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\n' + m['content'] + '<|im_end|>\n' }}"
                      "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")
GGUF_SPECIALS = ["<pad>", "<|im_start|>", "<s>", "<|im_end|>"]  # ids 0..3: pad, -, bos, eos (tiny_config's ids)
GGUF_MERGES = ["Ġ t", "h e", "Ġt he", "i n", "Ġ a"]
# weight -> quantization type in the file: every type the real SmolLM2 file uses (Q4_1,
# Q8_0, F32) and a few more; all dequantize exactly to what gguf.dequantize gives
GGUF_TYPES = {"token_embd": "Q8_0", "output": "Q8_0", "attn_q": "Q4_1", "attn_k": "F16", "attn_v": "BF16",
              "attn_output": "Q4_1", "ffn_gate": "Q8_0", "ffn_up": "Q5_0", "ffn_down": "F32"}
_GGUF_BLOCK = {"attn_norm": "input_layernorm", "ffn_norm": "post_attention_layernorm", "attn_q": "self_attn.q_proj",
               "attn_k": "self_attn.k_proj", "attn_v": "self_attn.v_proj", "attn_output": "self_attn.o_proj",
               "attn_q_norm": "self_attn.q_norm", "attn_k_norm": "self_attn.k_norm", "ffn_gate": "mlp.gate_proj",
               "ffn_up": "mlp.up_proj", "ffn_down": "mlp.down_proj"}


def gguf_vocabulary() -> list[str]:
    """Special tokens, the 256 byte-level characters, then one token per merge."""
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    return GGUF_SPECIALS + list(bytes_to_unicode().values()) + [m.replace(" ", "") for m in GGUF_MERGES]


def llama_cpp_rows(w, n_heads: int):
    """Transformers' query/key rows in llama.cpp's order (its converter's permutation,
    written from its description: per head, the two rotary halves are interleaved)."""
    return w.reshape(n_heads, 2, w.shape[0] // n_heads // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _gguf_quantized(w, kind: str):
    """(bytes or array to write, raw dtype, what the file dequantizes back to)."""
    import gguf
    import numpy as np

    q = gguf.GGMLQuantizationType[kind]
    if kind == "F32":
        return w.astype(np.float32), None, w.astype(np.float32)
    if kind == "F16":
        return w.astype(np.float16), None, w.astype(np.float16).astype(np.float32)
    data = gguf.quantize(w.astype(np.float32), q)
    return data, q, gguf.dequantize(data, q).reshape(w.shape).astype(np.float32)


def _add_gguf_metadata(w, cfg, chat_template: str) -> None:
    """The shape keys llama.cpp writes, and the byte-level BPE tokenizer of ``gguf_vocabulary()``."""
    for add, value in ((w.add_block_count, cfg.num_hidden_layers), (w.add_context_length, cfg.max_position_embeddings),
                       (w.add_embedding_length, cfg.hidden_size), (w.add_feed_forward_length, cfg.intermediate_size),
                       (w.add_head_count, cfg.num_attention_heads), (w.add_head_count_kv, cfg.num_key_value_heads),
                       (w.add_key_length, cfg.head_dim), (w.add_value_length, cfg.head_dim),
                       (w.add_rope_dimension_count, cfg.head_dim),
                       (w.add_rope_freq_base, float(cfg.rope_parameters["rope_theta"])),
                       (w.add_layer_norm_rms_eps, float(cfg.rms_norm_eps)), (w.add_vocab_size, cfg.vocab_size)):
        add(value)
    tokens = gguf_vocabulary()
    assert len(tokens) == cfg.vocab_size, (len(tokens), cfg.vocab_size)
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("default")
    w.add_token_list(tokens)
    w.add_token_types([3] * len(GGUF_SPECIALS) + [1] * (len(tokens) - len(GGUF_SPECIALS)))  # 3: control, 1: normal
    w.add_token_merges(GGUF_MERGES)
    w.add_bos_token_id(2)
    w.add_eos_token_id(3)
    w.add_pad_token_id(0)
    w.add_add_bos_token(False)
    if chat_template:
        w.add_chat_template(chat_template)


def write_gguf(path: Path, model, arch: str | None = None, types: dict | None = None, extra_tensors=None,
               chat_template: str = GGUF_CHAT_TEMPLATE) -> dict[str, torch.Tensor]:
    """Write ``model`` (a transformers Llama/Qwen2/Qwen3 whose vocabulary is
    ``gguf_vocabulary()``) as a GGUF file of architecture ``arch`` (default the model's) and
    return the state dict the file holds (each weight quantized and dequantized as the file
    stores it): the reference an import must reproduce. ``extra_tensors``: {GGUF name:
    (array, raw dtype or None)} written as they are."""
    import gguf

    cfg = model.config
    arch = arch or cfg.model_type
    types = {**GGUF_TYPES, **(types or {})}
    w = gguf.GGUFWriter(str(path), arch)
    _add_gguf_metadata(w, cfg, chat_template)
    held = {}

    def put(gguf_name: str, hf: str, t: torch.Tensor, kind: str, rows_heads: int | None = None):
        a = t.detach().float().numpy()
        if a.ndim == 1:
            kind = "F32"  # norms and biases: llama.cpp keeps them in F32
        data, raw, back = _gguf_quantized(a, kind)
        if rows_heads is not None:  # the file holds llama.cpp's row order; rows quantize on their own
            data, _, _ = _gguf_quantized(llama_cpp_rows(a, rows_heads), kind)
        w.add_tensor(gguf_name, data, raw_dtype=raw)
        held[hf] = torch.from_numpy(back.copy())

    sd = model.state_dict()
    put("token_embd.weight", "model.embed_tokens.weight", sd["model.embed_tokens.weight"], types["token_embd"])
    put("output_norm.weight", "model.norm.weight", sd["model.norm.weight"], "F32")
    if not cfg.tie_word_embeddings:
        put("output.weight", "lm_head.weight", sd["lm_head.weight"], types["output"])
    for i in range(cfg.num_hidden_layers):
        for g, h in _GGUF_BLOCK.items():
            for suffix in ("weight", "bias"):
                k = f"model.layers.{i}.{h}.{suffix}"
                if k in sd:
                    perm = {"attn_q": cfg.num_attention_heads, "attn_k": cfg.num_key_value_heads}.get(g) \
                        if arch == "llama" and suffix == "weight" else None
                    put(f"blk.{i}.{g}.{suffix}", k, sd[k], types.get(g, "F32"), perm)
    for name, (a, raw) in (extra_tensors or {}).items():
        w.add_tensor(name, a, raw_dtype=raw)
    finish_gguf(w)
    return held


def finish_gguf(w) -> None:
    """Write a ``gguf.GGUFWriter``'s header, metadata and tensors, and close it."""
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def tiny_gguf_model(arch: str = "llama", seed: int = 0):
    """A random transformers model of ``tiny_config``'s shape over ``gguf_vocabulary()``,
    with randomized norms and biases (so a dropped one shows)."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(tiny_config(arch, len(gguf_vocabulary())))
    with torch.no_grad():
        randomize_weights(model, 0.5)
    return model.eval()


def make_spm_teacher(folder: Path, corpus: Path, seed: int = 0, arch: str = "llama") -> Path:
    """A tiny teacher (Llama, or ``arch``) whose tokenizer is a SentencePiece BPE model trained here on
    ``corpus`` (as Llama 2 and Mistral ship theirs): ``tokenizer.model`` beside the
    ``tokenizer.json`` transformers converts it to, and the ``special_tokens_map.json`` an
    older transformers writes. Needs the ``sentencepiece`` package."""
    import tempfile

    import sentencepiece as spm
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        spm.SentencePieceTrainer.train(input=str(corpus), model_prefix=f"{tmp}/sp", vocab_size=80, model_type="bpe",
                                       unk_id=0, bos_id=1, eos_id=2, pad_id=-1, character_coverage=1.0,
                                       minloglevel=2, num_threads=1)
        src = Path(tmp) / "src"
        src.mkdir()
        shutil.copyfile(f"{tmp}/sp.model", src / "tokenizer.model")
        specials = {"bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>"}
        (src / "tokenizer_config.json").write_text(json.dumps({"tokenizer_class": "LlamaTokenizer", **specials}))
        tok = AutoTokenizer.from_pretrained(src)
        tok.save_pretrained(folder)
        shutil.copyfile(src / "tokenizer.model", folder / "tokenizer.model")
    (folder / "special_tokens_map.json").write_text(json.dumps(specials, indent=2))
    torch.manual_seed(seed)
    # a Qwen2 folder's tokenizer loads as Qwen2Tokenizer, which adds <|endoftext|>; its
    # embedding is padded past the tokenizer, as real Qwen2 checkpoints' are
    cfg = tiny_config(arch, len(tok) + (8 if arch == "qwen2" else 0))
    cfg.bos_token_id, cfg.eos_token_id, cfg.pad_token_id = 1, 2, None
    model = AutoModelForCausalLM.from_config(cfg)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith(".bias"):
                p.normal_(0.0, 0.1)  # Qwen2's q/k/v biases: not zero, so that a dropped one shows
    model.save_pretrained(folder)
    return folder


# -- Helpers shared by the tests of user errors: run the `red` CLI in-process, check that an
def snapshot(*folders: Path) -> dict:
    """path -> sha256 of every file under ``folders`` (missing folders: empty)."""
    out = {}
    for f in folders:
        if f.is_file():
            out[str(f)] = hashlib.sha256(f.read_bytes()).hexdigest()
        elif f.is_dir():
            for p in sorted(f.rglob("*")):
                if p.is_file():
                    out[str(p)] = hashlib.sha256(p.read_bytes()).hexdigest()
    return out


def run_cli_err(argv, capfd) -> tuple[int, str]:
    """(exit code, stderr) of ``red argv`` run in-process (argparse's exits included)."""
    capfd.readouterr()
    try:
        rc = main([str(a) for a in argv])
    except SystemExit as e:  # argparse's own exits
        rc = e.code
    return rc, capfd.readouterr().err


def one_line(capfd, rc, *needles) -> str:
    """Assert the command just run ended with exit 2 and one stderr line holding ``needles``."""
    err = [line for line in capfd.readouterr().err.splitlines() if line.strip()]
    assert rc == 2 and len(err) == 1, err
    for n in needles:
        assert n in err[0], (n, err[0])
    return err[0]


def error_table_failures(cases, capfd, new_out: Path) -> list[str]:
    """Run every (name, argv, needle) case; return what failed: an exit code other than 2,
    a traceback, more than one stderr line, a line not of the form "red <cmd>: error: ..."
    or without ``needle`` (None: any), or ``new_out`` created (it is removed again)."""
    failures = []
    for name, argv, needle in cases:
        rc, err = run_cli_err(argv, capfd)
        lines = [l for l in err.splitlines() if l.strip()]
        ok = (rc == 2 and "Traceback" not in err and len(lines) == 1
              and lines[0].startswith(f"red {argv[0]}: error:") and (needle is None or needle in lines[0]))
        if not ok:
            failures.append(f"{name}: rc={rc} err={err.strip()[-400:]!r}")
        if new_out.exists():
            failures.append(f"{name}: created the output path")
            shutil.rmtree(new_out) if new_out.is_dir() else new_out.unlink()
    return failures


# -- comparing two runs that reach the same model by different code paths
# Comparing two training runs that reach the same model by different code paths
# (1 vs N processes, sharded vs whole start-up, a checkpoint resharded on resume).
#
# Such runs do the same arithmetic up to the order of float32 reductions, so every
# gradient agrees to about 1e-6 relative. What that means for the trained tensors depends
# on the optimizer. AdamW's step is lr * m / (sqrt(v) + eps): for an entry whose gradient
# is near zero the ratio is a sign, so with the default eps = 1e-8 a rounding-level
# difference in a gradient of ~1e-8 can move that entry by up to lr, on whichever machine
# (the BLAS and vector units decide which entries). Its derivative in the gradient is at
# most a few / eps, so with eps above the size of the gradients (here ~1e-3) the step is
# Lipschitz: a difference d in a gradient moves a weight by at most ~4 lr d / eps. The runs
# compared here therefore train with ``ADAM_EPS``: at lr 3e-3, 4 steps and gradient
# differences below 1e-8, the bound is ~1e-9 per entry, far under ``ATOL``, on any machine.
# Measured on a 4-step run (qwen3, d = 32) with Gaussian noise of 1e-6 of each tensor's
# largest gradient added to every gradient entry (ten times rounding): the trained tensors
# moved by at most 2.1e-3 at eps = 1e-8 and 3.0e-6 at eps = 1e-3. A raised eps also makes
# the comparison see the gradient's scale (a wrong factor in an average over ranks), which
# AdamW's default eps hides, since its step ignores scale.
#
# Runs compared bit for bit (a resumed run against an uninterrupted one in the same kind
# of process) run the same ops in the same order and stay ``torch.equal``.

ADAM_EPS = 1e-3
ATOL = 1e-5   # trained tensors (projections, gains, AdamW moments), absolute
RTOL = 1e-5   # every loss term of every metrics row, relative (absolute floor 1e-7)


def metrics(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def max_abs_diff(a: dict, b: dict) -> float:
    """Largest |a - b| over tensors with the same names (asserts the names agree)."""
    assert set(a) == set(b), sorted(set(a) ^ set(b))
    return max((a[k].double() - b[k].double()).abs().max().item() for k in a)


def assert_close_tensors(a: dict, b: dict) -> float:
    worst = max_abs_diff(a, b)
    assert worst <= ATOL, worst
    return worst


def assert_same_metrics(a: Path, b: Path) -> None:
    """Both runs logged the same steps with the same values (throughput aside)."""
    ma, mb = metrics(a), metrics(b)
    assert [r["step"] for r in ma] == [r["step"] for r in mb]
    for ra, rb in zip(ma, mb):
        for k in ra:
            if k != "tokens_per_s":
                assert rb[k] == pytest.approx(ra[k], rel=RTOL, abs=1e-7), (ra["step"], k)


def same_threads_env(**extra) -> dict:
    """Environment of a child process whose results are compared bit for bit with this
    one's: the same number of torch threads (a BLAS may split a product's reduction
    differently with another count, so "same ops in the same order" needs it)."""
    return child_env(threads=torch.get_num_threads(), **extra)


# -- Fault injection for the SIGKILL tests, kept out of the product.
EVENTS = {"save": "checkpoint-written", "train": "step-done"}


def hold_at(spec: str) -> None:
    import red.run.folder

    point, step = spec.split(":")

    def hook(event, at, folder):
        if event == EVENTS[point] and at == int(step):
            Path(folder).mkdir(parents=True, exist_ok=True)
            (Path(folder) / f".hold-{point}-{step}").write_text("held")
            time.sleep(3600)

    red.run.folder.HOOKS.append(hook)


def disk_full_at(spec: str) -> None:
    """``RANK:STEP``: that rank's write of checkpoint STEP leaves a partial file and then
    fails as a full disk does (ENOSPC)."""
    import errno

    import red.run.checkpoint as C

    rank, step = spec.split(":")
    real_save = C.save_file

    def full_disk(tensors, path, *a, **k):
        if os.environ.get("RANK") == rank and f".step-{int(step):07d}.tmp-" in str(path):
            with open(path, "wb") as f:
                f.write(b"\x00" * 100)  # a partial write, then the disk is full
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_save(tensors, path, *a, **k)

    C.save_file = full_disk


# -- Measure what each rank holds during a run's start-up (tests only).
class StartupProbe:
    """Bytes of teacher tensors this rank holds during start-up, for tests and sizing.

    Off (every call a no-op) unless the environment names ``RED_STARTUP_PROBE`` (a folder:
    each rank writes ``rank<R>.json`` there: ``world_size``, ``teacher_bytes`` (the whole
    teacher), ``stages`` (stage -> max bytes), ``peak`` and ``over_budget``) or
    ``RED_STARTUP_TEACHER_BUDGET`` (bytes: start-up stops with RedError as soon as a sample
    exceeds it, ``over_budget`` naming the stage). A sample is the local bytes of every
    teacher parameter (a DTensor's shard, a plain tensor whole, nothing on ``meta``) plus
    the full-size teacher tensors the caller says are alive (``extra``: one gathered
    layer, one slice being read). Tensors are counted, not RSS."""

    def __init__(self, rank: int = 0, world_size: int = 1):
        self.folder = os.environ.get("RED_STARTUP_PROBE") or None
        budget = os.environ.get("RED_STARTUP_TEACHER_BUDGET")
        self.budget = int(float(budget)) if budget else None
        self.enabled = bool(self.folder or self.budget)
        self.rank, self.world_size = rank, world_size
        self.teacher = None
        self.stages: dict[str, int] = {}
        self.extra = 0
        self.teacher_bytes = 0
        self.over_budget: str | None = None

    def watch(self, teacher) -> None:
        self.teacher = teacher
        if self.enabled:
            from red.model.arch import expected_teacher_shapes

            shapes = expected_teacher_shapes(teacher.config)
            self.teacher_bytes = sum(math.prod(s) for s in shapes.values()) * teacher.dtype.itemsize

    def resident(self) -> int:
        if self.teacher is None:
            return 0
        seen, total = set(), 0
        for p in self.teacher.parameters():
            if id(p) in seen:
                continue
            seen.add(id(p))
            t = local_tensor(p)
            if not t.is_meta:
                total += t.numel() * t.element_size()
        return total

    def sample(self, stage: str, extra: int = 0) -> None:
        if not self.enabled:
            return
        b = self.resident() + self.extra + extra
        self.stages[stage] = max(self.stages.get(stage, 0), b)
        if self.budget is not None and b > self.budget:
            self.over_budget = stage
            self.write()  # the record says where, even if this rank is stopped before it reports
            raise RedError(f"start-up holds {b} bytes of teacher tensors on rank {self.rank} at {stage}, over "
                           f"RED_STARTUP_TEACHER_BUDGET={self.budget}")

    def hold(self, nbytes: int) -> None:
        self.extra = nbytes

    def done(self) -> None:
        self.write()

    def write(self) -> None:
        if not self.folder:
            return
        import json
        from pathlib import Path

        Path(self.folder).mkdir(parents=True, exist_ok=True)
        Path(self.folder, f"rank{self.rank}.json").write_text(json.dumps({
            "world_size": self.world_size, "teacher_bytes": self.teacher_bytes, "stages": self.stages,
            "peak": max(self.stages.values(), default=0), "over_budget": self.over_budget}))


# -- kernel tests: relative error against float64, random inputs of a dtype
TOL = {torch.float32: 2e-5, torch.bfloat16: 1.5e-2, torch.float16: 5e-3, torch.float64: 1e-10}


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    """‖out − ref‖ / ‖ref‖ in float64; NaN anywhere gives inf (never passes)."""
    out = out.detach().double()
    ref = ref.detach().double()
    assert out.shape == ref.shape, (out.shape, ref.shape)
    if not torch.isfinite(out).all():
        return float("inf")
    denom = ref.norm().item()
    num = (out - ref).norm().item()
    return num if denom == 0 else num / denom


def assert_close(out, ref, dtype, name="", factor=1.0):
    e = rel_err(out, ref)
    assert e <= TOL[dtype] * factor, f"{name}: rel err {e:.3e} > {TOL[dtype] * factor:.1e}"


def randn(*shape, dtype=torch.float32, gen=None, scale=1.0, requires_grad=False, device=None):
    """float64 normal samples rounded to ``dtype``, on ``device`` (default: ``gen``'s device)."""
    if device is None:
        device = gen.device if gen is not None else "cpu"
    t = (torch.randn(*shape, generator=gen, dtype=torch.float64, device=device) * scale).to(dtype)
    return t.requires_grad_(requires_grad)


# -- multi-process runs (torchrun on 127.0.0.1, gloo)
def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def child_env(threads: int = 1, **extra) -> dict:
    """The environment of a child process: the checkout and tests/ importable, ``threads``
    torch threads, ``extra`` variables."""
    path = [str(ROOT), str(ROOT / "tests"), os.environ.get("PYTHONPATH", "")]
    env = dict(os.environ, PYTHONWARNINGS="ignore", OMP_NUM_THREADS=str(threads),
               PYTHONPATH=os.pathsep.join(p for p in path if p))
    env.update(extra)
    return env


def torchrun(nproc: int, *args, timeout: int = 120, env_extra: dict | None = None, module: str = "red"):
    """`python -m torch.distributed.run --nproc_per_node=N -m red ...` on 127.0.0.1
    (``module="helpers", args=("probe", ...)`` to watch the start-up)."""
    cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}", "--master_addr=127.0.0.1",
           f"--master_port={free_port()}", "-m", module, *map(str, args)]
    return subprocess.run(cmd, capture_output=True, text=True, env=child_env(**(env_extra or {})), timeout=timeout)


def ok_result(out: Path, world: int) -> dict:
    """A run is judged by the result.json rank 0 writes at its very end, not only by the exit code."""
    res = json.loads((out / "result.json").read_text())
    assert res["status"] == "ok" and res["world_size"] == world
    return res


if __name__ == "__main__":
    what, rest = sys.argv[1], sys.argv[2:]
    if what == "hold":
        hold_at(rest[0])
        rest = rest[1:]
    elif what == "disk-full":
        disk_full_at(rest[0])
        rest = rest[1:]
    elif what == "probe":
        import red.train.startup as startup

        probe = StartupProbe(int(os.environ.get("RANK", "0")), int(os.environ.get("WORLD_SIZE", "1")))
        if probe.enabled:
            startup.STARTUP_OBSERVERS.append(probe)
    from red.cli import run

    sys.exit(run(rest))
