"""Tests of the synthetic reasoning task, its tokenizer, packing, evaluator and teacher."""
import json
import re
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from red.commands.demo import task
from red.commands.demo.task import (CHARS, Problem, build_tokenizer, check_problem, encode_document,
                           evaluate_reasoning, format_problem, generate_problems,
                           greedy_generate, is_heldout, pack_documents, parse_answer,
                           prompt_text, write_corpus)

ASSETS = Path(__file__).resolve().parents[2] / "red" / "assets"
TEACHERS = {"llama": ASSETS / "demo-teacher", "qwen3": ASSETS / "demo-teacher-qwen3"}


def solve(question: str) -> str:
    """Independent solver: the correct completion ``cot#answer`` for a question."""
    head, query = question.split("?")
    vals, steps = {}, []
    clauses = head.split(",")
    for clause in clauses:
        if "=" not in clause:  # binding, "c3" (the bindings follow the step clauses)
            vals[clause[0]] = int(clause[1:])
    for clause in clauses:
        if "=" not in clause:
            continue
        v, (x, op, y) = clause.split("=")
        a, b = vals[x], vals[y]
        r = eval(f"({a}{op}{b}) % 10")
        steps.append(f"{v}={x}{a}{op}{y}{b}={v}{r}")
        vals[v] = r
    return ",".join(steps) + f"#{vals[query]}"


# ----------------------------------------------------------------------------- generator

def test_generator_is_deterministic_per_seed():
    a = generate_problems(60, range(1, 7), "train", seed=3)
    b = generate_problems(60, range(1, 7), "train", seed=3)
    c = generate_problems(60, range(1, 7), "train", seed=4)
    assert a == b
    assert [p.question for p in a] != [p.question for p in c]
    assert generate_problems(30, [2], "heldout", 5) == generate_problems(30, [2], "heldout", 5)


def test_k_cycles_through_ks():
    ps = generate_problems(12, [1, 3, 6], "train", 0)
    assert [p.k for p in ps] == [1, 3, 6] * 4


@pytest.mark.parametrize("split", ["train", "heldout"])
def test_every_step_and_answer_is_correct(split):
    ps = generate_problems(900, range(1, 7), split, seed=11)
    for p in ps:
        check_problem(p)
        assert f"{p.cot}#{p.answer}" == solve(p.question), p
        assert format_problem(p) == prompt_text(p) + f"{p.cot}#{p.answer}"
        assert len(p.cot.split(",")) == p.k
        assert set(format_problem(p)) <= set(CHARS)


def test_each_step_reads_the_previous_result():
    for p in generate_problems(300, range(2, 7), "train", seed=1):
        clauses = p.question.split("?")[0].split(",")[: -task.N_INITIAL]
        for prev, cur in zip(clauses, clauses[1:]):
            x, _, y = cur.split("=")[1]
            assert prev[0] in (x, y), p.question
            assert x != y


def test_variable_names():
    firsts = set()
    cycle = task.STEP_VARIABLES * 2
    for p in generate_problems(400, range(1, task.MAX_K + 1), "train", seed=4):
        clauses = p.question.split("?")[0].split(",")
        bound = [c[0] for c in clauses[-task.N_INITIAL:]]
        assert len(set(bound)) == task.N_INITIAL and set(bound) <= set(task.INPUT_VARIABLES)
        names = "".join(c[0] for c in clauses[: -task.N_INITIAL])
        assert names in cycle and len(set(names)) == p.k  # consecutive letters of the cycle
        assert p.question.endswith("?" + names[-1])
        firsts.add(names[0])
    assert firsts == set(task.STEP_VARIABLES)  # the cycle starts anywhere
    assert task.step_names("o", 4) == ["o", "p", "i", "j"]


