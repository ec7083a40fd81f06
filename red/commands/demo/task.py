"""Synthetic multi-step reasoning task for the CPU-scale RED demo.

A problem binds three variables (a random choice among ``a``..``h``) to digits, then
defines ``k`` new variables, named by a run of consecutive letters of the cycle
``i j k l m n o p i ...`` that starts at a letter drawn per problem (``m n o`` for k=3,
``o p i j`` for k=4, ...), each as ``x op y`` (``op`` in ``+ -``, everything mod 10, so
answers are near-uniform digits). Step 1 reads two distinct bound variables; every later
step reads the result of the step before it plus one other variable defined earlier
(bound or computed; never the same one twice, so no ``x-x`` shortcuts), so the answer
cannot be had without walking the chain: every operand is a variable name whose value
must be looked up, in the question or in the chain of thought so far. The question asks
for the last variable. The chain of thought writes every step as its definition with
each variable followed by its value, then the result, then the answer::

    question        n=c+h,o=a-n,c3,h7,a1?o
    prompt_text     n=c+h,o=a-n,c3,h7,a1?o:
    format_problem  n=c+h,o=a-n,c3,h7,a1?o:n=c3+h7=n0,o=a1-n0=o1#1

(the question lists the step definitions first and the bindings after them, so that a
step name followed by ``,`` occurs in short chains as in long ones)

Tokens are characters. The longest k=6 text is 114 characters, 116 tokens with bos/eos.

Why this shape: everywhere a value is written it directly follows its variable's name
(``c3`` in the question, ``c3`` and ``n0`` in the chain of thought), so looking a value
up is the plain "find the earlier occurrence of this name, copy what came next" pattern
(an induction head), and every written token is one lookup away. The next step's name is
the successor of the last one in the fixed cycle, so "which step comes next" is a learned
successor table, not a search. Three earlier shapes left a 4-layer, width-128 teacher
near chance after 600-1400 steps of CPU training: step names drawn at random (it never
learned which clause to write next); ``i=3+7=0`` (clause -> operand name -> value, two
lookups for one token); ``i=c+h=3+7=0`` with bindings ``c=3`` (the name three tokens
before the value it selects: not learned in 1400 steps).

Why a cycle with a random start (and not always ``i j k ...``): "general" data of short
chains (k <= 2) must hold every token and every token bigram that a long chain holds, so
that distilling on them alone is a test of whether the student keeps the teacher's
multi-step skill, not of whether it can guess tokens it never saw. With a fixed order,
the names of steps 3+ never occur in k <= 2 data; with a random start every name, every
successor pair and every bigram does (:func:`uncovered_ngrams` checks it).

Held-out split: a question is held out iff ``sha256(question) % HELDOUT_MODULUS == 0``.
The generators for ``split="train"`` and ``split="heldout"`` reject the other split's
questions, so the two can never share a question, whatever seeds are used.

Document / packing convention (the engine packs the same way): a document's ids are
``[bos] + tokenizer(text, add_special_tokens=False).input_ids + [eos]``; documents are
concatenated in order and cut into blocks of ``seq_len`` tokens (the incomplete tail is
dropped); models are trained with ``labels = input_ids`` (Hugging Face shifts inside).
"""
from __future__ import annotations

import hashlib
import json
import random
import re
from dataclasses import dataclass
from typing import Iterable, Iterator, List, Optional, Sequence

import torch

__all__ = [
    "Problem",
    "VARIABLES",
    "INPUT_VARIABLES",
    "STEP_VARIABLES",
    "DIGITS",
    "SYMBOLS",
    "CHARS",
    "BOS",
    "EOS",
    "PAD",
    "UNK",
    "N_INITIAL",
    "HELDOUT_MODULUS",
    "MAX_K",
    "is_heldout",
    "make_problem",
    "generate_problems",
    "format_problem",
    "prompt_text",
    "parse_answer",
    "check_problem",
    "write_corpus",
    "build_tokenizer",
    "encode_document",
    "pack_documents",
    "greedy_generate",
    "evaluate_reasoning",
    "iter_problems",
    "step_names",
    "uncovered_ngrams",
]

MOD = 10
N_INITIAL = 3                       # variables bound to digits before the chain
INPUT_VARIABLES = "abcdefgh"   # the N_INITIAL bound variables: a random choice of these
STEP_VARIABLES = "ijklmnop"    # a problem's steps: consecutive letters of this cycle
VARIABLES = INPUT_VARIABLES + STEP_VARIABLES
MAX_K = len(STEP_VARIABLES)    # 8
DIGITS = "0123456789"
OPS = "+-"  # no "*": with it 30% of answers were 0; with "+-" the most frequent is 11-20%
# ',' separates clauses, '?' asks, ':' starts the chain of thought, '#' the answer.
SYMBOLS = "=,+-?:#"
CHARS = DIGITS + VARIABLES + SYMBOLS
PAD, BOS, EOS, UNK = "<pad>", "<bos>", "<eos>", "<unk>"
SPECIAL_TOKENS = [PAD, BOS, EOS, UNK]  # ids 0..3, characters follow in CHARS order

