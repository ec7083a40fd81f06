"""Does memory stay flat as the corpus grows? Token stores (`red prepare`) against today's path.

Run (from the repository root; takes ~15-30 minutes at the default sizes on 2 cores)::

    python benchmarks/data_scale.py                      # 10M and 100M tokens, old path included
    python benchmarks/data_scale.py --sizes 1M --skip-old  # a quick check

It measures, in one run, on deterministic synthetic English-like text (written under
``--workdir``, /tmp by default, never into the repository) and a tiny Llama teacher with
a 32k byte-level BPE tokenizer trained here on that text (nothing is downloaded):

1. ``red prepare`` at each size with ``--workers 1`` and ``--workers 2``: wall seconds,
   tokens/s and the peak memory of the whole process tree (prepare plus its workers).
2. The peak RSS of a 5-step ``red distill --data STORE`` from each size's store. Goal: the
   smallest and the largest size differ by less than 100 MB (PASS/FAIL).
3. Today's path (the commit before token stores, ``--old-commit``, checked out with
   ``git worktree`` and run with PYTHONPATH pointing at it; the module file that runs is
   printed and recorded): peak RSS and tokenizing time of the same 5-step
   ``red distill --data FILE``. A size whose estimated need (150 bytes/token + 1 GB) is
   not available (``MemAvailable`` below 20 GB for 100M tokens) is skipped and an
   extrapolation from the smallest measured size is reported, labelled as such.

How memory is measured. Each command runs as a child of this script in its own session:

* ``max_proc_rss_mb``: the kernel's high-water mark of the largest single process of the
  tree: ``getrusage(RUSAGE_CHILDREN).ru_maxrss`` read in a small launcher process
  (``LAUNCHER``) that runs the command. Not ``wait4`` on the command from this script: at
  exec the kernel keeps the RSS high-water mark of the image being replaced, so a child
  forked from this (large) script would report this script's size. Exact, but per
  process: for a worker pool it does not add the workers up.
* ``tree_rss_mb`` / ``tree_pss_mb``: the tree walked every 0.1 s through
  /proc/PID/task/*/children, summing VmRSS (/proc/PID/status) and Pss
  (/proc/PID/smaps_rollup) of every process; the peak of the sums. The RSS sum counts
  pages shared by forked workers (torch, the tokenizer) once per process, so it is an upper
  bound; the PSS sum splits shared pages between their users. Sampling can miss a peak
  shorter than 0.1 s.
* ``peak_rss_mb`` (the column compared) is ``tree_rss_mb`` for prepare (several processes)
  and ``max_proc_rss_mb`` for distill (one process; the tree figures are recorded too).
  psutil is not needed (not installed here); /usr/bin/time -v gives the same number as
  ru_maxrss and no tree sum.

For distill, a small driver (``DRIVER``) runs `red` in the child and, at exit, reports the
child's own /proc/self/status (RssAnon = heap, RssFile = file pages such as memory-mapped
store blocks) and the time spent making the corpus ready (``load_corpus`` on the old path,
opening the store on the new one).

Results: ``benchmarks/results/data-scale-<date>.json`` (``--out``) and a markdown table.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
OLD_COMMIT = "3e3da49"
OLD_BYTES_PER_TOKEN = 150  # today's path, measured before: the estimate that decides whether to run it
GOAL_MB = 100
MB = 1 << 20

# Runs a command and writes its tree's largest ru_maxrss (KiB) to argv[1]. Small, so that the
# exec'd command does not inherit a large RSS high-water mark.
LAUNCHER = ("import resource, subprocess, sys; rc = subprocess.call(sys.argv[2:]); "
            "open(sys.argv[1], 'w').write(str(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss)); "
            "sys.exit(rc)")

# Runs `red` in the measured process: records which red runs, how long the corpus took to be ready,
# and this process's memory at exit.
DRIVER = r"""
import atexit, json, sys, time
def status():
    out = {}
    for line in open("/proc/self/status"):
        k, _, v = line.partition(":")
        if k in ("VmRSS", "VmHWM", "RssAnon", "RssFile", "RssShmem"):
            out[k] = int(v.split()[0]) / 1024
    return out
import red
print("RED_FILE " + red.__file__, flush=True)
info = {}
P = None
if sys.argv[1] == "distill":  # prepare does not import the pipeline: leave its memory as it is
    import red.commands.distill as P