def test_short_chains_hold_every_token_and_bigram_of_long_chains(tmp_path):
    """The premise of the demo: distillation data of k <= 2 problems only (what `red demo`
    writes by default) contain every token and every token bigram, bos/eos included, of
    held-out chains of every length, so a student that stops after two steps has not merely
    never seen the tokens of step 3. Longer n-grams are not all covered: a k <= 2 step reads
    at most one computed variable, so ``i+j`` (two computed operands) is k >= 3 only."""
    from red.commands.demo.run import write_general_corpus

    path = tmp_path / "general.txt"
    write_general_corpus(path, 20000, [1, 2], [3], 0.0)  # the demo's default corpus
    short = path.read_text().splitlines()
    assert {line.split("?")[0].count("=") for line in short} == {1, 2}
    long = [format_problem(p) for p in generate_problems(6000, range(3, task.MAX_K + 1), "heldout", 1)]
    missing = task.uncovered_ngrams(short, long, 2)
    assert missing == {1: [], 2: []}, missing
    # the check itself can fail: a fixed step order (i, j, k, ...) would leave step 3's name
    fixed = [t.replace(t.split("=")[0], "i") for t in short if t.split("?")[0].count("=") == 1]
    assert "k" in task.uncovered_ngrams(fixed, long, 1)[1]
    # and the longest n-grams that are missing are the ones named above
    assert "i+j" in task.uncovered_ngrams(short, long, 3)[3]


def test_check_problem_rejects_wrong_problems():
    p = generate_problems(1, [3], "train", 0)[0]
    wrong = str((int(p.answer) + 1) % 10)
    with pytest.raises(AssertionError):
        check_problem(Problem(p.question, p.cot, wrong, p.k))
    steps = p.cot.split(",")
    steps[1] = steps[1][:-1] + str((int(steps[1][-1]) + 1) % 10)
    with pytest.raises(AssertionError):
        check_problem(Problem(p.question, ",".join(steps), p.answer, p.k))


def test_longest_problem_is_short():
    tok = build_tokenizer()
    for p in generate_problems(200, [6], "train", 0):
        assert len(encode_document(format_problem(p), tok)) <= 116


def test_heldout_and_train_are_disjoint():
    train = {p.question for s in (0, 1) for p in generate_problems(6000, [1, 2], "train", s)}
    held = {p.question for s in (0, 1) for p in generate_problems(3000, [1, 2], "heldout", s)}
    assert len(held) > 5900 and len(train) > 11900
    assert not train & held
    assert all(is_heldout(q) for q in held)
    assert not any(is_heldout(q) for q in train)


def test_heldout_fraction_matches_modulus():
    import random
    rng = random.Random(0)
    qs = [task.make_problem(rng, 2).question for _ in range(5000)]
    frac = sum(map(is_heldout, qs)) / len(qs)
    assert abs(frac - 1 / task.HELDOUT_MODULUS) < 0.02


def test_bad_arguments_raise():
    with pytest.raises(ValueError):
        generate_problems(1, [1], "test", 0)
    with pytest.raises(ValueError):
        generate_problems(1, [0], "train", 0)
    with pytest.raises(ValueError):
        generate_problems(1, [task.MAX_K + 1], "train", 0)
    with pytest.raises(ValueError):
        write_corpus("/dev/null", 1, fmt="csv")


@pytest.mark.parametrize("fmt", ["txt", "jsonl"])
def test_write_corpus(tmp_path, fmt):
    path = tmp_path / f"c.{fmt}"
    assert write_corpus(path, 25, ks=(1, 2), seed=7, fmt=fmt) == 25
    lines = path.read_text().splitlines()
    want = [format_problem(p) for p in generate_problems(25, (1, 2), "train", 7)]
    got = [json.loads(l)["text"] for l in lines] if fmt == "jsonl" else lines
    assert got == want


# ----------------------------------------------------------------------------- tokenizer

def test_tokenizer_vocabulary():
    tok = build_tokenizer()
    assert len(tok) == 4 + len(CHARS) and len(set(CHARS)) == len(CHARS)
    assert (tok.pad_token_id, tok.bos_token_id, tok.eos_token_id, tok.unk_token_id) == (0, 1, 2, 3)
    ids = tok("i=a3", add_special_tokens=False)["input_ids"]
    assert ids == [tok.convert_tokens_to_ids(c) for c in "i=a3"] and len(set(ids)) == 4
    assert tok("i=a3")["input_ids"] == [tok.bos_token_id] + ids
    assert tok("z", add_special_tokens=False)["input_ids"] == [tok.unk_token_id]