HELDOUT_MODULUS = 10  # about 1 question in 10 is held out


@dataclass(frozen=True)
class Problem:
    question: str  # bindings ("c3") and step definitions ("i=c+h"), ends with "?<var>"
    cot: str       # written-out steps, "i=c3+h7=i0,j=a1-i0=j1"
    answer: str    # one digit
    k: int         # number of steps


def _apply(op: str, x: int, y: int) -> int:
    if op == "+":
        return (x + y) % MOD
    if op == "-":
        return (x - y) % MOD
    raise ValueError(f"unknown op {op!r}")


def is_heldout(question: str) -> bool:
    """Split membership, decided by the question text alone."""
    h = int.from_bytes(hashlib.sha256(question.encode("utf-8")).digest()[:8], "big")
    return h % HELDOUT_MODULUS == 0


def step_names(first: str, k: int) -> List[str]:
    """The names of ``k`` steps starting at ``first``: consecutive letters of the cycle
    STEP_VARIABLES (``step_names("o", 4) == ["o", "p", "i", "j"]``)."""
    o = STEP_VARIABLES.index(first)
    return [STEP_VARIABLES[(o + i) % MAX_K] for i in range(k)]


def make_problem(rng: random.Random, k: int) -> Problem:
    """One problem with ``k`` steps, drawn from ``rng`` (no split filtering)."""
    if not 1 <= k <= MAX_K:
        raise ValueError(f"k must be in 1..{MAX_K}, got {k}")
    bound = rng.sample(INPUT_VARIABLES, N_INITIAL)
    names = bound + step_names(rng.choice(STEP_VARIABLES), k)
    values = {}
    bindings, clauses, steps = [], [], []
    for v in names[:N_INITIAL]:
        values[v] = rng.randrange(MOD)
        bindings.append(f"{v}{values[v]}")
    defined = list(names[:N_INITIAL])
    prev = None
    for v in names[N_INITIAL:]:
        op = rng.choice(OPS)
        if prev is None:
            x, y = rng.sample(defined, 2)
        else:
            other = rng.choice([d for d in defined if d != prev])
            x, y = (prev, other) if rng.random() < 0.5 else (other, prev)
        r = _apply(op, values[x], values[y])
        clauses.append(f"{v}={x}{op}{y}")
        steps.append(f"{v}={x}{values[x]}{op}{y}{values[y]}={v}{r}")
        values[v] = r
        defined.append(v)
        prev = v
    question = ",".join(clauses + bindings) + "?" + prev
    return Problem(question=question, cot=",".join(steps), answer=str(values[prev]), k=k)


def generate_problems(n: int, ks: Iterable[int] = range(1, 7), split: str = "train",
                      seed: int = 0) -> List[Problem]:
    """``n`` problems of ``split`` ("train" or "heldout"), k cycling through ``ks``.

    Deterministic for a given (n, ks, split, seed). Problems are not de-duplicated (the
    space is large: about 10^8 questions already at k=1).
    """
    return list(iter_problems(ks, split, seed, n))


def iter_problems(ks: Iterable[int] = range(1, 7), split: str = "train", seed: int = 0,
                  n: Optional[int] = None) -> Iterator[Problem]:
    """Stream of problems of ``split``; endless when ``n`` is None."""
    if split not in ("train", "heldout"):
        raise ValueError(f"split must be 'train' or 'heldout', got {split!r}")
    ks = list(ks)
    if not ks:
        raise ValueError("ks is empty")
    want_heldout = split == "heldout"
    rng = random.Random(f"red-demo/{split}/{seed}")
    i = 0
    while n is None or i < n:
        k = ks[i % len(ks)]
        while True:
            p = make_problem(rng, k)
            if is_heldout(p.question) == want_heldout:
                break
        yield p
        i += 1


def format_problem(p: Problem) -> str:
    """The full training text of a problem."""
    return f"{p.question}:{p.cot}#{p.answer}"


def prompt_text(p: Problem) -> str:
    """What the model sees at evaluation time; it must continue with cot#answer<eos>."""
    return f"{p.question}:"


_ANSWER_RE = re.compile(r"[^#]*#(\d+)")


def parse_answer(completion: str) -> Optional[str]:
    """The answer in a model's completion (the text after the prompt, cut at eos).

    Strict: the completion must be ``<anything without '#'>#<digits>`` and end there.
    Returns the digits, or None when the completion is malformed (no '#', two '#',
    non-digits or text after the answer, empty answer).
    """
    m = _ANSWER_RE.fullmatch(completion.strip())
    return m.group(1) if m else None