def wrap(name):
    f = getattr(P, name, None)
    if f is None:
        return
    def timed(*a, **k):
        t = time.perf_counter()
        r = f(*a, **k)
        info[name + "_s"] = info.get(name + "_s", 0.0) + time.perf_counter() - t
        info[name + "_status"] = status()
        return r
    setattr(P, name, timed)
for n in ("load_corpus", "corpus_from_stores"):
    wrap(n)
atexit.register(lambda: print("BENCH_INFO " + json.dumps({**info, "exit_status": status()}), flush=True))
from red.cli import run
sys.exit(run(sys.argv[1:]))
"""


# -- synthetic text ---------------------------------------------------------------------------

FUNCTION_WORDS = ("the of and to a in is that it was for on are as with his they be at one have this from or had by "
                  "not word but what some we can out other were all there when up use your how said an each she "
                  "which do their time if will way about many then them write would like so these her long make "
                  "thing see him two has look more day could go come did number sound no most people my over know "
                  "water than call first who may down side been now find").split()
ONSETS = ["", "b", "c", "d", "f", "g", "h", "j", "k", "l", "m", "n", "p", "r", "s", "t", "v", "w", "y", "z", "br",
          "ch", "cl", "cr", "dr", "fl", "fr", "gl", "gr", "pl", "pr", "sc", "sh", "sl", "sp", "st", "str", "th", "tr",
          "wh"]
VOWELS = ["a", "e", "i", "o", "u", "ai", "ea", "ee", "ie", "oa", "ou", "y"]
CODAS = ["", "", "", "n", "r", "s", "t", "l", "m", "nd", "ng", "nt", "rs", "st", "ck", "sh", "th", "ed", "ing", "ly"]


class TextGen:
    """English-like documents: a 60k-word lexicon (function words, then syllable words
    shorter-first) drawn with Zipf frequencies, in capitalized sentences of 4-18 words
    ending with a period; documents of 20-400 words, one per line. Deterministic in seed."""

    def __init__(self, n_words: int = 60_000, lexicon_seed: int = 7):
        rng = np.random.default_rng(lexicon_seed)
        words, seen = list(FUNCTION_WORDS), set(FUNCTION_WORDS)
        while len(words) < n_words:
            k = int(rng.choice([1, 2, 2, 3, 3, 4]))
            w = "".join(ONSETS[rng.integers(len(ONSETS))] + VOWELS[rng.integers(len(VOWELS))]
                        + CODAS[rng.integers(len(CODAS))] for _ in range(k))
            if w not in seen:
                seen.add(w)
                words.append(w)
        head, tail = words[:len(FUNCTION_WORDS)], sorted(words[len(FUNCTION_WORDS):], key=len)
        lex = head + tail
        self.table = np.array([lex, [w.capitalize() for w in lex], [w + "." for w in lex],
                               [w.capitalize() + "." for w in lex]], dtype=object)
        p = 1.0 / (np.arange(len(lex)) + 2.7) ** 1.05
        self.cdf = np.cumsum(p / p.sum())

    def documents(self, seed: int):
        rng = np.random.default_rng(seed)
        while True:
            n = int(rng.integers(20, 401))
            ids = np.minimum(np.searchsorted(self.cdf, rng.random(n)), len(self.cdf) - 1)
            cuts = np.cumsum(rng.integers(4, 19, size=n // 4 + 1))
            cuts = cuts[cuts < n]
            variant = np.zeros(n, np.int8)
            variant[0] = 1
            variant[cuts] |= 1
            variant[cuts - 1] |= 2
            variant[n - 1] |= 2
            yield " ".join(self.table[variant, ids].tolist())

    def write(self, path: Path, seed: int, chars: int) -> int:
        """Write documents to ``path`` until ``chars`` characters; returns the documents written."""
        n, size, buf = 0, 0, []
        with open(path, "w", encoding="utf-8") as f:
            for doc in self.documents(seed):
                buf.append(doc)
                size += len(doc) + 1
                n += 1
                if len(buf) >= 4096:
                    f.write("\n".join(buf) + "\n")
                    buf = []
                if size >= chars:
                    break
            if buf:
                f.write("\n".join(buf) + "\n")
        return n


def make_teacher(folder: Path, gen: TextGen, vocab: int = 32_000, sample_docs: int = 30_000) -> Path:
    """A byte-level BPE of ``vocab`` tokens trained on generated text, and a tiny random Llama
    (hidden 64, 2 layers) with that vocabulary, saved to ``folder``."""
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    folder.mkdir(parents=True, exist_ok=True)
    docs = gen.documents(seed=999)
    sample = [next(docs) for _ in range(sample_docs)]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab, special_tokens=["<pad>", "<s>", "</s>", "<unk>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(sample, trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>",
                                   unk_token="<unk>")
    cfg = LlamaConfig(vocab_size=len(fast), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, head_dim=16, max_position_embeddings=512,
                      bos_token_id=fast.bos_token_id, eos_token_id=fast.eos_token_id,
                      pad_token_id=fast.pad_token_id, tie_word_embeddings=True)
    torch.manual_seed(0)
    LlamaForCausalLM(cfg).save_pretrained(folder)
    fast.save_pretrained(folder)
    probe = sample[:2000]
    toks = sum(len(x) + 2 for x in fast(probe, add_special_tokens=False)["input_ids"])  # + bos, eos
    chars = sum(len(x) + 1 for x in probe)
    (folder / "bench.json").write_text(json.dumps({"tokens_per_char": toks / chars, "vocab": len(fast)}))
    return folder


# -- measuring --------------------------------------------------------------------------------

def mem_available_mb() -> float:
    for line in open("/proc/meminfo"):
        if line.startswith("MemAvailable:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def _tree(pid: int) -> list[int]:
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        out.append(p)
        try:
            for t in os.listdir(f"/proc/{p}/task"):
                with open(f"/proc/{p}/task/{t}/children") as f:
                    todo += [int(c) for c in f.read().split()]
        except OSError:
            pass
    return out


def _proc_kb(path: str, key: str) -> int:
    try:
        with open(path) as f:
            for line in f:
                if line.startswith(key):
                    return int(line.split()[1])
    except OSError:
        pass
    return 0


def measure(cmd: list[str], env: dict, cwd: Path, log: Path, guard_mb: float = 1500,
            timeout_s: float | None = None) -> dict:
    """Run ``cmd``; wall seconds, exit code, the peak of the tree's summed RSS and PSS (polled),
    the largest process's ru_maxrss (LAUNCHER), and the driver's report if it printed one.
    The run is killed (its own process group only) if the machine's available memory falls
    below ``guard_mb`` (the machine is shared), or when it runs past ``timeout_s``."""
    t0 = time.perf_counter()
    maxrss_file = log.with_suffix(".maxrss")
    maxrss_file.unlink(missing_ok=True)
    with open(log, "w") as out:
        proc = subprocess.Popen([sys.executable, "-c", LAUNCHER, str(maxrss_file), *cmd], env=env, cwd=cwd,
                                stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
        peak = {"rss": 0, "pss": 0, "procs": 0, "avail_min": mem_available_mb(), "killed": False, "timeout": False}
        stop = threading.Event()

        def poll():
            while not stop.is_set():
                pids = _tree(proc.pid)[1:]  # not the launcher
                rss = sum(_proc_kb(f"/proc/{p}/status", "VmRSS:") for p in pids)
                pss = sum(_proc_kb(f"/proc/{p}/smaps_rollup", "Pss:") for p in pids)
                peak["rss"], peak["pss"] = max(peak["rss"], rss), max(peak["pss"], pss)
                peak["procs"] = max(peak["procs"], len(pids))
                avail = mem_available_mb()
                peak["avail_min"] = min(peak["avail_min"], avail)
                if avail < guard_mb and not peak["killed"]:
                    peak["killed"] = True
                    os.killpg(proc.pid, signal.SIGKILL)
                if timeout_s and time.perf_counter() - t0 > timeout_s and not peak["timeout"]:
                    peak["timeout"] = True
                    os.killpg(proc.pid, signal.SIGKILL)
                stop.wait(0.1)

        th = threading.Thread(target=poll, daemon=True)
        th.start()
        proc.wait()
        wall = time.perf_counter() - t0
        stop.set()
        th.join()
    maxrss_kb = int(maxrss_file.read_text()) if maxrss_file.is_file() else 0
    text = log.read_text(errors="replace")
    info, red_file = {}, None
    for line in text.splitlines():
        if line.startswith("BENCH_INFO "):
            info = json.loads(line[len("BENCH_INFO "):])
        elif line.startswith("RED_FILE "):
            red_file = line[len("RED_FILE "):]
    return {"rc": proc.returncode, "wall_s": round(wall, 2), "max_proc_rss_mb": round(maxrss_kb / 1024, 1) if maxrss_kb else None,
            "tree_rss_mb": round(peak["rss"] / 1024, 1), "tree_pss_mb": round(peak["pss"] / 1024, 1),
            "tree_procs": peak["procs"], "mem_available_min_mb": round(peak["avail_min"]),
            "killed_low_memory": peak["killed"], "timed_out": peak["timeout"], "info": info, "red_file": red_file,
            "log_tail": text[-2000:] if proc.returncode else ""}


def parse_size(s: str) -> int:
    s = s.strip().upper()
    mult = {"K": 10**3, "M": 10**6, "G": 10**9}.get(s[-1:], 1)
    return int(float(s.rstrip("KMG")) * mult)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--sizes", default="10M,100M", help="corpus sizes in tokens, comma-separated (e.g. 1M)")
    ap.add_argument("--out", default=None, help="results JSON (default benchmarks/results/data-scale-DATE.json)")
    ap.add_argument("--workdir", default="/tmp/red-data-scale", help="where data, stores and runs go")
    ap.add_argument("--keep", action="store_true", help="keep --workdir (data, stores) afterwards")
    ap.add_argument("--skip-old", action="store_true", help="do not measure today's path")
    ap.add_argument("--old-commit", default=OLD_COMMIT, help="the commit of today's path")
    ap.add_argument("--old-worktree", default="/tmp/red-old")
    ap.add_argument("--old-timeout", type=float, default=1800, help="stop a run of today's path after this many s")
    ap.add_argument("--workers", default="1,2", help="red prepare --workers values")
    args = ap.parse_args(argv)

    sizes = [(s.strip(), parse_size(s)) for s in args.sizes.split(",")]
    workers = [int(w) for w in args.workers.split(",")]
    date = datetime.date.today().isoformat()
    out = Path(args.out) if args.out else REPO / "benchmarks" / "results" / f"data-scale-{date}.json"
    work = Path(args.workdir)
    work.mkdir(parents=True, exist_ok=True)
    if work.resolve().is_relative_to(REPO):
        raise SystemExit("--workdir must be outside the repository")
    env_new = {**os.environ, "PYTHONPATH": str(REPO), "PYTHONUNBUFFERED": "1"}
    rows, t_start = [], time.time()

    def log(msg):
        print(f"[{time.time() - t_start:7.1f}s, {mem_available_mb() / 1024:.1f} GB available] {msg}", flush=True)

    # -- teacher, tokenizer, data
    gen = TextGen()
    teacher = work / "teacher"
    if not (teacher / "bench.json").is_file():
        log("training the 32k BPE and saving the tiny teacher")
        make_teacher(teacher, gen)
    meta = json.loads((teacher / "bench.json").read_text())
    log(f"tokenizer: {meta['vocab']} tokens, {meta['tokens_per_char']:.4f} tokens/char")
    files = {}
    for label, n in sizes:
        f = work / f"corpus-{label}.txt"
        if not f.is_file():
            log(f"writing {f} (~{n:,} tokens)")
            gen.write(f, seed=n % 1_000_003, chars=int(n / meta["tokens_per_char"]))
        files[label] = f

    # -- 1. red prepare
    stores, tokens = {}, {}
    for label, n in sizes:
        for w in workers:
            store = work / f"store-{label}-w{w}"
            shutil.rmtree(store, ignore_errors=True)
            log(f"red prepare {label} --workers {w}")
            r = measure([sys.executable, "-c", DRIVER, "prepare", "--tokenizer", str(teacher), "--data",
                         str(files[label]), "--out", str(store), "--workers", str(w), "--quiet"],
                        env_new, work, work / f"prepare-{label}-w{w}.log")
            m = json.loads((store / "store.json").read_text()) if r["rc"] == 0 else {}
            tokens.setdefault(label, m.get("tokens"))
            rows.append({"name": f"prepare {label} workers={w}", "step": "prepare", "path": "new", "size": label,
                         "tokens": m.get("tokens"), "documents": m.get("documents"), "workers": w,
                         "wall_s": r["wall_s"], "tokens_per_s": round(m["tokens"] / r["wall_s"]) if m else None,
                         "peak_rss_mb": r["tree_rss_mb"], "max_proc_rss_mb": r["max_proc_rss_mb"],
                         "tree_pss_mb": r["tree_pss_mb"], "tree_procs": r["tree_procs"],
                         "store_fingerprint": m.get("fingerprint"), "red_file": r["red_file"],
                         "status": "ok" if r["rc"] == 0 else f"failed rc={r['rc']}", "log_tail": r["log_tail"]})
            log(f"  {rows[-1]['status']}: {r['wall_s']} s, tree RSS {r['tree_rss_mb']} MB, "
                f"PSS {r['tree_pss_mb']} MB, largest process {r['max_proc_rss_mb']} MB")
            if r["rc"] == 0:
                if label in stores:  # one store per size is enough: the same tokens whatever --workers
                    shutil.rmtree(store)
                else:
                    stores[label] = store
        fps = {r["store_fingerprint"] for r in rows if r["step"] == "prepare" and r["size"] == label}
        if len(fps) > 1:
            log(f"  NOTE: --workers gave different stores for {label}: {fps}")

    distill_args = ["--hidden-size", "32", "--seq-len", "256", "--batch-size", "4", "--steps", "5",
                    "--eval-every", "0", "--save-every", "0", "--quiet", "--calib-samples", "4", "--device", "cpu"]

    def distill(path: str, label: str, data: Path, env: dict, timeout_s: float | None = None) -> dict:
        run_dir = work / f"run-{path}-{label}"
        shutil.rmtree(run_dir, ignore_errors=True)
        r = measure([sys.executable, "-c", DRIVER, "distill", "--teacher", str(teacher), "--data", str(data),
                     "--out", str(run_dir), *distill_args], env, work, work / f"distill-{path}-{label}.log",
                    timeout_s=timeout_s)
        shutil.rmtree(run_dir, ignore_errors=True)
        info = r["info"]
        ready = info.get("load_corpus_s", info.get("corpus_from_stores_s"))
        st = info.get("exit_status", {})
        row = {"name": f"distill 5 steps {label} ({'store' if path == 'new' else 'text file, today'})",
               "step": "distill", "path": path, "size": label, "tokens": tokens.get(label), "workers": None,
               "wall_s": r["wall_s"], "data_ready_s": round(ready, 2) if ready is not None else None,
               "tokens_per_s": round(tokens[label] / ready) if path == "old" and ready and tokens.get(label) else None,
               "peak_rss_mb": r["max_proc_rss_mb"], "tree_rss_mb": r["tree_rss_mb"], "tree_pss_mb": r["tree_pss_mb"],
               "tree_procs": r["tree_procs"], "rss_when_stopped_mb": r["tree_rss_mb"] if r["rc"] else None,
               "rss_anon_at_exit_mb": st.get("RssAnon"),
               "rss_file_at_exit_mb": st.get("RssFile"), "after_data_ready": info.get(
                   "load_corpus_status", info.get("corpus_from_stores_status")),
               "red_file": r["red_file"], "mem_available_min_mb": r["mem_available_min_mb"],
               "status": "ok" if r["rc"] == 0 else ("killed: machine low on memory" if r["killed_low_memory"] else
                                                    f"stopped: ran past --old-timeout {timeout_s:g} s" if r["timed_out"]
                                                    else f"failed rc={r['rc']}"), "log_tail": r["log_tail"]}
        log(f"  {row['status']}: {r['wall_s']} s (data ready {row['data_ready_s']} s), peak RSS "
            f"{row['peak_rss_mb']} MB, red = {r['red_file']}")
        return row

    # -- 2. red distill --data STORE
    for label, _ in sizes:
        if label in stores:
            log(f"red distill --data store {label}")
            rows.append(distill("new", label, stores[label], env_new))

    # -- 3. today's path
    if not args.skip_old:
        wt = Path(args.old_worktree)
        subprocess.run(["git", "-C", str(REPO), "worktree", "add", "--detach", str(wt), args.old_commit], check=True,
                       capture_output=True)
        try:
            env_old = {**os.environ, "PYTHONPATH": str(wt), "PYTHONUNBUFFERED": "1"}
            for label, n in sizes:
                need_gb = (n * OLD_BYTES_PER_TOKEN) / 1e9 + 1
                threshold_gb = max(20.0, need_gb + 4) if need_gb > 10 else need_gb + 2
                avail_gb = mem_available_mb() / 1024
                log(f"today's path {label}: needs ~{need_gb:.1f} GB, {avail_gb:.1f} GB available "
                    f"(runs if >= {threshold_gb:.0f} GB)")
                if avail_gb < threshold_gb:
                    rows.append({"name": f"distill 5 steps {label} (text file, today)", "step": "distill",
                                 "path": "old", "size": label, "tokens": tokens.get(label), "workers": None,
                                 "wall_s": None, "tokens_per_s": None, "peak_rss_mb": None,
                                 "status": f"skipped: {avail_gb:.1f} GB available < {threshold_gb:.0f} GB"})
                    continue
                row = distill("old", label, files[label], env_old, args.old_timeout)
                if not (row["red_file"] or "").startswith(str(wt)):
                    row["status"] = f"INVALID: ran {row['red_file']}, not the old code"
                rows.append(row)
        finally:
            subprocess.run(["git", "-C", str(REPO), "worktree", "remove", "--force", str(wt)], capture_output=True)
            subprocess.run(["git", "-C", str(REPO), "worktree", "prune"], capture_output=True)
            log(f"worktree {wt} removed")
        # an extrapolation for skipped sizes, from the smallest measured size, clearly labelled
        measured = [r for r in rows if r["path"] == "old" and r["status"] == "ok"]
        new_by = {r["size"]: r for r in rows if r["step"] == "distill" and r["path"] == "new" and r["status"] == "ok"}
        if measured and measured[0]["size"] in new_by:
            m0, base = measured[0], new_by[measured[0]["size"]]
            per_token = (m0["peak_rss_mb"] - base["peak_rss_mb"]) * MB / m0["tokens"]
            for r in rows:
                if r["path"] == "old" and r["status"] != "ok" and r["size"] in new_by and r["tokens"]:
                    r["extrapolated_peak_rss_mb"] = round(new_by[r["size"]]["peak_rss_mb"]
                                                          + per_token * r["tokens"] / MB)
                    r["extrapolated_data_ready_s"] = round(m0["data_ready_s"] * r["tokens"] / m0["tokens"], 1)
                    r["extrapolation"] = (f"EXTRAPOLATED, not measured: new-path RSS at {r['size']} + "
                                          f"{per_token:.0f} bytes/token (today's path minus the store path at "
                                          f"{m0['size']}) x {r['tokens']:,} tokens; time linear in tokens")

    # -- goal
    new = [r for r in rows if r["step"] == "distill" and r["path"] == "new" and r["status"] == "ok"]
    goal = None
    if len(new) >= 2:
        lo, hi = new[0], new[-1]
        diff = hi["peak_rss_mb"] - lo["peak_rss_mb"]
        goal = {"what": f"distill peak RSS, store {hi['size']} minus store {lo['size']}", "small_mb": lo["peak_rss_mb"],
                "large_mb": hi["peak_rss_mb"], "difference_mb": round(diff, 1), "limit_mb": GOAL_MB,
                "result": "PASS" if abs(diff) < GOAL_MB else "FAIL"}

    result = {"date": date, "machine": {"cpus": os.cpu_count(), "mem_total_gb": round(
        _proc_kb("/proc/meminfo", "MemTotal:") / MB, 1)}, "python": sys.version.split()[0],
              "commit": subprocess.run(["git", "-C", str(REPO), "rev-parse", "--short", "HEAD"], capture_output=True,
                                       text=True).stdout.strip() + " + working tree", "old_commit": args.old_commit,
              "tokenizer": meta, "distill_args": distill_args,
              "rss_method": "prepare: peak of the process tree's summed VmRSS (polled every 0.1 s; PSS sum and the "
                            "largest process's ru_maxrss also given); distill: ru_maxrss (RUSAGE_CHILDREN of a small "
                            "launcher) of the one process",
              "rows": rows, "goal": goal}
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1) + "\n")

    def cell(v, fmt="{:,}"):
        return "-" if v is None else (fmt.format(v) if isinstance(v, (int, float)) else str(v))

    print("\n| name | path | tokens | workers | wall s | data ready s | tokens/s | peak RSS MB | status |")
    print("|---|---|---:|---:|---:|---:|---:|---:|---|")
    for r in rows:
        status = r["status"]
        if "extrapolated_peak_rss_mb" in r:
            status += (f"; EXTRAPOLATED (not measured): ~{r['extrapolated_peak_rss_mb']:,} MB, "
                       f"~{r['extrapolated_data_ready_s']} s to tokenize")
        print(f"| {r['name']} | {r['path']} | {cell(r['tokens'])} | {cell(r['workers'])} | {cell(r['wall_s'])} | "
              f"{cell(r.get('data_ready_s'))} | {cell(r['tokens_per_s'])} | {cell(r['peak_rss_mb'])} | {status} |")
    if goal:
        print(f"\n{goal['what']}: {goal['large_mb']} - {goal['small_mb']} = {goal['difference_mb']} MB "
              f"(limit {GOAL_MB} MB): {goal['result']}")
    print(f"\nresults: {out}")
    if not args.keep:
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