def test_tokenizer_roundtrip_through_save_pretrained(tmp_path):
    from transformers import AutoTokenizer
    tok = build_tokenizer()
    tok.save_pretrained(tmp_path)
    tok2 = AutoTokenizer.from_pretrained(tmp_path)
    texts = [format_problem(p) for p in generate_problems(60, range(1, 7), "train", 2)]
    for t in texts:
        for special in (False, True):
            a = tok(t, add_special_tokens=special)["input_ids"]
            assert a == tok2(t, add_special_tokens=special)["input_ids"]
        ids = tok2(t, add_special_tokens=False)["input_ids"]
        assert len(ids) == len(t)
        assert tok2.decode(ids) == t
    assert tok2.get_vocab() == tok.get_vocab()
    assert (tok2.bos_token_id, tok2.eos_token_id, tok2.pad_token_id) == (1, 2, 0)
    assert tok2.padding_side == "left"


def test_document_packing_convention():
    tok = build_tokenizer()
    texts = [format_problem(p) for p in generate_problems(40, range(1, 7), "train", 0)]
    doc = encode_document(texts[0], tok)
    assert doc[0] == tok.bos_token_id and doc[-1] == tok.eos_token_id
    assert doc[1:-1] == tok(texts[0], add_special_tokens=False)["input_ids"]
    flat = [i for t in texts for i in encode_document(t, tok)]
    blocks = pack_documents(texts, tok, 64)
    assert blocks.shape == (len(flat) // 64, 64) and blocks.dtype == torch.long
    assert blocks.flatten().tolist() == flat[: blocks.numel()]


# ----------------------------------------------------------------------------- evaluator

@pytest.mark.parametrize("completion,expected", [
    ("d=3+7=0#0", "0"),
    ("d=3+7=0,e=0-1=9#9", "9"),
    ("#4", "4"),
    (" d=1+1=2#2 ", "2"),
    ("", None),
    ("d=3+7=0", None),
    ("d=3+7=0#", None),
    ("d=3+7=0#1#2", None),
    ("d=3+7=0#1a", None),
    ("d=3+7=0#a", None),
    ("d=3+7=0#1,e=2", None),
])
def test_parse_answer(completion, expected):
    assert parse_answer(completion) == expected


class OracleLM(torch.nn.Module):
    """A fake causal LM that writes ``mangle(correct completion)`` then eos.

    It speaks the transformers 5.24 protocol the evaluator uses: ``cache`` argument in,
    ``.logits`` and ``.cache`` out.
    """

    def __init__(self, tok, mangle=lambda question, target: target):
        super().__init__()
        self.tok, self.mangle = tok, mangle
        self.dummy = torch.nn.Parameter(torch.zeros(1))
        self.calls = 0

    def forward(self, input_ids, cache=None, use_cache=True, **kw):
        self.calls += 1
        ctx = input_ids if cache is None else torch.cat([cache, input_ids], dim=1)
        logits = torch.zeros(ctx.shape[0], input_ids.shape[1], len(self.tok))
        for b in range(ctx.shape[0]):
            text = self.tok.decode(ctx[b].tolist(), skip_special_tokens=True)
            question, done = text.split(":", 1)
            target = self.mangle(question, solve(question))
            nxt = (self.tok.convert_tokens_to_ids(target[len(done)])
                   if len(done) < len(target) else self.tok.eos_token_id)
            logits[b, -1, nxt] = 1.0
        return SimpleNamespace(logits=logits, cache=ctx)


def test_evaluator_scores_an_oracle_perfectly():
    tok = build_tokenizer()
    model = OracleLM(tok)
    r = evaluate_reasoning(model, tok, ks=[1, 2, 3], n_per_k=12, seed=0, batch_size=5)
    assert r["k1"] == r["k2"] == r["k3"] == 1.0
    assert r["cot_k3"] == 1.0 and r["general"] == 1.0 and r["reasoning"] == 1.0
    assert r["n_per_k"] == 12
    assert model.training  # restored


def test_evaluator_counts_wrong_and_malformed_answers():
    tok = build_tokenizer()

    def mangle(question, target):
        k = question.count("+") + question.count("-")
        if k == 1:  # wrong answer, right format
            return target[:-1] + str((int(target[-1]) + 1) % 10)
        if k == 2:  # no answer marker
            return target.split("#")[0]
        if k == 3:  # right answer followed by junk
            return target + "a"
        return target[:2] + ("0" if target[2] != "0" else "1") + target[3:]  # wrong step only

    r = evaluate_reasoning(OracleLM(tok, mangle), tok, ks=[1, 2, 3, 4], n_per_k=8, seed=1)
    assert r["k1"] == r["k2"] == r["k3"] == 0.0
    assert r["k4"] == 1.0 and r["cot_k4"] == 0.0  # only the final answer is scored
    assert r["general"] == 0.0 and r["reasoning"] == 0.5


def test_evaluator_uses_heldout_problems_and_stops_at_max_new_tokens():
    tok = build_tokenizer()
    seen = []

    def mangle(question, target):
        seen.append(question)
        return target * 5  # never stops by itself

    model = OracleLM(tok, mangle)
    r = evaluate_reasoning(model, tok, ks=[1], n_per_k=4, seed=2, max_new_tokens=6)
    assert r["k1"] == 0.0
    assert seen and all(is_heldout(q) for q in seen)
    assert model.calls == 6  # one batch: prompt call plus 5 cached steps


# ----------------------------------------------------------------------------- teacher

def bundled(arch):
    return pytest.param(arch, marks=pytest.mark.skipif(
        not (TEACHERS[arch] / "model.safetensors").exists(), reason=f"bundled {arch} teacher not present"))


@pytest.mark.parametrize("arch", [bundled("llama"), bundled("qwen3")])
def test_bundled_teacher_files(arch):
    folder = TEACHERS[arch]
    cfg = json.loads((folder / "config.json").read_text())
    assert cfg["model_type"] == arch and cfg["vocab_size"] == 4 + len(CHARS)
    assert sum(f.stat().st_size for f in folder.iterdir()) < 10e6
    card = (folder / "README.md").read_text()
    assert "python -m red.commands.demo.train_teacher" in card and f"--out red/assets/{folder.name}" in card
    row = re.search(r"\| answer exact match, % \|([^\n]*)", card).group(1)
    acc = [float(x) for x in row.strip(" |").split("|")]
    assert len(acc) == 8 and min(acc[:6]) > 20  # k=1..6, general, reasoning: all well above chance (~13 %)
    if arch == "qwen3":
        assert "--arch qwen3" in card and not cfg["attention_bias"] and not cfg["use_sliding_window"]


@pytest.fixture
def one_thread():
    """Many tiny ops: on a loaded 2-core machine two torch threads made the teacher test
    18x slower (53 s vs 2.9 s)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.mark.parametrize("arch", [bundled("llama"), bundled("qwen3")])
def test_bundled_teacher_solves_short_chains(arch, one_thread):
    from transformers import AutoModelForCausalLM, AutoTokenizer
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(TEACHERS[arch])
    tok = AutoTokenizer.from_pretrained(TEACHERS[arch])
    r = evaluate_reasoning(model, tok, ks=[1, 2], n_per_k=40, seed=123)
    assert r["general"] >= 0.35, r  # the most frequent answer scores ~13 %

    # The KV-cache loop gives the same tokens as recomputing the whole prefix each step.
    ps = generate_problems(6, [3], "heldout", 5)
    prompts = [[tok.bos_token_id] + tok(prompt_text(p), add_special_tokens=False)["input_ids"]
               for p in ps]
    fast = greedy_generate(model, prompts, 30, tok.eos_token_id)
    ids = torch.tensor(prompts)
    with torch.no_grad():
        for _ in range(30):
            ids = torch.cat([ids, model(input_ids=ids).logits[:, -1].argmax(-1)[:, None]], 1)
    slow = [r[len(prompts[0]):] for r in ids.tolist()]
    slow = [s[: s.index(tok.eos_token_id)] if tok.eos_token_id in s else s for s in slow]
    assert fast == slow