def check_problem(p: Problem) -> None:
    """Recompute a problem from its question; raise AssertionError on any inconsistency."""
    head, query = p.question.split("?")
    clauses = head.split(",")
    values = {}
    for c in clauses[-N_INITIAL:]:
        assert len(c) == 2 and c[1] in DIGITS, c
        v, d = c[0], c[1]
        assert len(v) == 1 and v in INPUT_VARIABLES and v not in values, c
        values[v] = int(d)
    steps = p.cot.split(",")
    assert len(steps) == len(clauses) - N_INITIAL == p.k, (p, len(steps))
    prev = None
    first = clauses[0].split("=")[0]
    assert first in STEP_VARIABLES, first
    names = step_names(first, p.k)
    for i, (c, s) in enumerate(zip(clauses[:-N_INITIAL], steps)):
        v, expr = c.split("=")
        assert v == names[i], c
        x, op, y = expr[0], expr[1], expr[2]
        assert len(expr) == 3 and op in OPS and x in values and y in values, c
        if prev is not None:
            assert prev in (x, y), f"step {c} does not read the previous result {prev}"
        r = _apply(op, values[x], values[y])
        assert s == f"{v}={x}{values[x]}{op}{y}{values[y]}={v}{r}", (c, s)
        values[v] = r
        prev = v
    assert query == prev, p
    assert p.answer == str(values[query]), p


def write_corpus(path, n: int, ks: Iterable[int] = range(1, 7), seed: int = 0,
                 fmt: str = "txt", split: str = "train") -> int:
    """Write ``n`` problems as a distillation corpus; returns ``n``.

    fmt="txt": one full problem text a line; fmt="jsonl": one ``{"text": ...}`` a line.
    The demo distils on "general" data, i.e. ``ks=(1, 2)``.
    """
    if fmt not in ("txt", "jsonl"):
        raise ValueError(f"fmt must be 'txt' or 'jsonl', got {fmt!r}")
    with open(path, "w", encoding="utf-8") as f:
        for p in iter_problems(ks, split, seed, n):
            t = format_problem(p)
            f.write((json.dumps({"text": t}) if fmt == "jsonl" else t) + "\n")
    return n


def uncovered_ngrams(short: Iterable[str], long: Iterable[str], n: int = 2) -> dict:
    """The character n-grams (n = 1 .. ``n``) of the texts ``long`` that occur in none of
    the texts ``short``, as ``{n: sorted list}``. Texts are documents as the engine packs
    them, so ``<bos>``/``<eos>`` (written here as ``^``/``$``) take part at both ends.
    """
    def grams(texts):
        out = {m: set() for m in range(1, n + 1)}
        for t in texts:
            t = f"^{t}$"
            for m in range(1, n + 1):
                out[m].update(t[i: i + m] for i in range(len(t) - m + 1))
        return out

    have, want = grams(short), grams(long)
    return {m: sorted(want[m] - have[m]) for m in range(1, n + 1)}


# --------------------------------------------------------------------------- tokenizer

def build_tokenizer():
    """Character-level tokenizer as a ``transformers.PreTrainedTokenizerFast``.

    Vocabulary: <pad>=0, <bos>=1, <eos>=2, <unk>=3, then the characters of CHARS.
    Like Llama's, calling it with ``add_special_tokens=True`` (the default) prepends
    <bos> only; the packing convention uses ``add_special_tokens=False`` and adds
    bos/eos itself. Padding side is left (for batched generation).
    """
    from tokenizers import Tokenizer, decoders, models, processors
    from transformers import PreTrainedTokenizerFast

    vocab = {t: i for i, t in enumerate(SPECIAL_TOKENS + list(CHARS))}
    # A BPE with no merges splits every word into its characters.
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token=UNK))
    tok.decoder = decoders.Fuse()
    tok.post_processor = processors.TemplateProcessing(
        single=f"{BOS} $A", pair=f"{BOS} $A {BOS} $B",
        special_tokens=[(BOS, vocab[BOS])])
    tok.add_special_tokens(SPECIAL_TOKENS)
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token=BOS, eos_token=EOS, pad_token=PAD,
        unk_token=UNK, padding_side="left", model_max_length=1024)


def encode_document(text: str, tokenizer) -> List[int]:
    """``[bos] + tokenizer(text, add_special_tokens=False).input_ids + [eos]``."""
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    return [tokenizer.bos_token_id] + list(ids) + [tokenizer.eos_token_id]


def pack_documents(texts: Iterable[str], tokenizer, seq_len: int) -> torch.Tensor:
    """Concatenate encoded documents and cut into ``[n_blocks, seq_len]`` (tail dropped)."""
    ids: List[int] = []
    for t in texts:
        ids.extend(encode_document(t, tokenizer))
    n_blocks = len(ids) // seq_len
    return torch.tensor(ids[: n_blocks * seq_len], dtype=torch.long).view(n_blocks, seq_len)


# -------------------------------------------------------------------------- evaluation

def _cache_kwarg(model) -> str:
    """Name of the KV-cache argument: ``cache`` in recent transformers 5.x (which warns
    that ``past_key_values`` is deprecated), ``past_key_values`` before."""
    import inspect
    params = inspect.signature(model.forward).parameters
    return "cache" if "cache" in params else "past_key_values"


def _get_cache(res):
    cache = getattr(res, "cache", None)
    return cache if cache is not None else getattr(res, "past_key_values", None)


@torch.no_grad()
def greedy_generate(model, prompts: Sequence[Sequence[int]], max_new_tokens: int,
                    eos_token_id: int, batch_size: int = 200) -> List[List[int]]:
    """Greedy continuation of every prompt (lists of ids), with the KV cache.

    Prompts are grouped by length, so no padding is ever needed (all prompts of one k
    have the same length in this task). Each continuation is cut after its first eos
    (the eos is not included). Works for any Hugging Face causal LM.
    """
    device = next(model.parameters()).device
    cache_kw = _cache_kwarg(model)
    out: List[Optional[List[int]]] = [None] * len(prompts)
    by_len = {}
    for i, p in enumerate(prompts):
        by_len.setdefault(len(p), []).append(i)
    for _, idx in sorted(by_len.items()):
        for s in range(0, len(idx), batch_size):
            chunk = idx[s: s + batch_size]
            ids = torch.tensor([list(prompts[i]) for i in chunk], dtype=torch.long,
                               device=device)
            res = model(input_ids=ids, use_cache=True)
            cache = _get_cache(res)
            nxt = res.logits[:, -1, :].argmax(-1)
            gen = [nxt]
            done = nxt == eos_token_id
            for _ in range(max_new_tokens - 1):
                if bool(done.all()):
                    break
                res = model(input_ids=nxt[:, None], use_cache=True,
                            **{cache_kw: cache})
                cache = _get_cache(res)
                nxt = res.logits[:, -1, :].argmax(-1)
                gen.append(nxt)
                done = done | (nxt == eos_token_id)
            gen_t = torch.stack(gen, dim=1).tolist()
            for j, i in enumerate(chunk):
                seq = gen_t[j]
                if eos_token_id in seq:
                    seq = seq[: seq.index(eos_token_id)]
                out[i] = seq
    return out  # type: ignore[return-value]


def evaluate_reasoning(model, tokenizer, ks: Iterable[int] = range(1, 7),
                       n_per_k: int = 200, seed: int = 0, batch_size: int = 200,
                       max_new_tokens: Optional[int] = None) -> dict:
    """Exact-match accuracy of the final answer on held-out problems, per k.

    Prompt = [bos] + tokens of ``prompt_text``; greedy decoding; the completion (cut at
    eos) must parse with :func:`parse_answer` and equal the true answer. Returns a flat
    dict: ``"k1"``..``"kN"`` accuracies in [0, 1], ``"general"`` = mean over k <= 2,
    ``"reasoning"`` = mean over k >= 3 (None when no such k), ``"cot_k1"``.. the fraction
    whose whole completion is exactly right, and ``"n_per_k"``. ``max_new_tokens``
    defaults to the length of the longest correct completion of that k plus 4.
    """
    ks = list(ks)
    was_training = model.training
    model.eval()
    result: dict = {}
    try:
        for k in ks:
            probs = generate_problems(n_per_k, [k], "heldout", seed)
            prompts = [[tokenizer.bos_token_id]
                       + tokenizer(prompt_text(p), add_special_tokens=False)["input_ids"]
                       for p in probs]
            targets = [f"{p.cot}#{p.answer}" for p in probs]
            mnt = max_new_tokens or (max(len(t) for t in targets) + 4)
            gens = greedy_generate(model, prompts, mnt, tokenizer.eos_token_id, batch_size)
            texts = tokenizer.batch_decode(gens, skip_special_tokens=True)
            result[f"k{k}"] = sum(parse_answer(t) == p.answer
                                  for t, p in zip(texts, probs)) / len(probs)
            result[f"cot_k{k}"] = sum(t == g for t, g in zip(texts, targets)) / len(probs)
    finally:
        model.train(was_training)
    gen_ks = [result[f"k{k}"] for k in ks if k <= 2]
    rea_ks = [result[f"k{k}"] for k in ks if k >= 3]
    result["general"] = sum(gen_ks) / len(gen_ks) if gen_ks else None
    result["reasoning"] = sum(rea_ks) / len(rea_ks) if rea_ks else None
    result["n_per_k"] = n_per_k
    return result
